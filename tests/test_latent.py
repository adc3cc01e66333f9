import dataclasses
import math

import pytest
import torch
from torch.distributions import Independent, Normal, kl_divergence

from genart_utils import latent, training

TINY = latent.AutoencoderConfig(base=8, mults=(1, 2, 2), groups=4, seed=0)


def _images(n: int, seed: int = 0) -> torch.Tensor:
    """Emoji-like test images: smooth colour blobs on white, in [0, 1]."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(32.0), torch.arange(32.0), indexing="ij")
    centres = 8 + 16 * torch.rand(n, 2, generator=g)
    radius = 4 + 8 * torch.rand(n, 1, 1, generator=g)
    inside = ((yy - centres[:, 0, None, None]) ** 2 + (xx - centres[:, 1, None, None]) ** 2) < radius ** 2
    colour = torch.rand(n, 3, 1, 1, generator=g)
    return torch.where(inside[:, None], colour, torch.ones(n, 3, 1, 1)).expand(n, 3, 32, 32).contiguous()


def test_encode_decode_shapes_and_clear_errors_for_wrong_shapes():
    model = latent.KLAutoencoder(TINY).requires_grad_(False)
    x = _images(5)
    mu, logvar = model.encode(x)
    assert mu.shape == logvar.shape == (5, 4, 8, 8) == (5, *model.latent_shape)
    out = model.decode(mu)
    assert out.shape == (5, 3, 32, 32) and 0 <= float(out.min()) and float(out.max()) <= 1
    x_hat, mu2, logvar2 = model(x, torch.Generator().manual_seed(0))
    assert x_hat.shape == x.shape and torch.equal(mu, mu2) and torch.equal(logvar, logvar2)
    # The clamp is the projection onto [0, 1]: never farther from an image than the raw output.
    raw = model.decode(mu, clamp=False)
    assert ((out - x) ** 2 <= (raw - x) ** 2 + 1e-7).all()
    with pytest.raises(ValueError, match=r"shape \(B, 3, 32, 32\).*add the batch axis"):
        model.encode(x[0])
    with pytest.raises(ValueError, match=r"resize other sizes to 32x32"):
        model.encode(torch.rand(2, 3, 28, 28))
    with pytest.raises(ValueError, match=r"shape \(B, 3, 32, 32\)"):
        model.encode(torch.rand(2, 1, 32, 32))
    with pytest.raises(ValueError, match=r"latents of shape \(B, 4, 8, 8\)"):
        model.decode(torch.zeros(2, 4, 16, 16))
    # Other sizes: the grid follows image_size and downsamplings.
    three = latent.AutoencoderConfig(image_size=16, channels=1, latent_channels=2, downsamplings=3,
                                     base=8, mults=(1, 1, 2, 2), groups=4)
    assert three.latent_shape == (2, 2, 2)
    assert latent.KLAutoencoder(three).encode(torch.rand(3, 1, 16, 16))[0].shape == (3, 2, 2, 2)


def test_compression_line_counts_pixels_and_latents():
    line = latent.describe_compression(latent.AutoencoderConfig())
    assert line == "3x32x32 = 3,072 pixel values -> 4x8x8 = 256 latents (12x fewer)"


def test_rate_is_the_closed_form_kl_and_the_distortion_a_summed_squared_error():
    model = latent.KLAutoencoder(TINY).double().requires_grad_(False)
    x = _images(6).double()
    g = torch.Generator().manual_seed(3)
    loss, logged = latent.ae_loss(model, x, g, kl_weight=0.25)
    mu, logvar = model.encode(x)
    q = Independent(Normal(mu.flatten(1), (0.5 * logvar.flatten(1)).exp()), 1)
    p = Independent(Normal(torch.zeros_like(mu.flatten(1)), torch.ones_like(mu.flatten(1))), 1)
    rate = kl_divergence(q, p)                                           # (B,) nats
    assert math.isclose(logged["rate_nats"], float(rate.mean()), rel_tol=1e-9)
    # A Monte Carlo estimate of E_q[log q(z|x) - log p(z)] agrees with the closed form.
    z = q.sample((4000,))
    mc = (q.log_prob(z) - p.log_prob(z)).mean(0)
    torch.testing.assert_close(mc, rate, rtol=0.02, atol=0.5)
    # The same generator state gives the same z, hence the distortion: the loss is D + beta R.
    g.manual_seed(3)
    x_hat, _, _ = model(x, g)
    distortion = ((x_hat - x) ** 2).flatten(1).sum(1)
    assert math.isclose(float(loss), float((distortion + 0.25 * rate).mean()), rel_tol=1e-9)
    assert math.isclose(logged["mse"], float(distortion.mean()) / 3072, rel_tol=1e-9)
    assert math.isclose(latent.decoder_noise(2e-3), math.sqrt(1e-3))
    with pytest.raises(ValueError, match="kl_weight must be a finite number >= 0"):
        latent.ae_loss(model, x, g, kl_weight=-1.0)


def test_evaluate_reports_mse_psnr_and_rate_of_the_deterministic_reconstruction():
    model = latent.KLAutoencoder(TINY).requires_grad_(False)
    x = _images(7)
    result = latent.evaluate(model, x, batch_size=3)
    recon = latent.reconstruct(model, x, batch_size=3)
    mse = float(((recon - x) ** 2).mean())
    assert math.isclose(result["mse"], mse, rel_tol=1e-5)
    assert math.isclose(result["psnr_db"], -10 * math.log10(mse), rel_tol=1e-5)
    mu, logvar = model.encode(x)
    rate = 0.5 * (mu ** 2 + logvar.exp() - 1 - logvar).flatten(1).sum(1).mean()
    assert math.isclose(result["rate_nats"], float(rate), rel_tol=1e-4)
    assert model.training                                 # the mode is put back


def test_a_tiny_autoencoder_overfits_eight_images():
    x = torch.nn.functional.avg_pool2d(_images(8), 2)   # 16x16, to keep the test fast
    baseline = float(((x - x.mean(0)) ** 2).mean())     # the mean image, the best constant guess
    recipe = latent.AutoencoderRecipe(
        autoencoder=dataclasses.replace(TINY, image_size=16), kl_weight=1e-3,
        optim=training.Optimisation(steps=250, batch_size=8, lr=3e-3, warmup=10, ema_decay=0.5))
    model, ema, history = latent.train_autoencoder(recipe, images=x, progress=False)
    assert history.step == 250 and set(history.keys()) == {"loss", "mse", "rate_nats"}
    mse = latent.evaluate(model, x)["mse"]
    assert mse < 0.1 * baseline, (mse, baseline)
    assert history.last("rate_nats") > 0


def test_a_resumed_run_equals_an_uninterrupted_one(tmp_path):
    x = _images(16)
    optim = training.Optimisation(steps=6, batch_size=4, lr=3e-3, warmup=2, ema_decay=0.9, seed=2)
    recipe = latent.AutoencoderRecipe(autoencoder=TINY, optim=optim, kl_weight=1e-2)
    model, ema, history = latent.train_autoencoder(recipe, images=x, progress=False)
    path = tmp_path / "ae.pt"
    short = dataclasses.replace(recipe, optim=dataclasses.replace(optim, steps=3))
    latent.train_autoencoder(short, images=x, checkpoint=str(path), progress=False)
    resumed, resumed_ema, resumed_history = latent.train_autoencoder(recipe, images=x, checkpoint=str(path),
                                                                     progress=False)
    for a, b in zip([*model.parameters(), *ema.model.parameters()],
                    [*resumed.parameters(), *resumed_ema.model.parameters()]):
        assert torch.equal(a, b)
    assert resumed_history.records == history.records
    # The checkpoint rebuilds the recipe (nested configs included) and the weights.
    stored = training.load_checkpoint(path, config_type=latent.AutoencoderRecipe)
    assert stored.config == recipe
    loaded = latent.build_autoencoder(stored.config)
    training.load_checkpoint(path, {"ema": loaded})
    assert all(torch.equal(a, b) for a, b in zip(loaded.parameters(), ema.model.parameters()))
    with pytest.raises(ValueError, match="another recipe"):
        latent.train_autoencoder(dataclasses.replace(recipe, kl_weight=0.5), images=x,
                                 checkpoint=str(path), progress=False)


def test_latent_scale_makes_the_encoder_means_unit_std():
    model = latent.KLAutoencoder(TINY)
    x = _images(20)
    scale = latent.latent_scale(model, x, batch_size=6)
    mu = latent.encode_images(model, x)
    assert math.isclose(float((scale * mu).std()), 1.0, rel_tol=1e-5)
    torch.testing.assert_close(mu, model.encode(x)[0].detach())
    draws = latent.encode_images(model, x, generator=torch.Generator().manual_seed(0))
    assert draws.shape == mu.shape and not torch.equal(draws, mu)
    torch.testing.assert_close(latent.decode_latents(model, mu, batch_size=7), latent.reconstruct(model, x))


def test_same_seed_same_weights_and_the_global_rng_untouched():
    state = torch.get_rng_state()
    a, b = latent.KLAutoencoder(TINY), latent.KLAutoencoder(TINY)
    assert torch.equal(torch.get_rng_state(), state)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    c = latent.KLAutoencoder(dataclasses.replace(TINY, seed=1))
    assert not torch.equal(a.encoder.net[0].weight, c.encoder.net[0].weight)


@pytest.mark.parametrize("kwargs, message", [
    (dict(base=0), r"AutoencoderConfig.base must be a positive int"),
    (dict(latent_channels=2.5), r"AutoencoderConfig.latent_channels must be a positive int"),
    (dict(mults=(1, 2)), r"2 downsamplings need 3 levels, so mults needs 3 entries, got 2"),
    (dict(mults=(1, 0, 2)), r"mults must be a non-empty tuple of positive ints"),
    (dict(image_size=30), r"image_size=30 cannot be halved 2 times \(it must be a multiple of 4\)"),
    (dict(base=12, groups=8), r"groups=8 must divide every width, but the widths \[12\]"),
])
def test_config_validation_names_the_field_and_the_fix(kwargs, message):
    with pytest.raises(ValueError, match=message):
        latent.AutoencoderConfig(**kwargs)


def test_recipe_validation_and_rebuilding_from_a_dict():
    with pytest.raises(ValueError, match=r"AutoencoderRecipe.kl_weight must be a finite number >= 0"):
        latent.AutoencoderRecipe(kl_weight=-0.1)
    with pytest.raises(TypeError, match=r"AutoencoderRecipe.optim must be a Optimisation"):
        latent.AutoencoderRecipe(optim=3)
    with pytest.raises(ValueError, match=r"AutoencoderRecipe.dataset must be a dataset name"):
        latent.AutoencoderRecipe(dataset="")
    recipe = latent.AUTOENCODER_RECIPE
    as_dicts = latent.AutoencoderRecipe(**{**dataclasses.asdict(recipe),
                                           "autoencoder": {**dataclasses.asdict(recipe.autoencoder),
                                                           "mults": list(recipe.autoencoder.mults)}})
    assert as_dicts == recipe
    assert latent.AutoencoderConfig(mults=[1, 2, 2]).mults == (1, 2, 2)
    with pytest.raises(TypeError, match="AutoencoderRecipe or AutoencoderConfig"):
        latent.build_autoencoder(training.Optimisation())
    with pytest.raises(ValueError, match=r"images have shape \(3, 32, 32\), but the autoencoder takes \(1, 32, 32\)"):
        latent.training_images(latent.AutoencoderRecipe(autoencoder=latent.AutoencoderConfig(channels=1)))

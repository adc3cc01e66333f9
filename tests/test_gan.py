import math

import pytest
import torch

from genart_utils import data, gan, metrics, training


def test_losses_at_d_equal_half():
    zero = torch.zeros(7)  # logit 0 <=> D = 1/2 everywhere
    assert math.isclose(float(gan.value_function(zero, zero)), -math.log(4), rel_tol=1e-6)
    assert math.isclose(float(gan.discriminator_loss(zero, zero)), math.log(4), rel_tol=1e-6)
    assert math.isclose(float(gan.generator_loss(zero, "non_saturating")), math.log(2), rel_tol=1e-6)
    assert math.isclose(float(gan.generator_loss(zero, "saturating")), -math.log(2), rel_tol=1e-6)


def test_losses_from_logits_equal_losses_from_probabilities():
    g = torch.Generator().manual_seed(0)
    real, fake = torch.randn(50, generator=g, dtype=torch.float64), torch.randn(60, generator=g, dtype=torch.float64)
    d_real, d_fake = torch.sigmoid(real), torch.sigmoid(fake)
    torch.testing.assert_close(gan.discriminator_loss(real, fake),
                               -(d_real.log().mean() + (1 - d_fake).log().mean()))
    torch.testing.assert_close(gan.generator_loss(fake, "non_saturating"), -d_fake.log().mean())
    torch.testing.assert_close(gan.generator_loss(fake, "saturating"), (1 - d_fake).log().mean())


def test_losses_stay_finite_where_probabilities_saturate():
    extreme = torch.tensor([-200.0, 200.0])  # sigmoid rounds to exactly 0 and 1 in float32
    assert torch.sigmoid(extreme).tolist() == [0.0, 1.0]
    for value in (gan.discriminator_loss(extreme, extreme), gan.generator_loss(extreme),
                  gan.generator_loss(extreme, "saturating")):
        assert torch.isfinite(value)
    # -log D(G(z)) for a confidently rejected sample is the logit's magnitude.
    assert math.isclose(float(gan.generator_loss(torch.tensor([-200.0]))), 200.0, rel_tol=1e-6)
    with pytest.raises(ValueError, match="unknown generator loss"):
        gan.generator_loss(extreme, "wasserstein")


def test_generator_loss_gradients_wrt_logit():
    logits = torch.tensor([-6.0, 0.0, 6.0], requires_grad=True)
    (g_sat,) = torch.autograd.grad(gan.generator_loss(logits, "saturating") * 3, logits)
    (g_ns,) = torch.autograd.grad(gan.generator_loss(logits, "non_saturating") * 3, logits)
    d = torch.sigmoid(logits.detach())
    torch.testing.assert_close(g_sat, -d)          # vanishes as D -> 0
    torch.testing.assert_close(g_ns, -(1 - d))     # largest as D -> 0


def test_dcgan_shapes_and_init():
    cfg = gan.DCGANConfig(latent_dim=16, g_width=8, d_width=8)
    G, D = gan.build_dcgan(cfg)
    z = torch.randn(5, 16)
    x = G(z)
    assert x.shape == (5, 1, 28, 28) and x.abs().max() <= 1
    assert D(x).shape == (5,)
    w = G.net[0].weight
    assert abs(float(w.detach().std()) - 0.02) < 0.005


def test_mlp_gan_shapes():
    cfg = gan.MLPGANConfig(hidden=16, depth=2)
    assert gan.MLPGenerator(cfg)(torch.randn(4, 2)).shape == (4, 2)
    assert gan.MLPDiscriminator(cfg)(torch.randn(4, 2)).shape == (4,)


def test_sample_is_deterministic_under_a_seed_and_restores_mode():
    G, _ = gan.build_dcgan(gan.DCGANConfig(latent_dim=8, g_width=4, d_width=4))
    a = gan.sample(G, 6, generator=torch.Generator().manual_seed(3))
    b = gan.sample(G, 6, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b) and G.training
    assert not torch.equal(a, gan.sample(G, 6, generator=torch.Generator().manual_seed(4)))


def test_slerp_end_points_and_norm():
    g = torch.Generator().manual_seed(0)
    z0, z1 = torch.randn(64, generator=g), torch.randn(64, generator=g)
    path = gan.slerp(z0, z1, torch.linspace(0, 1, 5))
    torch.testing.assert_close(path[0], z0)
    torch.testing.assert_close(path[-1], z1)
    assert path.norm(dim=1).min() > 0.9 * min(z0.norm(), z1.norm())


def test_tiny_gan_covers_more_modes_after_training():
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    x, centers = data.ring_of_gaussians(4096, modes=8, radius=2.0, std=0.05, generator=g)
    cfg = gan.MLPGANConfig(hidden=64, depth=2, lr=2e-3)
    G, D = gan.MLPGenerator(cfg), gan.MLPDiscriminator(cfg)
    opt_g, opt_d = gan.adam_pair(G, D, cfg.lr, cfg.beta1)

    def coverage():
        with torch.no_grad():
            s = G(torch.randn(2000, 2, generator=torch.Generator().manual_seed(1)))
        return metrics.mode_coverage(s, centers, std=0.05, threshold=4.0)

    before = coverage()
    step = gan.make_train_step(G, D, opt_g, opt_d, latent_dim=2, generator=g)
    training.train(step, training.minibatches(x, batch_size=256), 800, progress=False)
    after = coverage()
    assert after["modes_covered"] >= before["modes_covered"] + 3
    assert after["high_quality"] > before["high_quality"]

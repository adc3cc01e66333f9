"""Text to image (genart_utils.text2img): classifier-free guidance with the empty caption, a
tiny pipeline that overfits one caption, the recipe's checks and bad prompts. The parts are
tiny and untrained where training them does not matter."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from genart_utils import clip, diffusion, latent, text2img, training
from genart_utils.diffusion import NoiseSchedule, ScheduleConfig

TINY_AE = latent.AutoencoderRecipe(autoencoder=latent.AutoencoderConfig(base=8, groups=4),
                                   optim=training.Optimisation(steps=2, batch_size=8, warmup=0))
TINY_TEXT = clip.TextEncoderConfig(n_layer=1, n_head=2, n_embd=16)
TINY_CLIP = clip.CLIPRecipe(clip=clip.CLIPConfig(text=TINY_TEXT, image=clip.ImageEncoderConfig(widths=(8, 16), groups=4),
                                                 embed_dim=16),
                            optim=training.Optimisation(steps=2, batch_size=8, warmup=0))


def tiny_recipe(**kwargs) -> text2img.LatentDiffusionRecipe:
    unet = text2img.latent_unet(TINY_AE.autoencoder, TINY_TEXT, base=16, heads=2)
    unet = dataclasses.replace(unet, groups=4)
    return text2img.LatentDiffusionRecipe(
        autoencoder_name="tiny-ae", autoencoder=TINY_AE, clip_name="tiny-clip", clip=TINY_CLIP, unet=unet,
        optim=training.Optimisation(steps=3, batch_size=8, warmup=0), **kwargs)


def test_guidance_0_is_the_unconditional_path_which_is_the_empty_caption():
    model = text2img.build_latent_diffusion(tiny_recipe()).eval()
    core = model.net
    tokens = core.tokenizer.encode(["red apple", "grinning face"])
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([5, 60])
    unconditional = model(x, t)                                   # no caption at all
    assert torch.allclose(diffusion.guided_eps(model, x, t, tokens, guidance=0.0), unconditional, atol=1e-5)
    assert torch.allclose(model(x, t, core.tokenizer.encode(["", ""])), unconditional, atol=1e-6)
    conditional = model(x, t, tokens)
    assert not torch.allclose(conditional, unconditional)
    assert torch.allclose(diffusion.guided_eps(model, x, t, tokens, guidance=1.0), conditional, atol=1e-6)
    w = 3.0
    assert torch.allclose(diffusion.guided_eps(model, x, t, tokens, guidance=w),
                          unconditional + w * (conditional - unconditional), atol=1e-4)


def test_padding_after_the_longest_caption_changes_nothing():
    model = text2img.build_latent_diffusion(tiny_recipe()).eval()
    tokens = model.net.tokenizer.encode(["cat", "dog face"])
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([1, 2])
    assert torch.allclose(model(x, t, tokens), model(x, t, tokens[:, :10]), atol=1e-6)


def test_a_tiny_pipeline_overfits_one_caption():
    recipe = tiny_recipe()                                      # v-prediction, as the chapter's
    ae = latent.build_autoencoder(TINY_AE).eval()
    model = text2img.build_latent_diffusion(recipe)
    target = torch.randn(1, 4, 8, 8)                            # the one (scaled) latent of the caption
    tokens = model.net.tokenizer.encode(["red apple"])
    schedule = NoiseSchedule(recipe.schedule)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    for _ in range(450):
        t = torch.randint(0, schedule.T, (16,), generator=g)
        noise = torch.randn(16, 4, 8, 8, generator=g)
        loss = diffusion.simple_loss(model, schedule, target.expand(16, -1, -1, -1), t, noise,
                                     tokens.expand(16, -1), weighting="v")
        opt.zero_grad()
        loss.backward()
        opt.step()
    pipe = text2img.TextToImage(ae, model.eval(), schedule)
    z = pipe.latents(["red apple"] * 4, guidance=1.0, steps=20, seed=1)
    error = ((z - target) ** 2).mean() / (target ** 2).mean()
    assert error < 0.1, float(error)                            # untrained: about 2
    images = pipe(["red apple"], guidance=2.0, steps=5)
    assert images.shape == (1, 3, 32, 32) and 0 <= images.min() and images.max() <= 1


def test_bad_prompts_get_clear_errors_and_the_empty_prompt_means_no_caption():
    recipe = tiny_recipe()
    pipe = text2img.TextToImage(latent.build_autoencoder(TINY_AE).eval(),
                                text2img.build_latent_diffusion(recipe).eval(), NoiseSchedule(recipe.schedule))
    with pytest.raises(ValueError, match="outside|not in|alphabet"):
        pipe(["red apple ☺"], steps=2)
    with pytest.raises(ValueError, match="80"):
        pipe(["a" * 81], steps=2)
    with pytest.raises(TypeError, match="list of strings"):
        pipe("red apple", steps=2)
    assert torch.equal(pipe.tokens(["  "]), pipe.tokens([""]))   # blank prompts: no caption
    assert torch.equal(pipe.tokens(["Red Apple"]), pipe.tokens(["red apple"]))


def test_recipe_checks_that_the_parts_fit_and_rebuilds_from_a_checkpoint(tmp_path):
    recipe = tiny_recipe()
    with pytest.raises(ValueError, match="latents are"):
        dataclasses.replace(recipe, unet=dataclasses.replace(recipe.unet, channels=3))
    with pytest.raises(ValueError, match="context_dim"):
        text2img.TextConditionedUNet(dataclasses.replace(recipe.unet, context_dim=8), TINY_TEXT)
    path = training.save_checkpoint(tmp_path / "r.pt", {}, config=recipe)
    assert training.load_checkpoint(path, config_type=text2img.LatentDiffusionRecipe).config == recipe


def test_training_copies_the_text_encoder_and_scales_the_latents(tmp_path):
    recipe = tiny_recipe()
    ae, clip_model = latent.build_autoencoder(TINY_AE).eval(), clip.build_clip(TINY_CLIP).eval()
    model, ema, history = text2img.train_latent_diffusion(recipe, parts=(ae, clip_model), progress=False,
                                                          checkpoint=str(tmp_path / "ldm.pt"))
    assert history.step == 3
    core = ema.model.net
    for a, b in zip(core.text.parameters(), clip_model.text.parameters()):
        assert torch.equal(a, b)                                 # frozen: still CLIP's weights
    assert not any(p.requires_grad for p in model.net.text.parameters())
    from genart_utils.data import load_dataset
    images = load_dataset("openmoji", "train", size=32).images
    assert float(core.latent_scale) == pytest.approx(latent.latent_scale(ae, images), rel=1e-5)


@pytest.mark.parametrize("mode", text2img.BLEND_MODES)
def test_a_prompt_blend_is_each_prompt_at_its_ends_and_no_caption_for_nan(mode):
    model = text2img.build_latent_diffusion(tiny_recipe()).eval()
    core = model.net
    blend = text2img.PromptBlend(core, "red apple", "cat", mode)     # captions of different lengths
    x, t = torch.randn(3, 4, 8, 8), torch.tensor([5, 60, 900])
    a, b = core(x, t, core.tokenizer.encode(["red apple"] * 3)), core(x, t, core.tokenizer.encode(["cat"] * 3))
    assert torch.allclose(blend(x, t, torch.zeros(3)), a, atol=1e-5)
    assert torch.allclose(blend(x, t, torch.ones(3)), b, atol=1e-5)
    assert torch.allclose(blend(x, t, torch.full((3,), float("nan"))), core(x, t), atol=1e-5)
    middle = blend(x, t, torch.full((3,), 0.5))
    assert not torch.allclose(middle, a, atol=1e-3) and not torch.allclose(middle, b, atol=1e-3)
    if mode == "score":                     # a convex mix of the two noise estimates
        assert torch.allclose(middle, 0.5 * (a + b), atol=1e-5)
    # guidance through the v-prediction wrapper: the NaN row is the unconditional half
    wrapped = diffusion.VPrediction(blend, NoiseSchedule(ScheduleConfig()))
    assert torch.allclose(diffusion.guided_eps(wrapped, x, t, torch.zeros(3), guidance=2.0),
                          diffusion.guided_eps(model, x, t, core.tokenizer.encode(["red apple"] * 3), guidance=2.0),
                          atol=1e-4)
    with pytest.raises(ValueError, match=r"values in \[0, 1\]"):
        blend(x, t, torch.tensor([0.0, 1.5, 0.2]))
    with pytest.raises(ValueError, match="mode must be one of"):
        text2img.PromptBlend(core, "a", "b", "average")

"""Co-creation tools (genart_utils.cocreate): SDEdit, inpainting with resampling, interactive
evolution, interpolation strips and provenance, on tiny untrained denoisers and toy codes."""

from __future__ import annotations

import pytest
import torch

from genart_utils import cocreate, data, diffusion
from genart_utils.diffusion import NoiseSchedule, ScheduleConfig, UNet, UNetConfig

SCHEDULE = NoiseSchedule(ScheduleConfig(T=50))


@pytest.fixture(scope="module")
def unet():
    return UNet(UNetConfig(image_size=8, channels=3, base=8, mults=(1, 2), attention_at=(), groups=4,
                           n_classes=3)).eval()


def images(n=2, seed=0):
    return torch.rand(n, 3, 8, 8, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def test_sdedit_at_strength_0_returns_the_input(unet):
    x0 = images()
    assert torch.equal(cocreate.sdedit(unet, SCHEDULE, x0, 0.0, generator=torch.Generator().manual_seed(0)), x0)
    assert cocreate.start_index(0.0, 1000) == -1 and cocreate.start_index(1.0, 1000) == 999
    assert cocreate.start_index(0.25, 1000) == 249


def test_sdedit_is_the_forward_process_then_ddim_from_that_step(unet):
    x0, strength, steps = images(), 0.5, 10
    out = cocreate.sdedit(unet, SCHEDULE, x0, strength, steps=steps, generator=torch.Generator().manual_seed(1))
    # by hand: noise to index 24 with the generator's first draw, then 5 DDIM steps from 24 down to 0
    g = torch.Generator().manual_seed(1)
    start = 24
    x_t = SCHEDULE.q_sample(x0, torch.full((2,), start), torch.randn(x0.shape, generator=g))
    ts = [int(v) for v in torch.linspace(start, 0, 5).round()]
    x = x_t
    for i, t in enumerate(ts):
        x, _ = diffusion.reverse_step(unet, SCHEDULE, x, t, ts[i + 1] if i + 1 < len(ts) else -1)
    assert torch.allclose(out, x, atol=1e-6)
    # more strength forgets more of the input; labels condition the edit
    weak = cocreate.sdedit(unet, SCHEDULE, x0, 0.1, generator=torch.Generator().manual_seed(1))
    assert (weak - x0).abs().mean() < (out - x0).abs().mean()
    labelled = cocreate.sdedit(unet, SCHEDULE, x0, strength, steps=steps, labels=torch.tensor([0, 2]),
                               generator=torch.Generator().manual_seed(1))
    assert labelled.shape == x0.shape and not torch.allclose(labelled, out)
    with pytest.raises(ValueError, match="strength must be a number in"):
        cocreate.sdedit(unet, SCHEDULE, x0, 1.5)


def test_sample_with_start_refuses_ddpm_and_a_missing_state(unet):
    with pytest.raises(ValueError, match="needs method='ddim'"):
        diffusion.sample(unet, SCHEDULE, (1, 3, 8, 8), method="ddpm", start=10, x_T=torch.zeros(1, 3, 8, 8))
    with pytest.raises(ValueError, match="from 1 to 11 "):
        SCHEDULE.timesteps(12, start=10)
    assert SCHEDULE.timesteps(3, start=10).tolist() == [10, 5, 0]


@pytest.mark.parametrize("resample", [1, 3])
def test_inpainting_never_changes_the_known_pixels(unet, resample):
    x0 = images(3)
    mask = cocreate.box_mask(8, 2, 3, 4, 3)
    out = cocreate.inpaint(unet, SCHEDULE, x0, mask, steps=6, resample=resample,
                           generator=torch.Generator().manual_seed(0))
    keep = mask.expand_as(x0) == 0
    assert torch.equal(out[keep], x0[keep])
    assert not torch.allclose(out[~keep], x0[~keep])
    again = cocreate.inpaint(unet, SCHEDULE, x0, mask, steps=6, resample=resample,
                             generator=torch.Generator().manual_seed(0))
    assert torch.equal(out, again)


def test_inpainting_refuses_bad_masks_with_what_to_do(unet):
    x0 = images()
    with pytest.raises(ValueError, match="the mask is empty"):
        cocreate.inpaint(unet, SCHEDULE, x0, torch.zeros(1, 1, 8, 8), steps=2)
    with pytest.raises(ValueError, match="0 .keep the pixel. and 1"):
        cocreate.inpaint(unet, SCHEDULE, x0, torch.full((1, 1, 8, 8), 0.5), steps=2)
    with pytest.raises(ValueError, match="mask must be"):
        cocreate.inpaint(unet, SCHEDULE, x0, torch.ones(1, 1, 4, 4), steps=2)
    with pytest.raises(ValueError, match="resample must be a positive int"):
        cocreate.inpaint(unet, SCHEDULE, x0, cocreate.box_mask(8, 0, 0, 2, 2), steps=2, resample=0)
    with pytest.raises(ValueError, match="must lie inside"):
        cocreate.box_mask(8, 6, 0, 4, 2)


def test_seam_error_counts_only_pairs_across_the_boundary():
    img = torch.zeros(1, 1, 4, 4)
    img[..., :, 2:] = 1.0                   # a vertical edge between columns 1 and 2
    mask = torch.zeros(1, 1, 4, 4)
    mask[..., :, 2:] = 1                    # ... which is exactly the mask's boundary
    assert cocreate.seam_error(img, mask).item() == pytest.approx(1.0)
    mask2 = torch.zeros(1, 1, 4, 4)
    mask2[..., :, 3:] = 1                   # boundary between columns 2 and 3: both 1 there
    assert cocreate.seam_error(img, mask2).item() == pytest.approx(0.0)
    with pytest.raises(ValueError, match="no boundary"):
        cocreate.seam_error(img, torch.zeros(1, 1, 4, 4))


def test_next_generation_keeps_favourites_first_and_is_deterministic_per_seed():
    z = torch.randn(8, 5, generator=torch.Generator().manual_seed(0))
    a = cocreate.next_generation(z, [3, 6], generator=torch.Generator().manual_seed(1))
    b = cocreate.next_generation(z, [3, 6], generator=torch.Generator().manual_seed(1))
    c = cocreate.next_generation(z, [3, 6], generator=torch.Generator().manual_seed(2))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.shape == z.shape and torch.equal(a[0], z[3]) and torch.equal(a[1], z[6])
    # one favourite and no mutation: every child is a copy of it
    clones = cocreate.next_generation(z, [2], mutation=0.0, generator=torch.Generator().manual_seed(0))
    assert torch.equal(clones, z[2].expand(8, -1))
    for bad, message in (([], "pick at least one favourite"), ([9], r"indices in \[0, 8\)")):
        with pytest.raises(ValueError, match=message):
            cocreate.next_generation(z, bad)


def test_mutation_keeps_standard_gaussian_codes_standard():
    z = torch.randn(20000, 4, generator=torch.Generator().manual_seed(0))
    child = cocreate.next_generation(z, [0], size=20001, mutation=0.6, generator=torch.Generator().manual_seed(1))
    # children of a single parent: sqrt(1 - 0.36) z_0 + 0.6 eps: mean 0.8 z_0, variance 0.36
    kids = child[1:]
    assert torch.allclose(kids.mean(0), 0.8 * z[0], atol=0.02)
    assert torch.allclose(kids.var(0), torch.full((4,), 0.36), atol=0.02)


def test_evolution_selects_on_a_toy_fitness_and_random_picks_do_not():
    z0 = torch.randn(8, 16, generator=torch.Generator().manual_seed(0))
    fitness = lambda codes: codes[:, 0]                     # noqa: E731 - the "image" is the code

    def by_fitness(codes):
        return cocreate.top(fitness(codes), 2)

    def at_random(codes, g=torch.Generator().manual_seed(5)):
        return torch.randperm(len(codes), generator=g)[:2].tolist()

    chosen = cocreate.evolve(z0, lambda c: c, by_fitness, 12, seed=0)
    random = cocreate.evolve(z0, lambda c: c, at_random, 12, seed=0)
    best = [fitness(g).mean().item() for g in chosen.images]
    assert best[-1] > best[0] + 1.0
    assert best[-1] > fitness(random.images[-1]).mean().item() + 1.0
    replay = cocreate.evolve(z0, lambda c: c, by_fitness, 12, seed=0)
    assert all(torch.equal(a, b) for a, b in zip(chosen.latents, replay.latents))
    assert chosen.picks == replay.picks


def test_redness_and_top():
    imgs = torch.ones(3, 3, 2, 2)                         # white
    imgs[1, 1:] = 0                                       # pure red
    imgs[2, 2] = 0                                        # yellow
    assert cocreate.redness(imgs).tolist() == [0.0, 1.0, 0.0]
    assert cocreate.top(torch.tensor([0.1, 0.9, 0.5]), 2) == [1, 2]


def test_slerp_strip_ends_at_both_codes_and_keeps_the_norm_of_equal_norm_codes():
    a = torch.randn(3, 4, 4, generator=torch.Generator().manual_seed(0))
    b = torch.randn(3, 4, 4, generator=torch.Generator().manual_seed(1))
    b = b * a.norm() / b.norm()
    strip = cocreate.slerp_strip(a, b, 5)
    assert strip.shape == (5, 3, 4, 4)
    assert torch.allclose(strip[0], a, atol=1e-6) and torch.allclose(strip[-1], b, atol=1e-6)
    assert torch.allclose(strip.flatten(1).norm(dim=1), a.norm().expand(5), rtol=1e-5)


def test_provenance_finds_the_nearest_training_images_by_brute_force():
    train = data.ImageDataset(torch.rand(30, 3, 4, 4, generator=torch.Generator().manual_seed(0)),
                              torch.zeros(30, dtype=torch.long), "toy", "train",
                              captions=tuple(f"emoji {i}" for i in range(30)))
    queries = train.images[[4, 17]] + 0.01
    found = cocreate.provenance(queries, train, k=3, copy_distance=0.5)
    for q, p in zip(queries, found):
        d = (train.images - q).flatten(1).norm(dim=1)
        assert list(p.indices) == d.argsort()[:3].tolist()
        assert p.closer_than_held_out
    assert found[0].names[0] == "emoji 4" and "CC BY-SA 4.0" in found[0].licence
    assert "emoji 4" in found[0].describe()


def test_strip_steps_of_an_even_straight_strip_are_equal_and_sum_to_the_end_to_end_distance():
    a, b = torch.zeros(3, 4, 4), torch.ones(3, 4, 4)
    strip = torch.stack([a + (b - a) * k / 4 for k in range(5)])
    steps = cocreate.strip_steps(strip)
    assert torch.allclose(steps, steps[0].expand(4))
    assert steps.sum().item() == pytest.approx((b - a).norm().item())
    with pytest.raises(ValueError, match="at least two images"):
        cocreate.strip_steps(strip[:1])

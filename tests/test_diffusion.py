"""Diffusion (genart_utils.diffusion): the forward process against a simulated chain, the
posterior against brute force, the samplers' noise, guidance, the bound in bits per dimension,
training on one batch, EMA, resuming the recipe, and clear errors for bad input.

Every model here is tiny and every check runs in well under a second or two on one CPU thread.
Monte Carlo checks use fixed generators and tolerances of a few standard errors.
"""

from __future__ import annotations

import dataclasses
import math

import mpmath
import pytest
import torch
from torch import nn

from genart_utils import data, diffusion, distributions, metrics
from genart_utils.diffusion import (MLPDenoiser, MLPDenoiserConfig, NoiseSchedule, ScheduleConfig,
                                    UNet, UNetConfig)

# A conditional U-Net on 8x8 RGB: levels 8 and 4, attention at 4 (about 20 k parameters).
TINY_UNET = UNetConfig(image_size=8, channels=3, base=8, mults=(1, 2), attention_at=(4,), groups=4,
                       n_classes=3, seed=0)
# The same at 16x16 through a 2x2 pixel unshuffle: the U-Net itself runs at 8x8.
PATCH_UNET = dataclasses.replace(TINY_UNET, image_size=16, patch=2, base=16, n_classes=0)
TINY_MLP = MLPDenoiserConfig(dim=2, hidden=64, layers=2, time_dim=16, seed=0)
SCHEDULES = [ScheduleConfig(T=100, kind="linear", beta_start=1e-3, beta_end=0.05),
             ScheduleConfig(T=100, kind="cosine")]


class ZeroDenoiser(nn.Module):
    """Predicts no noise at all: the sampler's randomness is then all that moves x_t. Keeps
    the states it was called on, unclamped, in the model's range."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def forward(self, x, t, labels=None):
        self.seen.append(x.clone())
        return torch.zeros_like(x)


def _images(n: int, config: UNetConfig, seed: int = 0) -> torch.Tensor:
    """Random 8-bit images (values k / 255) of the config's shape."""
    g = torch.Generator().manual_seed(seed)
    shape = (n, config.channels, config.image_size, config.image_size)
    return torch.randint(0, 256, shape, generator=g).float() / 255


# ------------------------------------------------------------------------ forward process

@pytest.mark.parametrize("config", SCHEDULES, ids=lambda c: c.kind)
def test_closed_form_q_xt_given_x0_matches_the_simulated_chain(config):
    sched = NoiseSchedule(config)
    n = 20_000
    g = torch.Generator().manual_seed(0)
    x0 = torch.tensor([-1.0, 0.3, 1.0], dtype=torch.float64).repeat(n, 1)     # (n, 3)
    x = x0.clone()
    checked = 0
    for t in range(sched.T):          # x_{t+1} = sqrt(1 - beta) x_t + sqrt(beta) z, paper numbering
        beta = float(sched.betas[t])
        x = math.sqrt(1 - beta) * x + math.sqrt(beta) * torch.randn(x.shape, generator=g, dtype=x.dtype)
        if t in (0, 5, 30, sched.T - 1):
            mean, var = sched.q_mean_var(x0[:1], torch.tensor([t]))          # (1, 3), (1, 1)
            var = float(var)
            se_mean = math.sqrt(var / n)
            se_var = var * math.sqrt(2 / (n - 1))
            assert (x.mean(0) - mean[0]).abs().max() < 5 * se_mean, t
            assert (x.var(0) - var).abs().max() < 5 * se_var, t
            # q_sample is the same Gaussian: its draws agree with the closed-form moments
            noise = torch.randn(x.shape, generator=g, dtype=x.dtype)
            direct = sched.q_sample(x0, torch.full((n,), t), noise)
            torch.testing.assert_close(direct, mean + math.sqrt(var) * noise)
            checked += 1
    assert checked == 4
    assert torch.all(sched.betas > 0) and torch.all(sched.betas < 1)
    assert torch.all(sched.alpha_bars[1:] < sched.alpha_bars[:-1])
    torch.testing.assert_close(sched.sigmas ** 2, 1 - sched.alpha_bars)


def test_predict_x0_and_predict_eps_invert_q_sample():
    sched = NoiseSchedule(SCHEDULES[0])
    g = torch.Generator().manual_seed(1)
    x0 = torch.rand(6, 3, 4, 4, generator=g) * 2 - 1
    noise = torch.randn(x0.shape, generator=g)
    t = torch.tensor([0, 1, 10, 50, 98, 99])
    x_t = sched.q_sample(x0, t, noise)
    assert x_t.dtype == torch.float32 and x_t.shape == x0.shape
    torch.testing.assert_close(sched.predict_x0(x_t, t, noise), x0, atol=2e-4, rtol=0)
    torch.testing.assert_close(sched.predict_eps(x_t, t, x0), noise, atol=1e-4, rtol=0)


# ------------------------------------------------------------------------ posterior

@pytest.mark.parametrize("config", SCHEDULES, ids=lambda c: c.kind)
def test_posterior_matches_the_joint_gaussians_conditional_and_bayes_on_a_grid(config):
    sched = NoiseSchedule(config)
    for t, x0, x_t in [(1, 0.5, 0.2), (7, -1.0, 0.9), (40, 0.3, -1.5), (99, 1.0, 0.0)]:
        ab_prev, ab, alpha = (float(v) for v in (sched.alpha_bars[t - 1], sched.alpha_bars[t],
                                                  sched.alphas[t]))
        # (x_{t}, x_{t+1}) given x0 is jointly Gaussian (paper numbering: x_{t-1}, x_t)
        m = torch.tensor([math.sqrt(ab_prev) * x0, math.sqrt(ab) * x0], dtype=torch.float64)
        v1 = 1 - ab_prev
        cov = torch.tensor([[v1, math.sqrt(alpha) * v1],
                            [math.sqrt(alpha) * v1, alpha * v1 + 1 - alpha]], dtype=torch.float64)
        cond_mean = m[0] + cov[0, 1] / cov[1, 1] * (x_t - m[1])
        cond_var = cov[0, 0] - cov[0, 1] ** 2 / cov[1, 1]
        mean, var = sched.posterior(torch.tensor([[x0]], dtype=torch.float64),
                                    torch.tensor([[x_t]], dtype=torch.float64), torch.tensor([t]))
        torch.testing.assert_close(mean.flatten()[0], cond_mean, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(var.flatten()[0], cond_var, rtol=1e-10, atol=1e-14)
        torch.testing.assert_close(var.flatten()[0], sched.posterior_variance[t])
        # Bayes' rule on a grid: prior q(x_{t-1} | x0) times likelihood q(x_t | x_{t-1})
        lik_centre, lik_sd = x_t / math.sqrt(alpha), math.sqrt((1 - alpha) / alpha)
        prior_centre, prior_sd = float(m[0]), math.sqrt(v1)
        lo = min(lik_centre - 12 * lik_sd, prior_centre - 12 * prior_sd)
        hi = max(lik_centre + 12 * lik_sd, prior_centre + 12 * prior_sd)
        grid = torch.linspace(lo, hi, 400_001, dtype=torch.float64)
        log_post = (-0.5 * (grid - prior_centre) ** 2 / v1
                    - 0.5 * (x_t - math.sqrt(alpha) * grid) ** 2 / (1 - alpha))
        w = torch.exp(log_post - log_post.max())
        w = w / w.sum()
        grid_mean = (w * grid).sum()
        grid_var = (w * (grid - grid_mean) ** 2).sum()
        assert abs(float(mean) - float(grid_mean)) < 1e-6 * max(1.0, math.sqrt(float(var)))
        assert abs(float(var) / float(grid_var) - 1) < 1e-4, (t, float(var), float(grid_var))


def test_posterior_at_the_first_step_is_the_data_itself():
    sched = NoiseSchedule(SCHEDULES[0])
    x0 = torch.tensor([[0.25, -0.5]], dtype=torch.float64)
    mean, var = sched.posterior(x0, torch.tensor([[3.0, -2.0]], dtype=torch.float64), torch.tensor([0]))
    torch.testing.assert_close(mean, x0)
    assert float(var) == 0.0 and float(sched.posterior_variance[0]) == 0.0


# ------------------------------------------------------------------------ samplers

def test_timesteps_are_distinct_decreasing_and_span_the_chain():
    sched = NoiseSchedule(ScheduleConfig(T=1000))
    assert torch.equal(sched.timesteps(1000), torch.arange(999, -1, -1))
    assert sched.timesteps(1).tolist() == [999]
    for steps in (2, 10, 25, 50, 100, 333, 999):
        ts = sched.timesteps(steps)
        assert len(ts) == steps and ts[0] == 999 and ts[-1] == 0
        assert torch.all(ts[1:] < ts[:-1]), steps


def _mlp_and_schedule(T: int = 50):
    return MLPDenoiser(TINY_MLP), NoiseSchedule(ScheduleConfig(T=T, beta_start=1e-3, beta_end=0.1))


def test_ddim_with_eta_0_is_deterministic_given_x_T():
    model, sched = _mlp_and_schedule()
    x_T = torch.randn(16, 2, generator=torch.Generator().manual_seed(3))
    runs = [diffusion.sample(model, sched, (16, 2), method="ddim", steps=steps, eta=0.0, x_T=x_T,
                             generator=torch.Generator().manual_seed(seed))
            for steps in (10, 50) for seed in (0, 1)]
    assert torch.equal(runs[0], runs[1]) and torch.equal(runs[2], runs[3])
    # without x_T the two seeds start elsewhere and end elsewhere: the check above can fail
    a, b = (diffusion.sample(model, sched, (16, 2), method="ddim", steps=10,
                             generator=torch.Generator().manual_seed(seed)) for seed in (0, 1))
    assert not torch.allclose(a, b)
    # with eta > 0 the generator matters even with the same x_T
    c, d = (diffusion.sample(model, sched, (16, 2), method="ddim", steps=10, eta=0.5, x_T=x_T,
                             generator=torch.Generator().manual_seed(seed)) for seed in (0, 1))
    assert not torch.allclose(c, d)
    assert model.training                 # sample() puts the model back in its mode


def test_ddim_with_eta_1_over_all_steps_is_ddpm():
    model, sched = _mlp_and_schedule()
    for clip in (True, False):
        ddpm, ddpm_path = diffusion.sample(model, sched, (64, 2), method="ddpm", clip_x0=clip,
                                           generator=torch.Generator().manual_seed(5), trajectory=True)
        ddim, ddim_path = diffusion.sample(model, sched, (64, 2), method="ddim", steps=sched.T, eta=1.0,
                                           clip_x0=clip, generator=torch.Generator().manual_seed(5),
                                           trajectory=True)
        assert ddpm_path.shape == (sched.T + 1, 64, 2)
        torch.testing.assert_close(ddim_path, ddpm_path, atol=1e-5, rtol=0)
        torch.testing.assert_close(ddim, ddpm, atol=1e-5, rtol=0)
        torch.testing.assert_close(ddpm_path[-1], ddpm)
    # and eta = 0 is a different sampler, so the agreement above is not automatic
    det = diffusion.sample(model, sched, (64, 2), method="ddim", steps=sched.T, eta=0.0,
                           generator=torch.Generator().manual_seed(5))
    assert (det - ddpm).abs().max() > 1e-2


@pytest.mark.parametrize("method, steps, eta", [("ddpm", None, 0.0), ("ddim", 50, 1.0),
                                                 ("ddim", 50, 0.5), ("ddim", 10, 1.0), ("ddim", 4, 0.7)])
def test_the_variance_of_one_sampler_step_is_the_ddim_formula(method, steps, eta):
    """From a fixed x_T with a denoiser that predicts 0, the first step's spread is the noise
    the sampler adds alone: beta_tilde for DDPM, eta^2 (1 - abar_s) / (1 - abar_t) (1 - abar_t /
    abar_s) for DDIM from t to s, which is beta_tilde when s = t - 1 and eta = 1."""
    sched = NoiseSchedule(ScheduleConfig(T=50, beta_start=1e-3, beta_end=0.1))
    n = 40_000
    model = ZeroDenoiser()
    diffusion.sample(model, sched, (n, 1), method=method, steps=steps, eta=eta, x_T=torch.zeros(n, 1),
                     generator=torch.Generator().manual_seed(0))
    ts = sched.timesteps(sched.T if steps is None else steps)
    assert len(model.seen) == len(ts) and torch.equal(model.seen[0], torch.zeros(n, 1))
    t, s = int(ts[0]), int(ts[1])
    ab_t, ab_s = float(sched.alpha_bars[t]), float(sched.alpha_bars[s])
    expected = eta ** 2 * (1 - ab_s) / (1 - ab_t) * (1 - ab_t / ab_s)
    if method == "ddpm":
        expected = float(sched.posterior_variance[t])
    elif eta == 1 and s == t - 1:           # one step of the chain with eta = 1: DDPM's variance
        assert expected == pytest.approx(float(sched.posterior_variance[t]), rel=1e-12)
    x = model.seen[1].double()              # the state after the first step
    assert abs(float(x.mean())) < 5 * math.sqrt(expected / n)
    assert abs(float(x.var()) / expected - 1) < 5 * math.sqrt(2 / (n - 1))


def test_ddim_with_eta_0_follows_the_prediction_without_noise():
    sched = NoiseSchedule(ScheduleConfig(T=50, beta_start=1e-3, beta_end=0.1))
    model = ZeroDenoiser()
    _, path = diffusion.sample(model, sched, (8, 1), method="ddim", steps=10, eta=0.0,
                               x_T=torch.zeros(8, 1), trajectory=True)
    assert path.shape == (11, 8, 1) and torch.equal(path, torch.full_like(path, 0.5))
    assert len(model.seen) == 10


# ------------------------------------------------------------------------ guidance

def test_guidance_at_0_is_unconditional_at_1_conditional_and_linear_in_between():
    model = UNet(TINY_UNET).eval()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 3, 8, 8, generator=g)
    t = torch.tensor([0, 10, 50, 99])
    labels = torch.tensor([0, 1, 2, 1])
    with torch.no_grad():
        cond = model(x, t, labels)
        uncond = model(x, t)
        null = model(x, t, torch.full_like(labels, TINY_UNET.n_classes))
        assert torch.equal(uncond, null)                # labels=None is the "no label" token
        assert (cond - uncond).abs().max() > 1e-3       # the labels matter at all
        torch.testing.assert_close(diffusion.guided_eps(model, x, t, labels, 0.0), uncond,
                                   atol=1e-6, rtol=0)
        torch.testing.assert_close(diffusion.guided_eps(model, x, t, labels, 1.0), cond,
                                   atol=1e-6, rtol=0)
        torch.testing.assert_close(diffusion.guided_eps(model, x, t, labels, 3.0),
                                   uncond + 3 * (cond - uncond), atol=1e-5, rtol=0)
        for w in (0.0, 1.0, 3.0):                       # no labels: no guidance to apply
            assert torch.equal(diffusion.guided_eps(model, x, t, None, w), uncond)


def test_guided_sampling_from_a_conditional_unet():
    model = UNet(TINY_UNET)
    sched = NoiseSchedule(ScheduleConfig(T=20))
    labels = torch.tensor([0, 2])
    images = diffusion.sample(model, sched, (2, 3, 8, 8), method="ddim", steps=5, labels=labels,
                              guidance=2.0, generator=torch.Generator().manual_seed(0))
    assert images.shape == (2, 3, 8, 8) and images.min() >= 0 and images.max() <= 1
    # w = 0 ignores the labels: it is the unconditional sampler
    a = diffusion.sample(model, sched, (2, 3, 8, 8), method="ddim", steps=5, labels=labels,
                         guidance=0.0, generator=torch.Generator().manual_seed(0))
    b = diffusion.sample(model, sched, (2, 3, 8, 8), method="ddim", steps=5,
                         generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="3 labels for a batch of 2"):
        diffusion.sample(model, sched, (2, 3, 8, 8), method="ddim", steps=5, labels=torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match=r"labels must be integers in \[0, 3\]"):
        diffusion.sample(model, sched, (2, 3, 8, 8), method="ddim", steps=5, labels=torch.tensor([0, 4]))


# ------------------------------------------------------------------------ training

def _overfit(model: nn.Module, sched: NoiseSchedule, x0: torch.Tensor, labels=None, steps: int = 60,
             lr: float = 1e-2) -> tuple[float, float]:
    g = torch.Generator().manual_seed(0)
    t = torch.randint(0, sched.T, (len(x0),), generator=g)
    noise = torch.randn(x0.shape, generator=g)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    losses = []
    for _ in range(steps):
        loss = diffusion.simple_loss(model, sched, x0, t, noise, labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses[0], losses[-1]


def test_simple_loss_is_the_mean_squared_noise_error():
    model = UNet(TINY_UNET)
    sched = NoiseSchedule(SCHEDULES[0])
    g = torch.Generator().manual_seed(0)
    x0 = diffusion.to_model_range(_images(3, TINY_UNET))
    t, noise = torch.tensor([0, 20, 99]), torch.randn(x0.shape, generator=g)
    labels = torch.tensor([0, 1, 2])
    loss = diffusion.simple_loss(model, sched, x0, t, noise, labels)
    expected = ((model(sched.q_sample(x0, t, noise), t, labels) - noise) ** 2).mean()
    torch.testing.assert_close(loss, expected)
    assert loss.ndim == 0


def test_a_tiny_unet_overfits_one_batch():
    model = UNet(TINY_UNET)
    sched = NoiseSchedule(SCHEDULES[0])
    x0 = diffusion.to_model_range(_images(4, TINY_UNET))
    first, last = _overfit(model, sched, x0, labels=torch.arange(4) % 3)
    assert first > 0.5                     # an untrained network predicts the noise poorly
    assert last < first / 20, (first, last)


def test_a_pixel_unshuffle_unet_overfits_one_batch():
    model = UNet(PATCH_UNET)
    sched = NoiseSchedule(SCHEDULES[1])
    x0 = diffusion.to_model_range(_images(2, PATCH_UNET))
    first, last = _overfit(model, sched, x0)
    assert first > 0.5
    assert last < first / 20, (first, last)


def test_the_mlp_denoiser_overfits_one_batch():
    model = MLPDenoiser(TINY_MLP)
    sched = NoiseSchedule(SCHEDULES[0])
    x0 = torch.randn(32, 2, generator=torch.Generator().manual_seed(0))
    first, last = _overfit(model, sched, x0, steps=200)
    assert first > 0.5
    assert last < first / 100, (first, last)


def test_make_train_step_trains_and_updates_the_ema():
    model = UNet(TINY_UNET)
    sched = NoiseSchedule(SCHEDULES[0])
    ema = diffusion.EMA(model, decay=0.0)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    step = diffusion.make_train_step(model, opt, sched, generator=torch.Generator().manual_seed(0),
                                     ema=ema, label_dropout=0.5)
    batch = (_images(8, TINY_UNET), torch.arange(8) % 3)
    before = [p.detach().clone() for p in model.parameters()]
    out = [step(batch)["loss"] for _ in range(3)]
    assert all(math.isfinite(v) for v in out)
    assert any(not torch.equal(a, p) for a, p in zip(before, model.parameters()))
    for avg, p in zip(ema.model.parameters(), model.parameters()):
        assert torch.equal(avg, p)
    with pytest.raises(ValueError, match="label_dropout"):
        diffusion.make_train_step(model, opt, sched, label_dropout=1.5)


def test_ema_decay_0_copies_and_the_average_follows_the_lerp_formula():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    ema = diffusion.EMA(model, decay=0.9)
    assert not ema.model.training and not any(p.requires_grad for p in ema.model.parameters())
    start = [p.detach().clone() for p in model.parameters()]
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p))
    model(torch.randn(8, 3))                          # moves BatchNorm's running statistics
    ema.update(model)
    for avg, a, b in zip(ema.model.parameters(), start, model.parameters()):
        torch.testing.assert_close(avg, 0.9 * a + 0.1 * b)
    for avg, b in zip(ema.model.buffers(), model.buffers()):
        assert torch.equal(avg, b)                    # buffers are copied, not averaged
    # two updates: theta_2 = d^2 theta_0 + d (1 - d) theta_1 + (1 - d) theta_2 with fixed theta
    ema.update(model)
    for avg, a, b in zip(ema.model.parameters(), start, model.parameters()):
        torch.testing.assert_close(avg, 0.81 * a + 0.19 * b)
    copy = diffusion.EMA(model, decay=0.0)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(-3.0)
    copy.update(model)
    for avg, p in zip(copy.model.parameters(), model.parameters()):
        assert torch.equal(avg, p)
    for bad in (1.0, -0.1):
        with pytest.raises(ValueError, match=r"EMA decay must lie in \[0, 1\)"):
            diffusion.EMA(model, decay=bad)


# ------------------------------------------------------------------------ likelihood

@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_discretised_gaussian_sums_to_one_and_matches_a_high_precision_cdf(dtype):
    x = (torch.arange(256, dtype=dtype) / 255 * 2 - 1)           # every 8-bit value in [-1, 1]
    cases = [(0.0, 0.0), (0.3, -2.0), (-0.999, -6.0), (1.0, -9.0), (0.5 / 255, -7.0),
             (4.0, -1.0), (-30.0, 1.0), (0.0, 4.0), (0.2, -20.0)]
    for mean, log_scale in cases:
        logp = distributions.discretised_gaussian_log_likelihood(
            x, torch.tensor(mean, dtype=dtype), torch.tensor(log_scale, dtype=dtype))
        assert logp.dtype == dtype and logp.shape == (256,)
        assert torch.isfinite(logp).all() and (logp <= 1e-6).all()
        p = logp.double().exp()
        # float32: rounding of ~1e-6 per bin and the midpoint rule of narrow bins (vae's tests
        # allow the same 1e-4)
        tol = 1e-9 if dtype == torch.float64 else 1e-4
        assert abs(float(p.sum()) - 1) < tol, (mean, log_scale, float(p.sum()))
        if dtype != torch.float64:
            continue
        sigma = mpmath.e ** mpmath.mpf(log_scale)
        with mpmath.workdps(40):
            for k in range(256):
                xk = mpmath.mpf(2 * k) / 255 - 1
                hi = mpmath.inf if k == 255 else xk + mpmath.mpf(1) / 255
                lo = -mpmath.inf if k == 0 else xk - mpmath.mpf(1) / 255
                exact = mpmath.ncdf(hi, mean, sigma) - mpmath.ncdf(lo, mean, sigma)
                # torch's float64 ndtr has an absolute error of ~1e-17 in its tails (a relative
                # error of 5e-7 at 4e-11): exact for every probability that matters, but only to
                # ~1e-5 nats for the rare values just above the clamp at 1e-12
                if exact > 1e-11:
                    err = abs(float(logp[k]) - float(mpmath.log(exact)))
                    assert err < (1e-10 if exact > 1e-6 else 1e-5), (mean, log_scale, k, err)
                else:
                    assert float(logp[k]) <= math.log(1e-11) + 1e-6


def _fixed_noise_model(eps: torch.Tensor) -> nn.Module:
    class Fixed(nn.Module):
        def forward(self, x, t, labels=None):
            return eps.expand_as(x)
    return Fixed()


def test_vlb_terms_are_the_gaussian_kl_for_t_above_0_and_the_discretised_nll_at_0():
    model = UNet(TINY_UNET).eval()
    sched = NoiseSchedule(SCHEDULES[0])
    g = torch.Generator().manual_seed(0)
    x0 = diffusion.to_model_range(_images(4, TINY_UNET))
    noise = torch.randn(x0.shape, generator=g)
    t = torch.tensor([0, 1, 30, 99])
    labels = torch.tensor([0, 1, 2, 3])
    terms = diffusion.vlb_terms(model, sched, x0, t, noise, labels)
    assert terms.shape == (4,) and terms.dtype == torch.float64 and (terms > 0).all()
    with torch.no_grad():
        x_t = sched.q_sample(x0, t, noise)
        x0_hat = sched.predict_x0(x_t, t, model(x_t, t, labels))
    mean_q, var = sched.posterior(x0.double(), x_t.double(), t)
    mean_p, _ = sched.posterior(x0_hat.double(), x_t.double(), t)
    for i in (1, 2, 3):
        sd = var[i].sqrt().expand_as(mean_q[i])
        kl = distributions.gaussian_kl(mean_q[i], sd, mean_p[i], sd).sum()
        assert float(terms[i]) == pytest.approx(float(kl), rel=1e-4), i
    # t = 0: -log p(x0 | x1) with the mean x0_hat and the variance beta_1
    log_scale = torch.tensor(0.5 * math.log(float(sched.betas[0])), dtype=torch.float64)
    nll = -distributions.discretised_gaussian_log_likelihood(x0[0].double(), x0_hat[0].double(),
                                                             log_scale).sum()
    assert float(terms[0]) == pytest.approx(float(nll), rel=1e-4)
    # simple_loss's weights: L = beta^2 / (2 beta_tilde alpha (1 - abar)) ||eps - eps_theta||^2
    with torch.no_grad():
        sq = ((model(x_t, t, labels) - noise).double() ** 2).sum((1, 2, 3))
    for i in (1, 2, 3):
        b, a, ab, bt = (float(v[t[i]]) for v in (sched.betas, sched.alphas, sched.alpha_bars,
                                                  sched.posterior_variance))
        assert float(terms[i]) == pytest.approx(b ** 2 / (2 * bt * a * (1 - ab)) * float(sq[i]), rel=1e-4)
    # the model that knows the noise pays nothing at t >= 1
    perfect = diffusion.vlb_terms(_fixed_noise_model(noise), sched, x0, t, noise)
    assert (perfect[1:] < 1e-3 * terms[1:]).all()


def test_bits_per_dim_is_finite_with_a_tiny_prior_term_and_refuses_bad_images():
    model = UNet(dataclasses.replace(TINY_UNET, n_classes=0))
    sched = NoiseSchedule(ScheduleConfig(T=1000))
    images = _images(4, TINY_UNET)
    x0 = diffusion.to_model_range(images)
    prior = diffusion.prior_kl(sched, x0)
    assert prior.shape == (4,) and (prior >= 0).all()
    assert float(prior.max()) / (x0[0].numel() * math.log(2)) < 1e-4     # bits per dimension
    bpd, se = diffusion.bits_per_dim(model, sched, images, samples_per_image=2,
                                     generator=torch.Generator().manual_seed(0))
    assert math.isfinite(bpd) and math.isfinite(se) and bpd > 0 and se > 0
    assert model.training
    with pytest.raises(ValueError, match="8-bit images"):
        diffusion.bits_per_dim(model, sched, images * 0.5 + 0.5 / 255)   # half steps, in [0, 1]
    with pytest.raises(ValueError, match=r"\(N, C, H, W\)"):
        diffusion.bits_per_dim(model, sched, images[0])


def test_bits_per_dim_is_an_unbiased_estimate_of_the_whole_bound():
    """The Monte Carlo bound (one random t per image) against the bound summed over every t,
    each term averaged over many noise draws: equal within their standard errors."""
    config = dataclasses.replace(TINY_UNET, n_classes=0)
    model = UNet(config).eval()
    sched = NoiseSchedule(ScheduleConfig(T=8, beta_start=0.01, beta_end=0.3))
    images = _images(2, config)
    x0 = diffusion.to_model_range(images)
    dim_bits = x0[0].numel() * math.log(2)
    g = torch.Generator().manual_seed(1)
    draws = 64
    total = diffusion.prior_kl(sched, x0).sum() / dim_bits
    var_total = 0.0
    for t in range(sched.T):
        x = x0.repeat(draws, 1, 1, 1)
        noise = torch.randn(x.shape, generator=g)
        terms = diffusion.vlb_terms(model, sched, x, torch.full((len(x),), t), noise) / dim_bits
        total = total + terms.mean() * len(x0)
        var_total += float(terms.var()) * len(x0) / draws
    exact_mean, exact_se = float(total) / len(x0), math.sqrt(var_total) / len(x0)
    bpd, se = diffusion.bits_per_dim(model, sched, images, samples_per_image=256,
                                     generator=torch.Generator().manual_seed(2))
    assert abs(bpd - exact_mean) < 4 * math.hypot(se, exact_se), (bpd, se, exact_mean, exact_se)
    assert se < 0.2 * bpd        # the comparison above is not vacuous


# ------------------------------------------------------------------------ the U-Net

def test_unet_shapes_with_and_without_pixel_unshuffle():
    for config in (TINY_UNET, PATCH_UNET, dataclasses.replace(TINY_UNET, blocks=2, heads=2, mults=(1, 2, 2),
                                                              attention_at=(4, 2))):
        model = UNet(config)
        x = torch.randn(3, config.channels, config.image_size, config.image_size)
        labels = torch.tensor([0, 1, 2]) if config.n_classes else None
        out = model(x, torch.tensor([0, 5, 99]), labels)
        assert out.shape == x.shape and torch.isfinite(out).all()
    # the pixel unshuffle: the stem takes 2 * 2 * 3 = 12 inputs at 8x8, the head gives them back
    model = UNet(PATCH_UNET)
    assert model.stem.in_channels == 12 and model.head[-1].out_channels == 12
    # the same seed builds the same weights; another seed other weights
    a, b = UNet(TINY_UNET), UNet(dataclasses.replace(TINY_UNET, seed=1))
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), UNet(TINY_UNET).parameters()))
    assert not torch.equal(a.stem.weight, b.stem.weight)


def test_unet_refuses_bad_inputs_and_labels():
    model = UNet(TINY_UNET)
    x, t = torch.randn(2, 3, 8, 8), torch.tensor([1, 2])
    with pytest.raises(ValueError, match=r"takes images of shape \(B, 3, 8, 8\)"):
        model(torch.randn(2, 3, 16, 16), t)
    with pytest.raises(ValueError, match=r"labels must be integers in \[0, 3\]"):
        model(x, t, torch.tensor([0, 4]))
    with pytest.raises(ValueError, match=r"labels must be integers in \[0, 3\]"):
        model(x, t, torch.tensor([-1, 0]))
    with pytest.raises(ValueError, match="labels must be integers"):
        model(x, t, torch.tensor([0.0, 1.0]))
    with pytest.raises(ValueError, match="unconditional"):
        UNet(PATCH_UNET)(torch.randn(2, 3, 16, 16), t, torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="unconditional"):
        MLPDenoiser(TINY_MLP)(torch.randn(2, 2), t, torch.tensor([0, 1]))


@pytest.mark.parametrize("kwargs, match", [
    (dict(image_size=24), "power of two"),
    (dict(image_size=12), "power of two"),
    (dict(patch=3), "patch must be a power of two"),
    (dict(patch=8), "patch must be a power of two below image_size"),
    (dict(mults=(1, 2, 2, 2)), "halve"),
    (dict(attention_at=(16,)), "not among the U-Net's levels"),
    (dict(groups=3), "not divisible by groups"),
    (dict(mults=()), "non-empty"),
    (dict(n_classes=-1), "n_classes"),
    (dict(dropout=1.0), "dropout"),
])
def test_unet_config_refuses_bad_values(kwargs, match):
    with pytest.raises(ValueError, match=match):
        dataclasses.replace(TINY_UNET, **kwargs)


# ------------------------------------------------------------------------ bad input

def test_schedule_and_sampler_refuse_bad_input():
    sched = NoiseSchedule(ScheduleConfig(T=20))
    model = ZeroDenoiser()
    for steps in (0, 21, -1, 2.5, True):
        with pytest.raises(ValueError, match="number of sampling steps must be an integer from 1 to 20 "):
            sched.timesteps(steps)
    for steps in (0, 21):
        with pytest.raises(ValueError, match="from 1 to 20 "):
            diffusion.sample(model, sched, (2, 1), method="ddim", steps=steps)
    with pytest.raises(ValueError, match="DDPM sampling runs all T = 20 steps"):
        diffusion.sample(model, sched, (2, 1), method="ddpm", steps=10)
    diffusion.sample(model, sched, (2, 1), method="ddpm", steps=20)        # all T steps is fine
    for eta in (-0.1, 1.5, float("nan")):
        with pytest.raises(ValueError, match=r"eta must lie in \[0, 1\]"):
            diffusion.sample(model, sched, (2, 1), method="ddim", steps=5, eta=eta)
    with pytest.raises(ValueError, match="method must be one of"):
        diffusion.sample(model, sched, (2, 1), method="euler")
    with pytest.raises(ValueError, match="batch axis"):
        diffusion.sample(model, sched, (2,))
    with pytest.raises(ValueError, match=r"x_T has shape \(3, 1\)"):
        diffusion.sample(model, sched, (2, 1), x_T=torch.zeros(3, 1))
    x0 = torch.zeros(2, 1)
    for t in (torch.tensor([0, 20]), torch.tensor([-1, 0])):
        with pytest.raises(ValueError, match=r"time steps must lie in \[0, 20\)"):
            sched.q_sample(x0, t, torch.zeros_like(x0))
    with pytest.raises(ValueError, match="integers"):
        sched.q_mean_var(x0, torch.tensor([0.5, 1.0]))
    with pytest.raises(ValueError, match="noise has shape"):
        sched.q_sample(x0, torch.tensor([0, 1]), torch.zeros(2, 2))
    for bad in (dict(T=0), dict(kind="quadratic"), dict(beta_end=1.0), dict(beta_start=0.1, beta_end=0.01)):
        with pytest.raises(ValueError, match="ScheduleConfig"):
            ScheduleConfig(**bad)
    with pytest.raises(ValueError, match="power of two"):
        data.load_dataset("openmoji", "train", size=24)


# ------------------------------------------------------------------------ the recipe

def test_train_recipe_resumed_from_its_checkpoint_equals_an_uninterrupted_run(tmp_path):
    unet = UNetConfig(image_size=32, patch=2, base=8, mults=(1, 2), attention_at=(8,), groups=4,
                      n_classes=len(data.OPENMOJI_GROUPS), seed=0)
    recipe = diffusion.DiffusionRecipe(unet=unet, schedule=ScheduleConfig(T=100), steps=4, batch_size=8,
                                       lr=1e-3, warmup=3, ema_decay=0.5, label_dropout=0.5, seed=3)
    model, ema, history = diffusion.train_recipe(recipe, progress=False)
    assert history.step == 4
    path = tmp_path / "run.pt"
    diffusion.train_recipe(dataclasses.replace(recipe, steps=2), checkpoint=str(path), progress=False)
    resumed, resumed_ema, resumed_history = diffusion.train_recipe(recipe, checkpoint=str(path),
                                                                   save_every=100, progress=False)
    assert resumed_history.step == 4
    assert resumed_history.records == history.records
    for a, b in zip([*model.parameters(), *ema.model.parameters()],
                    [*resumed.parameters(), *resumed_ema.model.parameters()]):
        assert torch.equal(a, b)
    # the EMA is an average, not a copy, of the trained weights
    assert any(not torch.equal(a, b) for a, b in zip(model.parameters(), ema.model.parameters()))
    # the checkpoint of another recipe is refused, not silently resumed
    with pytest.raises(ValueError, match="another recipe"):
        diffusion.train_recipe(dataclasses.replace(recipe, lr=2e-3), checkpoint=str(path), progress=False)
    with pytest.raises(ValueError, match="n_classes"):
        diffusion.train_recipe(dataclasses.replace(recipe, unet=dataclasses.replace(unet, n_classes=4)),
                               progress=False)


# ------------------------------------------------------------------------ clear errors for bad input

def test_bits_per_dim_refuses_images_outside_0_1():
    model = ZeroDenoiser()
    sched = NoiseSchedule(ScheduleConfig(T=10))
    images = _images(2, TINY_UNET)
    for bad in (2 * images, images - 1):
        with pytest.raises(ValueError, match=r"\[0, 1\]"):
            diffusion.bits_per_dim(model, sched, bad)


def test_bits_per_dim_refuses_zero_samples():
    with pytest.raises(ValueError, match="samples_per_image"):
        diffusion.bits_per_dim(ZeroDenoiser(), NoiseSchedule(ScheduleConfig(T=10)), _images(2, TINY_UNET),
                               samples_per_image=0)


def test_guidance_on_an_unconditional_mlp_is_a_clear_error():
    model, sched = _mlp_and_schedule(T=10)
    with pytest.raises(ValueError, match="unconditional|n_classes"):
        diffusion.sample(model, sched, (2, 2), labels=torch.tensor([0, 1]), guidance=2.0)


def test_sample_accepts_a_float64_x_T():
    model = UNet(PATCH_UNET)
    sched = NoiseSchedule(ScheduleConfig(T=10))
    x_T = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    a = diffusion.sample(model, sched, tuple(x_T.shape), method="ddim", steps=3, x_T=x_T)
    b = diffusion.sample(model, sched, tuple(x_T.shape), method="ddim", steps=3, x_T=x_T.double())
    assert b.dtype == torch.float32
    torch.testing.assert_close(a, b)


def test_train_recipe_refuses_save_every_0(tmp_path):
    recipe = diffusion.DiffusionRecipe(
        unet=UNetConfig(image_size=32, patch=2, base=8, mults=(1, 2), attention_at=(8,), groups=4,
                        n_classes=0), schedule=ScheduleConfig(T=10), steps=1, batch_size=2, warmup=0)
    with pytest.raises(ValueError, match="save_every"):
        diffusion.train_recipe(recipe, checkpoint=str(tmp_path / "run.pt"), save_every=0, progress=False)


# ------------------------------------------------------------------------ v-prediction

def test_v_prediction_returns_the_noise_and_its_loss_is_the_velocity_error():
    sched = NoiseSchedule(ScheduleConfig(T=50))
    net = UNet(PATCH_UNET)
    model = diffusion.VPrediction(net, sched)
    g = torch.Generator().manual_seed(0)
    x0 = torch.rand(4, 3, 16, 16, generator=g) * 2 - 1
    eps = torch.randn(4, 3, 16, 16, generator=g)
    t = torch.tensor([0, 10, 30, 49])
    x_t = sched.q_sample(x0, t, eps)
    ab = sched.alpha_bars[t].float().reshape(-1, 1, 1, 1)
    v = ab.sqrt() * eps - (1 - ab).sqrt() * x0
    with torch.no_grad():
        v_hat = net(x_t, t)
        eps_hat = model(x_t, t)
        torch.testing.assert_close(eps_hat, ab.sqrt() * v_hat + (1 - ab).sqrt() * x_t)
        # the true velocity gives back the true noise
        torch.testing.assert_close(ab.sqrt() * v + (1 - ab).sqrt() * x_t, eps, atol=1e-5, rtol=1e-5)
        loss = diffusion.simple_loss(model, sched, x0, t, eps, weighting="v")
    torch.testing.assert_close(loss, ((v - v_hat) ** 2).flatten(1).mean(1).mean(), atol=1e-5, rtol=1e-4)
    with pytest.raises(ValueError, match="weighting"):
        diffusion.simple_loss(model, sched, x0, t, eps, weighting="x0")


def test_importance_sampled_bits_per_dim_is_unbiased_and_less_noisy():
    torch.manual_seed(0)
    sched = NoiseSchedule(ScheduleConfig(T=30))
    model = UNet(dataclasses.replace(TINY_UNET, n_classes=0)).eval()
    images = torch.randint(0, 256, (6, 3, 8, 8), generator=torch.Generator().manual_seed(1)).float() / 255
    x0 = diffusion.to_model_range(images)
    # the exact bound, every step summed (noise averaged over many draws per step)
    g = torch.Generator().manual_seed(2)
    exact = []
    for _ in range(40):
        total = diffusion.prior_kl(sched, x0)
        for t in range(sched.T):
            total = total + diffusion.vlb_terms(model, sched, x0, torch.full((6,), t),
                                                torch.randn(x0.shape, generator=g))
        exact.append(total)
    exact_bits = float(metrics.nats_to_bits_per_dim(torch.stack(exact).mean(), x0[0].numel()))
    p = diffusion.step_proposal(model, sched, images[:2], generator=torch.Generator().manual_seed(3))
    assert p.shape == (30,) and abs(float(p.sum()) - 1) < 1e-9 and (p > 0).all()
    uniform = diffusion.bits_per_dim(model, sched, images, samples_per_image=200,
                                     generator=torch.Generator().manual_seed(4))
    weighted = diffusion.bits_per_dim(model, sched, images, samples_per_image=200, proposal=p,
                                      generator=torch.Generator().manual_seed(4))
    for mean, se in (uniform, weighted):
        assert abs(mean - exact_bits) < 4 * se + 0.02 * exact_bits
    assert weighted[1] < uniform[1]
    with pytest.raises(ValueError, match="proposal"):
        diffusion.bits_per_dim(model, sched, images, proposal=torch.ones(30))


# ------------------------------------------------------------------ cross-attention to token states

def test_cross_attention_is_the_written_out_masked_softmax_and_ignores_masked_tokens():
    torch.manual_seed(0)
    layer = diffusion.CrossAttention2d(channels=8, context_dim=6, heads=2, groups=4)
    x, context = torch.randn(3, 8, 4, 4), torch.randn(3, 5, 6)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [1, 0, 1, 0, 1]], dtype=torch.bool)
    out = layer(x, context, mask)
    # by hand: per image, per head, per pixel a softmax over the kept tokens
    q = layer.q(layer.norm(x)).reshape(3, 2, 4, 16)                     # (B, heads, d, HW)
    k, v = layer.kv(context).reshape(3, 5, 2, 2, 4).unbind(2)           # each (B, L, heads, d)
    expected = torch.empty(3, 2, 4, 16)
    for b in range(3):
        keep = mask[b].nonzero().flatten()
        for h in range(2):
            scores = q[b, h].T @ k[b, keep, h].T / math.sqrt(4)             # (HW, kept)
            expected[b, h] = (torch.softmax(scores, dim=1) @ v[b, keep, h]).T
    reference = x + layer.out(expected.reshape(3, 8, 4, 4))
    assert torch.allclose(out, reference, atol=1e-5)
    # what a masked token holds does not matter
    changed = context.clone()
    changed[1, 2:] = 100.0
    assert torch.allclose(layer(x, changed, mask)[1], out[1], atol=1e-5)


def test_a_unet_with_context_uses_it_and_refuses_missing_or_misshapen_context():
    config = dataclasses.replace(TINY_UNET, n_classes=0, context_dim=6)
    model = UNet(config)
    x, t = torch.randn(2, 3, 8, 8), torch.tensor([3, 7])
    context = torch.randn(2, 5, 6)
    out = model(x, t, context=context)
    assert out.shape == x.shape
    assert not torch.allclose(out, model(x, t, context=torch.randn(2, 5, 6)))
    with pytest.raises(ValueError, match="pass context"):
        model(x, t)
    with pytest.raises(ValueError, match=r"context must have shape \(2, L, 6\)"):
        model(x, t, context=torch.randn(2, 5, 4))
    with pytest.raises(ValueError, match="pass context"):
        UNet(dataclasses.replace(config, context_dim=0))(x, t, context=context)
    with pytest.raises(ValueError, match="not both"):
        dataclasses.replace(config, n_classes=3)
    # a U-Net without context keeps its parameter names, so older checkpoints still load
    plain = UNet(dataclasses.replace(config, context_dim=0)).state_dict()
    assert set(plain) < set(model.state_dict())

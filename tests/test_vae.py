import dataclasses
import math

import numpy as np
import pytest
import torch
from torch.distributions import Bernoulli, Independent, MultivariateNormal, Normal, kl_divergence

from genart_utils import data, distributions, training, vae

TINY = vae.VAEConfig(latent_dim=4, width=4, hidden=16, lr=3e-3, seed=0)


def _binary_digits(n: int) -> torch.Tensor:
    return vae.binarize(data.load_mnist5k("test").images[:n])


def test_gaussian_kl_matches_torch_and_the_univariate_formula_and_vanishes_at_the_prior():
    g = torch.Generator().manual_seed(0)
    mu = torch.randn(64, 8, generator=g, dtype=torch.float64)
    logvar = 2 * torch.randn(64, 8, generator=g, dtype=torch.float64)
    kl = vae.gaussian_kl(mu, logvar)
    assert kl.shape == (64,)
    q = Independent(Normal(mu, (0.5 * logvar).exp()), 1)
    p = Independent(Normal(torch.zeros_like(mu), torch.ones_like(mu)), 1)
    torch.testing.assert_close(kl, kl_divergence(q, p), rtol=1e-12, atol=1e-12)
    # The sum of the foundations chapter's univariate KLs, one per dimension.
    per_dim = distributions.gaussian_kl(mu, (0.5 * logvar).exp(), 0.0, 1.0)
    torch.testing.assert_close(kl, per_dim.sum(-1), rtol=1e-12, atol=1e-12)
    assert torch.equal(vae.gaussian_kl(torch.zeros(3, 5), torch.zeros(3, 5)), torch.zeros(3))
    assert (kl > 0).all()
    with pytest.raises(ValueError, match="same shape"):
        vae.gaussian_kl(mu, logvar[:, :3])


def test_elbo_is_below_the_exact_linear_gaussian_likelihood_and_tight_at_the_posterior():
    g = torch.Generator().manual_seed(1)
    d, D, B = 5, 2, 16
    W = torch.randn(d, D, generator=g, dtype=torch.float64)
    b = torch.randn(d, generator=g, dtype=torch.float64)
    sigma = torch.tensor(0.7, dtype=torch.float64)
    x = torch.randn(B, d, generator=g, dtype=torch.float64) * 2
    log_px = vae.linear_gaussian_log_likelihood(x, W, b, sigma)

    post_mean, post_cov = vae.linear_gaussian_posterior(x, W, b, sigma)
    tight = vae.linear_gaussian_elbo(x, W, b, sigma, post_mean, post_cov).elbo
    torch.testing.assert_close(tight, log_px, rtol=0, atol=1e-10)

    # Any other Gaussian q: ELBO < log p(x), and the gap is exactly KL(q || p(z|x)).
    for _ in range(5):
        A = torch.randn(D, D, generator=g, dtype=torch.float64)
        q_cov = A @ A.T + 0.1 * torch.eye(D, dtype=torch.float64)
        q_mean = post_mean + torch.randn(B, D, generator=g, dtype=torch.float64)
        bound = vae.linear_gaussian_elbo(x, W, b, sigma, q_mean, q_cov).elbo
        assert (bound < log_px).all()
        gap = kl_divergence(MultivariateNormal(q_mean, q_cov), MultivariateNormal(post_mean, post_cov))
        torch.testing.assert_close(log_px - bound, gap, rtol=1e-9, atol=1e-9)

    # The linear VAE's one-sample estimate averages to its exact ELBO.
    model = vae.LinearVAE(vae.LinearVAEConfig(data_dim=d, latent_dim=D, init_scale=0.5)).double()
    exact = model.elbo(x).elbo
    estimates = torch.stack([model.elbo_estimate(x, generator=g).elbo for _ in range(4000)])
    se = estimates.std(0) / math.sqrt(len(estimates))
    assert ((estimates.mean(0) - exact).abs() < 5 * se + 1e-9).all()
    assert (exact <= model.log_likelihood(x)).all()


def test_iwae_with_one_sample_is_the_elbo_estimate_and_grows_with_k():
    model = vae.build_vae(TINY)
    x = _binary_digits(8)
    # k = 1: the same noise gives exactly the single-sample ELBO, computed independently here.
    bound = vae.iwae_bound(model, x, 1, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        mu, logvar = model.encode(x)
        eps = torch.randn(1, *mu.shape, generator=torch.Generator().manual_seed(5))[0]
        z = mu + (0.5 * logvar).exp() * eps
        q = Independent(Normal(mu, (0.5 * logvar).exp()), 1)
        prior = Independent(Normal(torch.zeros_like(mu), 1.0), 1)
        rec = Independent(Bernoulli(logits=model.decode(z)), 3).log_prob(x)
        single = rec - (q.log_prob(z) - prior.log_prob(z))
    torch.testing.assert_close(bound, single, rtol=1e-5, atol=1e-3)

    # In expectation: L_1 equals the ELBO (analytic KL) and L_k does not decrease with k.
    g = torch.Generator().manual_seed(6)
    reps = 30
    means = {k: torch.stack([vae.iwae_bound(model, x, k, generator=g) for _ in range(reps)]).mean(0)
             for k in (1, 4, 16, 64)}
    terms = torch.stack([vae.elbo_terms_of(model, x, generator=g).elbo for _ in range(reps)])
    se = terms.std(0) / math.sqrt(reps)
    assert ((means[1] - terms.mean(0)).abs() < 5 * se + 0.5).all()
    avg = [float(means[k].mean()) for k in (1, 4, 16, 64)]
    assert avg[0] < avg[1] < avg[2] < avg[3], avg
    # Chunking over k does not change the result.
    a = vae.iwae_bound(model, x, 50, generator=torch.Generator().manual_seed(7))
    b = vae.iwae_bound(model, x, 50, generator=torch.Generator().manual_seed(7), max_decodes=24)
    torch.testing.assert_close(a, b)
    with pytest.raises(ValueError, match="k must be at least 1"):
        vae.iwae_bound(model, x, 0)


def test_reparameterised_gradient_matches_the_analytic_gradient():
    # E[exp(z)] for z ~ N(mu, e^logvar) is exp(mu + e^logvar / 2): differentiate both ways.
    mu = torch.tensor([0.3, -0.5], dtype=torch.float64, requires_grad=True)
    logvar = torch.tensor([-1.0, 0.4], dtype=torch.float64, requires_grad=True)
    z = vae.reparameterize(mu, logvar, n_samples=200_000, generator=torch.Generator().manual_seed(0))
    torch.exp(z).mean(0).sum().backward()
    with torch.no_grad():
        m = torch.exp(mu + logvar.exp() / 2)
        analytic_mu, analytic_logvar = m, m * logvar.exp() / 2
    torch.testing.assert_close(mu.grad, analytic_mu, rtol=0.02, atol=0)
    torch.testing.assert_close(logvar.grad, analytic_logvar, rtol=0.03, atol=0)


def test_tiny_vae_lowers_its_negative_elbo_on_a_batch():
    model = vae.build_vae(TINY)
    x = data.load_mnist5k("train").images[:32]
    xb = vae.binarize(x)

    def neg_elbo() -> float:
        return -float(vae.elbo_terms_of(model, xb, generator=torch.Generator().manual_seed(0)).elbo.mean())

    before = neg_elbo()
    opt = torch.optim.Adam(model.parameters(), lr=TINY.lr)
    step = vae.make_train_step(model, opt, generator=torch.Generator().manual_seed(0))
    history = training.train(step, training.minibatches(x, batch_size=32), 80, progress=False)
    after = neg_elbo()
    assert after < before - 200, (before, after)   # from about 500 nats to about 230
    assert history.last("neg_elbo") < history.series("neg_elbo")[1][0] - 200


def test_determinism_under_a_seed():
    x = data.load_mnist5k("train").images[:64]

    def run(seed: int):
        model = vae.build_vae(TINY)
        opt = torch.optim.Adam(model.parameters(), lr=TINY.lr)
        step = vae.make_train_step(model, opt, generator=torch.Generator().manual_seed(seed))
        history = training.train(step, training.minibatches(x, batch_size=16, seed=seed), 5, progress=False)
        samples = vae.sample(model, 4, generator=torch.Generator().manual_seed(seed), binary=True)
        return model, history.series("neg_elbo")[1], samples

    m1, h1, s1 = run(0)
    m2, h2, s2 = run(0)
    assert all(torch.equal(a, b) for a, b in zip(m1.state_dict().values(), m2.state_dict().values()))
    assert (h1 == h2).all() and torch.equal(s1, s2)
    _, h3, s3 = run(1)
    assert not (h1 == h3).all() and not torch.equal(s1, s3)
    # build_vae does not depend on (or disturb) the global random state.
    torch.manual_seed(123)
    a = torch.rand(1)
    torch.manual_seed(123)
    vae.build_vae(TINY)
    assert torch.equal(torch.rand(1), a)


def test_kl_weight_ramps_linearly_to_beta():
    ramp = dataclasses.replace(TINY, beta=2.0, kl_warmup_steps=4)
    # beta * min(1, (t + 1) / T_w): reaches beta at step T_w - 1 and stays there
    assert [vae.kl_weight(t, ramp) for t in range(7)] == [0.5, 1.0, 1.5, 2.0, 2.0, 2.0, 2.0]
    assert [vae.kl_weight(t, dataclasses.replace(TINY, beta=0.25)) for t in (0, 5, 10**6)] == [0.25] * 3
    assert vae.kl_weight(np.int64(1), ramp) == 1.0
    with pytest.raises(ValueError, match="step must be >= 0"):
        vae.kl_weight(-1, ramp)


def test_train_step_reads_the_warm_up_step_from_the_history():
    x = data.load_mnist5k("train").images[:64]
    config = dataclasses.replace(TINY, kl_warmup_steps=4)

    def logged_weights(history):
        model = vae.build_vae(config)
        opt = torch.optim.Adam(model.parameters(), lr=config.lr)
        step = vae.make_train_step(model, opt, generator=torch.Generator().manual_seed(0), history=history)
        out = training.train(step, training.minibatches(x, batch_size=16), 6, history=history, progress=False)
        return out.series("kl_weight")[1].tolist()

    assert logged_weights(training.History()) == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    # A history that already holds 3 steps (a resumed run) continues the ramp at step 3.
    assert logged_weights(training.History(step=3)) == [1.0, 1.0, 1.0]
    # Without a history the step function counts its own calls from 0.
    model = vae.build_vae(config)
    step = vae.make_train_step(model, torch.optim.Adam(model.parameters()), generator=torch.Generator())
    assert [step((x[:8],))["kl_weight"] for _ in range(3)] == [0.25, 0.5, 0.75]


def test_validation_callback_logs_what_evaluate_reports_and_saves_nothing(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    x = data.load_mnist5k("train").images[:96]
    x_val, x_check = _binary_digits(40), vae.binarize(x[:24])
    model = vae.build_vae(TINY)
    opt = torch.optim.Adam(model.parameters(), lr=TINY.lr)
    step = vae.make_train_step(model, opt, generator=torch.Generator().manual_seed(0))
    expected = {}

    def reference(step_number: int, history: training.History) -> None:   # runs right after it
        if step_number % 3 == 0:
            expected[step_number] = (vae.evaluate(model, x_val, seed=7)["neg_elbo"],
                                     vae.evaluate(model, x_check, seed=7)["neg_elbo"])
            assert model.training                     # evaluation put the model back in training mode

    validate = vae.validation_callback(model, x_val, 3, x_train=x_check, seed=7)
    history = training.train(step, training.minibatches(x, batch_size=16), 9,
                             callbacks=[validate, reference], progress=False)
    steps, val = history.series("val_neg_elbo")
    _, train = history.series("train_neg_elbo")
    assert steps.tolist() == [3, 6, 9]
    assert [(v, t) for v, t in zip(val.tolist(), train.tolist())] == [expected[s] for s in (3, 6, 9)]
    assert val[-1] < val[0]
    assert list(tmp_path.iterdir()) == []             # it only logs: no checkpoint anywhere


def test_ppca_fit_is_the_maximum_likelihood_solution():
    g = torch.Generator().manual_seed(0)
    d, D, N = 6, 2, 4000
    W_true = torch.randn(d, D, generator=g, dtype=torch.float64) * 2
    b_true = torch.randn(d, generator=g, dtype=torch.float64)
    sigma_true = 0.5
    z = torch.randn(N, D, generator=g, dtype=torch.float64)
    x = z @ W_true.T + b_true + sigma_true * torch.randn(N, d, generator=g, dtype=torch.float64)
    W, b, sigma = vae.ppca_fit(x, D)

    def mean_log_lik(W, b, log_sigma):
        return vae.linear_gaussian_log_likelihood(x, W, b, log_sigma.exp()).mean()

    # A stationary point of the exact log-likelihood ...
    params = [W.clone().requires_grad_(), b.clone().requires_grad_(), sigma.log().clone().requires_grad_()]
    best = mean_log_lik(*params)
    for grad in torch.autograd.grad(best, params):
        assert grad.abs().max() < 1e-8
    # ... that no other parameters beat: the true ones, and random perturbations.
    assert best > mean_log_lik(W_true, b_true, torch.tensor(math.log(sigma_true), dtype=torch.float64))
    for _ in range(20):
        dW = 0.05 * torch.randn(d, D, generator=g, dtype=torch.float64)
        db = 0.05 * torch.randn(d, generator=g, dtype=torch.float64)
        ds = 0.05 * torch.randn((), generator=g, dtype=torch.float64)
        assert best > mean_log_lik(W + dW, b + db, sigma.log() + ds)
    # The fitted covariance W W^T + sigma^2 I keeps the sample covariance's top-D eigenvalues,
    # and it is close to the true model's (N = 4000 points).
    cov_fit = W @ W.T + sigma**2 * torch.eye(d, dtype=torch.float64)
    cov_sample = torch.cov(x.T, correction=0)
    top = torch.linalg.eigvalsh(cov_sample).flip(0)[:D]
    torch.testing.assert_close(torch.linalg.eigvalsh(cov_fit).flip(0)[:D], top, rtol=1e-10, atol=0)
    torch.testing.assert_close(b, x.mean(0))
    cov_true = W_true @ W_true.T + sigma_true**2 * torch.eye(d, dtype=torch.float64)
    assert (cov_fit - cov_true).abs().max() < 0.1 * cov_true.abs().max()
    assert abs(float(sigma) - sigma_true) < 0.02
    with pytest.raises(ValueError, match="latent_dim must be between 1 and d_x - 1"):
        vae.ppca_fit(x, d)
    with pytest.raises(ValueError, match=r"\(N, d_x\) matrix"):
        vae.ppca_fit(x[0], 1)


def test_log_likelihood_and_elbo_refuse_inputs_without_matching_batch_axes():
    x = torch.tensor([1.0, 0.0, 1.0])
    with pytest.raises(ValueError, match="no batch axis"):
        vae.bernoulli_log_likelihood(x, torch.zeros(3))       # used to sum the batch silently
    torch.testing.assert_close(vae.bernoulli_log_likelihood(x[None], torch.zeros(1, 3)),
                               torch.tensor([-3 * math.log(2.0)]))
    xb = _binary_digits(4)
    logits = torch.zeros(4, 1, 28, 28)
    with pytest.raises(ValueError, match="same batch"):
        vae.elbo(xb, logits, torch.zeros(1, 3), torch.zeros(1, 3))   # used to broadcast
    with pytest.raises(ValueError, match="same batch"):
        vae.elbo(xb, logits, torch.zeros(3, 3), torch.zeros(3, 3))


def test_configs_validate_their_fields_and_accept_numpy_numbers():
    for bad, field in [(dict(latent_dim=0), "latent_dim"), (dict(beta=-1.0), "beta"),
                       (dict(kl_warmup_steps=1.5), "kl_warmup_steps"),
                       (dict(binarization="soft"), "binarization"),
                       (dict(seed=-2), "seed")]:
        with pytest.raises(ValueError, match=f"VAEConfig.{field}"):
            vae.VAEConfig(**bad)
    with pytest.raises(ValueError, match="LinearVAEConfig.latent_dim"):
        vae.LinearVAEConfig(latent_dim=0)
    cfg = vae.VAEConfig(latent_dim=np.int64(4), width=4, hidden=16, beta=np.float32(0.5))
    assert type(cfg.latent_dim) is int and type(cfg.beta) is float
    assert cfg == dataclasses.replace(cfg, latent_dim=4)
    model, x = vae.build_vae(cfg), _binary_digits(8)
    assert vae.evaluate(model, x, ks=(np.int64(3),), seed=np.int64(2)) == vae.evaluate(model, x, ks=(3,), seed=2)


def test_evaluate_is_the_mean_of_the_per_image_bounds():
    model = vae.build_vae(vae.VAEConfig(latent_dim=2, width=2, hidden=8))
    x = vae.binarize(data.load_dataset("mnist5k", "test").images[:12])
    per_image = vae.evaluate_per_image(model, x, ks=(3,), batch_size=5, seed=4)
    means = vae.evaluate(model, x, ks=(3,), batch_size=5, seed=4)
    assert set(per_image) == set(means) == {"neg_elbo", "recon_nll", "kl", "iwae_3"}
    assert all(per_image[k].shape == (12,) and math.isclose(float(per_image[k].mean()), means[k])
               for k in means)
    assert torch.allclose(per_image["neg_elbo"], per_image["recon_nll"] + per_image["kl"])


# ------------------------------------------- colour images and discretised likelihoods

COLOUR = vae.VAEConfig(channels=3, image_size=32, latent_dim=4, width=4, hidden=16, lr=3e-3,
                       likelihood="discretised_logistic", scale="pixel")


def _colour_batch(n: int = 8, size: int = 32, seed: int = 0) -> torch.Tensor:
    """Discs of random colours on white, as 8-bit pixels k/255: (n, 3, size, size)."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    images = torch.ones(n, 3, size, size)
    for image in images:
        cx, cy = torch.randint(size // 4, size - size // 4, (2,), generator=g).tolist()
        r = int(torch.randint(size // 8, size // 4 + 1, (1,), generator=g))
        image[:, (xx - cx) ** 2 + (yy - cy) ** 2 <= r * r] = torch.rand(3, 1, generator=g)
    return torch.round(images * 255) / 255


def _brute_force_probs(mean: torch.Tensor, log_scale: torch.Tensor, kind: str) -> torch.Tensor:
    """P(k / 255) for k = 0..255 (rows) by the definition: the continuous CDF's mass on each
    value's bin, the edge bins reaching to -inf and +inf; float64."""
    cdf = torch.sigmoid if kind == "logistic" else torch.special.ndtr
    k = torch.arange(256, dtype=torch.float64)[:, None]
    s = log_scale.exp()
    upper = cdf((k / 255 + 0.5 / 255 - mean) / s)
    lower = cdf((k / 255 - 0.5 / 255 - mean) / s)
    upper = torch.where(k == 255, 1.0, upper)
    lower = torch.where(k == 0, 0.0, lower)
    return upper - lower


@pytest.mark.parametrize("kind", ["logistic", "gaussian"])
def test_discretised_likelihood_sums_to_one_over_the_256_values_and_matches_brute_force(kind):
    g = torch.Generator().manual_seed(0)
    # means inside and outside the pixel range, scales from a fraction of a bin to the whole range
    mean = torch.cat([torch.rand(300, generator=g, dtype=torch.float64) * 1.4 - 0.2,
                      torch.tensor([0.0, 1.0, 0.5 / 255, 127.5 / 255, -3.0, 4.0], dtype=torch.float64)])
    log_scale = torch.cat([torch.rand(300, generator=g, dtype=torch.float64) * 9 - 8,
                           torch.tensor([-8.0, -8.0, -8.0, -8.0, 0.0, 1.0], dtype=torch.float64)])
    x = (torch.arange(256, dtype=torch.float64) / 255)[:, None]           # every value, (256, 1)
    log_p = vae.discretised_log_prob(x, mean, log_scale, kind)            # (256, 306)
    assert log_p.shape == (256, 306) and (log_p <= 0).all()
    torch.testing.assert_close(log_p.exp().sum(0), torch.ones(306, dtype=torch.float64), rtol=0, atol=1e-10)
    brute = _brute_force_probs(mean, log_scale, kind)
    resolved = brute > 1e-6        # where float64 differences of CDFs are themselves accurate
    torch.testing.assert_close(log_p[resolved], brute[resolved].log(), rtol=0, atol=1e-8)
    # ... and so are its gradients (with respect to the mean and the log-scale)
    m, s = mean.clone().requires_grad_(), log_scale.clone().requires_grad_()
    weights = torch.randn(256, 306, generator=g, dtype=torch.float64) * (brute > 1e-3)
    ours = torch.autograd.grad((vae.discretised_log_prob(x, m, s, kind) * weights).sum(), (m, s))
    theirs = torch.autograd.grad((_brute_force_probs(m, s, kind).clamp(min=1e-300).log() * weights).sum(), (m, s))
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-8 * float(b.abs().max()))
    # float32, as training uses it: the same to float32 accuracy, and finite gradients even
    # for scales and means far outside the useful range
    m32 = mean.float().requires_grad_()
    s32 = torch.cat([log_scale[:-2], torch.tensor([-30.0, 40.0], dtype=torch.float64)]).float().requires_grad_()
    log_p32 = vae.discretised_log_prob(x.float(), m32, s32, kind)
    assert torch.isfinite(log_p32).all()
    torch.testing.assert_close(log_p32.double().exp().sum(0), torch.ones(306, dtype=torch.float64), rtol=0, atol=1e-4)
    torch.testing.assert_close(log_p32[:, :-2][resolved[:, :-2]].double(), log_p[:, :-2][resolved[:, :-2]],
                               rtol=0, atol=1e-3)
    log_p32.sum().backward()
    assert torch.isfinite(m32.grad).all() and torch.isfinite(s32.grad).all()
    # The per-image log-likelihood is the sum over pixels; the draws and the mean agree with
    # the probabilities.
    images = _colour_batch(4)
    mean_img = torch.rand(4, 3, 32, 32, generator=g)
    log_s = torch.full((3, 1, 1), -2.5)
    torch.testing.assert_close(vae.discretised_log_likelihood(images, mean_img, log_s, kind),
                               vae.discretised_log_prob(images, mean_img, log_s, kind).flatten(1).sum(1))
    probs = brute[:, :6]                                                  # (256, 6)
    expected_mean = (torch.arange(256, dtype=torch.float64)[:, None] / 255 * probs).sum(0)
    torch.testing.assert_close(vae.discretised_mean(mean[:6], log_scale[:6], kind), expected_mean,
                               rtol=0, atol=1e-10)
    n = 40_000
    draws = vae.discretised_sample(mean[:6].expand(n, 6), log_scale[:6], kind, torch.Generator().manual_seed(1))
    levels = vae.pixel_levels(draws).long()                               # (n, 6), on the grid
    counts = torch.stack([torch.bincount(levels[:, j], minlength=256) for j in range(6)], 1)
    se = (probs * (1 - probs) / n).sqrt()
    assert ((counts / n - probs).abs() <= 5 * se + 1e-3).all()


def test_discretised_likelihood_refuses_pixels_off_the_8bit_grid():
    mean = torch.zeros(1, 3)
    for bad in (torch.tensor([[0.5, 0.0, 1.0]]), torch.tensor([[1.0 + 1 / 255, 0.0, 0.0]]),
                torch.tensor([[-1 / 255, 0.0, 0.0]])):
        with pytest.raises(ValueError, match="8-bit pixel values k/255"):
            vae.discretised_log_likelihood(bad, mean, 0.0)
    with pytest.raises(ValueError, match="unknown discretised distribution"):
        vae.discretised_log_prob(torch.zeros(1, 3), mean, 0.0, "laplace")
    with pytest.raises(ValueError, match="no batch axis"):
        vae.discretised_log_likelihood(torch.zeros(3), torch.zeros(3), 0.0)


def test_config_image_size_likelihood_and_scale_are_validated():
    for bad, match in [(dict(image_size=30), "VAEConfig.image_size"), (dict(image_size=9), "VAEConfig.image_size"),
                       (dict(image_size=0), "VAEConfig.image_size"), (dict(likelihood="gaussian"), "VAEConfig.likelihood"),
                       (dict(likelihood="discretised_logistic", scale="image"), "VAEConfig.scale"),
                       (dict(likelihood="discretised_logistic", binarization="dynamic"), "binarises the images"),
                       (dict(scale="pixel"), "applies only to the discretised")]:
        with pytest.raises(ValueError, match=match):
            vae.VAEConfig(**bad)
    model = vae.build_vae(COLOUR)
    with pytest.raises(ValueError, match=r"\(B, 3, 32, 32\)"):
        model.encode(torch.zeros(2, 3, 28, 28))
    with pytest.raises(ValueError, match="pass draw=True"):
        vae.sample(model, 2, binary=True)


_SHAPE_CASES = [vae.VAEConfig(channels=3, image_size=size, latent_dim=5, width=4, hidden=16, likelihood=lik, scale=scale)
                for size in (32, 64, 28)
                for lik, scale in [("bernoulli", "channel"), ("discretised_logistic", "channel"),
                                   ("discretised_gaussian", "pixel")]]


@pytest.mark.parametrize("cfg", _SHAPE_CASES + [vae.CONV_VAE_OPENMOJI_SIZES[p]["model"] for p in ("smoke", "cpu", "gpu")])
def test_vae_layer_shapes_and_parameter_count_follow_the_resolution_levels(cfg):
    image_size, likelihood, scale = cfg.image_size, cfg.likelihood, cfg.scale
    sides = {28: (7, 14, 28), 32: (4, 8, 16, 32), 64: (4, 8, 16, 32, 64)}[image_size]
    model = vae.build_vae(cfg)
    C, w, h, Z, n = cfg.channels, cfg.width, cfg.hidden, cfg.latent_dim, len(sides) - 1
    P = C if likelihood == "bernoulli" else 2 * C        # logits, or means and log-scales
    x = torch.zeros(2, C, image_size, image_size)
    enc = [m for m in model.encoder.net if isinstance(m, torch.nn.Conv2d)]
    dec = [m for m in model.decoder.net if isinstance(m, torch.nn.ConvTranspose2d)]
    shapes = training.layer_shapes(model, x, {**{f"e{i}": m for i, m in enumerate(enc)},
                                              **{f"d{i}": m for i, m in enumerate(dec)}})
    widths = [w * 2**i for i in range(n)]                # w at image_size / 2, doubling per halving
    assert [shapes[f"e{i}"] for i in range(n)] == [(2, widths[i], sides[-2 - i], sides[-2 - i]) for i in range(n)]
    out = [(2, widths[n - 2 - i], sides[i + 1], sides[i + 1]) for i in range(n - 1)]
    assert [shapes[f"d{i}"] for i in range(n)] == out + [(2, P if scale == "pixel" else C, image_size, image_size)]
    params, mu, logvar, _ = model(x)
    assert params.shape == (2, P, image_size, image_size) and mu.shape == logvar.shape == (2, Z)
    assert model.decode(torch.zeros(3, 2, Z)).shape == (3, 2, P, image_size, image_size)
    # Parameters in closed form: 4x4 kernels with biases, the two linear layers each way,
    # and C log-scales for the per-channel decoder.
    convs = C * w * 16 + w + sum(a * b * 16 + b for a, b in zip(widths, widths[1:]))
    flat = widths[-1] * sides[0] ** 2
    n_enc = convs + flat * h + h + h * 2 * Z + 2 * Z
    last = P if scale == "pixel" else C
    n_dec = (Z * h + h + h * flat + flat + sum(b * a * 16 + a for a, b in zip(widths, widths[1:]))
             + w * last * 16 + last + (C if likelihood != "bernoulli" and scale == "channel" else 0))
    assert sum(p.numel() for p in model.encoder.parameters()) == n_enc
    assert sum(p.numel() for p in model.decoder.parameters()) == n_dec


@pytest.mark.parametrize("likelihood, scale", [("discretised_logistic", "pixel"), ("discretised_gaussian", "channel")])
def test_elbo_is_below_the_iwae_bound_for_a_discretised_decoder(likelihood, scale):
    cfg = dataclasses.replace(COLOUR, likelihood=likelihood, scale=scale)
    model = vae.build_vae(cfg)
    x = _colour_batch(6)
    # k = 1 with the same noise is the single-sample ELBO, computed here from its parts.
    bound = vae.iwae_bound(model, x, 1, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        mu, logvar = model.encode(x)
        z = mu + (0.5 * logvar).exp() * torch.randn(1, *mu.shape, generator=torch.Generator().manual_seed(5))[0]
        mean, log_s = model.decode(z).chunk(2, dim=1)
        rec = vae.discretised_log_prob(x, mean, log_s, cfg.discretised).flatten(1).sum(1)
        q = Independent(Normal(mu, (0.5 * logvar).exp()), 1)
        single = rec - (q.log_prob(z) - Independent(Normal(torch.zeros_like(mu), 1.0), 1).log_prob(z))
    torch.testing.assert_close(bound, single, rtol=1e-5, atol=1e-2)
    # The ELBO (analytic KL) <= E[L_k], increasing with k, per image, beyond the noise.
    g = torch.Generator().manual_seed(6)
    reps = 20
    elbos = torch.stack([vae.elbo_terms_of(model, x, generator=g).elbo for _ in range(reps)])
    iwae = {k: torch.stack([vae.iwae_bound(model, x, k, generator=g) for _ in range(reps)]) for k in (4, 32)}
    se = lambda a, b: (a.var(0) / reps + b.var(0) / reps).sqrt()
    assert (iwae[4].mean(0) - elbos.mean(0) > -3 * se(iwae[4], elbos)).all()
    assert (iwae[32].mean(0) - iwae[4].mean(0) > -3 * se(iwae[32], iwae[4])).all()
    assert float(iwae[32].mean()) > float(iwae[4].mean()) > float(elbos.mean())
    out = vae.evaluate(model, x, ks=(8,), batch_size=4)
    assert out["iwae_8"] < out["neg_elbo"] and math.isclose(out["neg_elbo"], out["recon_nll"] + out["kl"], rel_tol=1e-6)


@pytest.mark.parametrize("likelihood, scale", [("bernoulli", "channel"), ("discretised_logistic", "pixel"),
                                               ("discretised_gaussian", "channel")])
def test_tiny_colour_vae_lowers_its_negative_elbo_on_one_batch(likelihood, scale):
    cfg = dataclasses.replace(COLOUR, likelihood=likelihood, scale=scale)
    x = _colour_batch(8)
    target = vae.binarize(x) if likelihood == "bernoulli" else x
    model = vae.build_vae(cfg)

    def neg_elbo() -> float:
        return vae.evaluate(model, target, seed=0)["neg_elbo"]

    before = neg_elbo()
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    step = vae.make_train_step(model, opt, generator=torch.Generator().manual_seed(0))
    training.train(step, training.minibatches(x, batch_size=8), 150, progress=False)
    after = neg_elbo()
    assert after < 0.35 * before, (before, after)     # e.g. 28,700 -> 3,200 nats (logistic, per pixel)
    # the decoded means are 8-bit-range images, the draws lie on the grid
    means = vae.sample(model, 4, generator=torch.Generator().manual_seed(0))
    draws = vae.sample(model, 4, generator=torch.Generator().manual_seed(0), draw=True)
    assert means.shape == draws.shape == (4, 3, 32, 32) and 0 <= means.min() and means.max() <= 1
    if likelihood == "bernoulli":
        assert set(draws.unique().tolist()) <= {0.0, 1.0}
    else:
        vae.pixel_levels(draws)                                                # raises if off the grid


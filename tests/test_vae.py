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

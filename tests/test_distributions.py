import math

import pytest
import torch
from sklearn.mixture import GaussianMixture

from genart_utils import distributions as D, training


def _random_pmfs(n, k, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.softmax(3 * torch.randn(n, k, generator=g, dtype=torch.float64), -1)


def test_kl_is_non_negative_zero_on_equality_and_asymmetric():
    p, q = _random_pmfs(500, 6, 0), _random_pmfs(500, 6, 1)
    kl = D.kl_divergence(p, q)
    assert (kl > 0).all() and torch.allclose(D.kl_divergence(p, p), torch.zeros(500, dtype=torch.float64))
    assert not torch.allclose(kl, D.kl_divergence(q, p))
    ref = torch.distributions.kl_divergence(torch.distributions.Categorical(probs=p),
                                            torch.distributions.Categorical(probs=q))
    torch.testing.assert_close(kl, ref)


def test_kl_handles_zeros_by_convention():
    p = torch.tensor([0.5, 0.5, 0.0])
    q = torch.tensor([0.25, 0.25, 0.5])
    assert math.isclose(float(D.kl_divergence(p, q)), math.log(2), rel_tol=1e-6)
    assert math.isinf(float(D.kl_divergence(q, p)))


def test_js_is_symmetric_bounded_and_log2_for_disjoint_supports():
    p, q = _random_pmfs(500, 6, 2), _random_pmfs(500, 6, 3)
    js = D.js_divergence(p, q)
    torch.testing.assert_close(js, D.js_divergence(q, p))
    assert (js >= 0).all() and (js <= math.log(2)).all()
    disjoint = D.js_divergence(torch.tensor([0.3, 0.7, 0, 0]), torch.tensor([0, 0, 0.1, 0.9]))
    assert math.isclose(float(disjoint), math.log(2), rel_tol=1e-6)


def test_invalid_pmf_is_explained():
    with pytest.raises(ValueError, match="sums to"):
        D.kl_divergence(torch.tensor([0.5, 0.6]), torch.tensor([0.5, 0.5]))
    with pytest.raises(ValueError, match="negative"):
        D.js_divergence(torch.tensor([1.5, -0.5]), torch.tensor([0.5, 0.5]))


def test_gaussian_kl_matches_torch_and_quadrature():
    args = (0.3, 1.2, -1.0, 0.7)
    closed = float(D.gaussian_kl(*args))
    N = torch.distributions.Normal
    ref = float(torch.distributions.kl_divergence(N(args[0], args[1]), N(args[2], args[3])))
    x = torch.linspace(-15, 15, 200_001, dtype=torch.float64)
    numeric = D.density_divergences(N(torch.tensor(args[0], dtype=torch.float64), args[1]).log_prob(x),
                                    N(torch.tensor(args[2], dtype=torch.float64), args[3]).log_prob(x),
                                    float(x[1] - x[0]))
    assert math.isclose(closed, ref, rel_tol=1e-6) and math.isclose(closed, numeric["kl_pq"], rel_tol=1e-6)
    assert float(D.gaussian_kl(0.0, 1.0, 0.0, 1.0)) == 0.0


def test_mixture_density_integrates_to_one_and_samples_match():
    g = torch.Generator().manual_seed(0)
    m = D.GaussianMixture1d(D.MixtureConfig(n_components=3), generator=g)
    x = torch.linspace(-30, 30, 60_001, dtype=torch.float64)
    with torch.no_grad():
        assert math.isclose(float(m.log_prob(x).exp().sum() * (x[1] - x[0])), 1.0, rel_tol=1e-6)
    s = m.sample(20_000, generator=g)
    mean = float((m.weights * m.mu).sum().detach())
    assert abs(float(s.mean()) - mean) < 0.05


def test_mixture_config_is_validated_and_initialisation_depends_only_on_the_seed():
    for kwargs, field in [({"n_components": 0}, "n_components"), ({"n_components": True}, "n_components"),
                          ({"init_spread": -1.0}, "init_spread"), ({"seed": -1}, "seed"),
                          ({"init_log_sigma": float("nan")}, "init_log_sigma")]:
        with pytest.raises(ValueError, match=f"MixtureConfig.{field}"):
            D.MixtureConfig(**kwargs)
    before = torch.random.get_rng_state()
    a = D.GaussianMixture1d(D.MixtureConfig(seed=3))
    torch.manual_seed(12345)                               # the global RNG plays no part
    b = D.GaussianMixture1d(D.MixtureConfig(seed=3))
    c = D.GaussianMixture1d(D.MixtureConfig(seed=4))
    assert torch.equal(a.mu, b.mu) and not torch.equal(a.mu, c.mu)
    torch.manual_seed(0)
    state = torch.random.get_rng_state()
    D.GaussianMixture1d(D.MixtureConfig(seed=3))
    assert torch.equal(torch.random.get_rng_state(), state)          # and is left untouched
    torch.random.set_rng_state(before)


def test_gradient_maximum_likelihood_reaches_em():
    g = torch.Generator().manual_seed(1)
    x = torch.cat([torch.randn(600, generator=g) * 0.5 - 2, torch.randn(400, generator=g) * 0.8 + 1.5])
    m = D.GaussianMixture1d(D.MixtureConfig(n_components=2, init_spread=1.0),
                            generator=torch.Generator().manual_seed(0))
    opt = torch.optim.Adam(m.parameters(), lr=0.05)

    def step(batch):
        loss = m.nll(batch[0])
        opt.zero_grad()
        loss.backward()
        opt.step()
        return {"nll": loss.item()}

    training.train(step, training.minibatches(x, batch_size=1000), steps=400, progress=False)
    em = GaussianMixture(2, random_state=0).fit(x.numpy()[:, None])
    em_avg_ll = float(em.score(x.numpy()[:, None]))
    assert abs(-float(m.nll(x).detach()) - em_avg_ll) < 1e-3


def test_mixture_from_parameters_matches_torch_reference():
    import numpy as np

    weights, mu, sigma = [2.0, 6.0], np.array([-1.0, 3.0]), torch.tensor([0.5, 2.0])
    m = D.GaussianMixture1d.from_parameters(weights, mu, sigma)
    ref = torch.distributions.MixtureSameFamily(
        torch.distributions.Categorical(probs=torch.tensor([0.25, 0.75])),
        torch.distributions.Normal(torch.tensor([-1.0, 3.0]), sigma))
    x = torch.linspace(-5, 8, 27)
    with torch.no_grad():
        torch.testing.assert_close(m.log_prob(x), ref.log_prob(x))
    with pytest.raises(ValueError, match="same length"):
        D.GaussianMixture1d.from_parameters([1.0], [0.0, 1.0], [1.0, 1.0])
    with pytest.raises(ValueError, match="positive"):
        D.GaussianMixture1d.from_parameters([1.0, 1.0], [0.0, 1.0], [1.0, 0.0])

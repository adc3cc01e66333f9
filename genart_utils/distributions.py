"""Divergences and a 1-D Gaussian mixture: the foundations chapter's maths in code.

All logarithms are natural, so divergences are in nats (divide by ``log 2`` for bits).
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from . import runtime

LOG2 = math.log(2.0)


def _check_pmf(p: torch.Tensor, name: str) -> None:
    if (p < 0).any():
        raise ValueError(f"{name} has negative entries; a probability vector is non-negative")
    total = p.sum(-1)
    if not torch.allclose(total, torch.ones_like(total), atol=1e-6):
        raise ValueError(f"{name} sums to {total.tolist()} along its last axis, not 1; normalise it")


def kl_divergence(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    r"""KL divergence between discrete distributions along the last axis.

    .. math:: \mathrm{KL}(p \,\|\, q) = \sum_i p_i \log \frac{p_i}{q_i},

    with the convention :math:`0 \log(0/q) = 0`; it is :math:`+\infty` when some
    :math:`p_i > 0` has :math:`q_i = 0`.
    """
    _check_pmf(p, "p")
    _check_pmf(q, "q")
    terms = torch.where(p > 0, p * (torch.log(p) - torch.log(q)), torch.zeros_like(p))
    return terms.sum(-1)


def js_divergence(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    r"""Jensen-Shannon divergence, always finite and at most :math:`\log 2`.

    .. math:: \mathrm{JS}(p \,\|\, q) = \tfrac12 \mathrm{KL}(p \,\|\, m)
              + \tfrac12 \mathrm{KL}(q \,\|\, m), \qquad m = \tfrac12 (p + q).
    """
    m = 0.5 * (p + q)
    return 0.5 * kl_divergence(p, m) + 0.5 * kl_divergence(q, m)


def gaussian_kl(mu_p: torch.Tensor | float, sigma_p: torch.Tensor | float,
                mu_q: torch.Tensor | float, sigma_q: torch.Tensor | float) -> torch.Tensor:
    r"""Closed-form KL between univariate Gaussians (elementwise).

    .. math:: \mathrm{KL}(\mathcal N(\mu_p, \sigma_p^2) \,\|\, \mathcal N(\mu_q, \sigma_q^2))
              = \log\frac{\sigma_q}{\sigma_p}
              + \frac{\sigma_p^2 + (\mu_p - \mu_q)^2}{2\sigma_q^2} - \frac12 .
    """
    mu_p, sigma_p, mu_q, sigma_q = (torch.as_tensor(v, dtype=torch.float64)
                                    for v in (mu_p, sigma_p, mu_q, sigma_q))
    if (sigma_p <= 0).any() or (sigma_q <= 0).any():
        raise ValueError("standard deviations must be positive")
    return (torch.log(sigma_q / sigma_p)
            + (sigma_p**2 + (mu_p - mu_q) ** 2) / (2 * sigma_q**2) - 0.5)


def density_divergences(log_p: torch.Tensor, log_q: torch.Tensor, dx: float) -> dict[str, float]:
    """KL(p||q), KL(q||p) and JS(p||q) of two 1-D densities on a uniform grid (Riemann sum).

    ``log_p`` and ``log_q`` are log-densities at grid points spaced ``dx`` apart; the grid
    must cover (almost) all of both distributions' mass.
    """
    p, q = log_p.exp(), log_q.exp()
    log_m = torch.logaddexp(log_p, log_q) - LOG2
    kl_pq = (p * (log_p - log_q)).sum() * dx
    kl_qp = (q * (log_q - log_p)).sum() * dx
    js = 0.5 * ((p * (log_p - log_m)).sum() + (q * (log_q - log_m)).sum()) * dx
    return {"kl_pq": float(kl_pq), "kl_qp": float(kl_qp), "js": float(js)}


@dataclass(frozen=True)
class MixtureConfig:
    """A 1-D Gaussian mixture model."""

    n_components: int = 3      # K, the number of Gaussian bumps
    init_spread: float = 2.0   # initial means are drawn from N(0, init_spread^2)
    init_log_sigma: float = 0.0  # initial log standard deviation of every component
    seed: int = 0              # the initial means depend only on this (unless a generator is given)

    def __post_init__(self) -> None:
        runtime.check_fields(self, positive_ints=("n_components",), nonneg_ints=("seed",),
                             nonneg_floats=("init_spread",))
        value = self.init_log_sigma
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
            raise ValueError(f"MixtureConfig.init_log_sigma must be a finite number (the log of "
                             f"the initial standard deviation), got {self.init_log_sigma!r}")
        object.__setattr__(self, "init_log_sigma", float(self.init_log_sigma))


class GaussianMixture1d(nn.Module):
    r"""A mixture of K univariate Gaussians, parameterised for unconstrained optimisation.

    .. math:: p_\theta(x) = \sum_{k=1}^K \pi_k\, \mathcal N(x; \mu_k, \sigma_k^2),
              \quad \pi = \mathrm{softmax}(a), \quad \sigma_k = e^{s_k},

    so every real value of :math:`\theta = (a, \mu, s)` is a valid mixture.

    The initial means are drawn with ``generator`` if one is given, else with a generator
    seeded by ``config.seed``; the global random number generator is never used.
    """

    def __init__(self, config: MixtureConfig = MixtureConfig(), generator: torch.Generator | None = None):
        super().__init__()
        self.config = config
        k = config.n_components
        if generator is None:
            generator = torch.Generator().manual_seed(config.seed)
        self.logits = nn.Parameter(torch.zeros(k))                                   # a, (K,)
        self.mu = nn.Parameter(config.init_spread * torch.randn(k, generator=generator))  # (K,)
        self.log_sigma = nn.Parameter(torch.full((k,), config.init_log_sigma))       # s, (K,)

    @classmethod
    def from_parameters(cls, weights: torch.Tensor | list[float], mu: torch.Tensor | list[float],
                        sigma: torch.Tensor | list[float]) -> "GaussianMixture1d":
        r"""A mixture with given weights :math:`\pi`, means :math:`\mu` and standard deviations
        :math:`\sigma` (each of shape ``(K,)``, as tensors, lists or NumPy arrays), e.g. a
        known ground truth or a fit from another library such as scikit-learn.

        The weights are renormalised; they are stored as logits :math:`a = \log \pi`.
        """
        weights, mu, sigma = (torch.as_tensor(v, dtype=torch.float32).flatten()
                              for v in (weights, mu, sigma))
        if not len(weights) == len(mu) == len(sigma):
            raise ValueError(f"weights, mu and sigma need the same length, got "
                             f"{len(weights)}, {len(mu)} and {len(sigma)}")
        if (weights <= 0).any() or (sigma <= 0).any():
            raise ValueError("weights and standard deviations must be positive")
        model = cls(MixtureConfig(n_components=len(mu)))
        with torch.no_grad():
            model.logits.copy_(torch.log(weights / weights.sum()))
            model.mu.copy_(mu)
            model.log_sigma.copy_(torch.log(sigma))
        return model

    @property
    def weights(self) -> torch.Tensor:
        return F.softmax(self.logits, dim=0)

    @property
    def sigma(self) -> torch.Tensor:
        return self.log_sigma.exp()

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        r""":math:`\log p_\theta(x)` for each element of ``x`` (any shape), by log-sum-exp."""
        x = x.unsqueeze(-1)  # (..., 1) against (K,)
        log_normal = (-0.5 * ((x - self.mu) / self.sigma) ** 2 - self.log_sigma
                      - 0.5 * math.log(2 * math.pi))
        return torch.logsumexp(F.log_softmax(self.logits, dim=0) + log_normal, dim=-1)

    def nll(self, x: torch.Tensor) -> torch.Tensor:
        """Mean negative log-likelihood in nats per sample: the maximum-likelihood loss."""
        return -self.log_prob(x).mean()

    @torch.no_grad()
    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """``n`` draws: pick a component with probability pi_k, then add its Gaussian noise."""
        k = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        return self.mu[k] + self.sigma[k] * torch.randn(n, generator=generator)


def discretised_gaussian_log_likelihood(x: torch.Tensor, mean: torch.Tensor, log_scale: torch.Tensor
                                        ) -> torch.Tensor:
    r"""Log-probability (nats, elementwise) of 8-bit pixels ``x`` in ``[-1, 1]`` (the values
    :math:`2k/255 - 1`) under a Gaussian :math:`\mathcal N(\mu, \sigma^2)` discretised to the
    256 bins, with ``log_scale`` :math:`= \log\sigma`: the decoder of Ho et al.'s diffusion
    bound. Each value owns the interval up to the half-way points to its neighbours and the
    two extreme values own the tails, so the 256 probabilities of a pixel sum to 1.

    It is :func:`genart_utils.vae.discretised_log_prob` (pixels in ``[0, 1]``, where the maths
    and the numerics are documented) after the change of variables :math:`x \mapsto (x + 1)/2`,
    which halves the mean's offset and the scale; one implementation serves both chapters.
    """
    from .vae import discretised_log_prob

    return discretised_log_prob((x + 1) / 2, (mean + 1) / 2, log_scale - math.log(2.0), "gaussian")

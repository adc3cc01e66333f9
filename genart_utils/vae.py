r"""Variational autoencoders: the evidence lower bound, a convolutional VAE for 28x28
images, the importance-weighted bound, and a linear-Gaussian VAE whose likelihood is exact.

The model (Kingma and Welling 2014) is a latent-variable model

.. math:: p(z) = \mathcal N(0, I), \qquad p_\theta(x \mid z) = \text{decoder}(z),
          \qquad p_\theta(x) = \int p_\theta(x \mid z)\, p(z)\, dz,

trained together with an encoder :math:`q_\phi(z \mid x) = \mathcal N(\mu_\phi(x),
\operatorname{diag} \sigma^2_\phi(x))` by maximising the evidence lower bound (ELBO)

.. math:: \mathcal L(x) = \underbrace{\mathbb E_{q_\phi(z \mid x)}[\log p_\theta(x \mid z)]}_{
          \text{expected reconstruction log-likelihood}}
          - \underbrace{\mathrm{KL}(q_\phi(z \mid x) \,\|\, p(z))}_{\text{KL to the prior}}
          = \log p_\theta(x) - \mathrm{KL}(q_\phi(z \mid x) \,\|\, p_\theta(z \mid x))
          \le \log p_\theta(x).

All logarithms are natural: every bound is in nats per example (summed over pixels).
Images are binary, ``(B, C, H, W)`` with values in ``{0, 1}``, and the decoder returns
Bernoulli *logits*; :func:`binarize` makes binary images from ``[0, 1]`` ones.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass
from typing import Callable, Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from . import runtime, training
from .runtime import autocast, grad_scaler

Binarization = Literal["fixed", "dynamic"]
LOG_2PI = math.log(2.0 * math.pi)


# ------------------------------------------------------------------------ randomness

def _randn(shape: tuple[int, ...], generator: torch.Generator | None, device: torch.device,
           dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Standard normal noise on ``device``, drawn from ``generator`` where it lives (a CPU
    generator draws on the CPU, so the same seed gives the same noise on every device)."""
    if generator is None:
        return torch.randn(shape, device=device, dtype=dtype)
    return torch.randn(shape, generator=generator, device=generator.device, dtype=dtype).to(device)


def binarize(x: torch.Tensor, kind: Binarization = "fixed", threshold: float = 0.5,
             generator: torch.Generator | None = None) -> torch.Tensor:
    """Binary images from images in ``[0, 1]`` (same shape, same dtype).

    ``"fixed"``: 1 where the pixel exceeds ``threshold``, else 0; the same input always gives
    the same image, so evaluation numbers are reproducible.
    ``"dynamic"``: each pixel is an independent Bernoulli draw with the pixel's intensity as
    its probability, a fresh binary image on every call (a form of data augmentation).
    """
    if kind == "fixed":
        return (x > threshold).to(x.dtype)
    if kind == "dynamic":
        if generator is not None and generator.device != x.device:
            u = torch.rand(x.shape, generator=generator, dtype=x.dtype).to(x.device)
        else:
            u = torch.rand(x.shape, generator=generator, dtype=x.dtype, device=x.device)
        return (u < x).to(x.dtype)
    raise ValueError(f"unknown binarization {kind!r}; use 'fixed' (threshold) or 'dynamic' (sampled)")


def reparameterize(mu: torch.Tensor, logvar: torch.Tensor, n_samples: int | None = None,
                   generator: torch.Generator | None = None) -> torch.Tensor:
    r"""Draw :math:`z \sim \mathcal N(\mu, \operatorname{diag} e^{\text{logvar}})` as a
    differentiable function of the parameters:

    .. math:: z = \mu + \sigma \odot \varepsilon, \qquad \sigma = e^{\text{logvar}/2},
              \qquad \varepsilon \sim \mathcal N(0, I),

    so :math:`\nabla_{\mu, \sigma} \mathbb E[f(z)] = \mathbb E[\nabla_{\mu, \sigma} f(\mu +
    \sigma \odot \varepsilon)]`: the randomness no longer depends on the parameters.

    Args:
        mu, logvar: shape ``(B, d_z)`` (any shape, in fact; they must match).
        n_samples: ``None`` for one draw of shape ``(B, d_z)``; ``S`` for ``(S, B, d_z)``.
    """
    shape = mu.shape if n_samples is None else (n_samples, *mu.shape)
    eps = _randn(tuple(shape), generator, mu.device, mu.dtype)
    return mu + torch.exp(0.5 * logvar) * eps


# ------------------------------------------------------------------- pure loss terms

def gaussian_kl(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    r"""Closed-form :math:`\mathrm{KL}(\mathcal N(\mu, \operatorname{diag}\sigma^2) \,\|\,
    \mathcal N(0, I))`, summed over the last axis:

    .. math:: \mathrm{KL} = \frac12 \sum_{j=1}^{d_z} \left(\mu_j^2 + \sigma_j^2 - 1
              - \log \sigma_j^2\right), \qquad \log\sigma_j^2 = \text{logvar}_j.

    A diagonal Gaussian factorises over dimensions and so does the prior, so the KL is the
    sum of ``d_z`` univariate KLs (each is :func:`genart_utils.distributions.gaussian_kl`
    with :math:`\mu_q = 0, \sigma_q = 1`). It is zero exactly when ``mu = 0, logvar = 0``.

    Args:
        mu, logvar: shape ``(..., d_z)``.

    Returns:
        Shape ``(...)``, in nats.
    """
    if mu.shape != logvar.shape:
        raise ValueError(f"mu and logvar need the same shape, got {tuple(mu.shape)} and "
                         f"{tuple(logvar.shape)}")
    return 0.5 * (mu.pow(2) + logvar.exp() - 1.0 - logvar).sum(-1)


def bernoulli_log_likelihood(x: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    r""":math:`\log p(x \mid \ell) = \sum_i x_i \log \sigma(\ell_i) + (1 - x_i) \log(1 -
    \sigma(\ell_i)) = \sum_i x_i \ell_i - \operatorname{softplus}(\ell_i)` for binary ``x``.

    Computed from the logits :math:`\ell`, so it stays finite where :math:`\sigma(\ell)`
    would round to 0 or 1. This is minus the summed binary cross-entropy.

    Args:
        x: ``(B, C, H, W)`` with values in ``{0, 1}`` (any shape ``(B, ...)`` with a
            batch axis first; a single image needs ``x[None]``).
        logits: ``(B, C, H, W)`` or ``(S, B, C, H, W)`` (``S`` samples of ``z`` per image).

    Returns:
        ``(B,)`` or ``(S, B)``: one log-probability per image, in nats.
    """
    if x.ndim < 2:
        raise ValueError(f"x of shape {tuple(x.shape)} has no batch axis: the log-likelihood is "
                         "summed over every axis but the first, so pass x[None] (and logits[None]) "
                         "for a single example")
    if logits.shape[-x.ndim:] != x.shape:
        raise ValueError(f"logits of shape {tuple(logits.shape)} do not end with the images' "
                         f"shape {tuple(x.shape)}")
    dims = tuple(range(-(x.ndim - 1), 0))  # every axis but the batch axis
    return (x * logits - F.softplus(logits)).sum(dims)


def gaussian_log_likelihood(x: torch.Tensor, mean: torch.Tensor, log_sigma: torch.Tensor | float
                            ) -> torch.Tensor:
    r""":math:`\log \mathcal N(x; m, \sigma^2 I) = -\frac{\lVert x - m\rVert^2}{2\sigma^2}
    - \frac{d_x}{2}\log(2\pi\sigma^2)`, summed over every axis but the first.

    With :math:`\sigma` fixed, its negative is the squared error divided by
    :math:`2\sigma^2` plus a constant: a Gaussian decoder turns the reconstruction term into
    a (weighted) mean squared error.

    Args:
        x, mean: ``(B, ...)``, same shape. log_sigma: a scalar or broadcastable tensor.

    Returns:
        ``(B,)``, in nats (a log-*density*: it can be positive).
    """
    log_sigma = torch.as_tensor(log_sigma, dtype=mean.dtype, device=mean.device)
    per = -0.5 * ((x - mean) * torch.exp(-log_sigma)).pow(2) - log_sigma - 0.5 * LOG_2PI
    return per.flatten(1).sum(1) if per.ndim > 1 else per


class ELBOTerms(NamedTuple):
    """The two terms of the ELBO, per example (shape ``(B,)``, nats)."""

    reconstruction: torch.Tensor  # E_q[log p(x|z)], the expected reconstruction log-likelihood
    kl: torch.Tensor              # KL(q(z|x) || p(z)), the KL to the prior

    @property
    def elbo(self) -> torch.Tensor:
        """``reconstruction - kl``: the evidence lower bound itself, ``(B,)``."""
        return self.reconstruction - self.kl


def elbo(x: torch.Tensor, logits: torch.Tensor, mu: torch.Tensor, logvar: torch.Tensor
         ) -> ELBOTerms:
    r"""Both terms of the ELBO for a Bernoulli decoder, per example:

    .. math:: \mathcal L(x) = \underbrace{\frac1S \sum_{s=1}^{S} \log p_\theta(x \mid z_s)}_{
              \approx\, \mathbb E_q[\log p_\theta(x \mid z)]}
              - \mathrm{KL}(q_\phi(z \mid x) \,\|\, \mathcal N(0, I)),
              \qquad z_s = \mu + \sigma \odot \varepsilon_s,

    the first term a Monte Carlo estimate (unbiased, from ``S`` reparameterised samples whose
    decoded logits are passed in), the second in closed form (:func:`gaussian_kl`). The
    negative ELBO, :math:`J = -\mathcal L` = ``-(reconstruction - kl)``, is the VAE's loss;
    the reconstruction term alone is *not* the ELBO.

    Args:
        x: binary images ``(B, C, H, W)``.
        logits: decoder output for ``z`` drawn from ``q(z|x)``: ``(B, C, H, W)`` for one
            sample, or ``(S, B, C, H, W)`` for ``S`` samples (averaged).
        mu, logvar: the encoder's ``q(z|x)``, each ``(B, d_z)``.
    """
    log_px_z = bernoulli_log_likelihood(x, logits)
    if log_px_z.ndim == 2:  # (S, B): average the S samples
        log_px_z = log_px_z.mean(0)
    kl = gaussian_kl(mu, logvar)
    if kl.shape != log_px_z.shape:
        raise ValueError(f"x holds {len(x)} images but mu and logvar have shape {tuple(mu.shape)}; "
                         "pass the encoder's output for the same batch, (B, d_z) with B = len(x)")
    return ELBOTerms(reconstruction=log_px_z, kl=kl)


def log_mean_exp(a: torch.Tensor, dim: int = 0) -> torch.Tensor:
    r""":math:`\log \frac1k \sum_i e^{a_i}` along ``dim``, without overflow or underflow:
    :math:`m + \log \frac1k \sum_i e^{a_i - m}` with :math:`m = \max_i a_i` (log-sum-exp),
    so log-weights of -500 nats (whose exponentials are 0 in float32) are handled exactly."""
    return torch.logsumexp(a, dim=dim) - math.log(a.shape[dim])


def log_importance_weights(x: torch.Tensor, logits: torch.Tensor, z: torch.Tensor,
                           mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    r"""Log importance weights :math:`\log w = \log p_\theta(x \mid z) + \log p(z) - \log
    q_\phi(z \mid x)` of samples ``z`` from ``q``; :math:`\mathbb E_q[w] = p_\theta(x)`.

    Args:
        x: ``(B, C, H, W)``; logits: ``(S, B, C, H, W)``; z: ``(S, B, d_z)``;
        mu, logvar: ``(B, d_z)``.

    Returns:
        ``(S, B)`` in nats.
    """
    log_px_z = bernoulli_log_likelihood(x, logits)                         # (S, B)
    log_pz = -0.5 * (z.pow(2) + LOG_2PI).sum(-1)                           # (S, B)
    log_qz = -0.5 * ((z - mu).pow(2) * torch.exp(-logvar) + logvar + LOG_2PI).sum(-1)
    return log_px_z + log_pz - log_qz


# ----------------------------------------------------------------------------- models

@dataclass(frozen=True)
class VAEConfig:
    """A convolutional VAE for 28x28 images with a Bernoulli decoder, and how to train it."""

    channels: int = 1          # image channels (1 for MNIST)
    latent_dim: int = 16       # d_z, the dimension of z
    width: int = 32            # channels after the first conv (14x14); 2 * width at 7x7
    hidden: int = 256          # fully connected layer between the 7x7 maps and z
    lr: float = 1e-3           # Adam learning rate
    beta: float = 1.0          # weight of the KL term: 1 trains the ELBO, other values a beta-VAE
    kl_warmup_steps: int = 0   # ramp the KL weight linearly from 0 to beta over these steps
    binarization: Binarization = "fixed"  # how training images become binary (see binarize)
    seed: int = 0              # seeds the initial weights (build_vae)

    def __post_init__(self) -> None:
        runtime.check_fields(self, positive_ints=("channels", "latent_dim", "width", "hidden"),
                             nonneg_ints=("kl_warmup_steps", "seed"), positive_floats=("lr",),
                             nonneg_floats=("beta",), choices={"binarization": ("fixed", "dynamic")})


class ConvEncoder(nn.Module):
    """``x (B, C, 28, 28) -> mu, logvar``, each ``(B, latent_dim)``.

    Shapes: ``(B, C, 28, 28) -> (B, w, 14, 14) -> (B, 2w, 7, 7) -> (B, hidden) -> (B, 2 d_z)``,
    strided 4x4 convolutions with ReLU; the last layer is linear (mu and logvar are
    unconstrained reals).
    """

    def __init__(self, config: VAEConfig):
        super().__init__()
        w = config.width
        self.net = nn.Sequential(
            nn.Conv2d(config.channels, w, 4, 2, 1), nn.ReLU(),        # 28 -> 14
            nn.Conv2d(w, 2 * w, 4, 2, 1), nn.ReLU(),                  # 14 -> 7
            nn.Flatten(), nn.Linear(2 * w * 49, config.hidden), nn.ReLU(),
            nn.Linear(config.hidden, 2 * config.latent_dim),
        )

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mu, logvar = self.net(x).chunk(2, dim=-1)
        return mu, logvar


class ConvDecoder(nn.Module):
    """``z (B, latent_dim) -> logits (B, C, 28, 28)`` of independent Bernoulli pixels.

    Shapes: ``(B, d_z) -> (B, hidden) -> (B, 2w, 7, 7) -> (B, w, 14, 14) -> (B, C, 28, 28)``,
    the mirror image of :class:`ConvEncoder` with transposed convolutions.
    """

    def __init__(self, config: VAEConfig):
        super().__init__()
        w = config.width
        self.net = nn.Sequential(
            nn.Linear(config.latent_dim, config.hidden), nn.ReLU(),
            nn.Linear(config.hidden, 2 * w * 49), nn.ReLU(),
            nn.Unflatten(1, (2 * w, 7, 7)),
            nn.ConvTranspose2d(2 * w, w, 4, 2, 1), nn.ReLU(),          # 7 -> 14
            nn.ConvTranspose2d(w, config.channels, 4, 2, 1),           # 14 -> 28, logits
        )

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(z)


class VAE(nn.Module):
    """Encoder :math:`q_\\phi(z|x)` and decoder :math:`p_\\theta(x|z)` with prior N(0, I)."""

    def __init__(self, config: VAEConfig = VAEConfig()):
        super().__init__()
        self.config = config
        self.encoder = ConvEncoder(config)
        self.decoder = ConvDecoder(config)

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(B, C, 28, 28) -> mu, logvar`` of :math:`q(z|x)`, each ``(B, d_z)``."""
        if x.ndim != 4 or x.shape[1:] != (self.config.channels, 28, 28):
            raise ValueError(f"expected images of shape (B, {self.config.channels}, 28, 28), "
                             f"got {tuple(x.shape)}; the convolutions assume 28x28 images, so "
                             "add the batch axis, or resize or pad other sizes to 28x28")
        return self.encoder(x)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Logits of :math:`p(x|z)`: ``(..., d_z) -> (..., C, 28, 28)`` (any leading axes)."""
        lead = z.shape[:-1]
        return self.decoder(z.reshape(-1, z.shape[-1])).reshape(*lead, self.config.channels, 28, 28)

    def forward(self, x: torch.Tensor, generator: torch.Generator | None = None):
        """One reparameterised pass: returns ``logits (B, C, 28, 28)``, ``mu``, ``logvar``
        and ``z`` (each ``(B, d_z)``), with ``z`` drawn from :math:`q(z|x)`."""
        mu, logvar = self.encode(x)
        z = reparameterize(mu, logvar, generator=generator)
        return self.decode(z), mu, logvar, z


def build_vae(config: VAEConfig = VAEConfig(), device: torch.device | str = "cpu") -> VAE:
    """A VAE whose initial weights depend only on ``config.seed``: drawn inside
    :func:`genart_utils.runtime.seeded`, which leaves the global RNG as it was."""
    with runtime.seeded(config.seed):
        model = VAE(config)
    return model.to(device)


CONV_VAE_SIZES = {
    "smoke": dict(model=VAEConfig(latent_dim=16, width=4, hidden=32), steps=60, batch_size=64,
                  eval_every=20, n_eval=20, steps_2d=40),
    "cpu": dict(model=VAEConfig(latent_dim=16, width=16, hidden=256), steps=4_000, batch_size=64,
                eval_every=100, n_eval=500, steps_2d=1_500),
    "gpu": dict(model=VAEConfig(latent_dim=32, width=32, hidden=512), steps=8_000, batch_size=64,
                eval_every=200, n_eval=10_000, steps_2d=4_000),
}
"""The sizes of notebooks/05_conv_vae.ipynb for each execution profile (the only thing that
changes between profiles): ``cfg = runtime.profile_config(**vae.CONV_VAE_SIZES)``; the
benchmarks import the same dict."""


# ------------------------------------------------------------------------ training

def kl_weight(step: int, config: VAEConfig) -> float:
    r"""The KL weight at optimisation step ``step`` (0-based, the number of steps done before):

    .. math:: w_t = \beta \min\Big(1, \frac{t + 1}{T_w}\Big) \quad (T_w > 0),
              \qquad w_t = \beta \quad (T_w = 0),

    with :math:`T_w` = ``config.kl_warmup_steps``: a linear ramp that reaches ``beta`` at
    the last warm-up step (step :math:`T_w - 1`) and stays there."""
    if step < 0:
        raise ValueError(f"step must be >= 0 (the number of steps done), got {step!r}")
    if config.kl_warmup_steps <= 0:
        return config.beta
    return config.beta * min(1.0, (step + 1) / config.kl_warmup_steps)


def make_train_step(model: VAE, optimizer: torch.optim.Optimizer, *,
                    device: torch.device | str = "cpu", generator: torch.Generator | None = None,
                    amp: bool = True, history: training.History | None = None
                    ) -> Callable[[tuple], dict[str, float]]:
    r"""One optimisation step per call on a batch ``(x, ...)`` of images in ``[0, 1]``.

    The images are binarised as ``model.config.binarization`` says; the loss is

    .. math:: J = -\frac1B \sum_b \Big(\log p_\theta(x_b \mid z_b) - w_t\,
              \mathrm{KL}(q_\phi(z \mid x_b) \,\|\, p(z))\Big), \quad z_b \sim q_\phi(z \mid x_b),

    with :math:`w_t` from :func:`kl_weight`; for :math:`w_t = 1` it is the negative ELBO,
    :math:`J = -\mathcal L`. The step number :math:`t` is ``history.step`` when a
    ``history`` is given (pass the one :func:`genart_utils.training.train` records into, so
    that a run resumed from a checkpoint's history continues the warm-up where it stopped);
    without one, the step function counts its own calls from 0. All noise (the
    reparameterisation and dynamic binarisation) comes from ``generator``.

    Returns floats (nats per image): ``neg_elbo`` (always with weight 1, so runs with
    different weights stay comparable), ``recon_nll`` (:math:`-\mathbb E_q \log p(x|z)`,
    the distortion), ``kl`` (the rate) and ``kl_weight``. ``amp`` enables mixed precision on
    CUDA (a no-op on CPU); the loss itself is computed in float32.
    """
    device = torch.device(device)
    config = model.config
    scaler = grad_scaler(device, amp)
    calls = {"step": 0}   # used only without a history

    def step(batch) -> dict[str, float]:
        t = history.step if history is not None else calls["step"]
        x = batch[0].to(device, non_blocking=True)
        x = binarize(x, config.binarization, generator=generator)
        weight = kl_weight(t, config)
        with autocast(device, amp):
            logits, mu, logvar, _ = model(x, generator)
        terms = elbo(x, logits.float(), mu.float(), logvar.float())
        loss = (-terms.reconstruction + weight * terms.kl).mean()
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        calls["step"] += 1
        return {"neg_elbo": -terms.elbo.mean().item(),
                "recon_nll": -terms.reconstruction.mean().item(),
                "kl": terms.kl.mean().item(), "kl_weight": weight}

    return step


# ---------------------------------------------------------------------- evaluation

@torch.no_grad()
def elbo_terms_of(model: VAE, x: torch.Tensor, *, batch_size: int = 500,
                  generator: torch.Generator | None = None) -> ELBOTerms:
    """The ELBO's two terms for every image of binary ``x`` ``(N, C, 28, 28)`` (one
    reparameterised sample per image, analytic KL), in evaluation mode; ``(N,)`` each, CPU."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        recs, kls = [], []
        for chunk in x.split(batch_size):
            chunk = chunk.to(device)
            logits, mu, logvar, _ = model(chunk, generator)
            terms = elbo(chunk, logits.float(), mu.float(), logvar.float())
            recs.append(terms.reconstruction.cpu())
            kls.append(terms.kl.cpu())
        return ELBOTerms(torch.cat(recs), torch.cat(kls))
    finally:
        model.train(was_training)


@torch.no_grad()
def iwae_bound(model: VAE, x: torch.Tensor, k: int, *, generator: torch.Generator | None = None,
               max_decodes: int = 8192) -> torch.Tensor:
    r"""The importance-weighted bound (Burda et al. 2016) with ``k`` samples, per image:

    .. math:: \mathcal L_k(x) = \log \frac1k \sum_{i=1}^{k} w_i, \qquad
              w_i = \frac{p_\theta(x \mid z_i)\, p(z_i)}{q_\phi(z_i \mid x)}, \quad
              z_i \sim q_\phi(z \mid x).

    By Jensen :math:`\mathbb E[\mathcal L_k] \le \log p_\theta(x)`; the expectation does not
    decrease with ``k`` and tends to :math:`\log p_\theta(x)`, and
    :math:`\mathcal L_1` is the single-sample ELBO estimate (with a sampled KL).

    The ``k`` samples are decoded in chunks of at most ``max_decodes`` images (so
    ``k = 1000`` fits in memory), the ``(k, B)`` log-weights are kept, and the mean of the
    weights is taken by :func:`log_mean_exp` (weights like :math:`e^{-100}` underflow).

    Args:
        x: binary images ``(B, C, 28, 28)``; k: samples per image (``>= 1``).

    Returns:
        ``(B,)`` on the CPU, in nats (``-iwae_bound`` estimates :math:`-\log p(x)` from above).
    """
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        x = x.to(device)
        mu, logvar = (t.float() for t in model.encode(x))
        chunk = max(1, max_decodes // len(x))
        log_w = []
        for start in range(0, k, chunk):
            s = min(chunk, k - start)
            z = reparameterize(mu, logvar, n_samples=s, generator=generator)     # (s, B, d_z)
            logits = model.decode(z).float()                                     # (s, B, C, H, W)
            log_w.append(log_importance_weights(x, logits, z, mu, logvar))       # (s, B)
        return log_mean_exp(torch.cat(log_w), dim=0).cpu()
    finally:
        model.train(was_training)


def evaluate_per_image(model: VAE, x: torch.Tensor, *, ks: tuple[int, ...] = (),
                       batch_size: int = 100, seed: int = 0) -> dict[str, torch.Tensor]:
    """The bounds of :func:`evaluate` for every image of binary ``x`` ``(N, C, 28, 28)``:
    ``neg_elbo``, ``recon_nll``, ``kl`` and ``iwae_{k}`` for each ``k`` in ``ks``, each
    ``(N,)`` in nats (for standard errors over images, or paired differences)."""
    seed = operator.index(seed)   # an int (NumPy ints too); a float seed is refused
    terms = elbo_terms_of(model, x, generator=torch.Generator().manual_seed(seed))
    out = {"neg_elbo": -terms.elbo, "recon_nll": -terms.reconstruction, "kl": terms.kl}
    for k in ks:
        g = torch.Generator().manual_seed(seed)
        out[f"iwae_{k}"] = -torch.cat([iwae_bound(model, chunk, k, generator=g)
                                       for chunk in x.split(batch_size)])
    return out


def evaluate(model: VAE, x: torch.Tensor, *, ks: tuple[int, ...] = (), batch_size: int = 100,
             seed: int = 0) -> dict[str, float]:
    """Mean bounds over binary images ``x`` ``(N, C, 28, 28)``, in nats per image.

    Returns ``neg_elbo``, ``recon_nll`` and ``kl`` (one sample per image), and
    ``iwae_{k}`` (the mean of ``-iwae_bound``, an upper bound on ``-log p(x)``) for each
    ``k`` in ``ks``. Every estimate draws its noise from a generator seeded with ``seed``;
    :func:`evaluate_per_image` gives the values these are the means of.
    """
    per_image = evaluate_per_image(model, x, ks=ks, batch_size=batch_size, seed=seed)
    return {name: float(values.mean()) for name, values in per_image.items()}


def validation_callback(model: VAE, x_val: torch.Tensor, every: int, *,
                        x_train: torch.Tensor | None = None, seed: int = 0) -> training.Callback:
    """A callback for :func:`genart_utils.training.train` that, every ``every`` steps,
    logs ``val_neg_elbo``, the mean negative ELBO on binary ``x_val`` (exactly
    ``evaluate(model, x_val, seed=seed)["neg_elbo"]``), and, with ``x_train``,
    ``train_neg_elbo`` on those training images, evaluated the same way.

    It only logs. To keep the best model, put
    ``training.keep_best(path, {"model": model}, "val_neg_elbo", config=model.config)``
    after it in the callbacks: the best value is derived from the history, so a resumed run
    never overwrites the best checkpoint with a worse one.
    """
    def evaluate_now(step: int, history: training.History) -> None:
        values = {"val_neg_elbo": evaluate(model, x_val, seed=seed)["neg_elbo"]}
        if x_train is not None:
            values["train_neg_elbo"] = evaluate(model, x_train, seed=seed)["neg_elbo"]
        history.log(step, values)

    return training.every(every, evaluate_now)


# ------------------------------------------------------------------------ sampling

@torch.no_grad()
def sample(model: VAE, n: int, generator: torch.Generator | None = None,
           z: torch.Tensor | None = None, binary: bool = False) -> torch.Tensor:
    """Decode ``n`` codes ``z ~ N(0, I)`` (or the given ``z`` ``(n, d_z)``) into images.

    Returns ``(n, C, 28, 28)`` on the CPU: the decoder's pixel probabilities
    :math:`\\sigma(\\ell)` (the mean of :math:`p(x|z)`, what VAE figures usually show), or,
    with ``binary=True``, a binary image drawn from :math:`p(x|z)` (same ``generator``).
    """
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        if z is None:
            z = _randn((n, model.config.latent_dim), generator, device)
        probs = torch.sigmoid(model.decode(z.to(device)).float())
        if binary:
            probs = binarize(probs, "dynamic", generator=generator)
        return probs.cpu()
    finally:
        model.train(was_training)


def fit_pixel_bernoulli(x: torch.Tensor, alpha: float = 1.0) -> torch.Tensor:
    """The trivial baseline: independent Bernoulli pixels, ignoring any latent variable.

    Fitted on binary images ``x`` ``(N, C, H, W)`` by maximum likelihood with ``alpha``
    pseudo-counts of each outcome (Laplace smoothing, so that a pixel never on in training
    does not get probability 0); returns the logits ``(C, H, W)``, to be scored with
    :func:`bernoulli_log_likelihood` (its exact log-likelihood: there is no ``z``).
    """
    p = (x.sum(0) + alpha) / (len(x) + 2 * alpha)
    return torch.log(p) - torch.log1p(-p)


# ------------------------------------------------- linear-Gaussian model (probabilistic PCA)

def linear_gaussian_log_likelihood(x: torch.Tensor, A: torch.Tensor, b: torch.Tensor,
                                   sigma: torch.Tensor | float) -> torch.Tensor:
    r"""Exact :math:`\log p(x)` of :math:`z \sim \mathcal N(0, I_{d_z})`,
    :math:`x \mid z \sim \mathcal N(Az + b, \sigma^2 I_{d_x})`: integrating out :math:`z`,

    .. math:: p(x) = \mathcal N(x;\, b,\, A A^\top + \sigma^2 I_{d_x}).

    Args:
        x: ``(B, d_x)``; A: ``(d_x, d_z)``; b: ``(d_x,)``; sigma: a positive scalar.

    Returns:
        ``(B,)``, in nats.
    """
    sigma = torch.as_tensor(sigma, dtype=A.dtype)
    cov = A @ A.T + sigma**2 * torch.eye(A.shape[0], dtype=A.dtype, device=A.device)
    return torch.distributions.MultivariateNormal(b, covariance_matrix=cov).log_prob(x)


def linear_gaussian_posterior(x: torch.Tensor, A: torch.Tensor, b: torch.Tensor,
                              sigma: torch.Tensor | float) -> tuple[torch.Tensor, torch.Tensor]:
    r"""The exact posterior of the linear-Gaussian model, a Gaussian:

    .. math:: p(z \mid x) = \mathcal N\big(M^{-1} A^\top (x - b),\; \sigma^2 M^{-1}\big),
              \qquad M = A^\top A + \sigma^2 I_{d_z}.

    Its covariance does not depend on ``x``, and it is diagonal when the columns of ``A``
    are orthogonal.

    Returns:
        mean ``(B, d_z)`` and covariance ``(d_z, d_z)``.
    """
    sigma = torch.as_tensor(sigma, dtype=A.dtype)
    M = A.T @ A + sigma**2 * torch.eye(A.shape[1], dtype=A.dtype, device=A.device)
    mean = torch.linalg.solve(M, A.T @ (x - b).T).T
    return mean, sigma**2 * torch.linalg.inv(M)


def linear_gaussian_elbo(x: torch.Tensor, A: torch.Tensor, b: torch.Tensor,
                         sigma: torch.Tensor | float, q_mean: torch.Tensor, q_cov: torch.Tensor
                         ) -> ELBOTerms:
    r"""The ELBO of the linear-Gaussian model for a Gaussian :math:`q(z) = \mathcal N(m, S)`,
    both terms in closed form (no sampling):

    .. math:: \mathbb E_q[\log p(x \mid z)] = -\frac{\lVert x - b - A m\rVert^2
              + \operatorname{tr}(A S A^\top)}{2\sigma^2} - \frac{d_x}{2} \log(2\pi\sigma^2),

    .. math:: \mathrm{KL}(q \,\|\, \mathcal N(0, I)) = \frac12\big(\operatorname{tr} S
              + m^\top m - d_z - \log\det S\big).

    Args:
        x: ``(B, d_x)``; A: ``(d_x, d_z)``; b: ``(d_x,)``; q_mean: ``(B, d_z)``;
        q_cov: ``(d_z, d_z)`` or ``(B, d_z, d_z)``, symmetric positive definite (for a
        diagonal :math:`q` pass ``torch.diag_embed(logvar.exp())``).
    """
    sigma = torch.as_tensor(sigma, dtype=A.dtype)
    d_x, d_z = A.shape
    resid = x - b - q_mean @ A.T                                              # (B, d_x)
    trace_asa = torch.einsum("ij,...jk,ik->...", A, q_cov, A)                 # () or (B,)
    rec = (-(resid.pow(2).sum(-1) + trace_asa) / (2 * sigma**2)
           - 0.5 * d_x * (LOG_2PI + 2 * torch.log(sigma)))
    kl = 0.5 * (torch.diagonal(q_cov, dim1=-2, dim2=-1).sum(-1) + q_mean.pow(2).sum(-1) - d_z
                - torch.logdet(q_cov))
    return ELBOTerms(rec, kl.expand_as(rec))


@dataclass(frozen=True)
class LinearVAEConfig:
    """A VAE whose decoder is linear-Gaussian (probabilistic PCA) and whose encoder is linear."""

    data_dim: int = 5          # d_x, the dimension of x
    latent_dim: int = 2        # d_z, the dimension of z
    init_scale: float = 0.1    # initial weights ~ N(0, init_scale^2)
    lr: float = 0.01           # Adam learning rate
    seed: int = 0              # seeds the initial weights

    def __post_init__(self) -> None:
        runtime.check_fields(self, positive_ints=("data_dim", "latent_dim"), nonneg_ints=("seed",),
                             positive_floats=("init_scale", "lr"))


class LinearVAE(nn.Module):
    r"""Decoder :math:`p(x \mid z) = \mathcal N(Az + b, \sigma^2 I)`, prior
    :math:`\mathcal N(0, I)`, encoder :math:`q(z \mid x) = \mathcal N(Ex + c,
    \operatorname{diag} e^{\text{logvar}})` with a variance that does not depend on ``x``
    (neither does the exact posterior's). Its :math:`\log p(x)` is exact, so the gap to the
    ELBO can be measured.
    """

    def __init__(self, config: LinearVAEConfig = LinearVAEConfig()):
        super().__init__()
        self.config = config
        d_x, d_z = config.data_dim, config.latent_dim
        with runtime.seeded(config.seed):   # initial weights from config.seed only
            A, E = torch.randn(d_x, d_z), torch.randn(d_z, d_x)
        self.A = nn.Parameter(config.init_scale * A)                                 # (d_x, d_z)
        self.b = nn.Parameter(torch.zeros(d_x))                                      # (d_x,)
        self.log_sigma = nn.Parameter(torch.zeros(()))                               # ()
        self.E = nn.Parameter(config.init_scale * E)                                 # (d_z, d_x)
        self.c = nn.Parameter(torch.zeros(d_z))                                      # (d_z,)
        self.q_logvar = nn.Parameter(torch.zeros(d_z))                               # (d_z,)

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``x (B, d_x) -> mu, logvar``, each ``(B, d_z)``."""
        mu = x @ self.E.T + self.c
        return mu, self.q_logvar.expand_as(mu)

    def elbo_estimate(self, x: torch.Tensor, generator: torch.Generator | None = None) -> ELBOTerms:
        """The two terms with one reparameterised sample (the usual VAE training signal)."""
        mu, logvar = self.encode(x)
        z = reparameterize(mu, logvar, generator=generator)
        rec = gaussian_log_likelihood(x, z @ self.A.T + self.b, self.log_sigma)
        return ELBOTerms(rec, gaussian_kl(mu, logvar))

    def elbo(self, x: torch.Tensor) -> ELBOTerms:
        """The two terms exactly (:func:`linear_gaussian_elbo`), ``(B,)`` each."""
        mu, logvar = self.encode(x)
        return linear_gaussian_elbo(x, self.A, self.b, self.log_sigma.exp(), mu,
                                    torch.diag_embed(logvar[0].exp()))

    def log_likelihood(self, x: torch.Tensor) -> torch.Tensor:
        """Exact :math:`\\log p(x)` ``(B,)`` (:func:`linear_gaussian_log_likelihood`)."""
        return linear_gaussian_log_likelihood(x, self.A, self.b, self.log_sigma.exp())

    def posterior(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The exact posterior's mean ``(B, d_z)`` and covariance ``(d_z, d_z)``."""
        return linear_gaussian_posterior(x, self.A, self.b, self.log_sigma.exp())


def ppca_fit(x: torch.Tensor, latent_dim: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    r"""Maximum-likelihood probabilistic PCA in closed form (Tipping and Bishop 1999).

    With the sample covariance's eigenvalues :math:`\lambda_1 \ge \dots \ge \lambda_{d_x}`
    and eigenvectors :math:`U`: :math:`b = \bar x`, :math:`\sigma^2 = \frac{1}{d_x - d_z}
    \sum_{j > d_z} \lambda_j` and :math:`A = U_{d_z} (\Lambda_{d_z} - \sigma^2 I)^{1/2}`
    (up to a rotation of the latent space, which leaves :math:`p(x)` unchanged).

    Args:
        x: ``(N, d_x)`` with ``d_x > latent_dim``.

    Returns:
        ``A (d_x, d_z)``, ``b (d_x,)`` and ``sigma`` (a scalar tensor).
    """
    if x.ndim != 2:
        raise ValueError(f"x must be a (N, d_x) matrix of N data points, got shape {tuple(x.shape)}")
    n, d_x = x.shape
    if not 0 < latent_dim < d_x:
        raise ValueError(f"latent_dim must be between 1 and d_x - 1 = {d_x - 1}, got {latent_dim}")
    b = x.mean(0)
    cov = (x - b).T @ (x - b) / n           # the maximum-likelihood covariance (divides by N)
    values, vectors = torch.linalg.eigh(cov)  # ascending
    values, vectors = values.flip(0), vectors.flip(1)
    sigma2 = values[latent_dim:].mean()
    A = vectors[:, :latent_dim] * (values[:latent_dim] - sigma2).clamp(min=0).sqrt()
    return A, b, sigma2.sqrt()

r"""Variational autoencoders: the evidence lower bound, a convolutional VAE for square images
(28x28 greyscale digits, 32x32 colour emoji), the importance-weighted bound, and a
linear-Gaussian VAE whose likelihood is exact.

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
Two kinds of decoder (``VAEConfig.likelihood``):

* ``"bernoulli"`` (the default, chapter 05): images are binary, ``(B, C, H, W)`` with values
  in ``{0, 1}``, and the decoder returns Bernoulli *logits*; :func:`binarize` makes binary
  images from ``[0, 1]`` ones.
* ``"discretised_logistic"`` and ``"discretised_gaussian"``: images are 8-bit, with values
  in :math:`\{0, \frac{1}{255}, \dots, 1\}`, and the decoder returns a location and a
  log-scale for each pixel (:func:`discretised_log_prob`). Each pixel then has a probability,
  not a density, so :math:`-\log p(x)` in nats divided by :math:`d_x \ln 2`
  (:math:`d_x = C H W`) is the bits per dimension that diffusion models and other likelihood
  models report.
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
from .gan import check_image_size, resolution_levels
from .runtime import autocast, grad_scaler

Binarization = Literal["fixed", "dynamic"]
Likelihood = Literal["bernoulli", "discretised_logistic", "discretised_gaussian"]
LIKELIHOODS = ("bernoulli", "discretised_logistic", "discretised_gaussian")
DecoderScale = Literal["channel", "pixel"]
LOG_2PI = math.log(2.0 * math.pi)
PIXEL_LEVELS = 255              # 8-bit pixels take the 256 values 0, 1/255, ..., 1
LOG_SCALE_RANGE = (-12.0, 10.0)  # discretised decoders clamp log-scales to this range
INITIAL_LOG_SCALE = math.log(0.1)  # discretised decoders start with scale 0.1 (pixels in [0, 1])


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


def _sum_per_image(x: torch.Tensor, params: torch.Tensor, name: str, log_probs) -> torch.Tensor:
    """Sum per-pixel log-probabilities over every axis of ``x`` but the batch axis, after
    checking that ``x`` has one and that the decoder's ``params`` end with its shape.
    ``log_probs`` computes the per-pixel values; it is called only after the checks."""
    if x.ndim < 2:
        raise ValueError(f"x of shape {tuple(x.shape)} has no batch axis: the log-likelihood is "
                         f"summed over every axis but the first, so pass x[None] (and {name}[None]) "
                         "for a single example")
    if params.shape[-x.ndim:] != x.shape:
        raise ValueError(f"{name} of shape {tuple(params.shape)} does not end with the images' "
                         f"shape {tuple(x.shape)}")
    return log_probs().sum(tuple(range(-(x.ndim - 1), 0)))  # every axis but the batch axis


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
    return _sum_per_image(x, logits, "logits", lambda: x * logits - F.softplus(logits))


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


# ------------------------------------------------- discretised likelihood of 8-bit pixels

def pixel_levels(x: torch.Tensor) -> torch.Tensor:
    """The integer levels 0, 1, ..., 255 (as floats, same shape) of 8-bit images ``x``, whose
    values are ``level / 255``.

    Raises:
        ValueError: if a value lies outside ``[0, 1]`` or off the grid of the 256 values (by
            more than float rounding), which a probability over those values cannot score.
    """
    scaled = x.detach() * PIXEL_LEVELS
    k = scaled.round()
    bad = ((scaled - k).abs() > 1e-3) | (k < 0) | (k > PIXEL_LEVELS)   # 1e-3 of a level: rounding
    if bool(bad.any()):                                                 # one sync per call
        raise ValueError(
            f"x must hold 8-bit pixel values k/255 in [0, 1] (the discretised likelihood is a "
            f"distribution over those 256 values), got {int(bad.sum())} values off that grid, "
            f"e.g. {float(x.detach()[bad][0]):.6g}; load 8-bit images, or quantise them first "
            "with torch.round(x.clamp(0, 1) * 255) / 255")
    return k


def _log1mexp(d: torch.Tensor) -> torch.Tensor:
    r""":math:`\log(1 - e^d)` for ``d < 0``, accurate near 0 and far below it (Maechler 2012)."""
    return torch.where(d > -math.log(2.0), torch.log(-torch.expm1(d)), torch.log1p(-torch.exp(d)))


def _log_ndtr_pair(u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    r""":math:`(\log \Phi(u), \log \Phi(-u))` from one :math:`\operatorname{erfcx}`, with
    finite, accurate values and gradients in float32 for any finite ``u``
    (``torch.special.log_ndtr``'s gradient is wrong below about -100 and NaN further out).

    With :math:`t = |u|/\sqrt2` and :math:`\operatorname{erfc}(t) = \operatorname{erfcx}(t)\,
    e^{-t^2}`: :math:`\log \Phi(-|u|) = \log(\operatorname{erfcx}(t)/2) - t^2` and
    :math:`\log \Phi(|u|) = \log(1 - \operatorname{erfcx}(t)\, e^{-t^2}/2)`.
    """
    below = u < 0
    t = u * (1.0 - 2.0 * below.to(u.dtype)) / math.sqrt(2.0)   # |u| / sqrt 2, slope +-1 at 0 too
    e = torch.special.erfcx(t)
    log_tail = torch.log(0.5 * e) - t.pow(2)          # log Phi(-|u|)
    log_body = torch.log1p(-0.5 * e * torch.exp(-t.pow(2)))   # log Phi(|u|)
    return torch.where(below, log_tail, log_body), torch.where(below, log_body, log_tail)


def _standard_log_pdf(u: torch.Tensor, kind: str) -> torch.Tensor:
    if kind == "logistic":   # log sigma(u) + log sigma(-u), written to stay finite for large |u|
        return -u.abs() - 2.0 * F.softplus(-u.abs())
    return -0.5 * u.pow(2) - 0.5 * LOG_2PI


def _check_kind(kind: str) -> None:
    if kind not in ("logistic", "gaussian"):
        raise ValueError(f"unknown discretised distribution {kind!r}; use 'logistic' or 'gaussian'")


def discretised_log_prob(x: torch.Tensor, mean: torch.Tensor, log_scale: torch.Tensor | float,
                         kind: str = "logistic") -> torch.Tensor:
    r"""Log-probability of each 8-bit pixel value :math:`x \in \{0, \frac{1}{255}, \dots, 1\}`
    under a logistic or Gaussian of location :math:`\hat x` and scale :math:`s` discretised to
    the 256 values (PixelCNN++, Salimans et al. 2017; the decoder of DDPM, Ho et al. 2020),
    elementwise:

    .. math:: P(x) = F\Big(\frac{x + \frac{1}{510} - \hat x}{s}\Big)
              - F\Big(\frac{x - \frac{1}{510} - \hat x}{s}\Big),

    with :math:`F` the standard logistic CDF :math:`\sigma(a) = 1/(1 + e^{-a})` or the standard
    normal CDF :math:`\Phi` (then :math:`s` is the standard deviation :math:`\sigma`), and the
    two edge bins stretched to the whole line: :math:`P(0) = F((\frac{1}{510} - \hat x)/s)` and
    :math:`P(1) = 1 - F((1 - \frac{1}{510} - \hat x)/s)`. Each value gets the mass that the
    continuous distribution puts on its bin (up to the half-way points to its neighbours), so
    the 256 probabilities telescope to :math:`F(+\infty) - F(-\infty) = 1`: a probability, at
    most 1, so unlike a density its log never exceeds 0 and bits per dimension compare across
    models.

    Numerics, with :math:`u > v` the standardised bin edges and :math:`f = F'` the standard
    density: for the logistic, exactly :math:`\sigma(u) - \sigma(v) = \sigma(u)\,\sigma(-v)\,
    (1 - e^{-(u - v)})`, whose log involves no cancellation (:math:`u - v = 1/(255 s)` is
    computed directly). For the Gaussian, the difference is taken in the tail nearer the bin
    (:math:`\Phi(u) - \Phi(v) = \Phi(-v) - \Phi(-u)`) and in log space,
    :math:`\log \Phi(u) + \log(1 - e^{\log\Phi(v) - \log\Phi(u)})`; where the bin is so
    narrow against the scale that this ratio is above :math:`e^{-0.014}` (float32;
    :math:`e^{-1.7 \cdot 10^{-5}}` in float64), the midpoint rule :math:`\log f(c) + \log(u -
    v)` (:math:`c` the bin's standardised centre) replaces it: the switch sits where rounding,
    of relative size :math:`\epsilon_\text{float} / |\log\Phi(v) - \log\Phi(u)|`, and the
    midpoint's relative error :math:`(u - v)^2 f''/24 f` balance. ``log_scale`` is clamped to
    :data:`LOG_SCALE_RANGE` (a scale from 1/640 of a bin to 22,000 times the pixel range), so
    no intermediate overflows and every gradient is finite.

    Args:
        x: 8-bit pixel values in ``[0, 1]`` (any shape; checked by :func:`pixel_levels`).
        mean: the location :math:`\hat x` in pixel units (``[0, 1]`` is the pixel range;
            values outside are allowed), broadcastable with ``x``.
        log_scale: :math:`\log s`, broadcastable with ``x`` (a tensor or a float).
        kind: ``"logistic"`` or ``"gaussian"`` (``s`` is then the standard deviation).

    Returns:
        The broadcast shape of the three inputs, in nats (each ``<= 0``).
    """
    _check_kind(kind)
    k = pixel_levels(x)
    log_scale = torch.as_tensor(log_scale, dtype=mean.dtype, device=mean.device).clamp(*LOG_SCALE_RANGE)
    inv_s = torch.exp(-log_scale)
    centre = k / PIXEL_LEVELS
    hi = (centre + 0.5 / PIXEL_LEVELS - mean) * inv_s       # standardised upper bin edge
    lo = (centre - 0.5 / PIXEL_LEVELS - mean) * inv_s       # standardised lower bin edge
    width = inv_s / PIXEL_LEVELS                            # hi - lo, computed without a difference
    if kind == "logistic":        # sigma(hi) - sigma(lo) = sigma(hi) sigma(-lo) (1 - e^-(hi - lo))
        first, last = F.logsigmoid(hi), F.logsigmoid(-lo)   # k = 0: F(hi); k = 255: 1 - F(lo) = F(-lo)
        interior = first + last + torch.log(-torch.expm1(-width))
    else:
        (first, log_f_minus_hi), (log_f_lo, last) = _log_ndtr_pair(hi), _log_ndtr_pair(lo)
        # Interior bins: F(u) - F(v) with (u, v) = (hi, lo), or (-lo, -hi) when the bin's
        # centre lies above the mean, so that both CDFs are in their accurate lower tail.
        upper = (hi + lo) > 0
        log_fu = torch.where(upper, last, first)                          # log F(u)
        d = torch.where(upper, log_f_minus_hi, log_f_lo) - log_fu         # log F(v)/F(u) < 0
        narrow = d > -(24 * torch.finfo(d.dtype).eps) ** (1 / 3)   # 0.014 in float32, 1.7e-5 in float64
        log_diff = log_fu + _log1mexp(d.masked_fill(narrow, -1.0))        # safe where unused
        log_mid = _standard_log_pdf(0.5 * (hi + lo), kind) + torch.log(width)   # the pdf is even
        interior = torch.where(narrow, log_mid, log_diff)
    return torch.where(k == 0, first, torch.where(k == PIXEL_LEVELS, last, interior))


def discretised_log_likelihood(x: torch.Tensor, mean: torch.Tensor, log_scale: torch.Tensor | float,
                               kind: str = "logistic") -> torch.Tensor:
    r""":math:`\log p(x \mid \hat x, s) = \sum_i \log P(x_i)` for 8-bit images, each pixel
    independent with the discretised distribution of :func:`discretised_log_prob`.

    Args:
        x: 8-bit images ``(B, C, H, W)`` (any ``(B, ...)`` with a batch axis first).
        mean: ``(B, C, H, W)`` or ``(S, B, C, H, W)`` (``S`` samples of ``z`` per image).
        log_scale: broadcastable to ``mean``: per pixel like it, or per channel ``(C, 1, 1)``.

    Returns:
        ``(B,)`` or ``(S, B)``: one log-probability per image, in nats.
    """
    return _sum_per_image(x, mean, "mean", lambda: discretised_log_prob(x, mean, log_scale, kind))


def discretised_mean(mean: torch.Tensor, log_scale: torch.Tensor | float,
                     kind: str = "logistic") -> torch.Tensor:
    r"""The expected pixel value of the discretised distribution, elementwise: summing
    :math:`P(x \ge e)` over the 255 bin edges :math:`e = \frac{1}{510}, \frac{3}{510}, \dots,
    \frac{509}{510}` (each step up adds :math:`\frac{1}{255}`),

    .. math:: \mathbb E[x] = \sum_x x\, P(x) = \frac{1}{255} \sum_{e} P(x \ge e)
              = \frac{1}{255} \sum_{e} F\Big(\frac{\hat x - e}{s}\Big),

    in ``[0, 1]`` (the edge bins hold the mass beyond the range, so it is *not* the location
    :math:`\hat x` clipped). Shape: ``mean`` and ``log_scale`` broadcast.
    """
    _check_kind(kind)
    log_scale = torch.as_tensor(log_scale, dtype=mean.dtype, device=mean.device).clamp(*LOG_SCALE_RANGE)
    inv_s = torch.exp(-log_scale)
    cdf = torch.sigmoid if kind == "logistic" else torch.special.ndtr
    total = torch.zeros(torch.broadcast_shapes(mean.shape, inv_s.shape), dtype=mean.dtype,
                        device=mean.device)
    for k in range(1, PIXEL_LEVELS + 1):   # one pass per level: no (256, ...) tensor in memory
        total = total + cdf((mean - (k - 0.5) / PIXEL_LEVELS) * inv_s)
    return total / PIXEL_LEVELS


def discretised_sample(mean: torch.Tensor, log_scale: torch.Tensor | float, kind: str = "logistic",
                       generator: torch.Generator | None = None) -> torch.Tensor:
    r"""One draw of each pixel from the discretised distribution: draw :math:`y = \hat x + s
    \varepsilon` from the continuous one (:math:`\varepsilon` standard logistic,
    :math:`\log u - \log(1 - u)` with :math:`u \sim U(0, 1)`, or standard normal) and return
    the level whose bin holds it, :math:`\operatorname{clip}(\operatorname{round}(255 y), 0, 255)
    / 255`: exactly the probabilities of :func:`discretised_log_prob`. Shape: the broadcast of
    ``mean`` and ``log_scale``; noise from ``generator`` (drawn where it lives)."""
    _check_kind(kind)
    log_scale = torch.as_tensor(log_scale, dtype=mean.dtype, device=mean.device).clamp(*LOG_SCALE_RANGE)
    shape = tuple(torch.broadcast_shapes(mean.shape, log_scale.shape))
    if kind == "logistic":
        where = generator.device if generator is not None else mean.device
        u = torch.rand(shape, generator=generator, device=where, dtype=mean.dtype).to(mean.device)
        u = u.clamp(1e-7, 1 - 1e-7)
        eps = torch.log(u) - torch.log1p(-u)
    else:
        eps = _randn(shape, generator, mean.device, mean.dtype)
    y = mean + torch.exp(log_scale) * eps
    return (y * PIXEL_LEVELS).round().clamp(0, PIXEL_LEVELS) / PIXEL_LEVELS


class ELBOTerms(NamedTuple):
    """The two terms of the ELBO, per example (shape ``(B,)``, nats)."""

    reconstruction: torch.Tensor  # E_q[log p(x|z)], the expected reconstruction log-likelihood
    kl: torch.Tensor              # KL(q(z|x) || p(z)), the KL to the prior

    @property
    def elbo(self) -> torch.Tensor:
        """``reconstruction - kl``: the evidence lower bound itself, ``(B,)``."""
        return self.reconstruction - self.kl


LogLikelihood = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
"""``log_likelihood(x, decoder_output) -> (B,) or (S, B)``: :func:`bernoulli_log_likelihood`
or a model's :meth:`VAE.log_likelihood`."""


def elbo(x: torch.Tensor, logits: torch.Tensor, mu: torch.Tensor, logvar: torch.Tensor,
         log_likelihood: LogLikelihood = bernoulli_log_likelihood) -> ELBOTerms:
    r"""Both terms of the ELBO, per example (for a Bernoulli decoder unless told otherwise):

    .. math:: \mathcal L(x) = \underbrace{\frac1S \sum_{s=1}^{S} \log p_\theta(x \mid z_s)}_{
              \approx\, \mathbb E_q[\log p_\theta(x \mid z)]}
              - \mathrm{KL}(q_\phi(z \mid x) \,\|\, \mathcal N(0, I)),
              \qquad z_s = \mu + \sigma \odot \varepsilon_s,

    the first term a Monte Carlo estimate (unbiased, from ``S`` reparameterised samples whose
    decoded logits are passed in), the second in closed form (:func:`gaussian_kl`). The
    negative ELBO, :math:`J = -\mathcal L` = ``-(reconstruction - kl)``, is the VAE's loss;
    the reconstruction term alone is *not* the ELBO.

    Args:
        x: binary images ``(B, C, H, W)`` (8-bit ones for a discretised decoder).
        logits: decoder output for ``z`` drawn from ``q(z|x)``: ``(B, C, H, W)`` for one
            sample, or ``(S, B, C, H, W)`` for ``S`` samples (averaged); for a discretised
            decoder its means and log-scales, ``(..., 2C, H, W)``.
        mu, logvar: the encoder's ``q(z|x)``, each ``(B, d_z)``.
        log_likelihood: :math:`\log p_\theta(x \mid z)` from ``(x, logits)``; pass
            ``model.log_likelihood`` for a VAE whose ``config.likelihood`` is not Bernoulli.
    """
    log_px_z = log_likelihood(x, logits)
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
                           mu: torch.Tensor, logvar: torch.Tensor,
                           log_likelihood: LogLikelihood = bernoulli_log_likelihood) -> torch.Tensor:
    r"""Log importance weights :math:`\log w = \log p_\theta(x \mid z) + \log p(z) - \log
    q_\phi(z \mid x)` of samples ``z`` from ``q``; :math:`\mathbb E_q[w] = p_\theta(x)`.

    Args:
        x: ``(B, C, H, W)``; logits: ``(S, B, C, H, W)`` (``(S, B, 2C, H, W)`` for a
        discretised decoder); z: ``(S, B, d_z)``; mu, logvar: ``(B, d_z)``;
        log_likelihood: as for :func:`elbo`.

    Returns:
        ``(S, B)`` in nats.
    """
    log_px_z = log_likelihood(x, logits)                                   # (S, B)
    log_pz = -0.5 * (z.pow(2) + LOG_2PI).sum(-1)                           # (S, B)
    log_qz = -0.5 * ((z - mu).pow(2) * torch.exp(-logvar) + logvar + LOG_2PI).sum(-1)
    return log_px_z + log_pz - log_qz


# ----------------------------------------------------------------------------- models

@dataclass(frozen=True)
class VAEConfig:
    r"""A convolutional VAE for square images and how to train it: by default for 28x28
    binary images with a Bernoulli decoder (chapter 05).

    ``image_size`` sets the sides of the feature maps (:func:`genart_utils.gan.resolution_levels`,
    the DCGAN's: ``28 -> 14 -> 7``, ``32 -> 16 -> 8 -> 4``); the encoder has ``width``
    channels at ``image_size / 2`` and doubles them at each further halving.
    ``likelihood`` chooses :math:`p_\theta(x \mid z)`: independent Bernoulli pixels (binary
    images), or the discretised logistic or Gaussian of :func:`discretised_log_prob` (8-bit
    images, 256 values from 0 to 1). For a discretised decoder ``scale`` says where its scale
    comes from: ``"channel"``, one learned log-scale per colour channel, shared by every
    pixel and image; ``"pixel"``, a log-scale for each pixel that the decoder predicts from
    ``z`` next to the mean.
    """

    channels: int = 1          # image channels (1 for MNIST, 3 for colour)
    latent_dim: int = 16       # d_z, the dimension of z
    width: int = 32            # channels after the first conv (14x14); 2 * width at 7x7 (28x28 images)
    hidden: int = 256          # fully connected layer between the coarsest maps (7x7) and z
    lr: float = 1e-3           # Adam learning rate
    beta: float = 1.0          # weight of the KL term: 1 trains the ELBO, other values a beta-VAE
    kl_warmup_steps: int = 0   # ramp the KL weight linearly from 0 to beta over these steps
    binarization: Binarization = "fixed"  # how training images become binary (see binarize)
    seed: int = 0              # seeds the initial weights (build_vae)
    image_size: int = 28       # side of the square images: 28, 32, 64, ... (gan.resolution_levels)
    likelihood: Likelihood = "bernoulli"  # p(x|z): "bernoulli", "discretised_logistic" or "discretised_gaussian"
    scale: DecoderScale = "channel"       # discretised decoders only: log-scale per "channel" or per "pixel"

    def __post_init__(self) -> None:
        runtime.check_fields(self, positive_ints=("channels", "latent_dim", "width", "hidden",
                                                  "image_size"),
                             nonneg_ints=("kl_warmup_steps", "seed"), positive_floats=("lr",),
                             nonneg_floats=("beta",),
                             choices={"binarization": ("fixed", "dynamic"),
                                      "likelihood": LIKELIHOODS, "scale": ("channel", "pixel")})
        check_image_size(self)
        if self.likelihood != "bernoulli" and self.binarization != "fixed":
            raise ValueError(f"VAEConfig.binarization={self.binarization!r} binarises the images, "
                             f"but likelihood={self.likelihood!r} models 8-bit images as they are; "
                             "leave binarization at its default or use likelihood='bernoulli'")
        if self.likelihood == "bernoulli" and self.scale != "channel":
            raise ValueError(f"VAEConfig.scale={self.scale!r} applies only to the discretised "
                             "likelihoods (a Bernoulli decoder has no scale); leave scale at its "
                             "default or set likelihood='discretised_logistic'")

    @property
    def discretised(self) -> str | None:
        """``"logistic"`` or ``"gaussian"`` for a discretised decoder, else ``None``."""
        return None if self.likelihood == "bernoulli" else self.likelihood.removeprefix("discretised_")

    @property
    def decoder_channels(self) -> int:
        """Channels of the decoder's output: ``C`` logits, or ``2C`` (means, log-scales)."""
        return self.channels if self.likelihood == "bernoulli" else 2 * self.channels


class ConvEncoder(nn.Module):
    """``x (B, C, H, W) -> mu, logvar``, each ``(B, latent_dim)``, ``H = W = image_size``.

    Shapes for 28x28: ``(B, C, 28, 28) -> (B, w, 14, 14) -> (B, 2w, 7, 7) -> (B, hidden)
    -> (B, 2 d_z)``; for 32x32: ``(B, C, 32, 32) -> (B, w, 16, 16) -> (B, 2w, 8, 8)
    -> (B, 4w, 4, 4) -> (B, hidden) -> (B, 2 d_z)``. Strided 4x4 convolutions with ReLU; the
    last layer is linear (mu and logvar are unconstrained reals).
    """

    def __init__(self, config: VAEConfig):
        super().__init__()
        sides = resolution_levels(config.image_size)              # e.g. (7, 14, 28)
        widths = [config.width * 2 ** i for i in range(len(sides) - 1)]   # w, 2w, ...
        layers: list[nn.Module] = [nn.Conv2d(config.channels, widths[0], 4, 2, 1), nn.ReLU()]  # S -> S/2
        for c_in, c_out in zip(widths, widths[1:]):                                          # side / 2
            layers += [nn.Conv2d(c_in, c_out, 4, 2, 1), nn.ReLU()]
        layers += [nn.Flatten(), nn.Linear(widths[-1] * sides[0] ** 2, config.hidden), nn.ReLU(),
                   nn.Linear(config.hidden, 2 * config.latent_dim)]
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mu, logvar = self.net(x).chunk(2, dim=-1)
        return mu, logvar


class ConvDecoder(nn.Module):
    """``z (B, latent_dim) -> (B, P, H, W)``: the parameters of :math:`p(x|z)`, pixel by pixel.

    For a Bernoulli decoder ``P = C`` logits. For a discretised one ``P = 2C``: ``C`` means
    (pixel units, unconstrained) then ``C`` log-scales, either predicted (``scale="pixel"``:
    the last layer has ``2C`` outputs) or one learned parameter per channel broadcast to
    every pixel (``scale="channel"``); both start near :data:`INITIAL_LOG_SCALE`.

    Shapes for 28x28: ``(B, d_z) -> (B, hidden) -> (B, 2w, 7, 7) -> (B, w, 14, 14)
    -> (B, P, 28, 28)``, the mirror image of :class:`ConvEncoder` with transposed
    convolutions (32x32: ``-> (B, 4w, 4, 4) -> (B, 2w, 8, 8) -> (B, w, 16, 16) -> (B, P, 32, 32)``).
    """

    def __init__(self, config: VAEConfig):
        super().__init__()
        self.config = config
        sides = resolution_levels(config.image_size)
        widths = [config.width * 2 ** i for i in range(len(sides) - 1)][::-1]   # ..., 2w, w
        out = 2 * config.channels if config.scale == "pixel" and config.discretised else config.channels
        layers: list[nn.Module] = [
            nn.Linear(config.latent_dim, config.hidden), nn.ReLU(),
            nn.Linear(config.hidden, widths[0] * sides[0] ** 2), nn.ReLU(),
            nn.Unflatten(1, (widths[0], sides[0], sides[0]))]
        for c_in, c_out in zip(widths, widths[1:]):                                    # side x 2
            layers += [nn.ConvTranspose2d(c_in, c_out, 4, 2, 1), nn.ReLU()]
        layers.append(nn.ConvTranspose2d(widths[-1], out, 4, 2, 1))                  # -> S
        self.net = nn.Sequential(*layers)
        if config.discretised and config.scale == "channel":
            self.log_scale = nn.Parameter(torch.full((config.channels,), INITIAL_LOG_SCALE))  # (C,)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        out = self.net(z)                                         # (B, C or 2C, H, W)
        if self.config.discretised is None:
            return out                                            # logits
        if self.config.scale == "pixel":
            mean, raw = out.chunk(2, dim=1)
            return torch.cat([mean, raw + INITIAL_LOG_SCALE], dim=1)
        return torch.cat([out, self.log_scale[:, None, None].expand_as(out)], dim=1)


class VAE(nn.Module):
    """Encoder :math:`q_\\phi(z|x)` and decoder :math:`p_\\theta(x|z)` with prior N(0, I)."""

    def __init__(self, config: VAEConfig = VAEConfig()):
        super().__init__()
        self.config = config
        self.encoder = ConvEncoder(config)
        self.decoder = ConvDecoder(config)

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(B, C, H, W) -> mu, logvar`` of :math:`q(z|x)`, each ``(B, d_z)``."""
        c, size = self.config.channels, self.config.image_size
        if x.ndim != 4 or x.shape[1:] != (c, size, size):
            raise ValueError(f"expected images of shape (B, {c}, {size}, {size}), "
                             f"got {tuple(x.shape)}; the convolutions assume {size}x{size} images, "
                             f"so add the batch axis, or resize or pad other sizes to {size}x{size} "
                             "(or set VAEConfig.image_size and channels)")
        return self.encoder(x)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """The parameters of :math:`p(x|z)`: ``(..., d_z) -> (..., P, H, W)`` (any leading
        axes): ``P = C`` logits, or ``P = 2C`` means then log-scales (see :class:`ConvDecoder`)."""
        lead = z.shape[:-1]
        c, size = self.config.decoder_channels, self.config.image_size
        return self.decoder(z.reshape(-1, z.shape[-1])).reshape(*lead, c, size, size)

    def forward(self, x: torch.Tensor, generator: torch.Generator | None = None):
        """One reparameterised pass: returns the decoder's output ``(B, P, H, W)`` (logits
        for the Bernoulli decoder), ``mu``, ``logvar`` and ``z`` (each ``(B, d_z)``), with
        ``z`` drawn from :math:`q(z|x)`."""
        mu, logvar = self.encode(x)
        z = reparameterize(mu, logvar, generator=generator)
        return self.decode(z), mu, logvar, z

    def log_likelihood(self, x: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
        """:math:`\\log p_\\theta(x \\mid z)` per image from the decoder's output ``params``
        (``(B, P, H, W)`` or ``(S, B, P, H, W)``): :func:`bernoulli_log_likelihood` of binary
        ``x``, or :func:`discretised_log_likelihood` of 8-bit ``x``; ``(B,)`` or ``(S, B)``."""
        if self.config.discretised is None:
            return bernoulli_log_likelihood(x, params)
        mean, log_scale = params.chunk(2, dim=-3)
        return discretised_log_likelihood(x, mean, log_scale, self.config.discretised)

    def decoder_mean(self, params: torch.Tensor) -> torch.Tensor:
        """The mean image of :math:`p(x|z)`: :math:`\\sigma(\\ell)` for Bernoulli pixels,
        :func:`discretised_mean` for 8-bit ones; ``(..., C, H, W)`` in ``[0, 1]``."""
        if self.config.discretised is None:
            return torch.sigmoid(params)
        mean, log_scale = params.chunk(2, dim=-3)
        return discretised_mean(mean, log_scale, self.config.discretised)

    def decoder_draw(self, params: torch.Tensor, generator: torch.Generator | None = None
                     ) -> torch.Tensor:
        """One image drawn from :math:`p(x|z)`: binary (:func:`binarize`, ``"dynamic"``) or
        8-bit (:func:`discretised_sample`); ``(..., C, H, W)``."""
        if self.config.discretised is None:
            return binarize(torch.sigmoid(params), "dynamic", generator=generator)
        mean, log_scale = params.chunk(2, dim=-3)
        return discretised_sample(mean, log_scale, self.config.discretised, generator)


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


def _openmoji_vae(**sizes) -> VAEConfig:
    return VAEConfig(channels=3, image_size=32, likelihood="discretised_logistic", scale="pixel", **sizes)


CONV_VAE_OPENMOJI_SIZES = {
    "smoke": dict(model=_openmoji_vae(latent_dim=16, width=4, hidden=32), steps=30, batch_size=64),
    "cpu": dict(model=_openmoji_vae(latent_dim=32, width=32, hidden=256), steps=1_800, batch_size=64),
    "gpu": dict(model=_openmoji_vae(latent_dim=64, width=64, hidden=512), steps=20_000, batch_size=128),
}
"""The VAE of the side-by-side comparison on OpenMoji at 32x32 in colour: 8-bit pixels with
the discretised logistic decoder and a scale per pixel, so that its bound in bits per
dimension compares with a diffusion model's; ``cfg = runtime.profile_config(
**vae.CONV_VAE_OPENMOJI_SIZES)``. The cpu profile is sized for about 3 minutes of training
on 2 CPU cores (from steps per second measured on one thread); the gpu sizes were not timed."""


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

    For the Bernoulli decoder the images are binarised as ``model.config.binarization``
    says; a discretised decoder models them as they are (8-bit, 256 values from 0 to 1). The
    loss is

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
        if config.likelihood == "bernoulli":
            x = binarize(x, config.binarization, generator=generator)
        weight = kl_weight(t, config)
        with autocast(device, amp):
            logits, mu, logvar, _ = model(x, generator)
        terms = elbo(x, logits.float(), mu.float(), logvar.float(), model.log_likelihood)
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
    """The ELBO's two terms for every image of binary ``x`` ``(N, C, H, W)`` (8-bit for a
    discretised decoder; one reparameterised sample per image, analytic KL), in evaluation
    mode; ``(N,)`` each, CPU."""
    device = next(model.parameters()).device
    with runtime.eval_mode(model):
        recs, kls = [], []
        for chunk in x.split(batch_size):
            chunk = chunk.to(device)
            logits, mu, logvar, _ = model(chunk, generator)
            terms = elbo(chunk, logits.float(), mu.float(), logvar.float(), model.log_likelihood)
            recs.append(terms.reconstruction.cpu())
            kls.append(terms.kl.cpu())
        return ELBOTerms(torch.cat(recs), torch.cat(kls))


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
        x: binary images ``(B, C, H, W)`` (8-bit for a discretised decoder); k: samples per
            image (``>= 1``).

    Returns:
        ``(B,)`` on the CPU, in nats (``-iwae_bound`` estimates :math:`-\log p(x)` from above).
    """
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    device = next(model.parameters()).device
    with runtime.eval_mode(model):
        x = x.to(device)
        mu, logvar = (t.float() for t in model.encode(x))
        chunk = max(1, max_decodes // len(x))
        log_w = []
        for start in range(0, k, chunk):
            s = min(chunk, k - start)
            z = reparameterize(mu, logvar, n_samples=s, generator=generator)     # (s, B, d_z)
            logits = model.decode(z).float()                                     # (s, B, C, H, W)
            log_w.append(log_importance_weights(x, logits, z, mu, logvar,
                                                model.log_likelihood))           # (s, B)
        return log_mean_exp(torch.cat(log_w), dim=0).cpu()


def evaluate_per_image(model: VAE, x: torch.Tensor, *, ks: tuple[int, ...] = (),
                       batch_size: int = 100, seed: int = 0) -> dict[str, torch.Tensor]:
    """The bounds of :func:`evaluate` for every image of binary ``x`` ``(N, C, H, W)``
    (8-bit for a discretised decoder):
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
    """Mean bounds over binary images ``x`` ``(N, C, H, W)`` (8-bit for a discretised
    decoder), in nats per image.

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
    logs ``val_neg_elbo``, the mean negative ELBO on binary (or 8-bit) ``x_val`` (exactly
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
           z: torch.Tensor | None = None, binary: bool = False, *, draw: bool = False) -> torch.Tensor:
    """Decode ``n`` codes ``z ~ N(0, I)`` (or the given ``z`` ``(n, d_z)``) into images.

    Returns ``(n, C, H, W)`` on the CPU: the mean of :math:`p(x|z)` (what VAE figures usually
    show; :meth:`VAE.decoder_mean`: the pixel probabilities :math:`\\sigma(\\ell)` of the
    Bernoulli decoder), or, with ``draw=True``, an image drawn from :math:`p(x|z)` (binary for
    the Bernoulli decoder, 8-bit for a discretised one; same ``generator``). ``binary=True``
    is chapter 05's name for ``draw=True`` with the Bernoulli decoder.
    """
    if binary and model.config.likelihood != "bernoulli":
        raise ValueError(f"binary=True draws binary images, but this VAE's decoder is "
                         f"{model.config.likelihood!r} (8-bit pixels); pass draw=True instead")
    device = next(model.parameters()).device
    with runtime.eval_mode(model):
        if z is None:
            z = _randn((n, model.config.latent_dim), generator, device)
        params = model.decode(z.to(device)).float()
        images = model.decoder_draw(params, generator) if (draw or binary) else model.decoder_mean(params)
        return images.cpu()


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

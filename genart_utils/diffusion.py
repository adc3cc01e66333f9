r"""Denoising diffusion: the noise schedule, denoisers (a U-Net and a small MLP), the loss, the
DDPM and DDIM samplers with classifier-free guidance, and the variational bound in bits per
dimension.

**Time index.** The papers number the noising steps :math:`t = 1, \dots, T`. In code a step is a
0-based index ``t`` in ``[0, T)`` that stands for the paper's step ``t + 1``: ``betas[0]`` is
:math:`\beta_1`, ``alpha_bars[t]`` is :math:`\bar\alpha_{t+1}` and ``q_sample(x0, t)`` draws
:math:`x_{t+1}`. Every docstring below uses the paper's numbering in its maths and the code's in
its arguments.

**Pixels.** Models work on images in ``[-1, 1]``; the public functions take and return images in
``[0, 1]`` like the rest of the book (:func:`to_model_range`, :func:`from_model_range`).

**Guidance.** :math:`\tilde\epsilon_w = \epsilon_\theta(x_t, \varnothing) + w\,(\epsilon_\theta(x_t,
y) - \epsilon_\theta(x_t, \varnothing))`: ``w = 0`` is the unconditional model, ``w = 1`` the
conditional one and ``w > 1`` extrapolates past it.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from . import distributions, metrics, runtime, training
from .runtime import autocast, grad_scaler

SCHEDULES = ("linear", "cosine")
SAMPLERS = ("ddpm", "ddim")


# ------------------------------------------------------------------------ schedule

@dataclass(frozen=True)
class ScheduleConfig:
    """The forward (noising) process."""

    T: int = 1000              # number of noising steps
    kind: str = "linear"       # "linear": betas evenly spaced (Ho et al.); "cosine": Nichol & Dhariwal
    beta_start: float = 1e-4   # beta_1 of the linear schedule
    beta_end: float = 0.02     # beta_T of the linear schedule

    def __post_init__(self):
        runtime.check_fields(self, positive_ints=("T",), positive_floats=("beta_start", "beta_end"),
                             choices={"kind": SCHEDULES})
        if max(self.beta_start, self.beta_end) >= 1:
            raise ValueError(f"ScheduleConfig: betas are variances of one step and must be below 1, "
                             f"got beta_start={self.beta_start}, beta_end={self.beta_end}")
        if self.kind == "linear" and self.beta_start > self.beta_end:
            raise ValueError(f"ScheduleConfig: beta_start={self.beta_start} is larger than "
                             f"beta_end={self.beta_end}; the noise must grow with t")


def _betas(config: ScheduleConfig) -> torch.Tensor:
    if config.kind == "linear":
        return torch.linspace(config.beta_start, config.beta_end, config.T, dtype=torch.float64)
    s = 0.008                                       # cosine: alpha_bar(t) = f(t) / f(0)
    steps = torch.arange(config.T + 1, dtype=torch.float64) / config.T
    f = torch.cos((steps + s) / (1 + s) * math.pi / 2) ** 2
    alpha_bars = f / f[0]
    return (1 - alpha_bars[1:] / alpha_bars[:-1]).clamp(max=0.999)


class NoiseSchedule:
    r"""The forward process :math:`q(x_t \mid x_{t-1}) = \mathcal N(\sqrt{1-\beta_t}\,x_{t-1},
    \beta_t I)` and the quantities derived from it, as ``(T,)`` float64 tensors.

    * ``alphas`` :math:`\alpha_t = 1 - \beta_t`; ``alpha_bars`` :math:`\bar\alpha_t = \prod_{s \le t}
      \alpha_s`; ``sigmas`` :math:`\sigma_t = \sqrt{1 - \bar\alpha_t}`, the noise level of
      :math:`q(x_t \mid x_0) = \mathcal N(\sqrt{\bar\alpha_t}\,x_0, \sigma_t^2 I)`;
    * ``posterior_variance`` :math:`\tilde\beta_t = \beta_t (1 - \bar\alpha_{t-1}) / (1 - \bar\alpha_t)`
      (0 at the first step, where :math:`\bar\alpha_0 = 1`).

    Indices are 0-based (see the module docstring). Per-sample values are gathered with the
    dtype and device of the tensor they multiply.
    """

    def __init__(self, config: ScheduleConfig = ScheduleConfig()):
        self.config = config
        self.T = config.T
        self.betas = _betas(config)
        self.alphas = 1 - self.betas
        self.alpha_bars = torch.cumprod(self.alphas, 0)
        self.alpha_bars_prev = torch.cat([torch.ones(1, dtype=torch.float64), self.alpha_bars[:-1]])
        self.sigmas = torch.sqrt(1 - self.alpha_bars)
        self.posterior_variance = self.betas * (1 - self.alpha_bars_prev) / (1 - self.alpha_bars)
        # q(x_{t-1} | x_t, x_0) has mean coef_x0 * x_0 + coef_xt * x_t
        self.posterior_coef_x0 = self.betas * torch.sqrt(self.alpha_bars_prev) / (1 - self.alpha_bars)
        self.posterior_coef_xt = (1 - self.alpha_bars_prev) * torch.sqrt(self.alphas) / (1 - self.alpha_bars)

    def __repr__(self) -> str:
        return f"NoiseSchedule({self.config})"

    def check_t(self, t: torch.Tensor) -> torch.Tensor:
        """``t`` as an int64 tensor, after checking that every index lies in ``[0, T)``."""
        t = torch.as_tensor(t)
        if t.dtype.is_floating_point or t.dtype == torch.bool:
            raise ValueError(f"time steps must be integers in [0, {self.T}), got dtype {t.dtype}")
        if t.numel() and (int(t.min()) < 0 or int(t.max()) >= self.T):
            raise ValueError(f"time steps must lie in [0, {self.T}) (0-based: index t is the "
                             f"paper's step t + 1), got values in [{int(t.min())}, {int(t.max())}]")
        return t.long()

    def _at(self, values: torch.Tensor, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """``values[t]`` shaped ``(B, 1, ..., 1)`` to broadcast against ``like`` ``(B, ...)``."""
        out = values[self.check_t(t).cpu()].to(like.device, like.dtype)
        return out.reshape(-1, *([1] * (like.ndim - 1)))

    def q_mean_var(self, x0: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        r"""Mean and variance of :math:`q(x_t \mid x_0) = \mathcal N(\sqrt{\bar\alpha_t}\,x_0,
        (1 - \bar\alpha_t) I)`; the variance is ``(B, 1, ...)``."""
        return torch.sqrt(self._at(self.alpha_bars, t, x0)) * x0, self._at(1 - self.alpha_bars, t, x0)

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        r""":math:`x_t = \sqrt{\bar\alpha_t}\,x_0 + \sqrt{1 - \bar\alpha_t}\,\epsilon`, one step per
        sample: ``x0`` ``(B, ...)``, ``t`` ``(B,)``, ``noise`` like ``x0``."""
        if noise.shape != x0.shape:
            raise ValueError(f"noise has shape {tuple(noise.shape)}, x0 {tuple(x0.shape)}: they must match")
        return torch.sqrt(self._at(self.alpha_bars, t, x0)) * x0 + self._at(self.sigmas, t, x0) * noise

    def posterior(self, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor
                  ) -> tuple[torch.Tensor, torch.Tensor]:
        r"""Mean and variance of :math:`q(x_{t-1} \mid x_t, x_0) = \mathcal N(\tilde\mu_t,
        \tilde\beta_t I)`, with

        .. math:: \tilde\mu_t = \frac{\sqrt{\bar\alpha_{t-1}}\,\beta_t}{1 - \bar\alpha_t}\,x_0
                  + \frac{\sqrt{\alpha_t}\,(1 - \bar\alpha_{t-1})}{1 - \bar\alpha_t}\,x_t .
        """
        mean = self._at(self.posterior_coef_x0, t, x0) * x0 + self._at(self.posterior_coef_xt, t, x0) * x_t
        return mean, self._at(self.posterior_variance, t, x0)

    def predict_x0(self, x_t: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        r"""Invert :meth:`q_sample` for a noise estimate: :math:`\hat x_0 = (x_t - \sigma_t\,
        \hat\epsilon) / \sqrt{\bar\alpha_t}`."""
        return (x_t - self._at(self.sigmas, t, x_t) * eps) / torch.sqrt(self._at(self.alpha_bars, t, x_t))

    def predict_eps(self, x_t: torch.Tensor, t: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
        r"""The noise that takes ``x0`` to ``x_t``: :math:`(x_t - \sqrt{\bar\alpha_t}\,x_0) / \sigma_t`."""
        return (x_t - torch.sqrt(self._at(self.alpha_bars, t, x_t)) * x0) / self._at(self.sigmas, t, x_t)

    def timesteps(self, steps: int, start: int | None = None) -> torch.Tensor:
        """The decreasing 0-based indices a sampler with ``steps`` steps visits: ``steps``
        evenly spaced indices from ``start`` (default ``T - 1``) down to 0 (all of them when
        ``steps == start + 1``). A ``start`` below ``T - 1`` is a sampler that begins from a
        partly noised image, as SDEdit does."""
        start = self.T - 1 if start is None else start
        if not runtime.is_int(start) or not 0 <= start < self.T:
            raise ValueError(f"start must be a 0-based step index in [0, {self.T}), got {start!r}")
        if not runtime.is_int(steps) or not 1 <= steps <= start + 1:
            raise ValueError(f"the number of sampling steps must be an integer from 1 to {start + 1} "
                             f"(the steps from index {start} down to 0), got {steps!r}")
        if steps == 1:
            return torch.tensor([start])
        return torch.linspace(start, 0, steps, dtype=torch.float64).round().long()


def to_model_range(x: torch.Tensor) -> torch.Tensor:
    """Images in ``[0, 1]`` -> ``[-1, 1]``, the range the denoisers work in."""
    return 2 * x - 1


def from_model_range(x: torch.Tensor) -> torch.Tensor:
    """``[-1, 1]`` -> ``[0, 1]``, clamped (a sample may overshoot slightly)."""
    return ((x + 1) / 2).clamp(0, 1)


# ------------------------------------------------------------------------ denoisers

def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10_000.0) -> torch.Tensor:
    r"""Sinusoidal embedding ``(B, dim)`` of integer steps ``t`` ``(B,)``, as a transformer's
    positions: :math:`[\cos(t\,\omega_i), \sin(t\,\omega_i)]` with :math:`\omega_i =
    \text{max\_period}^{-i / (\text{dim}/2)}`."""
    if dim % 2:
        raise ValueError(f"the time embedding needs an even dim, got {dim}")
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    angles = t.float()[:, None] * freqs[None]                                 # (B, half)
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=1)


@dataclass(frozen=True)
class MLPDenoiserConfig:
    """An MLP that predicts the noise of low-dimensional points (the 2-D toys)."""

    dim: int = 2           # data dimension
    hidden: int = 128      # width of every hidden layer
    layers: int = 3        # hidden layers
    time_dim: int = 32     # size of the sinusoidal time embedding (even)
    seed: int = 0          # initial weights

    def __post_init__(self):
        runtime.check_fields(self, positive_ints=("dim", "hidden", "layers", "time_dim"),
                             nonneg_ints=("seed",))
        if self.time_dim % 2:
            raise ValueError(f"MLPDenoiserConfig.time_dim must be even, got {self.time_dim}")


class MLPDenoiser(nn.Module):
    """``(B, dim)`` points and ``(B,)`` steps -> predicted noise ``(B, dim)``."""

    def __init__(self, config: MLPDenoiserConfig = MLPDenoiserConfig()):
        super().__init__()
        self.config = config
        with runtime.seeded(config.seed):
            dims = [config.dim + config.time_dim] + [config.hidden] * config.layers
            layers = []
            for a, b in zip(dims[:-1], dims[1:]):
                layers += [nn.Linear(a, b), nn.SiLU()]
            self.net = nn.Sequential(*layers, nn.Linear(dims[-1], config.dim))

    def forward(self, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        if labels is not None:
            raise ValueError("MLPDenoiser is unconditional: call it without labels")
        return self.net(torch.cat([x, timestep_embedding(t, self.config.time_dim)], dim=1))


@dataclass(frozen=True)
class UNetConfig:
    """A small U-Net noise predictor (Ho et al.'s design, scaled down)."""

    image_size: int = 32            # height = width, a power of two
    channels: int = 3               # image channels
    patch: int = 1                  # pixel-unshuffle factor: p x p pixels become one position with
                                    # p * p * channels inputs, so the U-Net runs at image_size / p
    base: int = 32                  # channels at full resolution
    mults: tuple = (1, 2, 2)        # channel multiplier per resolution (each level halves the size)
    blocks: int = 1                 # residual blocks per level on the way down (one more on the way up)
    attention_at: tuple = (8,)      # resolutions with self-attention after each residual block
    heads: int = 1                  # attention heads
    groups: int = 8                 # group-norm groups (must divide every width)
    n_classes: int = 0              # class labels for conditioning (0: unconditional)
    context_dim: int = 0            # width of the token states to cross-attend to (0: none)
    dropout: float = 0.0            # dropout inside residual blocks
    seed: int = 0                   # initial weights

    def __post_init__(self):
        runtime.check_fields(self, positive_ints=("image_size", "channels", "patch", "base", "blocks",
                                                  "heads", "groups"),
                             nonneg_ints=("n_classes", "context_dim", "seed"), half_open_unit=("dropout",))
        if self.n_classes and self.context_dim:
            raise ValueError("UNetConfig: condition on class labels (n_classes) or on token states "
                             "(context_dim), not both; set the other to 0")
        size = self.image_size
        if size & (size - 1):
            raise ValueError(f"UNetConfig.image_size must be a power of two, got {size}")
        if not self.mults or not all(runtime.is_int(m) and m > 0 for m in self.mults):
            raise ValueError(f"UNetConfig.mults must be a non-empty tuple of positive ints, got {self.mults!r}")
        if self.patch & (self.patch - 1) or self.patch >= size:
            raise ValueError(f"UNetConfig.patch must be a power of two below image_size={size}, "
                             f"got {self.patch}")
        size //= self.patch
        lowest = size >> (len(self.mults) - 1)
        if lowest < 2:
            raise ValueError(f"UNetConfig: {len(self.mults)} levels halve {size} pixels to {lowest}; "
                             "use fewer mults or a larger image_size")
        levels = [size >> i for i in range(len(self.mults))]   # resolutions inside the U-Net
        stray = [r for r in self.attention_at if r not in levels]
        if stray:
            raise ValueError(f"UNetConfig.attention_at={self.attention_at}: resolutions {stray} are "
                             f"not among the U-Net's levels {levels}")
        for w in {self.base * m for m in self.mults}:
            if w % self.groups or w % self.heads:
                raise ValueError(f"UNetConfig: width {w} is not divisible by groups={self.groups} "
                                 f"and heads={self.heads}")

    @property
    def time_dim(self) -> int:
        return 4 * self.base


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv twice, the time (and class) embedding added in between, and a
    skip connection (a 1x1 conv when the width changes)."""

    def __init__(self, c_in: int, c_out: int, emb_dim: int, groups: int, dropout: float):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, c_in)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.emb = nn.Linear(emb_dim, c_out)
        self.norm2 = nn.GroupNorm(groups, c_out)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1)
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))                          # (B, c_out, H, W)
        h = h + self.emb(F.silu(emb))[:, :, None, None]                # per-channel shift from (t, y)
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.skip(x) + h


class SelfAttention2d(nn.Module):
    """Multi-head self-attention over the ``H * W`` positions of a feature map, with a
    residual connection: every pixel can look at every other one (used at low resolution,
    where ``H * W`` is small)."""

    def __init__(self, channels: int, heads: int, groups: int):
        super().__init__()
        self.heads = heads
        self.norm = nn.GroupNorm(groups, channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(b, 3, self.heads, c // self.heads, h * w).unbind(1)
        # (B, heads, d, HW) -> (B, heads, HW, d) for scaled dot-product attention
        y = F.scaled_dot_product_attention(q.transpose(-1, -2), k.transpose(-1, -2), v.transpose(-1, -2))
        return x + self.out(y.transpose(-1, -2).reshape(b, c, h, w))


class CrossAttention2d(nn.Module):
    r"""Multi-head cross-attention from the ``H * W`` positions of a feature map (queries) to
    the ``L`` states of a token sequence (keys and values), with a residual connection: each
    pixel reads what it needs from the caption. For one head,

    .. math:: \mathrm{out}_p = \sum_{j:\,m_j} \mathrm{softmax}_j\Big(\frac{q_p^\top k_j}{\sqrt d}\Big)\,v_j,
              \qquad q = W_q\,\mathrm{GN}(h),\ k = W_k\,c,\ v = W_v\,c,

    where the softmax runs over the tokens ``j`` that the mask ``m`` keeps (not padding).
    This is how Stable Diffusion's U-Net reads its text encoder's token states. A floating
    mask holds log-weights :math:`\log w_j` added to the logits instead (``-inf`` drops a
    token): the softmax then weighs token ``j`` by :math:`w_j` (co-creation's prompt blends)."""

    def __init__(self, channels: int, context_dim: int, heads: int, groups: int):
        super().__init__()
        self.heads = heads
        self.norm = nn.GroupNorm(groups, channels)
        self.q = nn.Conv2d(channels, channels, 1)
        self.kv = nn.Linear(context_dim, 2 * channels)
        self.out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor, context: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        b, c, h, w = x.shape
        d = c // self.heads
        q = self.q(self.norm(x)).reshape(b, self.heads, d, h * w).transpose(-1, -2)   # (B, heads, HW, d)
        k, v = self.kv(context).reshape(b, -1, 2, self.heads, d).permute(2, 0, 3, 1, 4)  # (B, heads, L, d)
        if mask is None:
            keep = None
        elif mask.dtype.is_floating_point:      # log-weights added to the logits (-inf: ignore)
            keep = mask[:, None, None, :].to(q.dtype)                                  # (B, 1, 1, L)
        else:
            keep = mask[:, None, None, :].bool()                                       # (B, 1, 1, L)
        y = F.scaled_dot_product_attention(q, k.to(q.dtype), v.to(q.dtype), attn_mask=keep)
        return x + self.out(y.transpose(-1, -2).reshape(b, c, h, w))


class UNet(nn.Module):
    """``(B, C, S, S)`` noisy images in ``[-1, 1]``, ``(B,)`` 0-based steps and optional ``(B,)``
    labels -> predicted noise ``(B, C, S, S)``.

    Down path: a 3x3 conv to ``base`` channels, then per level ``blocks`` residual blocks
    (each followed by self-attention at the resolutions in ``attention_at``) and a strided
    conv that halves the size; middle: residual, attention, residual; up path: per level
    ``blocks + 1`` residual blocks, each taking the matching down-path activation
    concatenated to its input, then a nearest-neighbour upsampling and a conv.

    With ``n_classes > 0`` the label's embedding is added to the time embedding; label
    ``n_classes`` (or ``labels=None``) is the "no label" token that classifier-free guidance
    trains by dropping labels.

    With ``context_dim > 0`` every self-attention layer (at the resolutions in
    ``attention_at`` and in the middle) is followed by a :class:`CrossAttention2d` to the
    ``(B, L, context_dim)`` token states passed as ``context`` (with a ``(B, L)`` mask of the
    tokens to attend to): the text conditioning of latent diffusion.
    """

    def __init__(self, config: UNetConfig = UNetConfig()):
        super().__init__()
        self.config = config
        with runtime.seeded(config.seed):
            self._build(config)

    def _build(self, c: UNetConfig) -> None:
        emb = c.time_dim
        self.time_mlp = nn.Sequential(nn.Linear(c.base, emb), nn.SiLU(), nn.Linear(emb, emb))
        self.label_emb = nn.Embedding(c.n_classes + 1, emb) if c.n_classes else None
        self.unshuffle = nn.PixelUnshuffle(c.patch) if c.patch > 1 else nn.Identity()
        self.shuffle = nn.PixelShuffle(c.patch) if c.patch > 1 else nn.Identity()
        pixels_in = c.channels * c.patch ** 2
        self.stem = nn.Conv2d(pixels_in, c.base, 3, padding=1)
        widths = [c.base * m for m in c.mults]

        def attention(width, res):
            return SelfAttention2d(width, c.heads, c.groups) if res in c.attention_at else nn.Identity()

        def with_cross(width, res):            # the cross-attention that follows an attention layer
            return [CrossAttention2d(width, c.context_dim, c.heads, c.groups)] \
                if c.context_dim and res in c.attention_at else []

        self.down = nn.ModuleList()
        skips, width, res = [c.base], c.base, c.image_size // c.patch
        for level, w in enumerate(widths):
            for _ in range(c.blocks):
                self.down.append(nn.ModuleList([ResBlock(width, w, emb, c.groups, c.dropout),
                                                attention(w, res), *with_cross(w, res)]))
                width = w
                skips.append(width)
            if level < len(widths) - 1:
                self.down.append(nn.Conv2d(width, width, 3, stride=2, padding=1))
                res //= 2
                skips.append(width)
        self.mid = nn.ModuleList([ResBlock(width, width, emb, c.groups, c.dropout),
                                  SelfAttention2d(width, c.heads, c.groups),
                                  ResBlock(width, width, emb, c.groups, c.dropout)])
        self.mid_cross = CrossAttention2d(width, c.context_dim, c.heads, c.groups) if c.context_dim else None
        self.up = nn.ModuleList()
        for level, w in reversed(list(enumerate(widths))):
            for _ in range(c.blocks + 1):
                self.up.append(nn.ModuleList([ResBlock(width + skips.pop(), w, emb, c.groups, c.dropout),
                                              attention(w, res), *with_cross(w, res)]))
                width = w
            if level > 0:
                self.up.append(nn.Sequential(nn.Upsample(scale_factor=2, mode="nearest"),
                                             nn.Conv2d(width, width, 3, padding=1)))
                res *= 2
        self.head = nn.Sequential(nn.GroupNorm(c.groups, width), nn.SiLU(),
                                  nn.Conv2d(width, pixels_in, 3, padding=1))

    def forward(self, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor | None = None,
                context: torch.Tensor | None = None, context_mask: torch.Tensor | None = None) -> torch.Tensor:
        c = self.config
        if (context is None) != (not c.context_dim):
            raise ValueError(f"this U-Net was built with context_dim={c.context_dim}: pass context "
                             "(B, L, context_dim) token states exactly when context_dim > 0")
        if context is not None and (context.ndim != 3 or context.shape[0] != len(x)
                                    or context.shape[2] != c.context_dim):
            raise ValueError(f"context must have shape ({len(x)}, L, {c.context_dim}), got {tuple(context.shape)}")
        if x.ndim != 4 or tuple(x.shape[1:]) != (c.channels, c.image_size, c.image_size):
            raise ValueError(f"the U-Net takes images of shape (B, {c.channels}, {c.image_size}, "
                             f"{c.image_size}), got {tuple(x.shape)}")
        emb = self.time_mlp(timestep_embedding(t, c.base))                   # (B, 4 * base)
        if self.label_emb is not None:
            if labels is None:
                labels = torch.full((len(x),), c.n_classes, dtype=torch.long, device=x.device)
            elif labels.dtype.is_floating_point or int(labels.min()) < 0 or int(labels.max()) > c.n_classes:
                raise ValueError(f"labels must be integers in [0, {c.n_classes}] ({c.n_classes}: no "
                                 f"label), got {labels.dtype} values in [{labels.min()}, {labels.max()}]")
            emb = emb + self.label_emb(labels)
        elif labels is not None:
            raise ValueError("this U-Net is unconditional (n_classes=0): call it without labels")
        def level(layer, h):                  # residual block, attention, cross-attention
            h = layer[1](layer[0](h, emb))
            return layer[2](h, context, context_mask) if len(layer) == 3 else h

        h = self.stem(self.unshuffle(x))                                     # (B, base, S/p, S/p)
        skips = [h]
        for layer in self.down:
            h = level(layer, h) if isinstance(layer, nn.ModuleList) else layer(h)   # or downsample
            skips.append(h)
        h = self.mid[1](self.mid[0](h, emb))
        if self.mid_cross is not None:
            h = self.mid_cross(h, context, context_mask)
        h = self.mid[2](h, emb)
        for layer in self.up:
            if isinstance(layer, nn.ModuleList):
                h = level(layer, torch.cat([h, skips.pop()], dim=1))
            else:
                h = layer(h)                                                # upsample
        return self.shuffle(self.head(h))


# ------------------------------------------------------------------------ training

LOSS_WEIGHTINGS = ("eps", "v")


def simple_loss(model: nn.Module, schedule: NoiseSchedule, x0: torch.Tensor, t: torch.Tensor,
                noise: torch.Tensor, labels: torch.Tensor | None = None, weighting: str = "eps"
                ) -> torch.Tensor:
    r"""The noise-matching loss, in one of two weightings of the same per-step errors.

    * ``weighting="eps"``: Ho et al.'s "simple" loss, :math:`J = \frac1B \sum_b \frac{1}{d_x}
      \|\epsilon_b - \epsilon_\theta(x_{t_b}, t_b)\|^2`. Each term is, up to the weight
      :math:`\beta_t^2 / (2\tilde\beta_t\,\alpha_t\,(1 - \bar\alpha_t))` and a constant, the KL
      term :math:`L_{t-1}` of the variational bound; dropping the weights (and drawing ``t``
      uniformly) gives the steps with little noise less weight than the bound does.
    * ``weighting="v"``: the same errors divided by :math:`\bar\alpha_t`, which is the squared
      error of the velocity :math:`v = \sqrt{\bar\alpha_t}\,\epsilon - \sigma_t x_0`, because
      :math:`\epsilon - \hat\epsilon = \sqrt{\bar\alpha_t}\,(v - \hat v)` at a fixed :math:`x_t`.
      Near :math:`t = T` the weight grows like :math:`1/\bar\alpha_t`: there the image is
      :math:`\hat x_0 = (x_t - \sigma_t\hat\epsilon)/\sqrt{\bar\alpha_t}`, so a tiny noise error
      is a huge image error, and the "eps" weighting barely trains those steps. Use it with a
      :class:`VPrediction` network, whose output is :math:`\hat v`.

    ``model`` returns the noise estimate :math:`\epsilon_\theta`; ``x0`` in ``[-1, 1]``;
    returns a scalar.
    """
    if weighting not in LOSS_WEIGHTINGS:
        raise ValueError(f"weighting must be one of {LOSS_WEIGHTINGS}, got {weighting!r}")
    x_t = schedule.q_sample(x0, t, noise)
    eps = model(x_t, t, labels) if labels is not None else model(x_t, t)
    per_sample = ((eps.float() - noise.float()) ** 2).flatten(1).mean(1)          # (B,)
    if weighting == "v":
        per_sample = per_sample / schedule._at(schedule.alpha_bars, t, per_sample).float()
    return per_sample.mean()


class VPrediction(nn.Module):
    r"""A network that outputs the velocity :math:`\hat v`, seen from outside as a noise
    predictor: ``forward`` returns :math:`\hat\epsilon = \sqrt{\bar\alpha_t}\,\hat v + \sigma_t
    x_t` (from :math:`x_t = \sqrt{\bar\alpha_t}\,x_0 + \sigma_t\epsilon` and :math:`v =
    \sqrt{\bar\alpha_t}\,\epsilon - \sigma_t x_0`), so the samplers, guidance and the bound work
    unchanged. Near :math:`t = T` it predicts :math:`\hat x_0 = \sqrt{\bar\alpha_t}\,x_t -
    \sigma_t \hat v \approx -\hat v` directly instead of dividing a noise error by
    :math:`\sqrt{\bar\alpha_t} \approx 0`. Train it with ``simple_loss(..., weighting="v")``.
    """

    def __init__(self, net: nn.Module, schedule: NoiseSchedule):
        super().__init__()
        self.net = net
        self.config = net.config
        self.register_buffer("alpha_bars", schedule.alpha_bars.float())

    def forward(self, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        v = self.net(x, t, labels) if labels is not None else self.net(x, t)
        ab = self.alpha_bars[t].to(v.dtype).reshape(-1, *([1] * (x.ndim - 1)))
        return torch.sqrt(ab) * v + torch.sqrt(1 - ab) * x


EMA = training.EMA     # the averaged weights; shared with the text-to-image parts


def make_train_step(model: nn.Module, optimizer: torch.optim.Optimizer, schedule: NoiseSchedule, *,
                    device: torch.device | str = "cpu", generator: torch.Generator | None = None,
                    amp: bool = True, ema: EMA | None = None, label_dropout: float = 0.0,
                    grad_clip: float | None = 1.0, weighting: str = "eps"
                    ) -> Callable[[tuple], dict[str, float]]:
    r"""One optimisation step of :func:`simple_loss` per call on a batch ``(x, labels)`` of
    images in ``[0, 1]`` (labels are used when the model has ``n_classes > 0``).

    Steps ``t`` are uniform over ``[0, T)`` and the noise Gaussian, both drawn from
    ``generator`` (on the CPU, so a run is the same on every device). For classifier-free
    guidance each label is replaced by the "no label" token with probability
    ``label_dropout``, so the one network also learns :math:`\epsilon_\theta(x_t, \varnothing)`.
    ``weighting`` is :func:`simple_loss`'s. Gradients are clipped to norm ``grad_clip``;
    ``ema`` is updated after each step. ``amp``
    enables mixed precision on CUDA (a no-op on CPU). Returns ``{"loss": J}``.
    """
    device = torch.device(device)
    if not runtime.is_real(label_dropout) or not 0.0 <= label_dropout <= 1.0:
        raise ValueError(f"label_dropout is a probability in [0, 1], got {label_dropout!r}")
    n_classes = getattr(getattr(model, "config", None), "n_classes", 0)
    scaler = grad_scaler(device, amp)

    def step(batch) -> dict[str, float]:
        x = to_model_range(batch[0]).to(device, non_blocking=True)
        b = len(x)
        t = torch.randint(0, schedule.T, (b,), generator=generator)
        noise = torch.randn(x.shape, generator=generator).to(device)
        labels = None
        if n_classes:
            labels = batch[1].clone()
            drop = torch.rand(b, generator=generator) < label_dropout
            labels[drop] = n_classes
            labels = labels.to(device)
        with autocast(device, amp):
            loss = simple_loss(model, schedule, x, t.to(device), noise, labels, weighting)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        if grad_clip is not None:
            scaler.unscale_(optimizer)
            nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        scaler.step(optimizer)
        scaler.update()
        if ema is not None:
            ema.update(model)
        return {"loss": loss.item()}

    return step


# ------------------------------------------------------------------------ sampling

def guided_eps(model: nn.Module, x_t: torch.Tensor, t: torch.Tensor,
               labels: torch.Tensor | None = None, guidance: float = 1.0) -> torch.Tensor:
    r"""The denoiser's noise estimate with classifier-free guidance,

    .. math:: \tilde\epsilon_w = \epsilon_\theta(x_t, \varnothing)
              + w\,\big(\epsilon_\theta(x_t, y) - \epsilon_\theta(x_t, \varnothing)\big).

    Since :math:`\epsilon_\theta \approx -\sigma_t \nabla \log p_t`, this is the score of
    :math:`p_t(x)\,p_t(y \mid x)^w` (Bayes' rule: :math:`\nabla \log p_t(x \mid y) = \nabla\log
    p_t(x) + \nabla \log p_t(y \mid x)`). ``labels=None`` or ``guidance == 1`` costs one
    network call; other values evaluate both branches in one batch.

    :math:`\varnothing` is the label ``n_classes`` of a class-conditional U-Net, or what the
    model's (or its wrapped ``net``'s) ``null_condition(labels)`` returns, e.g. the empty
    caption of a text-conditioned model.
    """
    if labels is None:
        return model(x_t, t)
    if guidance == 1:
        return model(x_t, t, labels)
    null_condition = getattr(getattr(model, "net", model), "null_condition", None)
    n_classes = getattr(getattr(model, "config", None), "n_classes", 0)
    if null_condition is not None:
        null = null_condition(labels)
    elif n_classes:
        null = torch.full_like(labels, n_classes)
    else:
        raise ValueError(f"classifier-free guidance needs a conditional model (n_classes > 0 or a "
                         f"null_condition); {type(model).__name__} is unconditional: sample it without labels")
    eps = model(torch.cat([x_t, x_t]), torch.cat([t, t]), torch.cat([labels, null]))
    eps_cond, eps_uncond = eps.chunk(2)
    return eps_uncond + guidance * (eps_cond - eps_uncond)


@torch.no_grad()
def reverse_step(model: nn.Module, schedule: NoiseSchedule, x: torch.Tensor, t: int, s: int, *,
                 method: str = "ddim", eta: float = 0.0, labels: torch.Tensor | None = None,
                 guidance: float = 1.0, generator: torch.Generator | None = None,
                 clip_x0: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """One step of :func:`sample` from index ``t`` to the next visited index ``s < t``
    (``s = -1``: to the clean image; ``method="ddpm"`` needs ``s = t - 1``). Returns
    ``(x_s, x0_hat)``, both in the model's space; the noise, if any, comes from ``generator``
    on the CPU. Used by :func:`sample` and by co-creation's inpainting, which edits ``x_s``
    between steps."""
    device = x.device
    tt = torch.full((len(x),), t, dtype=torch.long, device=device)
    eps = guided_eps(model, x, tt, labels, guidance).float()
    x0 = schedule.predict_x0(x, tt, eps)
    if clip_x0:
        x0 = x0.clamp(-1, 1)
        eps = schedule.predict_eps(x, tt, x0)
    if method == "ddpm":
        if s != t - 1:
            raise ValueError(f"a DDPM step goes from t to t - 1, got t = {t}, s = {s}")
        mean, var = schedule.posterior(x0, x, tt)
        noise = torch.randn(x.shape, generator=generator).to(device) if t > 0 else 0.0
        return mean + var.sqrt() * noise, x0
    ab_t = float(schedule.alpha_bars[t])
    ab_s = float(schedule.alpha_bars[s]) if s >= 0 else 1.0
    var = eta ** 2 * (1 - ab_s) / (1 - ab_t) * (1 - ab_t / ab_s)
    x_s = math.sqrt(ab_s) * x0 + math.sqrt(max(1 - ab_s - var, 0.0)) * eps
    if var > 0:
        x_s = x_s + math.sqrt(var) * torch.randn(x.shape, generator=generator).to(device)
    return x_s, x0


@torch.no_grad()
def sample(model: nn.Module, schedule: NoiseSchedule, shape: Sequence[int], *, method: str = "ddpm",
           steps: int | None = None, eta: float = 0.0, labels: torch.Tensor | None = None,
           guidance: float = 1.0, generator: torch.Generator | None = None,
           device: torch.device | str = "cpu", clip_x0: bool = True, trajectory: bool = False,
           x_T: torch.Tensor | None = None, to_images: bool = True, start: int | None = None):
    r"""Draw images ``shape = (B, C, H, W)`` in ``[0, 1]`` by running the reverse process.

    * ``method="ddpm"``: ancestral sampling over all ``T`` steps (``steps`` must be ``None``
      or ``T``), :math:`x_{t-1} = \tilde\mu_t(\hat x_0, x_t) + \sqrt{\tilde\beta_t}\,z`;
    * ``method="ddim"``: the DDIM update over ``steps`` evenly spaced steps
      (:meth:`NoiseSchedule.timesteps`) from :math:`t` to the previous visited step :math:`s`,

      .. math:: x_s = \sqrt{\bar\alpha_s}\,\hat x_0 + \sqrt{1 - \bar\alpha_s - \varsigma^2}\,
                \hat\epsilon + \varsigma z, \quad
                \varsigma^2 = \eta^2\,\frac{1 - \bar\alpha_s}{1 - \bar\alpha_t}
                \Big(1 - \frac{\bar\alpha_t}{\bar\alpha_s}\Big),

      deterministic for :math:`\eta = 0`; with :math:`\eta = 1` over all steps it is DDPM.

    :math:`\hat x_0` is predicted from the (guided, :func:`guided_eps`) noise estimate and,
    with ``clip_x0``, clamped to the data range ``[-1, 1]``, after which the noise estimate is
    recomputed from it. All noise, including :math:`x_T` (unless given as ``x_T``, in the
    model's space), comes from ``generator`` on the CPU. With ``start`` (DDIM only), ``x_T``
    is the state at the 0-based index ``start < T - 1`` and the ``steps`` visited indices run
    from ``start`` down to 0: a reverse process that begins part-way (SDEdit). With
    ``trajectory=True`` returns ``(images, states)``, ``states`` the ``(steps + 1, B, C, H, W)``
    visited :math:`x_t` mapped to ``[0, 1]``, from :math:`x_T` to the result. With
    ``to_images=False`` (for latents, with ``clip_x0=False``) results and states are returned
    as they are, not mapped to ``[0, 1]``.
    """
    if method not in SAMPLERS:
        raise ValueError(f"method must be one of {SAMPLERS}, got {method!r}")
    if method == "ddpm" and steps not in (None, schedule.T):
        raise ValueError(f"DDPM sampling runs all T = {schedule.T} steps; for fewer steps use "
                         f"method='ddim' (got steps={steps})")
    if start is not None and (method != "ddim" or x_T is None):
        raise ValueError("start (a reverse process that begins part-way) needs method='ddim' and the "
                         "state x_T at that step")
    if not 0.0 <= eta <= 1.0:
        raise ValueError(f"eta must lie in [0, 1], got {eta}")
    if len(shape) < 2:
        raise ValueError(f"shape must be (B, ...) with a batch axis, got {tuple(shape)}")
    device = torch.device(device)
    first = schedule.T - 1 if start is None else start
    ts = schedule.timesteps(first + 1 if steps is None else steps, start)
    if labels is not None:
        labels = labels.to(device)
        if len(labels) != shape[0]:
            raise ValueError(f"{len(labels)} labels for a batch of {shape[0]} images")
    x = torch.randn(tuple(shape), generator=generator) if x_T is None else x_T.detach().cpu().float().clone()
    if tuple(x.shape) != tuple(shape):
        raise ValueError(f"x_T has shape {tuple(x.shape)}, expected {tuple(shape)}")
    x = x.to(device)
    out = from_model_range if to_images else (lambda v: v)
    states = [out(x).cpu()] if trajectory else None
    with runtime.eval_mode(model):
        for i, t in enumerate(ts.tolist()):
            s = int(ts[i + 1]) if i + 1 < len(ts) else -1
            x, _ = reverse_step(model, schedule, x, t, s, method=method, eta=eta, labels=labels,
                                guidance=guidance, generator=generator, clip_x0=clip_x0)
            if trajectory:
                states.append(out(x).cpu())
    images = out(x).cpu()
    return (images, torch.stack(states)) if trajectory else images


# ------------------------------------------------------------------------ likelihood

def _reverse_log_scale(schedule: NoiseSchedule, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """log of the reverse process's standard deviation: sqrt(beta_tilde_t), and sqrt(beta_1) at
    the first step, whose posterior variance is 0 (Ho et al.'s fixed variances)."""
    var = torch.where(t.cpu() == 0, schedule.betas[t.cpu()], schedule.posterior_variance[t.cpu()])
    return 0.5 * torch.log(var).to(like.device, like.dtype).reshape(-1, *([1] * (like.ndim - 1)))


@torch.no_grad()
def vlb_terms(model: nn.Module, schedule: NoiseSchedule, x0: torch.Tensor, t: torch.Tensor,
              noise: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
    r"""One term of the variational bound per image, in nats, for 8-bit images ``x0`` in
    ``[-1, 1]`` and 0-based steps ``t``:

    * ``t >= 1`` (paper step :math:`t + 1 \ge 2`): :math:`L_{t} = \mathrm{KL}(q(x_{t} \mid
      x_{t+1}, x_0) \,\|\, p_\theta(x_{t} \mid x_{t+1}))`, both Gaussians with variance
      :math:`\tilde\beta`, so :math:`L = \|\tilde\mu - \mu_\theta\|^2 / (2\tilde\beta)`;
    * ``t == 0``: :math:`L_0 = -\log p_\theta(x_0 \mid x_1)`, a Gaussian of mean
      :math:`\mu_\theta(x_1)` and variance :math:`\beta_1`, discretised to the 256 pixel
      values (:func:`distributions.discretised_gaussian_log_likelihood`).

    :math:`x_{t+1}` is drawn from ``noise``. Returns ``(B,)`` float64.
    """
    x_t = schedule.q_sample(x0, t, noise)
    eps = model(x_t, t, labels) if labels is not None else model(x_t, t)
    x0_hat = schedule.predict_x0(x_t, t, eps.float())
    mean_q, _ = schedule.posterior(x0, x_t, t)
    mean_p, _ = schedule.posterior(x0_hat, x_t, t)
    log_scale = _reverse_log_scale(schedule, t, x0)
    dims = tuple(range(1, x0.ndim))
    kl = ((mean_q - mean_p) ** 2 / (2 * torch.exp(2 * log_scale))).sum(dims)
    nll = -distributions.discretised_gaussian_log_likelihood(x0, mean_p, log_scale).sum(dims)
    return torch.where(t == 0, nll, kl).double()


def prior_kl(schedule: NoiseSchedule, x0: torch.Tensor) -> torch.Tensor:
    r""":math:`L_T = \mathrm{KL}(q(x_T \mid x_0) \,\|\, \mathcal N(0, I))` per image, in nats
    (float64, ``(B,)``): tiny for a schedule that destroys the data, and free of parameters."""
    t = torch.full((len(x0),), schedule.T - 1, dtype=torch.long)
    mean, var = schedule.q_mean_var(x0.double(), t)
    kl = distributions.gaussian_kl(mean, var.sqrt().expand_as(mean), 0.0, 1.0)
    return kl.sum(tuple(range(1, x0.ndim)))


@torch.no_grad()
def _check_8bit(images: torch.Tensor) -> torch.Tensor:
    if images.ndim != 4:
        raise ValueError(f"images must be (N, C, H, W) in [0, 1], got shape {tuple(images.shape)}")
    if images.numel() and (float(images.min()) < 0 or float(images.max()) > 1):
        raise ValueError(f"bits_per_dim takes images in [0, 1], got values in "
                         f"[{float(images.min()):.3g}, {float(images.max()):.3g}]")
    quantised = torch.round(images * 255) / 255
    if not torch.allclose(quantised, images, atol=1e-4):
        raise ValueError("bits_per_dim needs 8-bit images (values k / 255): the bound is a "
                         "likelihood of discrete pixel values")
    return to_model_range(quantised)


@torch.no_grad()
def step_proposal(model: nn.Module, schedule: NoiseSchedule, images: torch.Tensor, *,
                  labels: torch.Tensor | None = None, generator: torch.Generator | None = None,
                  batch_size: int = 256, device: torch.device | str = "cpu") -> torch.Tensor:
    r"""A distribution over the steps for :func:`bits_per_dim`'s importance sampling:
    :math:`p(t) \propto \sqrt{\mathbb E[L_{t-1}^2]}`, estimated from every step of a few pilot
    ``images`` (``len(images) * T`` network calls). This proposal minimises the variance of
    the estimate (Nichol and Dhariwal's choice); the terms of the bound span many orders of
    magnitude (:math:`L_0` and the first KLs dominate), so a uniform ``t`` is very noisy.
    Returns ``(T,)`` probabilities, each at least ``1e-3 / T`` so that no step is ignored.
    """
    device = torch.device(device)
    x0 = _check_8bit(images)
    second_moment = torch.zeros(schedule.T, dtype=torch.float64)
    for x, lab in zip(x0, labels if labels is not None else [None] * len(x0)):
        for start in range(0, schedule.T, batch_size):
            t = torch.arange(start, min(start + batch_size, schedule.T))
            xs = x.expand(len(t), *x.shape)
            noise = torch.randn(xs.shape, generator=generator)
            lb = None if lab is None else lab.expand(len(t)).to(device)
            terms = vlb_terms(model, schedule, xs.to(device), t.to(device), noise.to(device), lb).cpu()
            second_moment[start:start + len(t)] += terms ** 2
    p = torch.sqrt(second_moment / len(x0))
    p = p / p.sum()
    p = p.clamp_min(1e-3 / schedule.T)
    return p / p.sum()


@torch.no_grad()
def bits_per_dim(model: nn.Module, schedule: NoiseSchedule, images: torch.Tensor, *,
                 samples_per_image: int = 1, labels: torch.Tensor | None = None,
                 proposal: torch.Tensor | None = None, generator: torch.Generator | None = None,
                 batch_size: int = 256, device: torch.device | str = "cpu") -> tuple[float, float]:
    r"""An unbiased Monte Carlo estimate of the variational bound in bits per dimension on
    8-bit ``images`` in ``[0, 1]``, with its standard error:

    .. math:: -\log p_\theta(x_0) \le L_T + \sum_{t=1}^{T} L_{t-1}
              = L_T + \mathbb E_{t \sim p}\Big[\frac{L_{t-1}}{p(t)}\Big],

    one step ``t`` (and one noise draw) per image and repeat, divided by :math:`d_x \log 2`
    with :math:`d_x = C H W`. ``proposal`` is :math:`p`: uniform by default (then the weight is
    :math:`T`), or :func:`step_proposal`'s importance distribution, which gives the same
    expectation with a far smaller standard error. The same number a VAE's discretised bound
    gives, so the two can be compared. Returns ``(mean, standard error)`` over the
    ``len(images) * samples_per_image`` draws.
    """
    device = torch.device(device)
    x0 = _check_8bit(images)
    if not runtime.is_int(samples_per_image) or samples_per_image < 1:
        raise ValueError(f"samples_per_image must be a positive int, got {samples_per_image!r}")
    if proposal is None:
        proposal = torch.full((schedule.T,), 1.0 / schedule.T, dtype=torch.float64)
    proposal = torch.as_tensor(proposal, dtype=torch.float64)
    if proposal.shape != (schedule.T,) or (proposal <= 0).any() or abs(float(proposal.sum()) - 1) > 1e-6:
        raise ValueError(f"proposal must be {schedule.T} positive probabilities summing to 1 "
                         "(see step_proposal)")
    dim = x0[0].numel()
    model_was_training = model.training
    model.eval()
    totals = []
    try:
        for _ in range(samples_per_image):
            for start in range(0, len(x0), batch_size):
                x = x0[start:start + batch_size]
                t = torch.multinomial(proposal, len(x), replacement=True, generator=generator)
                noise = torch.randn(x.shape, generator=generator)
                lab = None if labels is None else labels[start:start + batch_size].to(device)
                terms = vlb_terms(model, schedule, x.to(device), t.to(device), noise.to(device), lab).cpu()
                totals.append(prior_kl(schedule, x) + terms / proposal[t])
    finally:
        model.train(model_was_training)
    bits = metrics.nats_to_bits_per_dim(torch.cat(totals), dim)
    return float(bits.mean()), float(bits.std(unbiased=True) / math.sqrt(len(bits)))


# ------------------------------------------------------------------------ the recipe

@dataclass(frozen=True)
class DiffusionRecipe:
    """Everything that decides a trained image diffusion model: data, network, schedule and
    optimisation. :func:`train_recipe` turns it into weights, the same in a notebook and in
    the long run whose checkpoint ships with the package (:mod:`genart_utils.shipped`).

    The learning rate is constant after a linear warm-up, so a run of ``steps`` steps is
    exactly the first ``steps`` steps of any longer run of the same recipe.
    """

    unet: UNetConfig = UNetConfig(image_size=32, patch=2, base=32, mults=(1, 2, 2),
                                  attention_at=(8,), n_classes=9)
    schedule: ScheduleConfig = ScheduleConfig()
    prediction: str = "v"       # what the U-Net outputs: "eps" (the noise) or "v" (VPrediction)
    dataset: str = "openmoji"   # data.load_dataset name; its labels condition the model
    steps: int = 2000           # optimisation steps
    batch_size: int = 64
    lr: float = 2e-4            # Adam's learning rate after warm-up
    warmup: int = 200           # steps of linear learning-rate warm-up
    ema_decay: float = 0.999    # the averaged weights are the ones sampled from
    label_dropout: float = 0.1  # probability of training on "no label" (classifier-free guidance)
    grad_clip: float = 1.0      # gradient norm clipping
    seed: int = 0               # minibatch order, time steps and noise (weights: unet.seed)

    def __post_init__(self):
        runtime.check_parts(self, unet=UNetConfig, schedule=ScheduleConfig)
        runtime.check_fields(self, positive_ints=("steps", "batch_size"), nonneg_ints=("warmup", "seed"),
                             positive_floats=("lr", "grad_clip"), half_open_unit=("ema_decay",),
                             unit_interval=("label_dropout",), choices={"prediction": LOSS_WEIGHTINGS})


def build_model(recipe: DiffusionRecipe, device: torch.device | str = "cpu") -> tuple[nn.Module, EMA]:
    """The recipe's U-Net (initial weights from ``recipe.unet.seed``; wrapped in
    :class:`VPrediction` when ``recipe.prediction == "v"``) and its EMA copy, in
    channels-last memory format, which is faster for these convolutions on CPU. Either way
    the model returns a noise estimate."""
    model = UNet(recipe.unet)
    if recipe.prediction == "v":
        model = VPrediction(model, NoiseSchedule(recipe.schedule))
    model = model.to(device, memory_format=torch.channels_last)
    return model, EMA(model, recipe.ema_decay)


def _recipe_data(recipe: DiffusionRecipe) -> tuple[torch.Tensor, torch.Tensor]:
    from .data import load_dataset

    kwargs = {"size": recipe.unet.image_size} if recipe.dataset == "openmoji" else {}
    train = load_dataset(recipe.dataset, "train", **kwargs)
    if train.image_shape != (recipe.unet.channels, recipe.unet.image_size, recipe.unet.image_size):
        raise ValueError(f"{recipe.dataset} images have shape {train.image_shape}, but the recipe's "
                         f"U-Net takes ({recipe.unet.channels}, {recipe.unet.image_size}, "
                         f"{recipe.unet.image_size})")
    n_classes = int(train.labels.max()) + 1
    if recipe.unet.n_classes not in (0, n_classes):
        raise ValueError(f"{recipe.dataset} has {n_classes} labels but the U-Net is built for "
                         f"n_classes={recipe.unet.n_classes}; use {n_classes} (or 0: unconditional)")
    return train.images, train.labels


def train_recipe(recipe: DiffusionRecipe, *, device: torch.device | str = "cpu",
                 checkpoint: str | None = None, save_every: int = 500, progress: bool = True,
                 callbacks: Sequence[training.Callback] = ()) -> tuple[nn.Module, EMA, training.History]:
    """Train ``recipe`` with the book's one loop and return ``(model, ema, history)``.

    With ``checkpoint`` (a path), the full state (weights, EMA, optimiser, history) is
    written there atomically every ``save_every`` steps and at the end, and a run found there
    is resumed: the result is the same as an uninterrupted run, because batches, steps and
    noise all depend only on ``(recipe.seed, step)``.
    """
    if not runtime.is_int(save_every) or save_every < 1:
        raise ValueError(f"save_every must be a positive int (steps between checkpoints), got {save_every!r}")
    device = torch.device(device)
    images, labels = _recipe_data(recipe)
    model, ema = build_model(recipe, device)
    optimizer = torch.optim.Adam(model.parameters(), lr=recipe.lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / recipe.warmup) if recipe.warmup else 1.0)
    modules = {"model": model, "ema": ema.model, "optimizer": optimizer, "scheduler": scheduler}
    history = training.History()
    if checkpoint is not None and Path(checkpoint).is_file():
        stored = training.load_checkpoint(checkpoint, config_type=DiffusionRecipe)
        if dataclasses.replace(stored.config, steps=recipe.steps) != recipe:
            raise ValueError(f"{checkpoint} holds a run of another recipe; delete it or pass another path")
        training.load_checkpoint(checkpoint, modules)
        history = stored.history
    generator = torch.Generator().manual_seed(recipe.seed)
    # the generator's state after `history.step` steps is not stored: re-derive it per step
    step_fn = make_train_step(model, optimizer, NoiseSchedule(recipe.schedule), device=device,
                              generator=generator, ema=ema, label_dropout=recipe.label_dropout,
                              grad_clip=recipe.grad_clip, weighting=recipe.prediction)

    def seeded_step(batch):
        generator.manual_seed(recipe.seed * 1_000_003 + history.step)
        out = step_fn(batch)
        scheduler.step()
        return out

    def save(step, hist):
        if checkpoint is not None and (step % save_every == 0 or step == recipe.steps):
            training.save_checkpoint(checkpoint, modules, config=recipe, history=hist)

    batches = training.minibatches(images, labels, batch_size=recipe.batch_size, seed=recipe.seed,
                                   start=history.step)
    training.train(seeded_step, batches, recipe.steps, history=history, callbacks=[*callbacks, save],
                   progress=progress, desc="diffusion")
    return model, ema, history

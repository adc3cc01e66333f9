"""Co-creation: tools with which an artist steers the book's trained models.

Each tool reuses a trained model as it is; none of them trains anything.

* :func:`sdedit`: sketch to image. Noise the sketch to a level ``strength`` of the way
  to pure noise, then run the reverse process from there (Meng et al., SDEdit).
* :func:`inpaint`: fill in a masked region. At every reverse step the known pixels are
  replaced by a fresh noised copy of themselves, and with ``resample > 1`` each step is
  undone and redone so that the generated region can agree with them (Lugmayr et al.,
  RePaint).
* :func:`next_generation` and :func:`evolve`: interactive evolution of latent codes (a GAN's
  ``z``, a diffusion model's DDIM noise :math:`x_T`). Favourites survive; children mix two
  favourites along the sphere (:func:`gan.slerp`) and mutate.
* :func:`slerp_strip` and :func:`strip_steps`: paths between two codes, and how evenly a
  strip of images moves along one.
* :func:`provenance`: the nearest training images of anything the studio makes, and the
  licence that covers them.

Prompt blends and edits of the text-to-image model live with its pipeline
(:class:`genart_utils.text2img.TextToImage`), which calls :func:`sdedit`.

Tensors in the model's space are ``[-1, 1]`` images (or latents); images are ``[0, 1]``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
from torch import nn

from . import diffusion, gan, runtime
from .diffusion import NoiseSchedule


# ------------------------------------------------------------------------ SDEdit

def start_index(strength: float, T: int) -> int:
    """The 0-based step index at which an edit of ``strength`` in ``[0, 1]`` starts:
    ``round(strength * T) - 1``, so 1 starts from the last step (pure noise, the sketch is
    forgotten) and 0 returns ``-1``: no noise, nothing to undo."""
    if isinstance(strength, bool) or not isinstance(strength, (int, float)) or not 0 <= strength <= 1:
        raise ValueError(f"strength must be a number in [0, 1] (the fraction of the way to pure noise), "
                         f"got {strength!r}")
    return round(strength * T) - 1


@torch.no_grad()
def sdedit(model: nn.Module, schedule: NoiseSchedule, x0: torch.Tensor, strength: float, *,
           steps: int = 50, labels: torch.Tensor | None = None, guidance: float = 1.0, eta: float = 0.0,
           generator: torch.Generator | None = None, device: torch.device | str = "cpu",
           clip_x0: bool = True) -> torch.Tensor:
    r"""Edit ``x0`` (a sketch, in the model's space) by noising it to the step
    :math:`t_0` of ``strength`` (:func:`start_index`) and denoising from there:

    .. math:: x_{t_0} = \sqrt{\bar\alpha_{t_0}}\,x_0 + \sqrt{1 - \bar\alpha_{t_0}}\,\epsilon,
              \qquad \hat x \sim p_\theta(x_0 \mid x_{t_0}) \text{ (DDIM from } t_0 \text{ down to 0)}.

    The noise is white: it has the same power at every spatial frequency, while a sketch's
    power lies at low frequencies. So at a middle :math:`t_0` the coarse layout still stands
    above the noise (its signal-to-noise ratio per frequency is
    :math:`\bar\alpha_{t_0} P(f) / (1 - \bar\alpha_{t_0})`), the details do not, and the model
    fills them in. ``strength = 0`` returns ``x0`` itself; ``strength = 1`` forgets it.

    ``steps`` is the number of DDIM steps for a full-strength edit; an edit of ``strength``
    takes ``max(1, round(steps * strength))`` of them. ``labels``/``guidance`` condition as
    in :func:`diffusion.sample`. Returns a tensor like ``x0`` (model space, on the CPU).
    """
    start = start_index(strength, schedule.T)
    x0 = x0.detach().cpu().float()
    if start < 0:
        return x0.clone()
    if not runtime.is_int(steps) or steps < 1:
        raise ValueError(f"steps must be a positive int, got {steps!r}")
    n = min(start + 1, max(1, round(steps * strength)))
    t = torch.full((len(x0),), start, dtype=torch.long)
    x_t = schedule.q_sample(x0, t, torch.randn(x0.shape, generator=generator))
    return diffusion.sample(model, schedule, tuple(x0.shape), method="ddim", steps=n, eta=eta, labels=labels,
                            guidance=guidance, generator=generator, device=device, clip_x0=clip_x0,
                            x_T=x_t, start=start, to_images=False)


def block_sketch(images: torch.Tensor, cells: int = 8, colours: int = 4) -> torch.Tensor:
    """Rough sketches made by code from ``(B, C, H, W)`` images in ``[0, 1]``: each image
    is averaged over ``cells x cells`` blocks and every channel rounded to ``colours``
    levels, as a reader painting a grid of ``cells x cells`` squares from a small palette
    would draw it."""
    if images.ndim != 4 or images.shape[-1] % cells or images.shape[-2] % cells:
        raise ValueError(f"images must be (B, C, H, W) with H and W multiples of cells={cells}, "
                         f"got {tuple(images.shape)}")
    if not runtime.is_int(colours) or colours < 2:
        raise ValueError(f"colours must be an int >= 2 (levels per channel), got {colours!r}")
    h, w = images.shape[-2:]
    coarse = torch.nn.functional.adaptive_avg_pool2d(images.float(), cells)
    coarse = torch.round(coarse * (colours - 1)) / (colours - 1)
    return torch.nn.functional.interpolate(coarse, size=(h, w), mode="nearest")


def layout_distance(images: torch.Tensor, sketches: torch.Tensor, cells: int = 8) -> torch.Tensor:
    """How far each image strays from its sketch's layout: the root-mean-square difference
    of the two after averaging over ``cells x cells`` blocks (the scale the sketch was drawn
    at), per image ``(B,)``, in ``[0, 1]`` units."""
    if images.shape != sketches.shape:
        raise ValueError(f"images {tuple(images.shape)} and sketches {tuple(sketches.shape)} must match")
    pool = torch.nn.functional.adaptive_avg_pool2d
    diff = pool(images.float(), cells) - pool(sketches.float(), cells)
    return diff.pow(2).flatten(1).mean(1).sqrt()


# ------------------------------------------------------------------------ inpainting

def _check_mask(mask: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    if mask.ndim != 4 or mask.shape[-2:] != x.shape[-2:] or mask.shape[0] not in (1, len(x)) \
            or mask.shape[1] not in (1, x.shape[1]):
        raise ValueError(f"mask must be (B or 1, 1 or C, H, W) = matching {tuple(x.shape)}, got {tuple(mask.shape)}")
    if not torch.all((mask == 0) | (mask == 1)):
        raise ValueError("mask must hold 0 (keep the pixel) and 1 (fill it in) only")
    if not mask.any():
        raise ValueError("the mask is empty: mark at least one pixel to fill in")
    return mask.float().cpu().expand_as(x)


@torch.no_grad()
def inpaint(model: nn.Module, schedule: NoiseSchedule, x0: torch.Tensor, mask: torch.Tensor, *,
            steps: int = 50, resample: int = 1, eta: float = 1.0, labels: torch.Tensor | None = None,
            guidance: float = 1.0, generator: torch.Generator | None = None,
            device: torch.device | str = "cpu", clip_x0: bool = True) -> torch.Tensor:
    r"""Fill in the pixels where ``mask == 1`` of ``x0`` (model space ``(B, C, H, W)``);
    the others are kept exactly.

    At each of the ``steps`` DDIM steps from :math:`t` to :math:`s` the unknown region takes
    the model's step and the known region is drawn from the forward process,

    .. math:: x_s = m \odot x_s^{\text{model}} + (1 - m) \odot \big(\sqrt{\bar\alpha_s}\,x_0
              + \sqrt{1 - \bar\alpha_s}\,\epsilon\big),

    so the known pixels are consistent with :math:`x_0` at every noise level. The two halves
    were drawn apart, so the seam between them need not match. With ``resample = r > 1``
    each step is repeated: :math:`x_s` is noised back to step :math:`t` with
    :math:`q(x_t \mid x_s) = \mathcal N(\sqrt{\bar\alpha_t / \bar\alpha_s}\,x_s,
    (1 - \bar\alpha_t / \bar\alpha_s) I)` and the step taken again, ``r`` times in all,
    which lets the model's next prediction see the known pixels (RePaint; it costs ``r``
    times the network calls). ``eta = 1`` keeps each DDIM step stochastic, as these
    repeats need. The result's known pixels are exactly those of ``x0``.
    """
    if not runtime.is_int(resample) or resample < 1:
        raise ValueError(f"resample must be a positive int (1: no resampling), got {resample!r}")
    x0 = x0.detach().cpu().float()
    m = _check_mask(mask, x0)
    device = torch.device(device)
    ts = schedule.timesteps(steps)
    if labels is not None:
        labels = labels.to(device)
    x = torch.randn(x0.shape, generator=generator).to(device)
    m_d, x0_d = m.to(device), x0.to(device)
    with runtime.eval_mode(model):
        for i, t in enumerate(ts.tolist()):
            s = int(ts[i + 1]) if i + 1 < len(ts) else -1
            ab_t = float(schedule.alpha_bars[t])
            ab_s = float(schedule.alpha_bars[s]) if s >= 0 else 1.0
            for r in range(resample):
                x_s, _ = diffusion.reverse_step(model, schedule, x, t, s, eta=eta, labels=labels,
                                                guidance=guidance, generator=generator, clip_x0=clip_x0)
                known = math.sqrt(ab_s) * x0_d + math.sqrt(1 - ab_s) * torch.randn(x0.shape, generator=generator).to(device)
                x_s = m_d * x_s + (1 - m_d) * known
                if r + 1 < resample and s >= 0:             # back to step t, and again
                    x = math.sqrt(ab_t / ab_s) * x_s + math.sqrt(1 - ab_t / ab_s) * \
                        torch.randn(x0.shape, generator=generator).to(device)
                else:
                    break
            x = x_s
    return m * x.cpu() + (1 - m) * x0


def seam_error(images: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """How visible the edge of a filled-in region is: the mean absolute difference between
    neighbouring pixels (left-right and up-down pairs) of which one is known and the other
    filled in, per image ``(B,)``. Compare it with the same pairs in the original image,
    whose natural edges it measures too."""
    if mask.ndim != 4 or mask.shape[-2:] != images.shape[-2:]:
        raise ValueError(f"mask {tuple(mask.shape)} must be (B or 1, 1 or C, H, W) for images {tuple(images.shape)}")
    m = mask.float().expand_as(images)
    total, count = 0.0, 0.0
    for dim in (-1, -2):
        a, b = images.narrow(dim, 0, images.shape[dim] - 1), images.narrow(dim, 1, images.shape[dim] - 1)
        ma, mb = m.narrow(dim, 0, m.shape[dim] - 1), m.narrow(dim, 1, m.shape[dim] - 1)
        straddle = (ma != mb).float()
        total = total + ((a - b).abs() * straddle).flatten(1).sum(1)
        count = count + straddle.flatten(1).sum(1)
    if torch.any(count == 0):
        raise ValueError("some mask has no boundary inside the image (empty, or covering everything)")
    return total / count


def box_mask(size: int, top: int, left: int, height: int, width: int) -> torch.Tensor:
    """A ``(1, 1, size, size)`` mask with ones (fill in) in the given rectangle."""
    if not (0 <= top < size and 0 <= left < size and height >= 1 and width >= 1
            and top + height <= size and left + width <= size):
        raise ValueError(f"the rectangle top={top}, left={left}, height={height}, width={width} "
                         f"must lie inside the {size}x{size} image and not be empty")
    mask = torch.zeros(1, 1, size, size)
    mask[..., top:top + height, left:left + width] = 1
    return mask


# ------------------------------------------------------------------------ interactive evolution

def next_generation(latents: torch.Tensor, favourites: Sequence[int], *, mutation: float = 0.3,
                    size: int | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    r"""The next population of latent codes ``(size, ...)`` (default: as many as now).

    The favourites come first, unchanged (the reader keeps what they liked). Each of the
    other codes has two parents drawn (with replacement) from the favourites, is a point
    :math:`u \sim U(0, 1)` of the way along the great circle between them
    (:func:`gan.slerp`; one parent: a copy of it), and is mutated by

    .. math:: z' = \sqrt{1 - \sigma^2}\,z + \sigma\,\epsilon, \qquad \epsilon \sim \mathcal N(0, I),

    with :math:`\sigma` = ``mutation`` in ``[0, 1]``. If :math:`z \sim \mathcal N(0, I)` so is
    :math:`z'` (the variances add to :math:`1 - \sigma^2 + \sigma^2`): a mutation never drifts
    away from the codes the generator was trained on, however many generations it runs.
    All randomness comes from ``generator``.
    """
    latents = latents.detach().cpu().float()
    n = len(latents) if size is None else size
    favourites = list(favourites)
    if not favourites:
        raise ValueError("pick at least one favourite: the next generation is bred from them")
    bad = [i for i in favourites if not runtime.is_int(i) or not 0 <= i < len(latents)]
    if bad:
        raise ValueError(f"favourites must be indices in [0, {len(latents)}), got {bad}")
    if not 0 <= mutation <= 1:
        raise ValueError(f"mutation must lie in [0, 1] (the share of noise in a child), got {mutation}")
    if not runtime.is_int(n) or n < len(favourites):
        raise ValueError(f"size ({n}) must be an int at least the number of favourites ({len(favourites)})")
    shape = latents.shape[1:]
    children = [latents[i] for i in favourites]
    while len(children) < n:
        a, b = (favourites[int(j)] for j in torch.randint(len(favourites), (2,), generator=generator))
        u = torch.rand((), generator=generator)
        child = latents[a].flatten() if a == b else gan.slerp(latents[a].flatten(), latents[b].flatten(), u)[0]
        child = math.sqrt(1 - mutation ** 2) * child + mutation * torch.randn(child.shape, generator=generator)
        children.append(child.reshape(shape))
    return torch.stack(children)


@dataclass
class Evolution:
    """What :func:`evolve` records: per generation, the codes, the images and the picks."""

    latents: list[torch.Tensor] = field(default_factory=list)
    images: list[torch.Tensor] = field(default_factory=list)
    picks: list[list[int]] = field(default_factory=list)


def evolve(latents: torch.Tensor, decode: Callable[[torch.Tensor], torch.Tensor],
           pick: Callable[[torch.Tensor], Sequence[int]], generations: int, *, mutation: float = 0.3,
           seed: int = 0) -> Evolution:
    """Replay ``generations`` rounds of interactive evolution with a scripted reader:
    ``decode`` turns codes into images, ``pick`` chooses the favourites among them (e.g. the
    two reddest, or two at random), and :func:`next_generation` breeds the next codes. The
    same seed gives the same run."""
    if not runtime.is_int(generations) or generations < 1:
        raise ValueError(f"generations must be a positive int, got {generations!r}")
    generator = torch.Generator().manual_seed(seed)
    record = Evolution()
    for g in range(generations):
        images = decode(latents)
        picked = list(pick(images))
        record.latents.append(latents)
        record.images.append(images)
        record.picks.append(picked)
        if g + 1 < generations:
            latents = next_generation(latents, picked, mutation=mutation, generator=generator)
    return record


def redness(images: torch.Tensor) -> torch.Tensor:
    """How red each ``(B, 3, H, W)`` image in ``[0, 1]`` is: the mean over pixels of how far
    red exceeds the larger of green and blue, ``max(0, R - max(G, B))``: 0 for white, grey,
    green, blue and yellow pixels, 1 for pure red; orange counts half."""
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"redness needs colour images (B, 3, H, W), got {tuple(images.shape)}")
    r, g, b = images.unbind(1)
    return (r - torch.maximum(g, b)).clamp(min=0).flatten(1).mean(1)


def top(scores: torch.Tensor, k: int) -> list[int]:
    """The indices of the ``k`` highest scores: a scripted reader who picks by a property."""
    return scores.topk(k).indices.tolist()


# ------------------------------------------------------------------------ interpolation and provenance

def slerp_strip(a: torch.Tensor, b: torch.Tensor, n: int) -> torch.Tensor:
    """``n`` codes shaped like ``a`` (a GAN code or a diffusion model's noise) on the great
    circle from ``a`` to ``b`` (:func:`gan.slerp` on the flattened codes), ends included."""
    if a.shape != b.shape:
        raise ValueError(f"a {tuple(a.shape)} and b {tuple(b.shape)} must have the same shape")
    if not runtime.is_int(n) or n < 2:
        raise ValueError(f"n must be an int >= 2 (the strip includes both ends), got {n!r}")
    return gan.slerp(a.flatten().double(), b.flatten().double(),
                     torch.linspace(0, 1, n, dtype=torch.float64)).float().reshape(n, *a.shape)


def strip_steps(images: torch.Tensor) -> torch.Tensor:
    """The pixel distances between neighbouring images of a strip ``(n, C, H, W)``,
    ``(n - 1,)``. A smooth strip takes even steps; their sum over the distance between the
    ends is 1 for a straight path and grows with every detour."""
    if images.ndim < 2 or len(images) < 2:
        raise ValueError(f"a strip needs at least two images (n, ...), got {tuple(images.shape)}")
    return (images[1:] - images[:-1]).flatten(1).norm(dim=1)


@dataclass(frozen=True)
class Provenance:
    """Where an image comes from: its ``k`` nearest training images (indices into the
    training set, pixel distances, names) and the licence that covers them."""

    indices: tuple[int, ...]
    distances: tuple[float, ...]
    names: tuple[str, ...]
    licence: str
    closer_than_held_out: bool | None = None     # nearer than any test image is: a possible copy

    def describe(self) -> str:
        near = ", ".join(f"{n!r} ({d:.2f})" for n, d in zip(self.names, self.distances))
        flag = "" if self.closer_than_held_out is None else (
            " It is closer to its nearest training image than any test image is to the training set: "
            "check it for copying." if self.closer_than_held_out else "")
        return f"Nearest training images: {near}.{flag} Licence: {self.licence}"


def provenance(images: torch.Tensor, train, *, k: int = 3, licence: str | None = None,
               copy_distance: float | None = None) -> list[Provenance]:
    """The provenance of each image of ``(N, C, H, W)``: its ``k`` nearest images in the
    training set ``train`` (a :class:`data.ImageDataset`; pixel L2 distance, as
    :func:`metrics.nearest_neighbours`), their names (captions) and ``licence`` (default:
    OpenMoji's attribution line, which names its licence, CC BY-SA 4.0). With ``copy_distance`` (the smallest distance from
    a held-out image to the training set, :func:`metrics.memorisation_check`'s
    ``held_out["min"]``), an image nearer than that to a training image is flagged."""
    from .data import openmoji_attribution

    if images.shape[1:] != train.images.shape[1:]:
        raise ValueError(f"images {tuple(images.shape[1:])} and training images {tuple(train.images.shape[1:])} "
                         "must have the same shape")
    if not runtime.is_int(k) or not 1 <= k <= len(train):
        raise ValueError(f"k must be an int in [1, {len(train)}], got {k!r}")
    licence = licence if licence is not None else openmoji_attribution()     # names CC BY-SA 4.0
    ref = train.images.flatten(1).double()
    d = torch.cdist(images.detach().cpu().flatten(1).double(), ref)            # (N, M)
    dist, idx = d.topk(k, largest=False)
    names = train.captions if train.captions is not None else tuple(str(i) for i in range(len(train)))
    out = []
    for row_d, row_i in zip(dist.tolist(), idx.tolist()):
        flag = None if copy_distance is None else row_d[0] < copy_distance
        out.append(Provenance(tuple(row_i), tuple(round(x, 4) for x in row_d), tuple(names[i] for i in row_i),
                              licence, flag))
    return out

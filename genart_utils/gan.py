"""Generative adversarial networks: losses, an MLP pair for 2-D toys, DCGAN for images.

The game (Goodfellow et al. 2014): a discriminator :math:`D` tells data from samples and
a generator :math:`G` maps noise :math:`z \\sim p(z)` to samples,

.. math:: \\min_G \\max_D V(D, G) = \\mathbb E_{x \\sim p_\\text{data}}[\\log D(x)]
          + \\mathbb E_{z \\sim p(z)}[\\log(1 - D(G(z)))].

Every loss here takes the discriminator's *logits* :math:`\\ell` (so
:math:`D = \\sigma(\\ell)`), and uses :math:`-\\log \\sigma(\\ell) = \\operatorname{softplus}(-\\ell)`
and :math:`-\\log(1 - \\sigma(\\ell)) = \\operatorname{softplus}(\\ell)`, which stay finite where
:math:`D` itself rounds to 0 or 1.

The recipe of a trained DCGAN (:class:`GANRecipe`) trains with :func:`train_recipe`, which
resumes exactly from its checkpoint; :data:`GAN_RECIPE` is the one whose generator ships
with the package (``shipped.load_or_train("dcgan-openmoji32")``).

Also here: the theory chapter's helpers (:func:`optimal_discriminator`,
:func:`value_by_quadrature`, :func:`dirac_gan_trajectory`) and latent-space tools
(:func:`slerp`, :func:`latent_walk`, :func:`principal_latent_directions`).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Literal, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from . import runtime, training
from .runtime import autocast, grad_scaler

GeneratorLoss = Literal["non_saturating", "saturating"]
GENERATOR_LOSSES = ("non_saturating", "saturating")


# ----------------------------------------------------------------------------- losses

def _check_logits(**logits: torch.Tensor) -> None:
    """Each loss averages over its batch: an empty batch has no average (it would be NaN)."""
    for name, value in logits.items():
        if value.numel() == 0:
            raise ValueError(f"{name} is empty (shape {tuple(value.shape)}); the loss is a mean "
                             "over the batch, so pass at least one logit")


def value_function(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    r"""Monte Carlo estimate of :math:`V(D, G) = \mathbb E[\log D(x)] + \mathbb E[\log(1 - D(G(z)))]`.

    Args:
        real_logits: :math:`\ell(x)` on data, shape ``(B,)`` or ``(B, 1)``.
        fake_logits: :math:`\ell(G(z))` on samples, any batch shape.
    """
    _check_logits(real_logits=real_logits, fake_logits=fake_logits)
    return -F.softplus(-real_logits).mean() - F.softplus(fake_logits).mean()


def discriminator_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    r"""The discriminator's loss :math:`-V(D, G)`: binary cross-entropy with labels 1 for
    data and 0 for samples, each term averaged over its own batch.

    .. math:: J_D = -\mathbb E_x[\log D(x)] - \mathbb E_z[\log(1 - D(G(z)))]
    """
    _check_logits(real_logits=real_logits, fake_logits=fake_logits)
    return F.softplus(-real_logits).mean() + F.softplus(fake_logits).mean()


def generator_loss(fake_logits: torch.Tensor, kind: GeneratorLoss = "non_saturating") -> torch.Tensor:
    r"""The generator's loss :math:`J_G` on the discriminator's logits for its samples.

    ``"saturating"``: the minimax loss :math:`J_G = \mathbb E_z[\log(1 - D(G(z)))]`; its gradient
    with respect to the logit is :math:`-\sigma(\ell) = -D`, which vanishes when the
    discriminator confidently rejects the samples (:math:`D \to 0`), early in training.

    ``"non_saturating"``: :math:`J_G = -\mathbb E_z[\log D(G(z))]`; the same fixed point, but
    gradient :math:`-(1 - D)`, which is largest exactly when :math:`D \to 0`.
    """
    _check_logits(fake_logits=fake_logits)
    if kind == "non_saturating":
        return F.softplus(-fake_logits).mean()
    if kind == "saturating":
        return -F.softplus(fake_logits).mean()
    raise ValueError(f"unknown generator loss {kind!r}; use 'non_saturating' or 'saturating'")


# ----------------------------------------------------------------------------- models

def _check_input(x: torch.Tensor, shape: tuple[int, ...], what: str, hint: str) -> None:
    """Raise unless ``x`` has shape ``(B, *shape)``: a batch of ``what``."""
    if x.ndim != len(shape) + 1 or tuple(x.shape[1:]) != shape:
        expected = ", ".join(["B", *map(str, shape)])
        raise ValueError(f"expected {what} of shape ({expected}), got {tuple(x.shape)}; {hint}")


@dataclass(frozen=True)
class MLPGANConfig:
    """A small fully connected GAN for 2-D toy data."""

    data_dim: int = 2       # d_x, the dimension of x
    latent_dim: int = 2     # d_z, the dimension of z ~ N(0, I)
    hidden: int = 128       # width of every hidden layer
    depth: int = 3          # hidden layers per network
    lr: float = 1e-3        # Adam learning rate of both players
    beta1: float = 0.5      # Adam beta1 (DCGAN's choice, also stable for toys)
    loss: GeneratorLoss = "non_saturating"  # the generator's loss (see generator_loss)
    seed: int = 0           # seeds the initial weights (build_mlp_gan)

    def __post_init__(self) -> None:
        runtime.check_fields(self, positive_ints=("data_dim", "latent_dim", "hidden", "depth"),
                             nonneg_ints=("seed",), positive_floats=("lr",),
                             half_open_unit=("beta1",), choices={"loss": GENERATOR_LOSSES})


def _mlp(n_in: int, n_out: int, hidden: int, depth: int, act: Callable[[], nn.Module]) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i in range(depth):
        layers += [nn.Linear(n_in if i == 0 else hidden, hidden), act()]
    layers.append(nn.Linear(hidden, n_out))
    return nn.Sequential(*layers)


class MLPGenerator(nn.Module):
    """``z (B, latent_dim) -> x (B, data_dim)``, unbounded output."""

    def __init__(self, config: MLPGANConfig):
        super().__init__()
        self.config = config
        self.net = _mlp(config.latent_dim, config.data_dim, config.hidden, config.depth, nn.ReLU)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        _check_input(z, (self.config.latent_dim,), "codes",
                     "pass a batch of codes, e.g. gan.sample_latent(n, latent_dim)")
        return self.net(z)


class MLPDiscriminator(nn.Module):
    """``x (B, data_dim) -> logit (B,)``."""

    def __init__(self, config: MLPGANConfig):
        super().__init__()
        self.config = config
        self.net = _mlp(config.data_dim, 1, config.hidden, config.depth,
                        lambda: nn.LeakyReLU(0.2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_input(x, (self.config.data_dim,), "points",
                     "add the batch axis (x[None] for one point) or set MLPGANConfig.data_dim")
        return self.net(x).squeeze(-1)


def build_mlp_gan(config: MLPGANConfig, device: torch.device | str = "cpu"
                  ) -> tuple[MLPGenerator, MLPDiscriminator]:
    """Generator and discriminator whose initial weights depend only on ``config.seed``
    (drawn inside :func:`genart_utils.runtime.seeded`, so the global RNG is untouched)."""
    with runtime.seeded(config.seed):
        G, D = MLPGenerator(config), MLPDiscriminator(config)
    return G.to(device), D.to(device)


def resolution_levels(image_size: int) -> tuple[int, ...]:
    """The side of the feature maps at each level of the book's convolutional image models,
    coarsest first: ``28 -> (7, 14, 28)``, ``32 -> (4, 8, 16, 32)``, ``64 -> (4, 8, 16, 32, 64)``.

    The side is halved while it is even and above 4, so the coarsest side ``b`` is 4 for a
    power of two and 7 for 28; each level is one stride-2 convolution (kernel 4, padding 1)
    of the DCGAN and of :class:`genart_utils.vae.VAE`, which exactly halves (or, transposed,
    doubles) an even side. Supported: ``image_size = b * 2**n`` with ``n >= 1`` and a
    coarsest side ``3 <= b <= 7`` (the kernel of the DCGAN's first and last layers), e.g.
    8, 12, 16, 24, 28, 32, 48, 56, 64, 128.
    """
    if not runtime.is_int(image_size) or image_size < 1:
        raise ValueError(f"image_size must be a positive int, got {image_size!r}")
    sides = [int(image_size)]
    while sides[-1] % 2 == 0 and sides[-1] > 4:
        sides.append(sides[-1] // 2)
    if len(sides) < 2 or not 3 <= sides[-1] <= 7:
        raise ValueError(f"image_size {image_size} is not supported: halving it gives "
                         f"{' -> '.join(map(str, sides))}, but the models need at least one "
                         "halving down to a side between 3 and 7; use 28 or a power of two "
                         "from 8 (16, 32, 64, ...), or resize the images")
    return tuple(reversed(sides))


def check_image_size(config) -> None:
    """Raise a ValueError naming the config class unless ``config.image_size`` is one that
    :func:`resolution_levels` supports (for the ``__post_init__`` of DCGANConfig and VAEConfig)."""
    try:
        resolution_levels(config.image_size)
    except ValueError as err:
        cls = type(config).__name__
        raise ValueError(f"{cls}.image_size: {err}; fix the image_size=... argument of "
                         f"{cls}(...)") from None


@dataclass(frozen=True)
class DCGANConfig:
    """DCGAN (Radford et al. 2016), with the paper's training choices, for square images of
    side ``image_size`` (28 for MNIST; 32 or 64 for OpenMoji) with ``channels`` channels.

    The feature maps have the sides of :func:`resolution_levels`: ``7 -> 14 -> 28`` for 28,
    ``4 -> 8 -> 16 -> 32`` for 32. The widths double at each coarser level: the generator
    has ``g_width`` channels at ``image_size / 2``, ``2 g_width`` at ``image_size / 4``, and
    so on (likewise the discriminator with ``d_width``).
    """

    latent_dim: int = 100   # d_z: z ~ N(0, I) of this size (the paper uses 100)
    channels: int = 1       # image channels (1 for MNIST, 3 for colour)
    g_width: int = 64       # generator channels at 14x14; 2 * g_width at 7x7 (for 28x28 images)
    d_width: int = 64       # discriminator channels at 14x14; 2 * d_width at 7x7 (for 28x28 images)
    lr: float = 2e-4        # Adam learning rate, both players (paper)
    beta1: float = 0.5      # Adam beta1 (paper: 0.9 oscillated)
    loss: GeneratorLoss = "non_saturating"  # the generator's loss (see generator_loss)
    seed: int = 0           # seeds the initial weights (build_dcgan)
    image_size: int = 28    # side of the square images: 28, 32, 64, ... (see resolution_levels)

    def __post_init__(self) -> None:
        runtime.check_fields(self, positive_ints=("latent_dim", "channels", "g_width", "d_width",
                                                  "image_size"),
                             nonneg_ints=("seed",), positive_floats=("lr",),
                             half_open_unit=("beta1",), choices={"loss": GENERATOR_LOSSES})
        check_image_size(self)


class DCGANGenerator(nn.Module):
    """``z (B, latent_dim) -> image (B, C, H, W)`` in ``[-1, 1]`` (tanh), ``H = W = image_size``.

    Shapes for 28x28: ``(B, d_z, 1, 1) -> (B, 2g, 7, 7) -> (B, g, 14, 14) -> (B, C, 28, 28)``;
    for 32x32: ``(B, d_z, 1, 1) -> (B, 4g, 4, 4) -> (B, 2g, 8, 8) -> (B, g, 16, 16)
    -> (B, C, 32, 32)``. The first transposed convolution turns the ``1x1`` code into the
    coarsest ``b x b`` map (kernel ``b``); each later one doubles the side (kernel 4, stride 2,
    padding 1); all but the last are followed by batch norm and ReLU.
    """

    def __init__(self, config: DCGANConfig):
        super().__init__()
        self.config = config
        sides = resolution_levels(config.image_size)         # e.g. (7, 14, 28), (4, 8, 16, 32)
        n = len(sides) - 1                                   # stride-2 layers
        widths = [config.g_width * 2 ** (n - 1 - i) for i in range(n)]   # at sides[:-1]: ..., 2g, g
        layers: list[nn.Module] = [
            nn.ConvTranspose2d(config.latent_dim, widths[0], sides[0], 1, 0, bias=False),  # 1 -> b
            nn.BatchNorm2d(widths[0]), nn.ReLU(True)]
        for c_in, c_out in zip(widths, widths[1:]):                                        # side x 2
            layers += [nn.ConvTranspose2d(c_in, c_out, 4, 2, 1, bias=False),
                       nn.BatchNorm2d(c_out), nn.ReLU(True)]
        layers += [nn.ConvTranspose2d(widths[-1], config.channels, 4, 2, 1),               # -> S
                   nn.Tanh()]
        self.net = nn.Sequential(*layers)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        _check_input(z, (self.config.latent_dim,), "codes",
                     "pass a batch of codes, e.g. gan.sample_latent(n, latent_dim)")
        return self.net(z[:, :, None, None])


class DCGANDiscriminator(nn.Module):
    """``image (B, C, H, W) in [-1, 1] -> logit (B,)``, ``H = W = image_size``.

    Shapes for 28x28: ``(B, C, 28, 28) -> (B, d, 14, 14) -> (B, 2d, 7, 7) -> (B, 1, 1, 1)``;
    for 32x32: ``(B, C, 32, 32) -> (B, d, 16, 16) -> (B, 2d, 8, 8) -> (B, 4d, 4, 4)
    -> (B, 1, 1, 1)``. Strided convolutions instead of pooling, LeakyReLU(0.2), no batch
    norm on the input layer. The last convolution (kernel ``b``, the coarsest side) sees
    the whole image, so each image gets exactly one logit; other image sizes are refused
    (a 32x32 image in a 28x28 discriminator would give a 2x2 map of logits).
    """

    def __init__(self, config: DCGANConfig):
        super().__init__()
        self.config = config
        sides = resolution_levels(config.image_size)
        n = len(sides) - 1
        widths = [config.d_width * 2 ** i for i in range(n)]            # d, 2d, ... at sides[-2::-1]
        layers: list[nn.Module] = [nn.Conv2d(config.channels, widths[0], 4, 2, 1),    # S -> S/2
                                   nn.LeakyReLU(0.2, True)]
        for c_in, c_out in zip(widths, widths[1:]):                                    # side / 2
            layers += [nn.Conv2d(c_in, c_out, 4, 2, 1, bias=False), nn.BatchNorm2d(c_out),
                       nn.LeakyReLU(0.2, True)]
        layers.append(nn.Conv2d(widths[-1], 1, sides[0], 1, 0))                        # b -> 1
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = self.config.image_size
        _check_input(x, (self.config.channels, size, size), "images",
                     f"the convolutions assume {size}x{size} images, so add the batch axis, "
                     f"or resize or pad other sizes to {size}x{size} (or set "
                     "DCGANConfig.image_size and channels)")
        return self.net(x).flatten()                                    # (B, 1, 1, 1) -> (B,)


def dcgan_init(module: nn.Module) -> None:
    """The paper's initialisation: conv weights ~ N(0, 0.02); batch-norm scale ~ N(1, 0.02)."""
    if isinstance(module, (nn.Conv2d, nn.ConvTranspose2d)):
        nn.init.normal_(module.weight, 0.0, 0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.BatchNorm2d):
        nn.init.normal_(module.weight, 1.0, 0.02)
        nn.init.zeros_(module.bias)


def build_dcgan(config: DCGANConfig, device: torch.device | str = "cpu"
                ) -> tuple[DCGANGenerator, DCGANDiscriminator]:
    """Generator and discriminator with the DCGAN initialisation, on ``device``.

    The initial weights depend only on ``config.seed``: they are drawn inside
    :func:`genart_utils.runtime.seeded`, which leaves the global RNG as it was.
    """
    with runtime.seeded(config.seed):
        G, D = DCGANGenerator(config), DCGANDiscriminator(config)
        G.apply(dcgan_init)
        D.apply(dcgan_init)
    return G.to(device), D.to(device)


DCGAN_SIZES = {
    "smoke": dict(g_width=8, d_width=8, batch_size=32, steps=60, grid_every=20),
    "cpu": dict(g_width=32, d_width=32, batch_size=64, steps=2_500, grid_every=500),
    "gpu": dict(g_width=64, d_width=64, batch_size=128, steps=10_000, grid_every=2_000),
}
"""The sizes of notebooks/03_dcgan.ipynb for each execution profile (the only thing that
changes between profiles): ``cfg = runtime.profile_config(**gan.DCGAN_SIZES)``; the
benchmarks import the same dict."""

def _openmoji_dcgan(width: int) -> DCGANConfig:
    return DCGANConfig(channels=3, image_size=32, g_width=width, d_width=width, lr=5e-4)


DCGAN_OPENMOJI_SIZES = {
    "smoke": dict(model=_openmoji_dcgan(8), batch_size=32, steps=30),
    "cpu": dict(model=_openmoji_dcgan(32), batch_size=64, steps=900),
    "gpu": dict(model=_openmoji_dcgan(64), batch_size=128, steps=10_000),
}
"""The DCGAN of the side-by-side comparison on OpenMoji at 32x32 in colour (generator and
discriminator trained with :func:`make_train_step` on ``to_tanh_range`` images):
``cfg = runtime.profile_config(**gan.DCGAN_OPENMOJI_SIZES)``. The cpu profile is sized for
about 3 minutes of training on 2 CPU cores (from steps per second measured on one thread).
The learning rate, the same in every profile, is above the paper's 2e-4: in the cpu
profile's 900 steps, 2e-4 left the discriminator winning and the samples blobs. The gpu
sizes follow the MNIST DCGAN's and were not timed."""


def adam_pair(G: nn.Module, D: nn.Module, lr: float, beta1: float
              ) -> tuple[torch.optim.Adam, torch.optim.Adam]:
    """One Adam optimiser per player, with betas ``(beta1, 0.999)``."""
    return (torch.optim.Adam(G.parameters(), lr=lr, betas=(beta1, 0.999)),
            torch.optim.Adam(D.parameters(), lr=lr, betas=(beta1, 0.999)))


# ------------------------------------------------------------------------ train, sample

def sample_latent(n: int, latent_dim: int, generator: torch.Generator | None = None,
                  device: torch.device | str = "cpu") -> torch.Tensor:
    """``n`` codes ``z ~ N(0, I)`` of shape ``(n, latent_dim)``, drawn on the CPU from
    ``generator`` (so the same seed gives the same codes on every device)."""
    return torch.randn(n, latent_dim, generator=generator).to(device)


def make_train_step(G: nn.Module, D: nn.Module, opt_g: torch.optim.Optimizer,
                    opt_d: torch.optim.Optimizer, *, device: torch.device | str = "cpu",
                    generator: torch.Generator | None = None, amp: bool = True,
                    channels_last: bool = False) -> Callable[[tuple], dict[str, float]]:
    r"""One alternating update per call: the discriminator, then the generator.

    The returned function takes a batch ``(x, ...)`` of data in the generator's output range,
    draws ``z ~ N(0, I)`` from ``generator`` (the only randomness of a step, so saving
    ``generator.get_state()`` with the models and optimisers resumes a run exactly), lowers
    :math:`J_D` (:func:`discriminator_loss`) by one step of ``opt_d``, then :math:`J_G`
    (:func:`generator_loss`) against the updated discriminator by one step of ``opt_g``.
    The latent size and the generator's loss are ``G.config.latent_dim`` and
    ``G.config.loss`` (change them with ``dataclasses.replace`` on the config).

    It returns ``loss_d``, ``loss_g``, ``d_real`` (mean :math:`D(x)`) and ``d_fake`` (mean
    :math:`D(G(z))` before the generator's update). ``amp`` enables mixed precision on CUDA
    (bf16, or fp16 with a gradient scaler) and does nothing on CPU; ``channels_last`` feeds
    4-D batches in that memory format (faster convolutions on recent GPUs).
    """
    config = getattr(G, "config", None)
    if not hasattr(config, "latent_dim") or getattr(config, "loss", None) not in GENERATOR_LOSSES:
        raise TypeError(f"G needs a .config with latent_dim and loss (an MLPGANConfig or "
                        f"DCGANConfig), got {type(G).__name__} with config {config!r}")
    latent_dim, loss = config.latent_dim, config.loss
    device = torch.device(device)
    scaler = grad_scaler(device, amp)
    memory_format = torch.channels_last if channels_last else torch.preserve_format

    def step(batch) -> dict[str, float]:
        x = batch[0].to(device, non_blocking=True)
        if channels_last and x.ndim == 4:
            x = x.contiguous(memory_format=memory_format)
        z = sample_latent(len(x), latent_dim, generator, device)

        with autocast(device, amp):
            fake = G(z)
            real_logits, fake_logits = D(x), D(fake.detach())
            loss_d = discriminator_loss(real_logits.float(), fake_logits.float())
        opt_d.zero_grad(set_to_none=True)
        scaler.scale(loss_d).backward()
        scaler.step(opt_d)

        with autocast(device, amp):
            loss_g = generator_loss(D(fake).float(), loss)
        opt_g.zero_grad(set_to_none=True)
        scaler.scale(loss_g).backward()
        scaler.step(opt_g)
        scaler.update()
        return {"loss_d": loss_d.item(), "loss_g": loss_g.item(),
                "d_real": torch.sigmoid(real_logits.float()).mean().item(),
                "d_fake": torch.sigmoid(fake_logits.float()).mean().item()}

    return step


@torch.no_grad()
def sample(G: nn.Module, n: int, generator: torch.Generator | None = None,
           z: torch.Tensor | None = None, device: torch.device | str | None = None) -> torch.Tensor:
    """Draw ``n`` samples from ``G`` in evaluation mode (batch norm uses running statistics).

    Pass ``z`` to decode given codes, or a seeded ``generator`` for reproducible draws.
    Returns the generator's raw output on the CPU (``[-1, 1]`` for the DCGAN).
    """
    device = device or next(G.parameters()).device
    with runtime.eval_mode(G):
        if z is None:
            z = sample_latent(n, G.config.latent_dim, generator, device)
        return G(z.to(device)).float().cpu()


def to_tanh_range(x: torch.Tensor) -> torch.Tensor:
    """``[0, 1]`` images (the datasets' range) to ``[-1, 1]`` (the generator's)."""
    return 2.0 * x - 1.0


def from_tanh_range(x: torch.Tensor) -> torch.Tensor:
    """``[-1, 1]`` generator output back to ``[0, 1]`` images, clipped."""
    return ((x + 1.0) / 2.0).clamp(0.0, 1.0)


# ------------------------------------------------------------------------ the recipe

_DATASET_CHANNELS = {"openmoji": 3, "mnist5k": 1, "digits": 1}   # known before loading the data


@dataclass(frozen=True)
class GANRecipe:
    """Everything that decides a trained DCGAN: data, networks and optimisation.
    :func:`train_recipe` turns it into weights, the same in a notebook and in the long run
    whose generator ships with the package (:mod:`genart_utils.shipped`, family ``"dcgan"``).

    Adam's learning rate is constant, so a run of ``steps`` steps is exactly the first
    ``steps`` steps of any longer run of the same recipe.
    """

    model: DCGANConfig = DCGAN_OPENMOJI_SIZES["cpu"]["model"]  # 32x32 colour, widths 32, lr 5e-4
    dataset: str = "openmoji"   # data.load_dataset name (its labels are not used)
    image_size: int = 32        # side the images are loaded at (must be model.image_size)
    steps: int = 900            # alternating updates (one of D, then one of G, each step)
    batch_size: int = 64        # images (and codes z) per step
    seed: int = 0               # minibatch order and the z of each step (weights: model.seed)

    def __post_init__(self):
        runtime.check_parts(self, model=DCGANConfig)
        runtime.check_fields(self, positive_ints=("steps", "batch_size", "image_size"),
                             nonneg_ints=("seed",))
        if self.model.image_size != self.image_size:
            raise ValueError(f"GANRecipe.image_size is {self.image_size} but the DCGAN is built for "
                             f"{self.model.image_size}x{self.model.image_size} images; pass "
                             f"model=dataclasses.replace(model, image_size={self.image_size}) or "
                             f"image_size={self.model.image_size}")
        channels = _DATASET_CHANNELS.get(self.dataset)
        if channels is not None and self.model.channels != channels:
            raise ValueError(f"GANRecipe: {self.dataset} images have {channels} channel(s) but the "
                             f"DCGAN is built for {self.model.channels}; pass "
                             f"model=dataclasses.replace(model, channels={channels})")


def build_gan(recipe: GANRecipe, device: torch.device | str = "cpu") -> DCGANGenerator:
    """The recipe's generator with its initial weights (from ``recipe.model.seed``): the
    model a shipped DCGAN's weights are loaded into."""
    return build_dcgan(recipe.model, device)[0]


def _gan_data(recipe: GANRecipe) -> torch.Tensor:
    """The recipe's training images in the generator's range ``[-1, 1]``, shape ``(N, C, S, S)``."""
    from .data import load_dataset

    kwargs = {"size": recipe.image_size} if recipe.dataset == "openmoji" else {}
    train = load_dataset(recipe.dataset, "train", **kwargs)
    shape = (recipe.model.channels, recipe.image_size, recipe.image_size)
    if tuple(train.image_shape) != shape:
        raise ValueError(f"{recipe.dataset} images have shape {tuple(train.image_shape)}, but the "
                         f"recipe's DCGAN takes {shape}; set GANRecipe.image_size and "
                         "model.channels / model.image_size to the data's")
    return to_tanh_range(train.images)


def train_recipe(recipe: GANRecipe, *, device: torch.device | str = "cpu",
                 checkpoint: str | None = None, save_every: int = 500, progress: bool = True,
                 callbacks: Sequence[training.Callback] = ()
                 ) -> tuple[DCGANGenerator, DCGANDiscriminator, training.History]:
    r"""Train ``recipe`` with the book's one loop and return ``(G, D, history)``.

    Each step is one round of the non-saturating GAN game of chapters 02 and 03
    (:func:`make_train_step`): with data :math:`x` (a minibatch, in ``[-1, 1]``) and codes
    :math:`z \sim \mathcal N(0, I)`, one Adam step of the discriminator on

    .. math:: J_D = -\mathbb E_x[\log D(x)] - \mathbb E_z[\log(1 - D(G(z)))],

    then one of the generator, against the updated discriminator, on
    :math:`J_G = -\mathbb E_z[\log D(G(z))]` (``recipe.model.loss``). The history records
    ``loss_d``, ``loss_g``, ``d_real`` and ``d_fake`` at every step.

    With ``checkpoint`` (a path), both networks, both optimisers and the history are written
    there atomically every ``save_every`` steps and at the end, and a run found there is
    resumed: the result equals an uninterrupted run, because the batch and the codes of a
    step depend only on ``(recipe.seed, step)``. A checkpoint of another recipe is refused.
    """
    if not runtime.is_int(save_every) or save_every < 1:
        raise ValueError(f"save_every must be a positive int (steps between checkpoints), got {save_every!r}")
    device = torch.device(device)
    images = _gan_data(recipe)
    G, D = build_dcgan(recipe.model, device)
    opt_g, opt_d = adam_pair(G, D, recipe.model.lr, recipe.model.beta1)
    modules = {"generator": G, "discriminator": D, "opt_g": opt_g, "opt_d": opt_d}
    history = training.History()
    if checkpoint is not None and Path(checkpoint).is_file():
        stored = training.load_checkpoint(checkpoint, config_type=GANRecipe)
        if dataclasses.replace(stored.config, steps=recipe.steps) != recipe:
            raise ValueError(f"{checkpoint} holds a run of another recipe; delete it or pass another path")
        if stored.history.step > recipe.steps:
            raise ValueError(f"{checkpoint} holds {stored.history.step} steps, more than the recipe's "
                             f"{recipe.steps}; pass steps >= {stored.history.step} or another path")
        training.load_checkpoint(checkpoint, modules)
        history = stored.history
    generator = torch.Generator()
    step_fn = make_train_step(G, D, opt_g, opt_d, device=device, generator=generator)

    def seeded_step(batch):
        # the generator's state after `history.step` steps is not stored: re-derive it per step
        generator.manual_seed(recipe.seed * 1_000_003 + history.step)
        return step_fn(batch)

    def save(step, hist):
        if checkpoint is not None and (step % save_every == 0 or step == recipe.steps):
            training.save_checkpoint(checkpoint, modules, config=recipe, history=hist)

    batches = training.minibatches(images, batch_size=recipe.batch_size, seed=recipe.seed,
                                   start=history.step)
    training.train(seeded_step, batches, recipe.steps, history=history, callbacks=[*callbacks, save],
                   progress=progress, desc="dcgan")
    return G, D, history


GAN_RECIPE = GANRecipe(steps=7000)
"""The recipe of the DCGAN that ships with the package as ``dcgan-openmoji32`` (load it with
``shipped.load_or_train("dcgan-openmoji32")``): the cpu profile's network of
:data:`DCGAN_OPENMOJI_SIZES` (OpenMoji at 32x32 in colour, widths 32, lr 5e-4), trained for
7,000 steps of 64 images: 927 s (15 minutes, 7.6 steps per second) on one CPU thread. Its
samples are varied emoji-like figures, faces and objects; the run did not collapse."""


def slerp(z0: torch.Tensor, z1: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    r"""Spherical interpolation between two codes for each ``t`` in ``[0, 1]``:

    .. math:: \mathrm{slerp}(z_0, z_1; t) = \frac{\sin((1-t)\Omega)}{\sin\Omega} z_0
              + \frac{\sin(t\Omega)}{\sin\Omega} z_1, \quad
              \cos\Omega = \frac{z_0 \cdot z_1}{\|z_0\|\,\|z_1\|}.

    Gaussian codes in high dimension concentrate near a sphere; the straight line between
    two of them passes through lower-norm codes that the generator rarely saw.

    The angle is computed as :math:`\Omega = 2 \operatorname{atan2}(\|u_0 - u_1\|,
    \|u_0 + u_1\|)` with :math:`u_i = z_i / \|z_i\|`, which stays accurate near 0 and
    :math:`\pi` (``arccos`` of a rounded cosine does not). For parallel codes
    (:math:`\Omega \to 0`) the formula tends to the straight line
    :math:`(1 - t) z_0 + t z_1`, which is returned. A zero code has no direction, and for
    opposite codes (:math:`\Omega = \pi`) every great circle joins them: both are refused.

    Args:
        z0, z1: codes of shape ``(latent_dim,)``; t: the fractions (a tensor or a list).

    Returns:
        Shape ``(len(t), latent_dim)``.
    """
    if z0.ndim != 1 or z0.shape != z1.shape:
        raise ValueError(f"z0 and z1 must be vectors of the same size, got {tuple(z0.shape)} "
                         f"and {tuple(z1.shape)}; interpolate one pair of codes at a time")
    t = torch.as_tensor(t, dtype=z0.dtype, device=z0.device).reshape(-1, 1)
    n0, n1 = z0.norm(), z1.norm()
    if n0 == 0 or n1 == 0:
        raise ValueError(f"{'z0' if n0 == 0 else 'z1'} is the zero vector, which has no "
                         "direction to interpolate; use the straight line (1 - t) z0 + t z1")
    u0, u1 = z0 / n0, z1 / n1
    apart, together = (u0 - u1).norm(), (u0 + u1).norm()  # 2 sin(Omega/2), 2 cos(Omega/2)
    tol = math.sqrt(torch.finfo(z0.dtype).eps)  # below it the straight line is exact to rounding
    if together < tol:
        raise ValueError("z0 and z1 point in opposite directions (angle pi): every great circle "
                         "joins them, so the spherical path is not defined; perturb one code")
    if apart < tol:  # parallel codes: the limit of the formula as Omega -> 0
        return (1 - t) * z0 + t * z1
    omega = 2 * torch.atan2(apart, together)
    return (torch.sin((1 - t) * omega) * z0 + torch.sin(t * omega) * z1) / torch.sin(omega)


# ------------------------------------------------------------------ theory: the game in 1-D

def optimal_discriminator(log_p_data: torch.Tensor, log_p_g: torch.Tensor) -> torch.Tensor:
    r"""The best discriminator against a fixed generator, from the two log-densities:

    .. math:: D^*(x) = \frac{p_\text{data}(x)}{p_\text{data}(x) + p_g(x)}
              = \sigma\big(\log p_\text{data}(x) - \log p_g(x)\big).

    Its logit is the log density ratio. Computed from log-densities, so it stays exact
    where both densities underflow to 0 (far in the tails); any shape (elementwise).
    """
    return torch.sigmoid(log_p_data - log_p_g)


def value_by_quadrature(log_p_data: torch.Tensor, log_p_g: torch.Tensor, logits: torch.Tensor,
                        dx: float) -> torch.Tensor:
    r""":math:`V(D, G)` for 1-D densities on a uniform grid, by a Riemann sum:

    .. math:: V(D, G) = \int p_\text{data}(x) \log D(x) + p_g(x) \log(1 - D(x))\,dx
              \approx \sum_i \big[p_\text{data}(x_i) \log\sigma(\ell_i)
              + p_g(x_i) \log\sigma(-\ell_i)\big]\,\Delta x,

    with :math:`D = \sigma(\ell)`. ``logits`` are the discriminator's logits at the grid
    points; all three tensors have shape ``(G,)`` (or broadcast to it). The grid must cover
    almost all of both distributions' mass. With ``logits = log_p_data - log_p_g`` this is
    the virtual criterion :math:`C(G) = V(D^*, G)`.
    """
    if dx <= 0:
        raise ValueError(f"dx must be the positive grid spacing, got {dx}")
    terms = log_p_data.exp() * F.logsigmoid(logits) + log_p_g.exp() * F.logsigmoid(-logits)
    return terms.sum(-1) * dx


DiracMode = Literal["simultaneous", "alternating"]


def dirac_gan_trajectory(theta0: float, psi0: float, *, lr: float, steps: int,
                         mode: DiracMode = "simultaneous",
                         loss: GeneratorLoss = "saturating") -> torch.Tensor:
    r"""Gradient play in the Dirac GAN, the smallest GAN that cycles (Mescheder et al., 2018).

    The data are a point mass at 0, the generator is a point mass at :math:`\theta`, and the
    discriminator is :math:`D_\psi(x) = \sigma(\psi x)`, so with the book's losses (logits
    :math:`0` for the data and :math:`\psi\theta` for the sample)

    .. math:: J_D(\theta, \psi) = \log 2 + \operatorname{softplus}(\psi\theta),
              \qquad J_G = -\operatorname{softplus}(\psi\theta)
              \ \text{(saturating)}\ \text{or}\ \operatorname{softplus}(-\psi\theta).

    The only equilibrium is :math:`(\theta, \psi) = (0, 0)`. Each step is plain gradient
    descent with step size ``lr`` for each player on its own loss, computed by autograd
    through :func:`discriminator_loss` and :func:`generator_loss`.

    ``"simultaneous"``: both players step from the same point. ``"alternating"``: the
    discriminator steps first and the generator answers the updated discriminator, as in
    :func:`make_train_step`.

    Returns:
        ``(steps + 1, 2)`` float64 tensor of ``(theta, psi)``, starting point first.
    """
    if lr <= 0 or steps < 0:
        raise ValueError(f"need lr > 0 and steps >= 0, got lr={lr}, steps={steps}")
    if mode not in ("simultaneous", "alternating"):
        raise ValueError(f"unknown mode {mode!r}; use 'simultaneous' or 'alternating'")

    def grad_d(theta: torch.Tensor, psi: torch.Tensor) -> torch.Tensor:
        psi = psi.detach().requires_grad_(True)
        real, fake = (psi * torch.zeros(1, dtype=torch.float64)), (psi * theta).reshape(1)
        return torch.autograd.grad(discriminator_loss(real, fake), psi)[0]

    def grad_g(theta: torch.Tensor, psi: torch.Tensor) -> torch.Tensor:
        theta = theta.detach().requires_grad_(True)
        return torch.autograd.grad(generator_loss((psi * theta).reshape(1), loss), theta)[0]

    theta = torch.tensor(float(theta0), dtype=torch.float64)
    psi = torch.tensor(float(psi0), dtype=torch.float64)
    path = [torch.stack([theta, psi])]
    for _ in range(steps):
        if mode == "simultaneous":
            theta, psi = theta - lr * grad_g(theta, psi), psi - lr * grad_d(theta, psi)
        else:
            psi = psi - lr * grad_d(theta, psi)
            theta = theta - lr * grad_g(theta, psi)
        path.append(torch.stack([theta, psi]).detach())
    return torch.stack(path)


# ------------------------------------------------------------------------- latent space

def latent_walk(z: torch.Tensor, direction: torch.Tensor, alphas: torch.Tensor) -> torch.Tensor:
    r"""Codes :math:`z + \alpha\, d / \lVert d \rVert` for each :math:`\alpha` in ``alphas``.

    ``z`` and ``direction`` have shape ``(latent_dim,)``; returns ``(len(alphas), latent_dim)``.
    The direction is normalised, so :math:`\alpha` is the distance travelled in latent space.
    """
    if z.shape != direction.shape or z.ndim != 1:
        raise ValueError(f"z and direction must be vectors of the same size, got "
                         f"{tuple(z.shape)} and {tuple(direction.shape)}")
    norm = direction.norm()
    if norm == 0:
        raise ValueError("direction is the zero vector; pass a non-zero direction")
    return z + alphas.reshape(-1, 1).to(z.dtype) * (direction / norm)


@torch.no_grad()
def principal_latent_directions(G: DCGANGenerator, k: int = 3) -> torch.Tensor:
    r"""The ``k`` unit directions in latent space that move the generator's first feature
    map the most, shape ``(k, latent_dim)``, strongest first.

    In evaluation mode the first block of :class:`DCGANGenerator`, a transposed
    convolution of the ``1x1`` code followed by batch norm, is an affine map
    :math:`h = A z + b`, with :math:`A_{(c,i,j),k} = W_{k,c,i,j}\, \gamma_c /
    \sqrt{v_c + \epsilon}` (``W`` the convolution's weight, :math:`\gamma_c, v_c` the
    batch norm's scale and running variance). For :math:`z \sim \mathcal N(0, I)` the
    covariance of :math:`h` is :math:`AA^\top`, so the principal components of the
    features (the idea of GANSpace, Härkönen et al. 2020, which is exact here because the
    map is linear) pull back to the top right singular vectors of :math:`A`: the unit
    :math:`d` maximising :math:`\lVert A d\rVert`. Each direction's sign is fixed so that
    its largest-magnitude entry is positive.
    """
    if not isinstance(G, DCGANGenerator):
        raise TypeError(f"expected a DCGANGenerator, got {type(G).__name__}")
    conv, bn = G.net[0], G.net[1]
    if not 1 <= k <= conv.weight.shape[0]:
        raise ValueError(f"k must be between 1 and latent_dim={conv.weight.shape[0]}, got {k}")
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)             # (C,)
    A = (conv.weight * scale[None, :, None, None]).flatten(1).T         # (C*b*b, d_z)
    _, _, vh = torch.linalg.svd(A.double(), full_matrices=False)         # rows: directions
    directions = vh[:k]
    signs = torch.sign(directions.gather(1, directions.abs().argmax(1, keepdim=True)))
    return (directions * signs).to(conv.weight.dtype)

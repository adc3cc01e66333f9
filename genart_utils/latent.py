r"""The first stage of latent diffusion: a KL-regularised convolutional autoencoder that
compresses 32x32 colour images to a small grid of latents, here ``4 x 8 x 8``.

It is chapter 05's VAE (:mod:`genart_utils.vae`) with two changes that make it the
autoencoder of Stable Diffusion (Rombach et al. 2022), minus that one's perceptual (LPIPS)
and adversarial (patch-GAN) loss terms, which this book leaves out:

* the latent is a **grid** :math:`z \in \mathbb R^{c \times h \times w}` that keeps the
  image's layout (a corner of the latent grid describes a corner of the image), made by
  convolutions only, instead of one vector;
* the KL term gets a **small weight** :math:`\beta`. The encoder :math:`q_\phi(z \mid x) =
  \mathcal N(\mu_\phi(x), \operatorname{diag}\sigma^2_\phi(x))` and the prior
  :math:`\mathcal N(0, I)` are those of the VAE, and the loss (:func:`ae_loss`) is

  .. math:: J(x) = \underbrace{\mathbb E_{q_\phi(z \mid x)}\lVert x - \hat x_\theta(z)
            \rVert^2}_{\text{distortion } D} + \beta\, \underbrace{\mathrm{KL}(q_\phi(z \mid x)
            \,\|\, \mathcal N(0, I))}_{\text{rate } R}.

  With a Gaussian decoder :math:`p_\theta(x \mid z) = \mathcal N(\hat x_\theta(z), s^2 I)` of
  fixed standard deviation :math:`s`, :math:`-\log p_\theta(x \mid z) = \lVert x - \hat
  x\rVert^2 / 2s^2 + \frac{d_x}{2}\log(2\pi s^2)`, so :math:`J / 2s^2` is the negative ELBO
  up to a constant when :math:`\beta = 2s^2`: a small :math:`\beta` is a VAE whose decoder
  claims a small pixel noise (:func:`decoder_noise`). Then :math:`D` dominates and the model
  is nearly a plain autoencoder; the KL term only keeps the latents near the prior's scale
  and their posteriors from collapsing to points, so that nearby latents decode to similar
  images. That is what a diffusion model trained on the latents needs: a smooth space of
  roughly unit scale (:func:`latent_scale` fixes the scale exactly).

Why bother: a diffusion model's cost grows with the size of what it denoises, and the
latent has 12 times fewer numbers than the image (:func:`describe_compression`). The price
is the autoencoder's own reconstruction error, a floor under everything decoded from the
latents, which :func:`evaluate` measures.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import nn

from . import runtime, training
from .vae import gaussian_kl, reparameterize


# ----------------------------------------------------------------------------- config

@dataclass(frozen=True)
class AutoencoderConfig:
    """The autoencoder's shape: images ``(channels, image_size, image_size)`` to latents
    ``(latent_channels, image_size / 2**downsamplings, ...)``.

    The encoder has one level per entry of ``mults``, the first at full resolution; each
    level has ``blocks`` residual blocks of width ``base * mults[i]``, and every level but
    the last ends with a stride-2 convolution, so there are ``len(mults) - 1 ==
    downsamplings`` halvings. The decoder mirrors it with nearest-neighbour upsampling.
    """

    image_size: int = 32        # side of the square images
    channels: int = 3           # image channels (RGB)
    latent_channels: int = 4    # c of the latent grid (c x h x w), Stable Diffusion's 4
    downsamplings: int = 2      # halvings: 32 -> 16 -> 8, so h = w = image_size / 4
    base: int = 16              # channels at full resolution
    mults: tuple = (1, 2, 4)    # width multiplier per level (len = downsamplings + 1)
    blocks: int = 1             # residual blocks per level (encoder and decoder)
    groups: int = 8             # group-norm groups (must divide every width)
    seed: int = 0               # initial weights

    def __post_init__(self):
        runtime.check_fields(self, positive_ints=("image_size", "channels", "latent_channels", "base",
                                                  "blocks", "groups"),
                             nonneg_ints=("downsamplings", "seed"))
        cls = type(self).__name__
        if isinstance(self.mults, list):
            object.__setattr__(self, "mults", tuple(self.mults))
        if not isinstance(self.mults, tuple) or not self.mults \
                or not all(runtime.is_int(m) and m > 0 for m in self.mults):
            raise ValueError(f"{cls}.mults must be a non-empty tuple of positive ints, got {self.mults!r}")
        object.__setattr__(self, "mults", tuple(int(m) for m in self.mults))
        if len(self.mults) != self.downsamplings + 1:
            raise ValueError(f"{cls}: {self.downsamplings} downsamplings need {self.downsamplings + 1} "
                             f"levels, so mults needs {self.downsamplings + 1} entries, got "
                             f"{len(self.mults)} ({self.mults!r})")
        factor = 2 ** self.downsamplings
        if self.image_size % factor:
            raise ValueError(f"{cls}: image_size={self.image_size} cannot be halved "
                             f"{self.downsamplings} times (it must be a multiple of {factor}); "
                             "change image_size or downsamplings")
        bad = sorted({w for w in self.widths if w % self.groups})
        if bad:
            raise ValueError(f"{cls}: groups={self.groups} must divide every width, but the widths "
                             f"{bad} (base * mults) are not multiples of it; change base, mults or groups")

    @property
    def widths(self) -> tuple[int, ...]:
        """Channels at each level, finest first: ``base * mults[i]``."""
        return tuple(self.base * m for m in self.mults)

    @property
    def latent_size(self) -> int:
        """Side of the latent grid, ``image_size / 2**downsamplings``."""
        return self.image_size // 2 ** self.downsamplings

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        """``(latent_channels, h, w)``: ``(4, 8, 8)`` by default."""
        return (self.latent_channels, self.latent_size, self.latent_size)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return (self.channels, self.image_size, self.image_size)


def describe_compression(config: AutoencoderConfig) -> str:
    """One line with the numbers per image before and after the encoder, e.g.
    ``3x32x32 = 3,072 pixel values -> 4x8x8 = 256 latents (12x fewer)``."""
    pixels, latents = math.prod(config.image_shape), math.prod(config.latent_shape)
    fmt = lambda shape: "x".join(map(str, shape))   # noqa: E731
    return (f"{fmt(config.image_shape)} = {pixels:,} pixel values -> {fmt(config.latent_shape)} = "
            f"{latents:,} latents ({pixels / latents:.3g}x fewer)")


# ----------------------------------------------------------------------------- modules

class ConvResBlock(nn.Module):
    """GroupNorm-SiLU-conv twice with a skip connection (a 1x1 conv when the width changes):
    :class:`genart_utils.diffusion.ResBlock` without the time embedding.
    ``(B, c_in, H, W) -> (B, c_out, H, W)``."""

    def __init__(self, c_in: int, c_out: int, groups: int):
        super().__init__()
        self.net = nn.Sequential(nn.GroupNorm(groups, c_in), nn.SiLU(), nn.Conv2d(c_in, c_out, 3, padding=1),
                                 nn.GroupNorm(groups, c_out), nn.SiLU(), nn.Conv2d(c_out, c_out, 3, padding=1))
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.skip(x) + self.net(x)


def _head(width: int, out: int, groups: int) -> nn.Sequential:
    return nn.Sequential(nn.GroupNorm(groups, width), nn.SiLU(), nn.Conv2d(width, out, 3, padding=1))


class LatentEncoder(nn.Module):
    """``x (B, C, S, S) -> (B, 2c, S/4, S/4)``: the means then the log-variances of
    :math:`q(z \\mid x)`. Default shapes: ``(B, 3, 32, 32) -> (B, 16, 32, 32) -> (B, 32, 16, 16)
    -> (B, 64, 8, 8) -> (B, 8, 8, 8)``."""

    def __init__(self, c: AutoencoderConfig):
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(c.channels, c.widths[0], 3, padding=1)]
        width = c.widths[0]
        for level, w in enumerate(c.widths):
            for _ in range(c.blocks):
                layers.append(ConvResBlock(width, w, c.groups))
                width = w
            if level < c.downsamplings:
                layers.append(nn.Conv2d(width, width, 3, stride=2, padding=1))     # S -> S/2
        layers.append(_head(width, 2 * c.latent_channels, c.groups))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class LatentDecoder(nn.Module):
    """``z (B, c, S/4, S/4) -> (B, C, S, S)``, the mean :math:`\\hat x` of :math:`p(x \\mid z)`
    (unconstrained; see :meth:`KLAutoencoder.decode`). The mirror image of
    :class:`LatentEncoder`, upsampling by nearest neighbour then a 3x3 convolution."""

    def __init__(self, c: AutoencoderConfig):
        super().__init__()
        width = c.widths[-1]
        layers: list[nn.Module] = [nn.Conv2d(c.latent_channels, width, 3, padding=1)]
        for level, w in reversed(list(enumerate(c.widths))):
            for _ in range(c.blocks):
                layers.append(ConvResBlock(width, w, c.groups))
                width = w
            if level > 0:
                layers += [nn.Upsample(scale_factor=2, mode="nearest"),            # S/2 -> S
                           nn.Conv2d(width, width, 3, padding=1)]
        layers.append(_head(width, c.channels, c.groups))
        self.net = nn.Sequential(*layers)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return 0.5 + self.net(z)      # an untrained decoder starts near mid-grey, not black


class KLAutoencoder(nn.Module):
    r"""Encoder :math:`q_\phi(z \mid x) = \mathcal N(\mu, \operatorname{diag} e^{\text{logvar}})`
    on a latent grid and decoder mean :math:`\hat x_\theta(z)`, images in ``[0, 1]``.

    The initial weights depend only on ``config.seed`` (drawn inside :func:`runtime.seeded`).
    """

    def __init__(self, config: AutoencoderConfig = AutoencoderConfig()):
        super().__init__()
        self.config = config
        with runtime.seeded(config.seed):
            self.encoder = LatentEncoder(config)
            self.decoder = LatentDecoder(config)

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        """``(c, h, w)`` of one latent, ``(4, 8, 8)`` by default."""
        return self.config.latent_shape

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Images ``(B, C, S, S)`` in ``[0, 1]`` -> ``mu, logvar`` of :math:`q(z \\mid x)`, each
        ``(B, c, h, w)``."""
        shape = self.config.image_shape
        if x.ndim != 4 or tuple(x.shape[1:]) != shape:
            raise ValueError(f"the autoencoder takes images of shape (B, {', '.join(map(str, shape))}) "
                             f"in [0, 1], got {tuple(x.shape)}; add the batch axis (x[None]) for one "
                             f"image, and resize other sizes to {shape[1]}x{shape[2]} (or build an "
                             "AutoencoderConfig with that image_size and channels)")
        mu, logvar = self.encoder(x).chunk(2, dim=1)
        return mu, logvar

    def decode(self, z: torch.Tensor, clamp: bool = True) -> torch.Tensor:
        r"""Latents ``(B, c, h, w)`` -> the decoder's mean image ``(B, C, S, S)``.

        The network's output :math:`\hat x` is unconstrained, and the loss is computed on it
        (``clamp=False``), so no gradient is lost to a saturating sigmoid on the white
        backgrounds (more than half of the emoji pixels are exactly 1). The image shown is
        :math:`\operatorname{clamp}(\hat x, 0, 1)`: the nearest point of :math:`[0, 1]^d`,
        which is at least as close as :math:`\hat x` to every image in :math:`[0, 1]^d`
        (coordinate by coordinate, :math:`|\operatorname{clamp}(a) - x| \le |a - x|` for
        :math:`x \in [0, 1]`), so the clamp can only lower the squared error.
        """
        if z.ndim != 4 or tuple(z.shape[1:]) != self.latent_shape:
            raise ValueError(f"the decoder takes latents of shape (B, {', '.join(map(str, self.latent_shape))}), "
                             f"got {tuple(z.shape)}")
        x_hat = self.decoder(z)
        return x_hat.clamp(0, 1) if clamp else x_hat

    def forward(self, x: torch.Tensor, generator: torch.Generator | None = None
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        r"""One reparameterised pass: :math:`z = \mu + \sigma \odot \varepsilon` with
        :math:`\varepsilon` from ``generator`` (:func:`genart_utils.vae.reparameterize`).
        Returns the unclamped reconstruction :math:`\hat x(z)` ``(B, C, S, S)`` and ``mu``,
        ``logvar`` ``(B, c, h, w)``."""
        mu, logvar = self.encode(x)
        z = reparameterize(mu, logvar, generator=generator)
        return self.decode(z, clamp=False), mu, logvar


# ----------------------------------------------------------------------------- loss

def decoder_noise(kl_weight: float) -> float:
    r"""The pixel noise :math:`s = \sqrt{\beta / 2}` of the Gaussian decoder for which
    :func:`ae_loss` with ``kl_weight`` :math:`\beta` is :math:`2s^2` times the negative ELBO
    (plus a constant): e.g. :math:`\beta = 10^{-3}` is :math:`s \approx 0.022`, about 6 of
    the 255 pixel levels."""
    return math.sqrt(kl_weight / 2)


def ae_loss(model: KLAutoencoder, x: torch.Tensor, generator: torch.Generator | None,
            kl_weight: float) -> tuple[torch.Tensor, dict[str, float]]:
    r"""The loss of a batch of images ``x`` ``(B, C, S, S)`` in ``[0, 1]``:

    .. math:: J = \frac1B \sum_{b=1}^{B} \Big(\underbrace{\lVert x_b - \hat x(z_b)\rVert^2}_{D_b}
              + \beta\, \underbrace{\mathrm{KL}(q(z \mid x_b) \,\|\, \mathcal N(0, I))}_{R_b}\Big),
              \qquad z_b = \mu_b + \sigma_b \odot \varepsilon_b,

    the distortion :math:`D_b` a **sum** of squared errors over the :math:`d_x = C S^2` pixel
    values of image :math:`b` (with one reparameterised draw of :math:`z`, from
    ``generator``), and the rate :math:`R_b` in nats per image, the closed form of
    :func:`genart_utils.vae.gaussian_kl` summed over all :math:`c\,h\,w` latents. With a
    Gaussian decoder of fixed noise :math:`s`, :math:`D_b / 2s^2` is :math:`-\log p(x_b
    \mid z_b)` up to a constant, so :math:`J / 2s^2` is a negative ELBO for :math:`\beta =
    2s^2` (:func:`decoder_noise`).

    Returns ``(J, {"mse": D / d_x, "rate_nats": R})``, both averaged over the batch: the
    mean squared error per pixel value and the rate in nats per image.
    """
    if not runtime.is_real(kl_weight) or kl_weight < 0:
        raise ValueError(f"kl_weight must be a finite number >= 0, got {kl_weight!r}")
    x_hat, mu, logvar = model(x, generator)
    distortion = (x_hat - x).pow(2).flatten(1).sum(1)                 # (B,) D_b
    rate = gaussian_kl(mu.flatten(1), logvar.flatten(1))             # (B,) R_b, nats
    loss = (distortion + kl_weight * rate).mean()
    return loss, {"mse": distortion.mean().item() / x[0].numel(), "rate_nats": rate.mean().item()}


# ----------------------------------------------------------------------------- recipe

@dataclass(frozen=True)
class AutoencoderRecipe:
    """Everything that decides a trained autoencoder: the network, the optimisation, the
    KL weight and the data. :func:`train_autoencoder` turns it into weights.

    No data augmentation: a horizontal flip would turn arrows and writing into other
    emoji (or into none)."""

    autoencoder: AutoencoderConfig = AutoencoderConfig()
    optim: training.Optimisation = training.Optimisation(steps=2400, batch_size=64, lr=2e-3, warmup=100,
                                                         ema_decay=0.995)
    kl_weight: float = 1e-3     # beta: the rate's weight against the summed squared error
    dataset: str = "openmoji"   # data.load_dataset name; its training split is used

    def __post_init__(self):
        runtime.check_parts(self, autoencoder=AutoencoderConfig, optim=training.Optimisation)
        runtime.check_fields(self, nonneg_floats=("kl_weight",))
        if not isinstance(self.dataset, str) or not self.dataset:
            raise ValueError(f"AutoencoderRecipe.dataset must be a dataset name such as 'openmoji', "
                             f"got {self.dataset!r}")


AUTOENCODER_RECIPE = AutoencoderRecipe()
"""The recipe of the chapter's autoencoder: 254k parameters, 2,400 steps of 64 images, sized
for about 15 minutes on one CPU thread (about 2.9 steps per second, channels-last).

In our run (827 s on a shared 2-core x86-64 machine, 1 thread) the EMA weights reached a
squared error of 0.0054 per pixel value on the 394 held-out test emoji (22.7 dB PSNR;
0.0018, 27.4 dB, on the training images), a rate of 849 nats per image (3.3 per latent) and
a :func:`latent_scale` of 0.95. On the book's Fréchet protocol the floor images scored 9.25
as they are and 9.10 after passing through the autoencoder: at this feature classifier's
resolution the reconstructions lose nothing measurable. (Reconstructions of the test images
score 3.5, below the floor, because they are copies of the reference set itself.)"""


def build_autoencoder(recipe: AutoencoderRecipe | AutoencoderConfig, device: torch.device | str = "cpu"
                      ) -> KLAutoencoder:
    """The recipe's (or config's) autoencoder, initial weights from its seed, on ``device``, in
    channels-last memory format (faster for these convolutions on a CPU, as in
    :func:`genart_utils.diffusion.build_model`)."""
    config = recipe.autoencoder if isinstance(recipe, AutoencoderRecipe) else recipe
    if not isinstance(config, AutoencoderConfig):
        raise TypeError(f"build_autoencoder takes an AutoencoderRecipe or AutoencoderConfig, "
                        f"got {type(recipe).__name__}")
    return KLAutoencoder(config).to(device, memory_format=torch.channels_last)


def training_images(recipe: AutoencoderRecipe) -> torch.Tensor:
    """The training split of ``recipe.dataset`` at the autoencoder's size, ``(N, C, S, S)``."""
    from .data import load_dataset

    config = recipe.autoencoder
    kwargs = {"size": config.image_size} if recipe.dataset == "openmoji" else {}
    images = load_dataset(recipe.dataset, "train", **kwargs).images
    if tuple(images.shape[1:]) != config.image_shape:
        raise ValueError(f"{recipe.dataset} images have shape {tuple(images.shape[1:])}, but the "
                         f"autoencoder takes {config.image_shape}; set AutoencoderConfig.channels "
                         "and image_size to match")
    return images


def train_autoencoder(recipe: AutoencoderRecipe = AUTOENCODER_RECIPE, *, device: torch.device | str = "cpu",
                      checkpoint: str | None = None, save_every: int = 500, progress: bool = True,
                      callbacks: Sequence[training.Callback] = (), images: torch.Tensor | None = None
                      ) -> tuple[KLAutoencoder, training.EMA, training.History]:
    """Train ``recipe`` with :func:`genart_utils.training.fit_recipe` (resumable from
    ``checkpoint``; batches and noise depend only on the seed and the step) on the
    training split of ``recipe.dataset`` (or on ``images``, e.g. a few for a test).
    Returns ``(model, ema, history)``; ``ema.model`` is the one to use. The history logs
    ``loss``, ``mse`` (per pixel value) and ``rate_nats`` (per image) at every step."""
    device = torch.device(device)
    images = training_images(recipe) if images is None else images
    model = build_autoencoder(recipe, device)

    def loss_fn(batch, generator):
        return ae_loss(model, batch[0].to(device, non_blocking=True), generator, recipe.kl_weight)

    model, ema, history = training.fit_recipe(recipe, model, loss_fn, (images,), checkpoint=checkpoint,
                                              save_every=save_every, progress=progress,
                                              desc="autoencoder", callbacks=callbacks)
    return model, ema, history


# ----------------------------------------------------------------------------- evaluation

@torch.no_grad()
def encode_images(model: KLAutoencoder, images: torch.Tensor, *, batch_size: int = 256,
                  generator: torch.Generator | None = None) -> torch.Tensor:
    """Latents of ``images`` ``(N, C, S, S)``, in batches, in eval mode, on the CPU:
    the encoder means ``mu`` ``(N, c, h, w)``, or, with a ``generator``, one draw
    :math:`z \\sim q(z \\mid x)` per image."""
    device = next(model.parameters()).device
    with runtime.eval_mode(model):
        out = []
        for chunk in images.split(batch_size):
            mu, logvar = model.encode(chunk.to(device))
            z = mu if generator is None else reparameterize(mu, logvar, generator=generator)
            out.append(z.float().cpu())
        return torch.cat(out)


@torch.no_grad()
def decode_latents(model: KLAutoencoder, z: torch.Tensor, *, batch_size: int = 256) -> torch.Tensor:
    """Images ``(N, C, S, S)`` in ``[0, 1]`` (clamped, on the CPU) from latents ``(N, c, h, w)``.
    Latents of a diffusion model trained on scaled latents must be divided by the scale first."""
    device = next(model.parameters()).device
    with runtime.eval_mode(model):
        return torch.cat([model.decode(chunk.to(device)).float().cpu() for chunk in z.split(batch_size)])


def reconstruct(model: KLAutoencoder, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """``decode(mu(x))``: the deterministic reconstruction of ``images``, ``(N, C, S, S)`` in
    ``[0, 1]`` on the CPU (the mean of :math:`q(z \\mid x)`, not a draw)."""
    return decode_latents(model, encode_images(model, images, batch_size=batch_size), batch_size=batch_size)


@torch.no_grad()
def evaluate(model: KLAutoencoder, images: torch.Tensor, batch_size: int = 256) -> dict[str, float]:
    r"""Reconstruction quality and rate on ``images`` ``(N, C, S, S)`` in ``[0, 1]``:

    * ``mse``: the squared error of :func:`reconstruct` per pixel value (each image's mean
      over its :math:`d_x` values, averaged over the images);
    * ``psnr_db``: :math:`10 \log_{10}(1 / \text{mse})`, the peak signal-to-noise ratio in
      decibels for a peak of 1, from that mean error;
    * ``rate_nats``: :math:`\mathrm{KL}(q(z \mid x) \,\|\, \mathcal N(0, I))` in nats per image,
      averaged: an upper bound on the information the latents carry about an image (per
      latent: ``rate_nats / (c h w)``).
    """
    device = next(model.parameters()).device
    with runtime.eval_mode(model):
        errors, rates = [], []
        for chunk in images.split(batch_size):
            mu, logvar = model.encode(chunk.to(device))
            x_hat = model.decode(mu).float().cpu()
            errors.append((x_hat - chunk).pow(2).flatten(1).mean(1))
            rates.append(gaussian_kl(mu.float().flatten(1), logvar.float().flatten(1)).cpu())
    mse = float(torch.cat(errors).mean())
    return {"mse": mse, "psnr_db": 10 * math.log10(1 / mse) if mse > 0 else math.inf,
            "rate_nats": float(torch.cat(rates).mean())}


def latent_scale(model: KLAutoencoder, images: torch.Tensor, batch_size: int = 256) -> float:
    r"""The scale factor :math:`1 / \operatorname{std}(\mu)` of the encoder means over all the
    latents of ``images`` (all images, channels and positions pooled), so that
    ``scale * mu`` has unit standard deviation on them.

    A diffusion model's forward process :math:`x_t = \sqrt{\bar\alpha_t}\,x_0 +
    \sqrt{1 - \bar\alpha_t}\,\epsilon` assumes data of about unit variance: much larger
    latents would still be recognisable at the last step (the noise would not drown them),
    much smaller ones drowned in the first few steps. Stable Diffusion 1.x multiplies its
    latents by 0.18215, the same kind of number for its autoencoder (whose KL weight is
    tiny); the latent diffusion model trains on ``scale * z`` and its samples are divided
    by ``scale`` before :meth:`KLAutoencoder.decode`.
    """
    mu = encode_images(model, images, batch_size=batch_size)
    return float(1.0 / mu.std())

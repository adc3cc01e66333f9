"""Text to image: a Stable Diffusion in miniature, built from the book's own parts.

* :mod:`genart_utils.latent`: a KL-regularised autoencoder (chapter 05's VAE with a small KL
  weight) maps a 3x32x32 image to a 4x8x8 latent grid and back;
* :mod:`genart_utils.clip`: a contrastive text-image encoder whose text transformer is
  chapter 07's block; its per-token states are the caption the denoiser reads;
* :mod:`genart_utils.diffusion`: the previous chapter's U-Net, schedule, v-prediction and
  samplers, here run on latents, with cross-attention to the caption's token states.

A prompt becomes images in four steps (:class:`TextToImage`): tokenise it, encode it with the
frozen text encoder, run DDIM with classifier-free guidance on latent noise, decode the latents.
The parts are trained one after the other; each is loaded through
:func:`genart_utils.shipped.load_or_train`, so a notebook loads the shipped weights, or the
cache of an earlier run, or trains them itself.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import nn

from . import clip, diffusion, latent, runtime, training
from .diffusion import NoiseSchedule, ScheduleConfig, UNet, UNetConfig


class TextConditionedUNet(nn.Module):
    """The latent denoiser: caption token ids ``(B, L)`` are encoded by a frozen copy of a
    CLIP text encoder into token states ``(B, L, D)``, which the U-Net (built with
    ``context_dim = D``) reads through cross-attention.

    The empty caption (``tokenizer.encode([""])``, begin and end of text only) is the "no
    caption" condition: the unconditional half of classifier-free guidance
    (:meth:`null_condition`, which :func:`diffusion.guided_eps` uses). Calling the model
    without tokens is the same as calling it with the empty caption.
    """

    def __init__(self, unet: UNetConfig, text: "clip.TextEncoderConfig"):
        super().__init__()
        if unet.context_dim != text.n_embd:
            raise ValueError(f"the U-Net's context_dim ({unet.context_dim}) must equal the text "
                             f"encoder's width n_embd ({text.n_embd})")
        self.config = unet
        self.tokenizer = clip.CaptionTokenizer(text.alphabet, text.max_chars)
        self.text = clip.TextEncoder(text).eval().requires_grad_(False)
        self.unet = UNet(unet)
        # 1 / std of the autoencoder's latents, set once before training (see train_latent_diffusion)
        self.register_buffer("latent_scale", torch.tensor(1.0))

    def train(self, mode: bool = True):
        super().train(mode)
        self.text.eval()                                # frozen: always in inference mode
        return self

    def null_condition(self, tokens: torch.Tensor) -> torch.Tensor:
        """The empty caption, one per row of ``tokens``."""
        return self.tokenizer.encode([""]).to(tokens.device).expand(len(tokens), -1)

    def forward(self, x: torch.Tensor, t: torch.Tensor, tokens: torch.Tensor | None = None) -> torch.Tensor:
        if tokens is None:
            tokens = self.null_condition(torch.empty(len(x), 1, device=x.device))
        if tokens.ndim != 2 or len(tokens) != len(x):
            raise ValueError(f"tokens must be (B, L) caption ids with B = {len(x)}, got {tuple(tokens.shape)}; "
                             "make them with model.tokenizer.encode(prompts)")
        tokens = tokens[:, :int((tokens != clip.PAD).sum(1).max())]     # causal: padding after the
        with torch.no_grad():                                           # longest caption changes nothing
            states, mask = self.text.states(tokens)
        return self.unet(x, t, context=states, context_mask=mask)


@dataclass(frozen=True)
class LatentDiffusionRecipe:
    """Everything that decides the trained text-to-image denoiser: the two parts it is built
    on (by the names :func:`shipped.load_or_train` knows them by, and their recipes), the
    latent U-Net, the schedule and the optimisation."""

    autoencoder_name: str = "autoencoder-openmoji32"
    autoencoder: "latent.AutoencoderRecipe" = None     # default: latent.AUTOENCODER_RECIPE
    clip_name: str = "clip-openmoji32"
    clip: "clip.CLIPRecipe" = None                     # default: clip.CLIP_RECIPE
    unet: UNetConfig = None                            # default: latent_unet(...) for the parts
    schedule: ScheduleConfig = ScheduleConfig()
    prediction: str = "v"
    caption_dropout: float = 0.1                       # classifier-free guidance: train on "no caption"
    optim: training.Optimisation = training.Optimisation(steps=6000, batch_size=64, lr=3e-4, warmup=200)

    def __post_init__(self):
        defaults = {"autoencoder": latent.AUTOENCODER_RECIPE, "clip": clip.CLIP_RECIPE}
        for name, value in defaults.items():
            if getattr(self, name) is None:
                object.__setattr__(self, name, value)
        runtime.check_parts(self, autoencoder=latent.AutoencoderRecipe, clip=clip.CLIPRecipe,
                            optim=training.Optimisation, schedule=ScheduleConfig)
        if self.unet is None:
            object.__setattr__(self, "unet", latent_unet(self.autoencoder.autoencoder, self.clip.clip.text))
        runtime.check_parts(self, unet=UNetConfig)
        runtime.check_fields(self, unit_interval=("caption_dropout",),
                             choices={"prediction": diffusion.LOSS_WEIGHTINGS})
        shape = latent.KLAutoencoder(self.autoencoder.autoencoder).latent_shape
        if (self.unet.channels, self.unet.image_size, self.unet.image_size) != tuple(shape):
            raise ValueError(f"the U-Net takes ({self.unet.channels}, {self.unet.image_size}, "
                             f"{self.unet.image_size}) but the autoencoder's latents are {tuple(shape)}")


def latent_unet(autoencoder: "latent.AutoencoderConfig", text: "clip.TextEncoderConfig", *,
                base: int = 48, mults: tuple = (1, 2), heads: int = 4, seed: int = 0) -> UNetConfig:
    """A U-Net for the autoencoder's latent grid that cross-attends to the text encoder's
    token states at every resolution (8x8 and 4x4 for a 4x8x8 grid)."""
    channels, size, _ = latent.KLAutoencoder(autoencoder).latent_shape
    levels = tuple(size >> i for i in range(len(mults)))
    return UNetConfig(image_size=size, channels=channels, patch=1, base=base, mults=mults,
                      attention_at=levels, heads=heads, context_dim=text.n_embd, seed=seed)


def build_latent_diffusion(recipe: LatentDiffusionRecipe, device: torch.device | str = "cpu") -> nn.Module:
    """The recipe's denoiser (weights from ``recipe.unet.seed``; the text encoder's weights
    are copied in by :func:`train_latent_diffusion` or loaded from a checkpoint), wrapped in
    :class:`diffusion.VPrediction` for ``prediction == "v"``: either way it returns a noise
    estimate."""
    model = TextConditionedUNet(recipe.unet, recipe.clip.clip.text)
    if recipe.prediction == "v":
        model = diffusion.VPrediction(model, NoiseSchedule(recipe.schedule))
    return model.to(device)


def load_parts(recipe: LatentDiffusionRecipe, device: torch.device | str = "cpu", progress: bool = True):
    """The autoencoder and the CLIP the recipe is built on, through
    :func:`shipped.load_or_train` (shipped, cached or trained now). Returns
    ``(autoencoder, clip_model)``, both in eval mode."""
    from . import shipped

    ae = shipped.load_or_train(recipe.autoencoder_name, recipe=recipe.autoencoder, family="autoencoder",
                               device=device, progress=progress)
    cl = shipped.load_or_train(recipe.clip_name, recipe=recipe.clip, family="clip",
                               device=device, progress=progress)
    return ae.model, cl.model


def train_latent_diffusion(recipe: LatentDiffusionRecipe, *, device: torch.device | str = "cpu",
                           checkpoint: str | None = None, save_every: int = 500, progress: bool = True,
                           callbacks: Sequence[training.Callback] = (), parts=None
                           ) -> tuple[nn.Module, training.EMA, training.History]:
    r"""Train the text-conditioned latent denoiser of ``recipe`` on OpenMoji's training split.

    Every image is encoded once to its encoder mean :math:`z = \mu(x)` (the posterior of
    this autoencoder is narrow: its small KL weight leaves :math:`\sigma \ll 1`), multiplied
    by the latent scale (:func:`latent.latent_scale`: one over the standard deviation of the
    training latents, so the diffusion prior's unit variance fits). Each step replaces each caption by
    the empty one with probability ``caption_dropout``, and takes a step of
    :func:`diffusion.simple_loss` in the recipe's weighting. ``parts`` is
    ``(autoencoder, clip_model)``, by default :func:`load_parts`. Resumable as
    :func:`training.fit_recipe`. Returns ``(model, ema, history)``.
    """
    from .data import load_dataset

    device = torch.device(device)
    ae, clip_model = parts if parts is not None else load_parts(recipe, device, progress)
    train = load_dataset(recipe.autoencoder.dataset, "train", size=recipe.autoencoder.autoencoder.image_size)
    model = build_latent_diffusion(recipe, device)
    denoiser = model.net if isinstance(model, diffusion.VPrediction) else model
    denoiser.text.load_state_dict(clip_model.text.state_dict())
    denoiser.latent_scale.fill_(latent.latent_scale(ae, train.images))
    z = latent.encode_images(ae, train.images) * denoiser.latent_scale.cpu()
    tokens = denoiser.tokenizer.encode(list(train.captions))
    null = denoiser.tokenizer.encode([""])[0]
    schedule = NoiseSchedule(recipe.schedule)

    def loss_fn(batch, generator):
        z, tok = batch
        drop = torch.rand(len(tok), generator=generator) < recipe.caption_dropout
        tok = torch.where(drop[:, None], null, tok)
        t = torch.randint(0, schedule.T, (len(z),), generator=generator)
        noise = torch.randn(z.shape, generator=generator)
        loss = diffusion.simple_loss(model, schedule, z.to(device), t.to(device), noise.to(device),
                                     tok.to(device), weighting=recipe.prediction)
        return loss, {}

    return training.fit_recipe(recipe, model, loss_fn, (z, tokens), checkpoint=checkpoint,
                               save_every=save_every, progress=progress, desc="latent diffusion",
                               callbacks=callbacks)


@dataclass
class TextToImage:
    """Prompt in, images out: the trained parts put together.

    ``images = pipe(["red apple", "blue apple"], guidance=3, steps=25, seed=0)`` returns
    ``(B, 3, 32, 32)`` images in ``[0, 1]``: the prompts are tokenised (see
    :class:`clip.CaptionTokenizer` for what a prompt may contain; ``""`` means no caption),
    DDIM runs ``steps`` steps with classifier-free guidance of weight ``guidance`` on
    latent noise drawn from ``seed``, and the decoder maps the latents to pixels.
    """

    autoencoder: nn.Module
    denoiser: nn.Module                 # a TextConditionedUNet, possibly inside VPrediction
    schedule: NoiseSchedule

    @property
    def core(self) -> TextConditionedUNet:
        return getattr(self.denoiser, "net", self.denoiser)

    def tokens(self, prompts: Sequence[str]) -> torch.Tensor:
        return self.core.tokenizer.encode(list(prompts))

    @torch.no_grad()
    def latents(self, prompts: Sequence[str], *, guidance: float = 3.0, steps: int = 25, seed: int = 0,
                eta: float = 0.0, x_T: torch.Tensor | None = None) -> torch.Tensor:
        """The sampled latents, unscaled (as the autoencoder's encoder gives them)."""
        if isinstance(prompts, str):
            raise TypeError("prompts must be a list of strings, e.g. ['red apple'], not one string")
        tokens = self.tokens(prompts)
        device = next(self.denoiser.parameters()).device
        shape = (len(tokens), self.core.config.channels, self.core.config.image_size, self.core.config.image_size)
        z = diffusion.sample(self.denoiser, self.schedule, shape, method="ddim", steps=steps, eta=eta,
                             labels=tokens, guidance=guidance, generator=torch.Generator().manual_seed(seed),
                             device=device, clip_x0=False, to_images=False, x_T=x_T)
        return z / self.core.latent_scale.cpu()

    @torch.no_grad()
    def edit(self, images: torch.Tensor, prompts: Sequence[str], strength: float, *, guidance: float = 3.0,
             steps: int = 25, seed: int = 0, batch_size: int = 64) -> torch.Tensor:
        """SDEdit in latent space (:func:`cocreate.sdedit`): encode ``images`` ``(B, 3, 32, 32)``
        in ``[0, 1]``, noise their latents to ``strength``, denoise them towards ``prompts``
        (``""``: no caption), decode. ``strength = 0`` gives back the autoencoder's
        reconstruction of the images, not the images themselves."""
        from . import cocreate

        if len(prompts) != len(images) or isinstance(prompts, str):
            raise ValueError(f"pass one prompt per image (a list of {len(images)} strings)")
        scale = self.core.latent_scale.cpu()
        z0 = latent.encode_images(self.autoencoder, images, batch_size=batch_size) * scale
        device = next(self.denoiser.parameters()).device
        z = cocreate.sdedit(self.denoiser, self.schedule, z0, strength, steps=steps, labels=self.tokens(prompts),
                            guidance=guidance, generator=torch.Generator().manual_seed(seed), device=device,
                            clip_x0=False)
        return latent.decode_latents(self.autoencoder, z / scale, batch_size=batch_size)

    @torch.no_grad()
    def blend(self, a: str, b: str, weights: Sequence[float], *, guidance: float = 3.0, steps: int = 25,
              seed: int = 0, same_noise: bool = True, mode: str = "score") -> torch.Tensor:
        """Images for blends of the prompts ``a`` and ``b`` (:class:`PromptBlend` in ``mode``),
        one per weight in ``weights`` (0: ``a``, 1: ``b``), from the same latent noise (the
        noise of ``seed``'s first image) when ``same_noise``, so that only the prompt moves."""
        blend = PromptBlend(self.core, a, b, mode)
        model = diffusion.VPrediction(blend, self.schedule) if isinstance(self.denoiser, diffusion.VPrediction) \
            else blend
        w = torch.as_tensor(list(weights), dtype=torch.float32)
        c, s = self.core.config.channels, self.core.config.image_size
        generator = torch.Generator().manual_seed(seed)
        x_T = torch.randn(1, c, s, s, generator=generator).expand(len(w), -1, -1, -1) if same_noise else None
        device = next(self.denoiser.parameters()).device
        z = diffusion.sample(model, self.schedule, (len(w), c, s, s), method="ddim", steps=steps, labels=w,
                             guidance=guidance, generator=generator, device=device, clip_x0=False,
                             to_images=False, x_T=x_T)
        return latent.decode_latents(self.autoencoder, z / self.core.latent_scale.cpu())

    @torch.no_grad()
    def __call__(self, prompts: Sequence[str], *, guidance: float = 3.0, steps: int = 25, seed: int = 0,
                 eta: float = 0.0, x_T: torch.Tensor | None = None, batch_size: int = 64) -> torch.Tensor:
        z = self.latents(prompts, guidance=guidance, steps=steps, seed=seed, eta=eta, x_T=x_T)
        return latent.decode_latents(self.autoencoder, z, batch_size=batch_size)


BLEND_MODES = ("score", "attention")


class PromptBlend(nn.Module):
    r"""The denoiser of a :class:`TextToImage` pipeline conditioned on a blend of two prompts
    ``a`` and ``b``: called with weights :math:`\lambda` ``(B,)`` in ``[0, 1]`` in place of
    caption ids (``NaN``: no caption, the unconditional half of guidance). Both modes are
    exactly prompt ``a`` at :math:`\lambda = 0` and exactly ``b`` at 1.

    * ``mode="score"``: the two captions' noise estimates are mixed,
      :math:`\epsilon_\lambda = (1 - \lambda)\,\epsilon(x_t, a) + \lambda\,\epsilon(x_t, b)`.
      With guidance of weight :math:`w` this is
      :math:`\epsilon_\varnothing + w\,[(1 - \lambda)(\epsilon_a - \epsilon_\varnothing)
      + \lambda(\epsilon_b - \epsilon_\varnothing)]`, the score of
      :math:`p_t(x)\,p_t(a \mid x)^{w(1-\lambda)}\,p_t(b \mid x)^{w\lambda}`: a product of
      experts whose weights slide from one caption to the other. Two network calls per image.
    * ``mode="attention"``: the cross-attention reads the token states of both captions at
      once, those of ``a`` with weight :math:`1 - \lambda` and those of ``b`` with weight
      :math:`\lambda` (log-weights added to the logits), so each pixel reads
      :math:`\frac{(1-\lambda) Z_a\,\mathrm{out}^a + \lambda Z_b\,\mathrm{out}^b}{(1-\lambda) Z_a
      + \lambda Z_b}`, :math:`Z_c = \sum_{j \in c} e^{q^\top k_j / \sqrt d}`: a blend of the text
      embeddings as the U-Net sees them. (Averaging the token states position by position is
      not defined for captions of different lengths.) One network call, but the U-Net never
      read two captions at once in training.
    """

    def __init__(self, core: TextConditionedUNet, a: str, b: str, mode: str = "score"):
        super().__init__()
        if mode not in BLEND_MODES:
            raise ValueError(f"mode must be one of {BLEND_MODES}, got {mode!r}")
        self.core, self.mode = core, mode
        self.config = core.config
        self.tokens = [core.tokenizer.encode([p]) for p in (a, b, "")]
        with torch.no_grad():
            self.states = [core.text.states(tok) for tok in self.tokens]

    def null_condition(self, weights: torch.Tensor) -> torch.Tensor:
        return torch.full_like(weights, float("nan"))

    def forward(self, x: torch.Tensor, t: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
        if weights is None:
            weights = torch.full((len(x),), float("nan"))
        weights = weights.detach().float().cpu()
        if weights.shape != (len(x),) or torch.any((weights < 0) | (weights > 1)):
            raise ValueError(f"weights must be ({len(x)},) values in [0, 1] (or NaN: no caption), got {weights}")
        if self.mode == "score":
            return self._score_blend(x, t, weights)
        return self._attention_blend(x, t, weights)

    def _score_blend(self, x, t, weights):
        null = weights.isnan()
        out = torch.empty_like(x)
        if null.any():
            out[null] = self.core(x[null], t[null])
        keep = ~null
        if keep.any():
            n = int(keep.sum())
            lam = weights[keep].to(x.device, x.dtype).reshape(-1, *([1] * (x.ndim - 1)))
            both = self.core(torch.cat([x[keep], x[keep]]), torch.cat([t[keep], t[keep]]),
                             torch.cat([self.tokens[0].expand(n, -1), self.tokens[1].expand(n, -1)]).to(x.device))
            out_a, out_b = both.chunk(2)
            out[keep] = (1 - lam) * out_a + lam * out_b
        return out

    def _attention_blend(self, x, t, weights):
        (sa, ma), (sb, mb), (sn, mn) = self.states
        length = sa.shape[1] + sb.shape[1]
        context = torch.cat([sa, sb], 1).expand(len(x), -1, -1).clone()               # (B, La + Lb, D)
        log_m = torch.cat([ma, mb], 1).float().log()                                   # 0 or -inf
        a_part = torch.zeros(len(x), length, dtype=torch.bool)
        a_part[:, :sa.shape[1]] = True
        lam = weights.nan_to_num(0.0)[:, None]
        bias = log_m + torch.where(a_part, torch.log1p(-lam), torch.log(lam))
        null = weights.isnan()
        if null.any():                     # no caption: the empty caption's states, padding ignored
            context[null] = 0
            context[null, :sn.shape[1]] = sn[0]
            bias[null] = float("-inf")
            bias[null, :sn.shape[1]] = mn[0].float().log()
        return self.core.unet(x, t, context=context.to(x.device), context_mask=bias.to(x.device))


def load_pipeline(name: str = "ldm-openmoji32", *, recipe: LatentDiffusionRecipe | None = None,
                  retrain: bool = False, device: torch.device | str = "cpu", progress: bool = True):
    """The text-to-image pipeline of the denoiser ``name`` (shipped, cached or trained now
    with ``recipe``) and its autoencoder. Returns ``(pipe, loaded)``, ``loaded`` the
    :class:`shipped.Loaded` of the denoiser (its recipe, history and provenance)."""
    from . import shipped

    loaded = shipped.load_or_train(name, recipe=recipe, family="latent-diffusion", retrain=retrain,
                                   device=device, progress=progress)
    ae, _ = load_parts(loaded.recipe, device, progress)
    return TextToImage(ae, loaded.model, NoiseSchedule(loaded.recipe.schedule)), loaded


def prompt_ranks(evaluator: nn.Module, images: torch.Tensor, prompts: Sequence[str],
                 candidates: Sequence[str]) -> torch.Tensor:
    """The rank (1 = best) of each image's prompt among ``candidates`` (which must contain
    every prompt) by the cosine similarity of ``evaluator``, a CLIP that was trained apart
    from the pipeline: a measure of text-image agreement that is not circular."""
    candidates = list(candidates)
    missing = sorted(set(prompts) - set(candidates))
    if missing:
        raise ValueError(f"prompts {missing[:3]} are not among the candidates; add them")
    index = {c: i for i, c in enumerate(candidates)}
    targets = torch.tensor([index[p] for p in prompts])
    with torch.no_grad():
        image_emb = evaluator.encode_image(images)
        text_emb = evaluator.encode_text(clip.CaptionTokenizer(evaluator.config.text.alphabet,
                                                               evaluator.config.text.max_chars).encode(candidates))
    return clip.retrieval_ranks(image_emb, text_emb, targets)

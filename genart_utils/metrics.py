"""Honest evaluation of generative models.

* :func:`frechet_distance`: the Fréchet distance between Gaussians fitted to two sets of
  features (the idea of FID, Heusel et al. 2017). FID proper uses an Inception network on
  natural images; we use the penultimate layer of a small classifier trained on the same
  dataset (:class:`DigitClassifier`: the digit for MNIST, the emoji group for OpenMoji in
  colour), so our numbers are comparable with each other, not with published FIDs.
* :func:`mode_coverage`: for the ring of Gaussians, how many modes the samples reach and
  what fraction of samples is close to some mode.
* :func:`mean_images`, :func:`blurred_noise`: trivial baselines to put a distance in
  context, and :func:`frechet_distances` to score several image sets against one reference.
* :func:`frechet_protocol`: THE Fréchet protocol of the book. Every chapter that reports a
  Fréchet distance calls it, so numbers from different chapters are on one scale (same
  sample size, same reference set, same features, same floor and baselines).
  :func:`predicted_labels` and :func:`classifier_accuracy` reuse its classifier to say which
  class samples look like (e.g. the accuracy of class-conditional samples).
* Memorisation: :func:`nearest_neighbours` and :func:`memorisation_check` for images (how
  close do samples come to the training set, compared with held-out real images?);
  :func:`longest_shared_substring` and :func:`tune_memorisation` for text.
* Uncertainty: :func:`mean_and_se`, :func:`mean_interval`, :func:`proportion_interval` (Wilson) and
  :func:`jackknife_interval`, so that a notebook reports a measured difference only with
  its interval.
"""

from __future__ import annotations

import bisect
import dataclasses
import functools
import hashlib
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from . import runtime, training


# ------------------------------------------------------------------- Fréchet distance

def gaussian_stats(features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean ``(D,)`` and unbiased covariance ``(D, D)`` of ``(N, D)`` features, in float64."""
    if features.ndim != 2 or len(features) < 2:
        raise ValueError(f"features must have shape (N >= 2, D), got {tuple(features.shape)}")
    f = features.detach().to(torch.float64).cpu()
    return f.mean(0), torch.cov(f.T)


def _sqrtm_psd(a: torch.Tensor) -> torch.Tensor:
    values, vectors = torch.linalg.eigh(a)
    return (vectors * values.clamp(min=0).sqrt()) @ vectors.T


def _check_gaussian(mu: torch.Tensor, cov: torch.Tensor, mu_name: str, cov_name: str) -> None:
    """A mean ``(D,)`` and a covariance ``(D, D)`` that is symmetric and positive
    semi-definite, up to rounding: a relative tolerance of the square root of the machine
    epsilon of ``cov``'s dtype (1.5e-8 in float64, 3.5e-4 in float32)."""
    if mu.ndim != 1:
        raise ValueError(f"{mu_name} must be a mean vector of shape (D,), got shape {tuple(mu.shape)}")
    d = len(mu)
    if cov.shape != (d, d):
        raise ValueError(f"{cov_name} must be a covariance of shape (D, D) = ({d}, {d}) to match "
                         f"{mu_name}, got shape {tuple(cov.shape)}")
    for name, t in ((mu_name, mu), (cov_name, cov)):
        if not torch.isfinite(t).all():
            raise ValueError(f"{name} contains NaN or infinite values; check the features it was "
                             "computed from")
    eps = torch.finfo(cov.dtype).eps if cov.dtype.is_floating_point else torch.finfo(torch.float64).eps
    tol = math.sqrt(eps)
    c = cov.to(torch.float64)
    scale = float(c.abs().max()) if d else 0.0
    asym = float((c - c.T).abs().max()) if d else 0.0
    if asym > tol * scale:
        raise ValueError(f"{cov_name} is not symmetric (largest |C - C^T| entry {asym:.3g}, largest "
                         f"|C| entry {scale:.3g}); a covariance matrix is symmetric: estimate it "
                         "with gaussian_stats or torch.cov")
    if d:
        values = torch.linalg.eigvalsh(c)
        lo, hi = float(values[0]), float(values.abs().max())
        if lo < -tol * hi:
            raise ValueError(f"{cov_name} is not positive semi-definite: its smallest eigenvalue is "
                             f"{lo:.3g} (largest magnitude {hi:.3g}), and a covariance has none below "
                             "0; estimate it with gaussian_stats or torch.cov, not as a difference "
                             "or a hand-made matrix")


def frechet_distance(mu1: torch.Tensor, cov1: torch.Tensor, mu2: torch.Tensor, cov2: torch.Tensor) -> float:
    r"""Fréchet (2-Wasserstein squared) distance between two Gaussians:

    .. math:: d^2 = \|\mu_1 - \mu_2\|^2 + \operatorname{Tr}\big(\Sigma_1 + \Sigma_2
              - 2 (\Sigma_1^{1/2} \Sigma_2 \Sigma_1^{1/2})^{1/2}\big).

    The trace of the cross term is computed from the eigenvalues of the symmetric matrix
    :math:`\Sigma_1^{1/2}\Sigma_2\Sigma_1^{1/2}`, which equal those of :math:`\Sigma_1\Sigma_2`.

    Raises:
        ValueError: when a mean is not ``(D,)``, a covariance is not ``(D, D)`` with the same
            ``D``, or a covariance is not symmetric positive semi-definite (beyond rounding):
            the formula assumes both, and would otherwise return a meaningless, possibly
            negative, number.
    """
    _check_gaussian(mu1, cov1, "mu1", "cov1")
    _check_gaussian(mu2, cov2, "mu2", "cov2")
    if len(mu1) != len(mu2):
        raise ValueError(f"the two Gaussians live in different dimensions: mu1 has {len(mu1)}, "
                         f"mu2 has {len(mu2)}; compute both from the same feature layer")
    mu1, mu2, cov1, cov2 = (t.to(torch.float64) for t in (mu1, mu2, cov1, cov2))
    root1 = _sqrtm_psd(cov1)
    cross = torch.linalg.eigvalsh(root1 @ cov2 @ root1).clamp(min=0).sqrt().sum()
    return float(((mu1 - mu2) ** 2).sum() + torch.trace(cov1) + torch.trace(cov2) - 2 * cross)


def frechet_distance_of(features1: torch.Tensor, features2: torch.Tensor) -> float:
    """Fréchet distance between Gaussians fitted to two ``(N, D)`` feature sets."""
    return frechet_distance(*gaussian_stats(features1), *gaussian_stats(features2))


# ---------------------------------------------------------------- feature classifier

@dataclass(frozen=True)
class ClassifierConfig:
    """A small CNN for square images whose penultimate layer gives the features.

    The defaults are the digits classifier (1x28x28 images, 10 classes). The Fréchet
    protocol's classifier of a dataset takes its image shape and number of classes from the
    data (:func:`protocol_classifier_config`).
    """

    channels: int = 1       # image channels: 1 for greyscale digits, 3 for RGB
    image_size: int = 28    # images are image_size x image_size; two 2x2 poolings need >= 4
    width: int = 32        # channels of the first conv block; the second has 2 * width
    feature_dim: int = 128  # size of the feature layer used by the Fréchet distance
    n_classes: int = 10
    lr: float = 1e-3
    steps: int = 1500
    batch_size: int = 128
    seed: int = 0           # initial weights and minibatch order

    def __post_init__(self):
        runtime.check_fields(self, positive_ints=("channels", "image_size", "width", "feature_dim",
                                                  "n_classes", "steps", "batch_size"),
                             nonneg_ints=("seed",), positive_floats=("lr",))
        if self.image_size < 4:
            raise ValueError(f"ClassifierConfig.image_size must be at least 4 (the classifier halves "
                             f"the image twice), got {self.image_size}")


_ADDED_SINCE_0_2 = ("image_size",)
"""Fields that :class:`ClassifierConfig` gained after genart_utils 0.2.0."""


def _classifier_tag(config: ClassifierConfig) -> str:
    """Ten hex digits of the sha256 of the config's repr, naming its cache file.

    Fields added after 0.2.0 (:data:`_ADDED_SINCE_0_2`) are left out of that repr while
    they hold their default, so a digits classifier cached by 0.2.0 keeps its file name and
    is not trained again.
    """
    shown = [f"{f.name}={getattr(config, f.name)!r}" for f in dataclasses.fields(config)
             if not (f.name in _ADDED_SINCE_0_2 and getattr(config, f.name) == f.default)]
    text = f"{type(config).__name__}({', '.join(shown)})"
    return hashlib.sha256(text.encode()).hexdigest()[:10]


CLASSIFIER_SIZES = {
    # smoke only tests that the code runs: a tiny classifier, trained in seconds
    "smoke": ClassifierConfig(width=4, feature_dim=16, steps=30, batch_size=64),
    "cpu": ClassifierConfig(),
    "gpu": ClassifierConfig(),
}
"""The feature classifier of the Fréchet protocol in each profile, for the 28x28 datasets
(``mnist5k``, ``mnist``, ``fashion_mnist``) and any dataset without an entry in
:data:`DATASET_CLASSIFIER_SIZES`. Every chapter uses the same one
(:func:`protocol_classifier_config`), so their distances are on one scale."""

DATASET_CLASSIFIER_SIZES: dict[str, dict[str, ClassifierConfig]] = {
    # Emoji groups (smileys, people, animals ... flags) at 32x32 in colour: ~3,550 training
    # images, and a test split of emoji families never seen in training. The classifier
    # learns the training emoji by heart quickly. In our runs (width 16, 2 seeds each) its
    # test accuracy fell from 300 to 600 steps (0.74, 0.71, 0.67 at 300, 400, 600) as it lost
    # the People & Body group (61% of the images), while its accuracy averaged over the
    # groups rose up to ~400 steps and then levelled (0.51, 0.56, 0.57). 400 steps (~14
    # epochs) balance the two; width 32 did no better at twice the time (~20 s on 1 core).
    "openmoji": {
        "smoke": ClassifierConfig(width=4, feature_dim=16, steps=30, batch_size=64),
        "cpu": ClassifierConfig(width=16, feature_dim=128, steps=400, batch_size=128),
        "gpu": ClassifierConfig(width=16, feature_dim=128, steps=400, batch_size=128),
    },
}
"""Per-dataset sizes of the protocol's feature classifier in each profile, where a dataset
needs other ones than :data:`CLASSIFIER_SIZES`. Only the sizes count: the channels, image
size and number of classes always come from the dataset."""


def _dataset_fields(dataset: str, splits: tuple | None = None) -> dict:
    """``channels``, ``image_size`` and ``n_classes`` (the largest label + 1 over both
    splits) of a dataset of square images; ``splits`` = its (train, test) when loaded."""
    train, test = splits or _splits(dataset)
    c, h, w = train.images.shape[1:]
    if h != w or tuple(test.images.shape[1:]) != (c, h, w):
        raise ValueError(f"{dataset}: the feature classifier takes square images of one shape, got "
                         f"train {tuple(train.images.shape[1:])} and test {tuple(test.images.shape[1:])}")
    n_classes = int(max(train.labels.max(), test.labels.max())) + 1
    return {"channels": int(c), "image_size": int(h), "n_classes": n_classes}


def protocol_classifier_config(profile: str | None = None, dataset: str = "mnist5k") -> ClassifierConfig:
    """The protocol's classifier config for ``dataset`` in ``profile`` (default: the active
    profile): the sizes of :data:`DATASET_CLASSIFIER_SIZES` (else :data:`CLASSIFIER_SIZES`)
    with the channels, image size and number of classes of the dataset. For the 28x28 digit
    datasets in the cpu and gpu profiles this is ``ClassifierConfig()`` itself."""
    return _fit_sizes(dataset, profile, _dataset_fields(dataset))


def _fit_sizes(dataset: str, profile: str | None, fields: dict) -> ClassifierConfig:
    sizes = runtime.profile_config(**DATASET_CLASSIFIER_SIZES.get(dataset, CLASSIFIER_SIZES),
                                   profile=profile)
    return dataclasses.replace(sizes, **fields)


class DigitClassifier(nn.Module):
    """The book's feature classifier (named after its first use, digits): ``(B, C, S, S)``
    images in ``[0, 1]`` -> logits ``(B, n_classes)``, with ``C = config.channels`` and
    ``S = config.image_size``; :meth:`features` returns the ``(B, feature_dim)`` activations
    before the last layer.

    Two blocks of a 3x3 convolution, ReLU and 2x2 max pooling take ``S`` to ``S // 4``
    (28 -> 14 -> 7 for digits, 32 -> 16 -> 8 for emoji), then a linear layer gives the features.
    """

    def __init__(self, config: ClassifierConfig = ClassifierConfig()):
        super().__init__()
        self.config = config
        w, s = config.width, config.image_size // 2 // 2
        self.body = nn.Sequential(
            nn.Conv2d(config.channels, w, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),  # (B, w, S/2, S/2)
            nn.Conv2d(w, 2 * w, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),           # (B, 2w, S/4, S/4)
            nn.Flatten(), nn.Linear(2 * w * s * s, config.feature_dim), nn.ReLU(),    # (B, feature_dim)
        )
        self.head = nn.Linear(config.feature_dim, config.n_classes)                  # (B, n_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        c, s = self.config.channels, self.config.image_size
        if x.ndim != 4 or tuple(x.shape[1:]) != (c, s, s):
            raise ValueError(f"the feature classifier takes images of shape (B, {c}, {s}, {s}), got "
                             f"{tuple(x.shape)}; it was built for {c}x{s}x{s} images (its config's "
                             "channels and image_size): use the classifier of the dataset the "
                             "images come from (metrics.feature_classifier(dataset))")
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def _data_fingerprint(images: torch.Tensor, labels: torch.Tensor) -> str:
    """sha256 of the training images and labels: a cached classifier trained on other data
    (say, a dataset rendered again differently) is not reused."""
    digest = hashlib.sha256(repr((tuple(images.shape), str(images.dtype))).encode())
    digest.update(images.detach().cpu().contiguous().numpy().tobytes())
    digest.update(labels.detach().cpu().to(torch.int64).contiguous().numpy().tobytes())
    return digest.hexdigest()


def _check_training_data(images: torch.Tensor, labels: torch.Tensor, config: ClassifierConfig) -> None:
    c, s = config.channels, config.image_size
    if images.ndim != 4 or tuple(images.shape[1:]) != (c, s, s):
        raise ValueError(f"images must have shape (N, {c}, {s}, {s}) for this ClassifierConfig "
                         f"(channels={c}, image_size={s}), got {tuple(images.shape)}; build the config "
                         "from the data (metrics.protocol_classifier_config(dataset=...), or "
                         "dataclasses.replace(config, channels=..., image_size=...))")
    if labels.shape != images.shape[:1] or labels.dtype != torch.int64:
        raise ValueError(f"labels must be int64 of shape ({len(images)},), one per image, got "
                         f"{labels.dtype} of shape {tuple(labels.shape)}")
    if len(labels) and (int(labels.min()) < 0 or int(labels.max()) >= config.n_classes):
        raise ValueError(f"labels must lie in [0, n_classes) = [0, {config.n_classes}), got "
                         f"[{int(labels.min())}, {int(labels.max())}]; set n_classes to the largest "
                         "label + 1")


def train_classifier(images: torch.Tensor, labels: torch.Tensor,
                     config: ClassifierConfig = ClassifierConfig(),
                     cache: str | Path | None = None, progress: bool = False) -> DigitClassifier:
    """Train the feature classifier on ``images`` ``(N, C, S, S)`` in ``[0, 1]`` with int64
    ``labels`` ``(N,)`` in ``[0, n_classes)``, or load it from ``cache``.

    A cached checkpoint is used only if it was trained with the same config and on the same
    data (a sha256 of images and labels stored with it; checkpoints of 0.2.0, which lack it,
    are trusted). The initial weights come from ``config.seed`` through
    :func:`runtime.seeded`, and the minibatch order from ``config.seed`` too, so the global
    random number generator is left untouched.
    """
    _check_training_data(images, labels, config)
    with runtime.seeded(config.seed):       # building draws initial weights: not from the global RNG
        model = DigitClassifier(config)
    fingerprint = None if cache is None else _data_fingerprint(images, labels)
    if cache is not None and Path(cache).is_file():
        stored = training.load_checkpoint(cache, config_type=ClassifierConfig)
        if stored.config == config and stored.extra.get("data_sha256", fingerprint) == fingerprint:
            training.load_checkpoint(cache, {"model": model})
            return model.eval()
    opt = torch.optim.Adam(model.parameters(), lr=config.lr)

    def step(batch):
        x, y = batch
        logits = model(x)
        loss = F.cross_entropy(logits, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return {"loss": loss.item(), "accuracy": (logits.argmax(1) == y).float().mean().item()}

    history = training.train(step, training.minibatches(images, labels, batch_size=config.batch_size,
                                                        seed=config.seed),
                             config.steps, progress=progress, desc="feature classifier")
    if cache is not None:
        training.save_checkpoint(cache, {"model": model}, config=config, history=history,
                                 extra={"data_sha256": fingerprint})
    return model.eval()


def feature_classifier(dataset: str = "mnist5k", config: ClassifierConfig | None = None,
                       progress: bool = False) -> DigitClassifier:
    """The feature classifier for a dataset's training split, shared by every chapter.

    Trained once per (dataset, config) and cached under ``data_home()/classifiers``, so the
    GAN, VAE and diffusion chapters measure their samples with the very same network. The
    default ``config`` is the Fréchet protocol's for the active profile
    (:func:`protocol_classifier_config`); a given one must fit the dataset's image shape
    and labels.
    """
    return _feature_classifier(dataset, config, progress, _splits(dataset))


def _feature_classifier(dataset: str, config: ClassifierConfig | None, progress: bool,
                        splits: tuple) -> DigitClassifier:
    from .data import data_home

    fields = _dataset_fields(dataset, splits)
    if config is None:
        config = _fit_sizes(dataset, None, fields)
    wrong = {k: getattr(config, k) for k, v in fields.items() if getattr(config, k) != v}
    if wrong:
        fix = ", ".join(f"{k}={v}" for k, v in fields.items())
        raise ValueError(f"this ClassifierConfig does not fit {dataset}: it has "
                         f"{', '.join(f'{k}={v}' for k, v in wrong.items())}, the data needs {fix}; "
                         f"use metrics.protocol_classifier_config(dataset={dataset!r}) or "
                         f"dataclasses.replace(config, {fix})")
    cache = data_home() / "classifiers" / f"{dataset}-{_classifier_tag(config)}.pt"
    train = splits[0]
    return train_classifier(train.images, train.labels, config, cache=cache, progress=progress)


@torch.no_grad()
def classifier_outputs(model: DigitClassifier, images: torch.Tensor, batch_size: int = 500
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """Features ``(N, feature_dim)`` and predicted labels ``(N,)`` of images in ``[0, 1]``, on
    the CPU (the images are moved to the model's device chunk by chunk)."""
    model.eval()
    device = next(model.parameters()).device
    feats, preds = [], []
    for chunk in images.split(batch_size):
        f = model.features(chunk.to(device, torch.float32))
        feats.append(f.cpu())
        preds.append(model.head(f).argmax(1).cpu())
    return torch.cat(feats), torch.cat(preds)


def predicted_labels(dataset: str, images: torch.Tensor, *, config: ClassifierConfig | None = None,
                     progress: bool = False) -> torch.Tensor:
    """The labels ``(N,)`` that the protocol's classifier of ``dataset``
    (:func:`feature_classifier`) predicts for ``(N, C, H, W)`` images in ``[0, 1]``: the
    digit for ``mnist5k``, the emoji group (an index into ``data.OPENMOJI_GROUPS``) for
    ``openmoji``."""
    model = feature_classifier(dataset, config, progress=progress)
    c, s = model.config.channels, model.config.image_size
    _check_images("images", images, (c, s, s), "N")
    return classifier_outputs(model, images)[1]


def classifier_accuracy(dataset: str, images: torch.Tensor, labels: torch.Tensor, *,
                        config: ClassifierConfig | None = None) -> tuple[float, float, float]:
    """How often the protocol's classifier of ``dataset`` recognises ``images`` as
    ``labels`` (say, samples drawn conditionally on those labels), as ``(accuracy, low,
    high)`` with the Wilson interval of :func:`proportion_interval`. On the real test
    images it is the classifier's own test accuracy: the ceiling for samples."""
    if not isinstance(labels, torch.Tensor) or labels.shape != (len(images),):
        shape = tuple(labels.shape) if isinstance(labels, torch.Tensor) else type(labels).__name__
        raise ValueError(f"labels must be a tensor of shape ({len(images)},), one per image, got {shape}")
    predicted = predicted_labels(dataset, images, config=config)
    return proportion_interval((predicted == labels.cpu()).numpy())


# ------------------------------------------------------------------- mode coverage

def _high_quality_counts(samples: torch.Tensor, centers: torch.Tensor, std: float,
                         threshold: float) -> torch.Tensor:
    """``(K,)`` number of high-quality samples nearest to each centre."""
    if samples.ndim != 2 or centers.ndim != 2 or samples.shape[1] != centers.shape[1]:
        raise ValueError(f"samples (N, d) and centers (K, d) must be 2-D with the same d, got "
                         f"{tuple(samples.shape)} and {tuple(centers.shape)}")
    if len(samples) == 0:
        raise ValueError("samples is empty: draw at least one sample")
    if not std > 0 or not threshold > 0:
        raise ValueError(f"std and threshold must be positive, got std={std}, threshold={threshold}")
    dist = torch.cdist(samples.detach().cpu().to(centers.dtype), centers.cpu())   # (N, K)
    nearest_dist, nearest = dist.min(dim=1)
    good = nearest_dist <= threshold * std
    return torch.bincount(nearest[good], minlength=len(centers))


def mode_shares(samples: torch.Tensor, centers: torch.Tensor, std: float,
                threshold: float = 3.0) -> torch.Tensor:
    r"""The share of all samples that are high quality at each mode, shape ``(K,)``.

    A sample :math:`x` is assigned to its nearest centre :math:`c_k`, and is *high quality*
    when :math:`\|x - c_k\| \le` ``threshold * std``. Entry :math:`k` is the number of
    high-quality samples assigned to mode :math:`k`, divided by the number of samples ``N``,
    so the entries sum to the high-quality fraction (at most 1); a perfect sampler of an
    equal mixture gives about :math:`1/K` each.

    Args:
        samples: ``(N, d)`` points.
        centers: ``(K, d)`` centres of the mixture's components.
        std: the components' standard deviation.
    """
    return _high_quality_counts(samples, centers, std, threshold).double() / len(samples)


def mode_coverage(samples: torch.Tensor, centers: torch.Tensor, std: float,
                  threshold: float = 3.0, min_count: int | None = None) -> dict:
    """How well samples cover the modes of a mixture of isotropic Gaussians.

    A sample is *high quality* when it lies within ``threshold * std`` of its nearest
    centre; a mode is *covered* when at least ``min_count`` high-quality samples are nearest
    to it (default: 1% of the samples, at least 1).

    Returns:
        ``modes_covered`` (a count), ``high_quality`` (a fraction), ``n_modes``, and for a
        bar chart ``shares`` (the :func:`mode_shares`, a ``(K,)`` tensor) and ``min_share``
        (``min_count / N``, the share a mode needs to count as covered).
    """
    counts = _high_quality_counts(samples, centers, std, threshold)
    n = len(samples)
    if min_count is None:
        min_count = max(1, math.ceil(0.01 * n))
    return {"modes_covered": int((counts >= min_count).sum()),
            "high_quality": float(counts.sum()) / n,
            "n_modes": len(centers),
            "shares": counts.double() / n,
            "min_share": min_count / n}


# ---------------------------------------------------------------- trivial baselines

def mean_images(reference: torch.Tensor, n: int) -> torch.Tensor:
    """``n`` copies of the average image of ``reference`` ``(N, C, H, W)``: a "generator"
    that always draws the same blurry average, shape ``(n, C, H, W)``."""
    if reference.ndim != 4:
        raise ValueError(f"reference must have shape (N, C, H, W), got {tuple(reference.shape)}")
    return reference.mean(0, keepdim=True).expand(n, -1, -1, -1).clone()


def _gaussian_kernel(sigma: float) -> torch.Tensor:
    radius = max(1, math.ceil(3 * sigma))
    t = torch.arange(-radius, radius + 1, dtype=torch.float32)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    return k / k.sum()


def blurred_noise(reference: torch.Tensor, n: int, blur_sigma: float = 1.0,
                  generator: torch.Generator | None = None) -> torch.Tensor:
    r"""A trivial baseline that knows the data's pixel statistics but nothing about shapes.

    White Gaussian noise is smoothed by a Gaussian kernel of standard deviation
    ``blur_sigma`` pixels and divided, pixel by pixel, by its exact standard deviation
    (the root of the sum of the squared kernel weights that fall inside the image), so each
    pixel is :math:`\mathcal N(0, 1)` with neighbouring pixels correlated. It is then
    given the per-pixel mean and standard deviation of ``reference`` and clipped to
    ``[0, 1]``. Colour channels are drawn independently, so colour images get each
    channel's statistics but no correlation between channels.

    Args:
        reference: ``(N, C, H, W)`` images in ``[0, 1]``.
        n: how many images to draw.

    Returns:
        ``(n, C, H, W)`` float32 images in ``[0, 1]``.
    """
    if reference.ndim != 4 or len(reference) < 2:
        raise ValueError(f"reference must have shape (N >= 2, C, H, W), got {tuple(reference.shape)}")
    if blur_sigma <= 0:
        raise ValueError(f"blur_sigma must be positive (in pixels), got {blur_sigma}")
    _, c, h, w = reference.shape
    k1 = _gaussian_kernel(blur_sigma)
    kernel = (k1[:, None] * k1[None, :]).expand(c, 1, -1, -1).contiguous()   # (C, 1, K, K)
    pad = len(k1) // 2
    noise = torch.randn(n, c, h, w, generator=generator)
    smooth = F.conv2d(noise, kernel, padding=pad, groups=c)
    # Variance of a weighted sum of independent N(0, 1): the sum of the squared weights.
    std = F.conv2d(torch.ones(1, c, h, w), kernel**2, padding=pad, groups=c).sqrt()
    ref = reference.float()
    return (ref.mean(0) + ref.std(0) * smooth / std).clamp(0.0, 1.0)


@torch.no_grad()
def frechet_distances(model: DigitClassifier, reference: torch.Tensor,
                      candidates: dict[str, torch.Tensor]) -> dict[str, float]:
    """Fréchet distance on ``model``'s features between ``reference`` images and each
    candidate set (all ``(N, C, H, W)`` in ``[0, 1]``), as ``{name: distance}``."""
    ref_features, _ = classifier_outputs(model, reference)
    ref_stats = gaussian_stats(ref_features)
    return {name: frechet_distance(*ref_stats, *gaussian_stats(classifier_outputs(model, images)[0]))
            for name, images in candidates.items()}


# ------------------------------------------------------------- the book's Fréchet protocol

FLOOR = "floor: training images"
MEAN_IMAGE = "baseline: mean image"
BLURRED_NOISE = "baseline: blurred noise"
PROTOCOL_ROWS = (FLOOR, MEAN_IMAGE, BLURRED_NOISE)
"""The rows :func:`frechet_protocol` always adds, whatever the candidates."""

FLOOR_SEED = 0   # which training images form the floor
NOISE_SEED = 1   # the blurred-noise baseline's draw


def _load(dataset: str, split: str):
    from .data import load_dataset

    return load_dataset(dataset, split)


def _splits(dataset: str) -> tuple:
    """``(train, test)`` of ``dataset``, loaded once for a whole protocol call."""
    return _load(dataset, "train"), _load(dataset, "test")


def frechet_sample_size(dataset: str = "mnist5k") -> int:
    """The protocol's ``n``: the size of ``dataset``'s test split (500 for ``mnist5k``,
    10,000 for ``mnist`` and ``fashion_mnist``, about a tenth of the emoji for ``openmoji``).
    Draw exactly this many samples."""
    return len(_load(dataset, "test"))


def frechet_floor(dataset: str = "mnist5k") -> torch.Tensor:
    """The protocol's floor set: ``n`` training images, a fixed seeded subset
    (:data:`FLOOR_SEED`) of ``dataset``'s training split, ``(n, C, H, W)`` in ``[0, 1]``.

    Real images that are not the reference: their distance to the test split is what a
    perfect model could expect with ``n`` samples. Pass a transformed copy (for instance
    binarised) as an extra candidate to get the floor of a model of such images.
    """
    train, test = _splits(dataset)
    return _floor(dataset, train.images, len(test))


def _floor(dataset: str, train: torch.Tensor, n: int) -> torch.Tensor:
    if len(train) < n:
        raise ValueError(f"{dataset}'s training split has {len(train)} images, fewer than the "
                         f"{n} of its test split: the protocol needs n training images for the floor")
    pick = torch.randperm(len(train), generator=torch.Generator().manual_seed(FLOOR_SEED))[:n]
    return train[pick]


def describe_frechet_protocol(dataset: str = "mnist5k", config: ClassifierConfig | None = None) -> str:
    """One line that says how :func:`frechet_protocol` measures, for a notebook to print."""
    splits = _splits(dataset)
    fields = _dataset_fields(dataset, splits)
    config = _fit_sizes(dataset, None, fields) if config is None else config
    n = len(splits[1])
    if config == _fit_sizes(dataset, "cpu", fields):
        which = "the default"
    elif config == _fit_sizes(dataset, "smoke", fields):
        which = "the smoke profile's stand-in"
    else:
        which = "a non-default"
    return (f"Fréchet protocol: each set of n = {n:,} images against all {n:,} {dataset} test "
            f"images, on the {config.feature_dim} features of {which} {dataset} feature "
            f"classifier; floor: {n:,} training images (seed {FLOOR_SEED}); baselines: the mean "
            f"training image and blurred noise (seed {NOISE_SEED})")


def _check_images(what: str, images: torch.Tensor, image_shape: tuple, count: str) -> None:
    """``images`` of shape ``(count, *image_shape)``, finite, in ``[0, 1]``."""
    if not isinstance(images, torch.Tensor) or images.ndim != 4 or tuple(images.shape[1:]) != image_shape:
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        c, h, w = image_shape
        hint = ""
        if isinstance(images, torch.Tensor) and images.ndim == 4 and images.shape[1] == c \
                and images.shape[2] == images.shape[3] != h:
            hint = (f"; images of another size can be resized first, e.g. "
                    f"F.interpolate(images, size={h}, mode=\"area\"), but then say so")
        raise ValueError(f"{what} must be images of shape ({count}, {c}, {h}, {w}), got {shape}{hint}")
    if not torch.isfinite(images).all():
        raise ValueError(f"{what} contains NaN or infinite pixels")
    if images.numel() == 0:
        return
    lo, hi = float(images.min()), float(images.max())
    if lo < -1e-6 or hi > 1 + 1e-6:
        raise ValueError(f"{what} has pixels in [{lo:.3g}, {hi:.3g}], but the protocol "
                         "takes images in [0, 1]; map a tanh generator's output with "
                         "gan.from_tanh_range first")


def _check_candidate(name: str, images: torch.Tensor, n: int, image_shape: tuple) -> None:
    what = f"candidates[{name!r}]"
    if isinstance(images, torch.Tensor) and images.ndim == 4 and tuple(images.shape[1:]) == image_shape \
            and len(images) != n:
        raise ValueError(f"{what} has {len(images)} images, but the protocol compares "
                         f"sets of exactly n = {n} images (the size of the test split): draw {n} "
                         "samples (metrics.frechet_sample_size(dataset) gives n)")
    _check_images(what, images, image_shape, "n")


def frechet_protocol(dataset: str, candidates: Mapping[str, torch.Tensor], *,
                     config: ClassifierConfig | None = None, progress: bool = False
                     ) -> dict[str, float]:
    r"""The book's one Fréchet protocol: distances of image sets to ``dataset``'s test split.

    Every chapter that reports a Fréchet distance calls this, so its numbers are on one
    scale. Everything that changes a Fréchet distance is fixed here:

    * **reference**: all ``n`` images of the test split (``n`` = :func:`frechet_sample_size`);
    * **sample size**: every candidate has exactly ``n`` images. The estimate from ``n``
      samples is biased upwards by an amount that shrinks like :math:`1/n` (the mean term
      alone: :math:`\mathbb E\|\hat\mu_1 - \hat\mu_2\|^2 = \|\mu_1 - \mu_2\|^2 +
      \operatorname{Tr}\Sigma_1/n_1 + \operatorname{Tr}\Sigma_2/n_2`), so only distances
      at the same ``n`` can be compared;
    * **features**: the penultimate layer of :func:`feature_classifier` for ``dataset``
      and ``config`` (trained once, cached);
    * **floor and baselines**, computed identically on every call and always included:
      :data:`FLOOR` (:func:`frechet_floor`, ``n`` real training images: what a perfect
      model could expect), :data:`MEAN_IMAGE` (``n`` copies of the mean training image)
      and :data:`BLURRED_NOISE` (:func:`blurred_noise` with the training pixels'
      statistics, seed :data:`NOISE_SEED`).

    Args:
        dataset: an image dataset of ``genart_utils.data`` with labels: the 28x28 digits
            and clothes (``"mnist5k"``, ``"mnist"``, ``"fashion_mnist"``) or the 32x32 colour
            emoji (``"openmoji"``, whose classifier predicts the emoji group).
        candidates: ``{name: (n, C, H, W) images in [0, 1]}``, e.g. a model's samples.
            Extra real-image sets are fine too (say the binarised floor images, for a model
            of binary images), as long as each has ``n`` images.
        config: the feature classifier's config; by default
            :func:`protocol_classifier_config` of ``dataset`` in the active profile, the same
            in every chapter. Compare numbers only between calls with the same config
            (:func:`describe_frechet_protocol` prints which).

    Returns:
        ``{name: distance}``: the floor first, then the candidates in their order, then the
        two baselines. Lower is better.
    """
    splits = _splits(dataset)
    config = _fit_sizes(dataset, None, _dataset_fields(dataset, splits)) if config is None else config
    train, test = splits[0].images, splits[1].images
    n, image_shape = len(test), tuple(test.shape[1:])
    clash = sorted(set(candidates) & set(PROTOCOL_ROWS))
    if clash:
        raise ValueError(f"candidate names {clash} are reserved for the protocol's own rows; rename them")
    for name, images in candidates.items():
        _check_candidate(name, images, n, image_shape)
    model = _feature_classifier(dataset, config, progress, splits)
    sets = {FLOOR: _floor(dataset, train, n), **candidates,
            MEAN_IMAGE: mean_images(train, n),
            BLURRED_NOISE: blurred_noise(train, n, generator=torch.Generator().manual_seed(NOISE_SEED))}
    return frechet_distances(model, test, sets)


# ------------------------------------------------------------ memorisation: images

def nearest_neighbours(queries: torch.Tensor, reference: torch.Tensor, *, batch_size: int = 256
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    r"""Exact nearest neighbour in ``reference`` of each query, in pixel L2 distance.

    Images are flattened, so :math:`d(x, y) = \|x - y\|_2` over all pixels. The squared
    distances are computed in float64 as :math:`\|x\|^2 + \|y\|^2 - 2\,x \cdot y`, one batch
    of ``batch_size`` queries at a time (memory ``batch_size x len(reference)``), and the
    distance to the nearest one again as :math:`\|x - y\|_2`, so that a copy is at exactly 0.

    Args:
        queries: ``(N, ...)``, e.g. ``(N, C, H, W)`` images.
        reference: ``(M, ...)`` with the same trailing shape.

    Returns:
        ``distances`` ``(N,)`` float64 and ``indices`` ``(N,)`` int64 into ``reference``
        (the first one on a tie).
    """
    if queries.shape[1:] != reference.shape[1:] or queries.ndim < 2:
        raise ValueError(f"queries (N, ...) and reference (M, ...) must have the same item shape, got "
                         f"{tuple(queries.shape)} and {tuple(reference.shape)}")
    if len(reference) == 0:
        raise ValueError("reference is empty: pass at least one reference image")
    if not (isinstance(batch_size, int) and batch_size >= 1):
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    ref = reference.detach().cpu().flatten(1).to(torch.float64)
    ref_sq = (ref**2).sum(1)
    distances, indices = [], []
    for chunk in queries.detach().cpu().flatten(1).to(torch.float64).split(batch_size):
        sq = (chunk**2).sum(1, keepdim=True) + ref_sq - 2 * chunk @ ref.T   # (B, M)
        idx = sq.argmin(dim=1)
        # The expansion above loses digits to cancellation (an exact copy of a 3x32x32 image
        # came out at ~2e-6): measure the distance to the chosen neighbour directly.
        distances.append((chunk - ref[idx]).norm(dim=1))
        indices.append(idx)
    if not distances:
        return torch.zeros(0, dtype=torch.float64), torch.zeros(0, dtype=torch.long)
    return torch.cat(distances), torch.cat(indices)


def _equal_subsets(a: int, b: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices of ``n = min(a, b)`` items of each of two sets: everything of the smaller,
    a seeded random subset of the larger."""
    n = min(a, b)
    g = torch.Generator().manual_seed(seed)
    pick = [torch.arange(m) if m == n else torch.randperm(m, generator=g)[:n] for m in (a, b)]
    return pick[0], pick[1]


def _distance_summary(distances: torch.Tensor, which: torch.Tensor, neighbour: torch.Tensor) -> dict:
    order = distances.argsort(stable=True)
    return {"min": float(distances.min()),
            "p01": float(torch.quantile(distances, 0.01)),
            "median": float(distances.median()),
            "distances": distances[order],      # ascending
            "which": which[order],              # index into the input set
            "neighbour": neighbour[order]}      # index of the nearest training image


def memorisation_check(samples: torch.Tensor, train: torch.Tensor, held_out: torch.Tensor, *,
                       seed: int = 0, batch_size: int = 256) -> dict:
    """Do samples come closer to the training set than real images the model never saw?

    For each sample, the pixel-L2 distance to its nearest training image
    (:func:`nearest_neighbours`); the same for as many held-out real images (a seeded
    random subset of the larger set, so both groups have ``n`` images: the minimum of more
    distances is smaller, so only equal ``n`` compare).

    How to read it: copying shows in the **minimum**, not the mean or median. A model that
    reproduces a few training images produces samples at (nearly) distance 0 from them,
    while its other samples keep the median high. So compare the samples' minimum and 1st
    percentile with the held-out ones'. If samples and held-out images came from the same
    distribution, the smallest of all 2n distances would be in either group with equal
    chance and only a few samples would fall below the held-out minimum; a sample minimum
    far below the held-out minimum (near 0), or many samples below it
    (``samples_below_held_out_min``), points to copies. Look at the closest pairs
    (``which``/``neighbour``, closest first) before calling them copies. Samples that are
    all *farther* from the training set than held-out images show no copying (they may
    simply be worse images).

    Args:
        samples: ``(N, C, H, W)`` generated images in the range of ``train``.
        train: ``(M, C, H, W)`` the training images.
        held_out: ``(K, C, H, W)`` real images not used for training (the test split).

    Returns:
        ``n``; ``samples`` and ``held_out``, each a dict with ``min``, ``p01`` (1st
        percentile) and ``median`` distance, and the tensors ``distances`` (ascending),
        ``which`` (index into the input) and ``neighbour`` (index into ``train``) in that
        order; ``samples_below_held_out_min``, the number of samples closer to the
        training set than the closest held-out image.
    """
    if samples.shape[1:] != train.shape[1:] or held_out.shape[1:] != train.shape[1:]:
        raise ValueError(f"samples, train and held_out must have the same image shape, got "
                         f"{tuple(samples.shape)}, {tuple(train.shape)} and {tuple(held_out.shape)}")
    if len(samples) == 0 or len(held_out) == 0:
        raise ValueError(f"samples and held_out must be non-empty, got {len(samples)} and {len(held_out)}")
    pick_s, pick_h = _equal_subsets(len(samples), len(held_out), seed)
    out = {"n": len(pick_s)}
    for name, images, pick in (("samples", samples, pick_s), ("held_out", held_out, pick_h)):
        d, idx = nearest_neighbours(images[pick], train, batch_size=batch_size)
        out[name] = _distance_summary(d, pick, idx)
    out["samples_below_held_out_min"] = int((out["samples"]["distances"] < out["held_out"]["min"]).sum())
    return out


def memorisation_report(result: Mapping) -> str:
    """A small table of a :func:`memorisation_check` or :func:`tune_memorisation` result."""
    if "generated" in result:      # tunes: longest shared substring, in characters
        title, stats, groups = "longest substring shared with one training text (characters)", \
            ("min", "median", "max"), ("generated", "held_out")
    else:                          # images: nearest-training-neighbour distance
        title, stats, groups = "distance to the nearest training image (pixel L2)", \
            ("min", "p01", "median"), ("samples", "held_out")
    lines = [f"{title}, n = {result['n']} per group",
             f"  {'':10s}" + "".join(f"{s:>9s}" for s in stats)]
    for g in groups:
        lines.append(f"  {g:10s}" + "".join(f"{result[g][s]:9.2f}" for s in stats))
    return "\n".join(lines)


# -------------------------------------------------------------- memorisation: text

class _SubstringIndex:
    r"""A suffix array of a corpus of texts, for longest-shared-substring queries.

    The texts are joined with a separator ``\0`` that no text contains, and all suffixes of
    the joined string are sorted (prefix doubling: sort by the first ``k`` characters, then
    by ``2k`` using the ranks of the two halves, until every rank is distinct; ``O(L log L)``
    numpy sorts for ``L`` characters). The longest prefix of a pattern ``P`` that occurs in
    the corpus is then shared with one of the two suffixes next to where ``P`` would be
    inserted in sorted order (binary search). A match can never run over a separator,
    since ``P`` contains none, so it never spans two texts.
    """

    SEP = "\0"

    def __init__(self, texts: tuple[str, ...]):
        if not texts:
            raise ValueError("corpus_texts is empty: pass the training texts")
        for i, t in enumerate(texts):
            if not isinstance(t, str):
                raise TypeError(f"corpus_texts[{i}] is a {type(t).__name__}, not a str")
            if self.SEP in t:
                raise ValueError(f"corpus_texts[{i}] contains the NUL character, which separates texts "
                                 "in the index; remove it")
        self.joined = self.SEP.join(texts) + self.SEP
        self.starts = np.cumsum([0] + [len(t) + 1 for t in texts[:-1]])
        self.suffixes = memoryview(self._suffix_array(self.joined))

    @staticmethod
    def _suffix_array(s: str) -> np.ndarray:
        codes = np.frombuffer(s.encode("utf-32-le"), dtype=np.uint32)
        n = len(codes)
        _, dense = np.unique(codes, return_inverse=True)
        dense = dense.reshape(-1).astype(np.int64) + 1          # 0 means "past the end"
        bits = int(dense.max()).bit_length()
        k = max(1, 62 // bits)                                  # characters packed per key
        padded = np.concatenate([dense, np.zeros(k, np.int64)])
        key = np.zeros(n, np.int64)
        for j in range(k):                                      # the first k characters
            key = (key << bits) | padded[j:j + n]
        while True:
            order = np.argsort(key)
            sorted_key = key[order]
            new_group = np.ones(n, dtype=bool)
            new_group[1:] = sorted_key[1:] != sorted_key[:-1]
            if new_group.all():
                return order.astype(np.int64)
            rank = np.empty(n, np.int64)
            rank[order] = np.cumsum(new_group)                  # 1, 2, ...: rank of first k chars
            second = np.zeros(n, np.int64)
            second[:n - k] = rank[k:]
            key = rank * (n + 1) + second                       # rank of the first 2k chars
            k *= 2

    def longest_match(self, text: str) -> tuple[int, int]:
        """``(length, corpus index)`` of the longest substring of ``text`` in the corpus."""
        if self.SEP in text:
            raise ValueError("text contains the NUL character, which no corpus text can match; remove it")
        joined, suffixes = self.joined, self.suffixes
        best, where = 0, -1
        for i in range(len(text)):
            pattern = text[i:]
            m = len(pattern)
            if m <= best:
                break                               # no later start can beat the best
            j = bisect.bisect_left(suffixes, pattern, key=lambda p: joined[p:p + m])
            for neighbour in (j - 1, j):
                if 0 <= neighbour < len(suffixes):
                    p = suffixes[neighbour]
                    length = _common_prefix(pattern, joined[p:p + m])
                    if length > best:
                        best, where = length, p
        if best == 0:
            return 0, -1
        return best, int(np.searchsorted(self.starts, where, side="right")) - 1


def _common_prefix(a: str, b: str) -> int:
    """Length of the longest common prefix of two strings (binary search on slices)."""
    lo, hi = 0, min(len(a), len(b))
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if a[:mid] == b[:mid]:
            lo = mid
        else:
            hi = mid - 1
    return lo


@functools.lru_cache(maxsize=2)
def _substring_index(texts: tuple[str, ...]) -> _SubstringIndex:
    return _SubstringIndex(texts)


def longest_shared_substring(text: str, corpus_texts: Sequence[str]) -> tuple[int, int]:
    """The longest substring of ``text`` that occurs inside one of ``corpus_texts``.

    Matches never span two corpus texts (the end of one text followed by the start of the
    next is not a match). The corpus is indexed once (a suffix array, about a second for
    2 MB of text) and the index is kept for the next call with the same texts; each query
    then takes about ``len(text) * log2(corpus size)`` string comparisons.

    Returns:
        ``(length, index)``: the length of the longest shared substring and the index of a
        corpus text that contains it; ``(0, -1)`` when not even one character is shared.
    """
    if not isinstance(text, str):
        raise TypeError(f"text must be a str, got {type(text).__name__}")
    return _substring_index(tuple(corpus_texts)).longest_match(text)


def tune_memorisation(generated: Sequence[str], train_texts: Sequence[str],
                      held_out: Sequence[str], *, seed: int = 0) -> dict:
    """Do generated tunes share longer passages with the training text than unseen tunes do?

    For each generated tune, the longest substring it shares with one training text
    (:func:`longest_shared_substring`), in characters and as a fraction of the tune's
    length; the same for as many held-out real tunes (a seeded random subset of the
    larger set, so both groups have ``n`` tunes).

    How to read it: real tunes of one tradition share formulas (the ``M:``/``L:``/``K:``
    header, cadences, stock phrases), so held-out tunes set the level of sharing that is
    not copying. A model that copies shows generated tunes whose longest shared substring
    is far above the held-out maximum, or a fraction near 1 (the whole tune is in the
    training text). Look at the top ones (``which``, ``index``) before calling it copying.

    Returns:
        ``n``; ``generated`` and ``held_out``, each with ``lengths`` and ``fractions``
        (lists, in the order of ``which``, the index into the input), ``index`` (the
        training text holding each match), ``min``, ``median``, ``max`` of the lengths and
        ``min_fraction``, ``median_fraction``, ``max_fraction``.
    """
    for name, tunes in (("generated", generated), ("held_out", held_out)):
        if len(tunes) == 0:
            raise ValueError(f"{name} is empty: pass at least one tune")
        for i, t in enumerate(tunes):
            if not isinstance(t, str) or not t:
                raise ValueError(f"{name}[{i}] must be a non-empty str, got {t!r}")
    index = _substring_index(tuple(train_texts))
    pick_g, pick_h = _equal_subsets(len(generated), len(held_out), seed)
    out = {"n": len(pick_g)}
    for name, tunes, pick in (("generated", generated, pick_g), ("held_out", held_out, pick_h)):
        chosen = [tunes[i] for i in pick.tolist()]
        matches = [index.longest_match(t) for t in chosen]
        lengths = [m[0] for m in matches]
        fractions = [m[0] / len(t) for m, t in zip(matches, chosen)]
        out[name] = {"lengths": lengths, "fractions": fractions, "index": [m[1] for m in matches],
                     "which": pick.tolist(),
                     "min": min(lengths), "median": float(np.median(lengths)), "max": max(lengths),
                     "min_fraction": min(fractions), "median_fraction": float(np.median(fractions)),
                     "max_fraction": max(fractions)}
    return out


# ------------------------------------------------------------------------ uncertainty

Z95 = 1.959963984540054
"""The standard normal quantile of 0.975: a 95% interval is the estimate ± ``Z95`` standard errors."""


def nats_to_bits_per_dim(nats, dims: int):
    r"""A negative log-likelihood (or a bound on it) in nats per example, as bits per
    dimension: :math:`-\log p(x) / (d_x \ln 2)` with ``dims`` :math:`= d_x = C H W`.

    Comparable across models only for likelihoods of the same discrete values: the 8-bit
    pixels of the VAE's discretised decoders and of the diffusion bound. Works on floats and
    tensors.
    """
    if not runtime.is_int(dims) or dims < 1:
        raise ValueError(f"dims must be a positive int (C * H * W), got {dims!r}")
    return nats / (dims * math.log(2.0))


def mean_interval(values, z: float = Z95) -> tuple[float, float, float]:
    r"""The mean of ``values`` and its interval :math:`\bar v \pm z\, s / \sqrt n`
    (``s`` the sample standard deviation), as ``(mean, low, high)``; the bounds are NaN
    with fewer than two values."""
    mean, se = mean_and_se(values)
    return mean, mean - z * se, mean + z * se


def mean_and_se(values) -> tuple[float, float]:
    r"""The mean of ``values`` and its standard error :math:`s / \sqrt n` (NaN with fewer
    than two values; both NaN for none)."""
    v = np.asarray(values, dtype=float).ravel()
    if len(v) == 0:
        return math.nan, math.nan
    if len(v) < 2:
        return float(v.mean()), math.nan
    return float(v.mean()), float(v.std(ddof=1) / math.sqrt(len(v)))


def proportion_interval(flags, z: float = Z95) -> tuple[float, float, float]:
    r"""A fraction of successes and its Wilson score interval, as ``(p, low, high)``:

    .. math:: \frac{\hat p + \frac{z^2}{2n}}{1 + \frac{z^2}{n}} \pm
              \frac{z}{1 + \frac{z^2}{n}} \sqrt{\frac{\hat p (1 - \hat p)}{n} + \frac{z^2}{4 n^2}}

    Unlike :math:`\hat p \pm z \sqrt{\hat p(1-\hat p)/n}` it does not shrink to a point
    when every flag (or none) is set, and it stays inside ``[0, 1]``.
    """
    f = np.asarray(flags, dtype=float).ravel()
    n = len(f)
    if n == 0:
        return math.nan, math.nan, math.nan
    if not np.isin(f, (0.0, 1.0)).all():
        raise ValueError("flags must be booleans or 0/1 values, one per trial")
    p = float(f.mean())
    centre = (p + z**2 / (2 * n)) / (1 + z**2 / n)
    half = z / (1 + z**2 / n) * math.sqrt(p * (1 - p) / n + z**2 / (4 * n**2))
    # The interval always contains p; min/max only undo rounding (at p = 1, centre + half
    # can come out as 0.9999999999999999).
    return p, max(0.0, min(p, centre - half)), min(1.0, max(p, centre + half))


def jackknife_interval(statistic, items: Sequence, z: float = Z95) -> tuple[float, float, float]:
    r"""``statistic(items)`` and its interval ± ``z`` jackknife standard errors, as
    ``(value, low, high)``. With :math:`\theta_{(i)}` the statistic without item ``i``,

    .. math:: \mathrm{se}^2 = \frac{n - 1}{n} \sum_i (\theta_{(i)} - \bar\theta_{(\cdot)})^2,

    which for the mean is exactly :math:`s / \sqrt n`. For statistics of a whole set, such
    as the share of distinct n-grams in a set of texts, that no per-item mean expresses.
    """
    items = list(items)
    n = len(items)
    if n == 0:
        return math.nan, math.nan, math.nan
    value = float(statistic(items))
    if n < 2:
        return value, math.nan, math.nan
    loo = np.array([statistic(items[:i] + items[i + 1:]) for i in range(n)], dtype=float)
    se = math.sqrt((n - 1) / n * float(((loo - loo.mean()) ** 2).sum()))
    return value, value - z * se, value + z * se

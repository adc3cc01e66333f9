import dataclasses
import math
import random

import pytest
import torch

from genart_utils import metrics, runtime


def test_frechet_distance_matches_closed_form_for_commuting_gaussians():
    # Diagonal covariances commute: d^2 = |mu1-mu2|^2 + sum (s1 - s2)^2 with s the std devs.
    mu1, mu2 = torch.tensor([0.0, 1.0, 2.0]), torch.tensor([1.0, 1.0, 0.0])
    s1, s2 = torch.tensor([1.0, 2.0, 0.5]), torch.tensor([3.0, 1.0, 0.5])
    d = metrics.frechet_distance(mu1, torch.diag(s1**2), mu2, torch.diag(s2**2))
    assert math.isclose(d, 5.0 + 4.0 + 1.0, rel_tol=1e-9)


def test_frechet_distance_general_case_and_invariances():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(4, 4, generator=g, dtype=torch.float64), torch.randn(4, 4, generator=g, dtype=torch.float64)
    c1, c2 = a @ a.T + 0.1 * torch.eye(4, dtype=torch.float64), b @ b.T + 0.1 * torch.eye(4, dtype=torch.float64)
    mu = torch.zeros(4, dtype=torch.float64)
    # Brute force with the non-symmetric product's eigenvalues.
    cross = torch.linalg.eigvals(c1 @ c2).real.clamp(min=0).sqrt().sum()
    ref = float(torch.trace(c1) + torch.trace(c2) - 2 * cross)
    assert math.isclose(metrics.frechet_distance(mu, c1, mu, c2), ref, rel_tol=1e-8)
    assert math.isclose(metrics.frechet_distance(mu, c1, mu, c2), metrics.frechet_distance(mu, c2, mu, c1), rel_tol=1e-8)


def test_frechet_distance_of_a_set_with_itself_is_zero():
    feats = torch.randn(500, 16, generator=torch.Generator().manual_seed(1))
    assert abs(metrics.frechet_distance_of(feats, feats)) < 1e-8
    assert metrics.frechet_distance_of(feats, feats + 1.0) > 15.9


def test_mode_coverage_counts_modes_and_quality():
    centers = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    samples = torch.cat([centers[0] + 0.01 * torch.randn(50, 2), centers[1] + 0.01 * torch.randn(50, 2),
                         torch.full((100, 2), 5.0)])
    out = metrics.mode_coverage(samples, centers, std=0.1)
    assert {k: out[k] for k in ("modes_covered", "high_quality", "n_modes")} == \
        {"modes_covered": 2, "high_quality": 0.5, "n_modes": 3}
    assert out["shares"].tolist() == [0.25, 0.25, 0.0] and out["min_share"] == 2 / 200


def test_mode_shares_match_a_loop_over_samples():
    g = torch.Generator().manual_seed(3)
    centers = torch.randn(5, 2, generator=g, dtype=torch.float64) * 3
    samples = torch.randn(400, 2, generator=g, dtype=torch.float64) * 3
    std, threshold = 0.4, 2.0
    counts = [0] * len(centers)
    for x in samples:
        d = [float(((x - c) ** 2).sum().sqrt()) for c in centers]
        k = min(range(len(centers)), key=d.__getitem__)
        counts[k] += d[k] <= threshold * std
    shares = metrics.mode_shares(samples, centers, std, threshold)
    assert shares.tolist() == [c / len(samples) for c in counts]
    cov = metrics.mode_coverage(samples, centers, std, threshold, min_count=3)
    assert cov["modes_covered"] == sum(c >= 3 for c in counts)
    assert math.isclose(cov["high_quality"], sum(counts) / len(samples))
    with pytest.raises(ValueError, match="same d"):
        metrics.mode_shares(samples, centers[:, :1], std)


def test_classifier_learns_and_caches(tmp_path):
    from genart_utils import data

    ds = data.load_mnist5k("train")
    cfg = metrics.ClassifierConfig(width=8, feature_dim=16, steps=100, batch_size=64)
    model = metrics.train_classifier(ds.images, ds.labels, cfg, cache=tmp_path / "clf.pt")
    test = data.load_mnist5k("test")
    feats, preds = metrics.classifier_outputs(model, test.images)
    assert feats.shape == (500, 16) and (preds == test.labels).float().mean() > 0.6
    again = metrics.train_classifier(ds.images, ds.labels, cfg, cache=tmp_path / "clf.pt")
    assert torch.equal(metrics.classifier_outputs(again, test.images)[0], feats)


def test_feature_classifier_is_cached_per_config(tmp_path, monkeypatch):
    monkeypatch.setenv("GENART_DATA", str(tmp_path))
    cfg = metrics.ClassifierConfig(width=2, feature_dim=4, steps=3, batch_size=16)
    first = metrics.feature_classifier("mnist5k", cfg)
    files = list((tmp_path / "classifiers").iterdir())
    assert len(files) == 1 and files[0].name.startswith("mnist5k-")
    second = metrics.feature_classifier("mnist5k", cfg)
    assert all(torch.equal(a, b) for a, b in zip(first.state_dict().values(), second.state_dict().values()))


def test_mean_images_and_blurred_noise_baselines():
    g = torch.Generator().manual_seed(0)
    reference = (0.5 + 0.1 * torch.randn(300, 1, 12, 12, generator=g)).clamp(0, 1)
    mean = metrics.mean_images(reference, 4)
    assert mean.shape == (4, 1, 12, 12) and torch.equal(mean[0], mean[3])
    torch.testing.assert_close(mean[0], reference.mean(0))

    noise = metrics.blurred_noise(reference, 4000, blur_sigma=1.5, generator=torch.Generator().manual_seed(1))
    assert noise.shape == (4000, 1, 12, 12) and noise.min() >= 0 and noise.max() <= 1
    # Far from the clipping bounds: each pixel has the reference's mean and std ...
    assert (noise.mean(0) - reference.mean(0)).abs().max() < 0.02
    assert ((noise.std(0) / reference.std(0)) - 1).abs().max() < 0.1
    # ... and neighbouring pixels are strongly correlated, unlike white noise.
    a, b = noise[:, 0, 6, 5], noise[:, 0, 6, 6]
    assert torch.corrcoef(torch.stack([a, b]))[0, 1] > 0.6
    again = metrics.blurred_noise(reference, 4000, blur_sigma=1.5, generator=torch.Generator().manual_seed(1))
    assert torch.equal(noise, again)
    with pytest.raises(ValueError, match="blur_sigma"):
        metrics.blurred_noise(reference, 3, blur_sigma=0.0)


def test_frechet_distances_match_an_independent_numpy_computation():
    # The features come straight from the network, the statistics from numpy, and the cross
    # term from the eigenvalues of the non-symmetric product Sigma1 Sigma2 (Tr (S1 S2)^1/2 is
    # the sum of their square roots): an independent route to the same formula.
    import numpy as np

    from genart_utils import data

    with runtime.seeded(0):
        model = metrics.DigitClassifier(metrics.ClassifierConfig(width=4, feature_dim=8)).eval()
    test = data.load_mnist5k("test").images
    train = data.load_mnist5k("train").images[:300]
    sets = {"train": train, "mean": metrics.mean_images(train, 300), "test": test}
    out = metrics.frechet_distances(model, test, sets)
    assert list(out) == ["train", "mean", "test"]

    def reference(a, b):
        with torch.no_grad():
            fa, fb = model.features(a).double().numpy(), model.features(b).double().numpy()
        m1, m2 = fa.mean(0), fb.mean(0)
        c1, c2 = np.cov(fa, rowvar=False), np.cov(fb, rowvar=False)
        cross = np.sqrt(np.clip(np.linalg.eigvals(c1 @ c2).real, 0, None)).sum()
        return float(((m1 - m2) ** 2).sum() + np.trace(c1) + np.trace(c2) - 2 * cross)

    assert math.isclose(out["train"], reference(test, train), rel_tol=1e-5)
    # n copies of one image have covariance 0, where d^2 = |mu1 - mu2|^2 + Tr(Sigma1).
    with torch.no_grad():
        ft, fm = model.features(test).double(), model.features(sets["mean"][:1]).double()[0]
    closed = float(((ft.mean(0) - fm) ** 2).sum() + torch.cov(ft.T).trace())
    assert math.isclose(out["mean"], closed, rel_tol=1e-6)
    assert abs(out["test"]) < 1e-6
    assert 0 < out["train"] < out["mean"]


# ------------------------------------------------------------ bad covariances (review E)

def test_frechet_distance_rejects_a_covariance_that_is_not_psd():
    mu = torch.zeros(2, dtype=torch.float64)
    good = torch.eye(2, dtype=torch.float64)
    bad = torch.diag(torch.tensor([1.0, -0.5], dtype=torch.float64))   # a negative variance
    with pytest.raises(ValueError, match="cov2 is not positive semi-definite"):
        metrics.frechet_distance(mu, good, mu, bad)
    with pytest.raises(ValueError, match="cov1 is not positive semi-definite"):
        metrics.frechet_distance(mu, bad, mu, good)


def test_frechet_distance_rejects_asymmetric_or_mismatched_inputs():
    mu = torch.zeros(2)
    with pytest.raises(ValueError, match="cov1 is not symmetric"):
        metrics.frechet_distance(mu, torch.tensor([[1.0, 0.5], [0.0, 1.0]]), mu, torch.eye(2))
    with pytest.raises(ValueError, match=r"cov2 must be a covariance of shape \(D, D\) = \(2, 2\)"):
        metrics.frechet_distance(mu, torch.eye(2), mu, torch.eye(3))
    with pytest.raises(ValueError, match="different dimensions"):
        metrics.frechet_distance(mu, torch.eye(2), torch.zeros(3), torch.eye(3))
    with pytest.raises(ValueError, match="mu1 must be a mean vector"):
        metrics.frechet_distance(torch.zeros(1, 2), torch.eye(2), mu, torch.eye(2))
    with pytest.raises(ValueError, match="NaN"):
        metrics.frechet_distance(mu, torch.full((2, 2), float("nan")), mu, torch.eye(2))


def test_frechet_distance_accepts_rank_deficient_covariances():
    # 5 samples in 20 dimensions give a covariance of rank 4 with eigenvalues ~ -1e-7 in
    # float32 rounding: still a valid covariance. A shift by 1 in every coordinate with the
    # same covariance is at exactly |1|^2 * 20 = 20.
    feats = torch.randn(5, 20, generator=torch.Generator().manual_seed(0))
    assert abs(metrics.frechet_distance_of(feats, feats)) < 1e-6
    assert math.isclose(metrics.frechet_distance_of(feats, feats + 1.0), 20.0, rel_tol=1e-6)
    mu, cov = feats.mean(0), torch.cov(feats.T)          # float32, as a user might pass them
    assert math.isclose(metrics.frechet_distance(mu, cov, mu + 1.0, cov), 20.0, rel_tol=1e-4)


# ------------------------------------------------------- classifier: config and seeding

@pytest.mark.parametrize("field, value", [("width", 0), ("feature_dim", -3), ("steps", 0),
                                          ("batch_size", 1.5), ("lr", 0.0), ("seed", -1),
                                          ("n_classes", True)])
def test_classifier_config_validates_its_fields(field, value):
    with pytest.raises(ValueError, match=f"ClassifierConfig.{field} must be"):
        metrics.ClassifierConfig(**{field: value})


def test_train_classifier_leaves_the_global_rng_untouched(tmp_path):
    from genart_utils import data

    ds = data.load_mnist5k("train")
    cfg = metrics.ClassifierConfig(width=2, feature_dim=4, steps=2, batch_size=16, seed=3)
    torch.manual_seed(123)
    before = torch.get_rng_state()
    first = metrics.train_classifier(ds.images, ds.labels, cfg, cache=tmp_path / "clf.pt")   # trains
    assert torch.equal(torch.get_rng_state(), before)
    cached = metrics.train_classifier(ds.images, ds.labels, cfg, cache=tmp_path / "clf.pt")  # loads
    assert torch.equal(torch.get_rng_state(), before)
    torch.manual_seed(999)                          # another global state: the same model
    second = metrics.train_classifier(ds.images, ds.labels, cfg)
    for model in (cached, second):
        assert all(torch.equal(a, b) for a, b in zip(first.state_dict().values(), model.state_dict().values()))


def test_digit_classifier_rejects_images_of_the_wrong_size():
    model = metrics.DigitClassifier(metrics.ClassifierConfig(width=2, feature_dim=4))
    with pytest.raises(ValueError, match=r"images of shape \(B, 1, 28, 28\)"):
        metrics.classifier_outputs(model, torch.rand(3, 1, 32, 32))


# ------------------------------------------------------------ the Fréchet protocol

TINY = metrics.ClassifierConfig(width=2, feature_dim=6, steps=3, batch_size=32)


def test_frechet_protocol_rows_sizes_and_determinism(tmp_path, monkeypatch):
    from genart_utils import data

    monkeypatch.setenv("GENART_DATA", str(tmp_path))
    n = metrics.frechet_sample_size("mnist5k")
    test, train = data.load_mnist5k("test").images, data.load_mnist5k("train").images
    assert n == len(test) == 500
    floor = metrics.frechet_floor("mnist5k")
    assert floor.shape == (n, 1, 28, 28) and torch.equal(floor, metrics.frechet_floor("mnist5k"))
    # Every floor image is a training image (distance 0 to it), and they are n distinct ones.
    d, idx = metrics.nearest_neighbours(floor, train)
    assert d.max() < 1e-6 and len(set(idx.tolist())) == n

    candidates = {"the test split itself": test, "the floor again": floor}
    out = metrics.frechet_protocol("mnist5k", candidates, config=TINY)
    assert list(out) == [metrics.FLOOR, *candidates, metrics.MEAN_IMAGE, metrics.BLURRED_NOISE]
    assert abs(out["the test split itself"]) < 1e-6
    assert out["the floor again"] == out[metrics.FLOOR] > 0
    assert out == metrics.frechet_protocol("mnist5k", candidates, config=TINY)   # same every call
    only_rows = metrics.frechet_protocol("mnist5k", {}, config=TINY)
    assert only_rows == {k: out[k] for k in metrics.PROTOCOL_ROWS}
    line = metrics.describe_frechet_protocol("mnist5k", TINY)
    assert "n = 500" in line and "non-default" in line and "\n" not in line
    assert "the default" in metrics.describe_frechet_protocol("mnist5k", metrics.ClassifierConfig())


def test_frechet_protocol_refuses_candidates_it_cannot_compare(tmp_path, monkeypatch):
    monkeypatch.setenv("GENART_DATA", str(tmp_path))
    ok = torch.rand(500, 1, 28, 28)
    with pytest.raises(ValueError, match=r"candidates\['few'\] has 499 images.*draw 500 samples"):
        metrics.frechet_protocol("mnist5k", {"few": ok[:499]}, config=TINY)
    with pytest.raises(ValueError, match="gan.from_tanh_range"):
        metrics.frechet_protocol("mnist5k", {"tanh": 2 * ok - 1}, config=TINY)
    with pytest.raises(ValueError, match=r"shape \(n, 1, 28, 28\)"):
        metrics.frechet_protocol("mnist5k", {"flat": ok.flatten(1)}, config=TINY)
    with pytest.raises(ValueError, match="reserved"):
        metrics.frechet_protocol("mnist5k", {metrics.FLOOR: ok}, config=TINY)


# ------------------------------------------------------------ memorisation: images

def test_nearest_neighbours_match_brute_force():
    g = torch.Generator().manual_seed(0)
    queries, reference = torch.rand(23, 1, 5, 5, generator=g), torch.rand(41, 1, 5, 5, generator=g)
    d, idx = metrics.nearest_neighbours(queries, reference, batch_size=7)   # 7 does not divide 23
    brute = torch.cdist(queries.flatten(1).double(), reference.flatten(1).double(),
                        compute_mode="donot_use_mm_for_euclid_dist")
    torch.testing.assert_close(d, brute.min(1).values, rtol=1e-10, atol=1e-10)
    assert torch.equal(idx, brute.argmin(1))
    with pytest.raises(ValueError, match="same item shape"):
        metrics.nearest_neighbours(queries, reference.flatten(1))
    with pytest.raises(ValueError, match="batch_size"):
        metrics.nearest_neighbours(queries, reference, batch_size=0)


def test_memorisation_check_finds_copies_in_the_minimum():
    g = torch.Generator().manual_seed(1)
    train, held_out = torch.rand(200, 1, 6, 6, generator=g), torch.rand(80, 1, 6, 6, generator=g)
    fresh = torch.rand(47, 1, 6, 6, generator=g)
    samples = torch.cat([fresh, train[[5, 17, 90]]])            # 50 samples, 3 of them copies
    out = metrics.memorisation_check(samples, train, held_out)
    assert out["n"] == 50 and len(out["held_out"]["which"]) == 50    # 50 of the 80 held out
    s = out["samples"]
    assert s["min"] == 0.0 and s["distances"][:3].max() == 0.0
    assert sorted(s["which"][:3].tolist()) == [47, 48, 49] and sorted(s["neighbour"][:3].tolist()) == [5, 17, 90]
    assert out["samples_below_held_out_min"] >= 3 and out["held_out"]["min"] > 0
    # The summaries are the statistics of brute-force distances of the chosen images.
    h = out["held_out"]
    brute = torch.cdist(held_out[h["which"]].flatten(1).double(), train.flatten(1).double(),
                        compute_mode="donot_use_mm_for_euclid_dist").min(1).values
    torch.testing.assert_close(h["distances"], brute)
    assert math.isclose(h["p01"], float(torch.quantile(brute, 0.01)), rel_tol=1e-9)
    assert math.isclose(h["median"], float(brute.median()), rel_tol=1e-9)
    assert "held_out" in metrics.memorisation_report(out)


# -------------------------------------------------------------- memorisation: text

def _brute_longest(text, corpus):
    best = 0
    for i in range(len(text)):
        for j in range(i + best + 1, len(text) + 1):
            if any(text[i:j] in c for c in corpus):
                best = j - i
    return best


def test_longest_shared_substring_matches_brute_force():
    rng = random.Random(0)
    for trial in range(300):
        alphabet = "ab" if trial % 2 else "abc"
        corpus = ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 12)))
                  for _ in range(rng.randint(1, 5))]
        text = "".join(rng.choice(alphabet + "d") for _ in range(rng.randint(0, 15)))
        length, index = metrics.longest_shared_substring(text, corpus)
        assert length == _brute_longest(text, corpus), (text, corpus)
        if length:
            assert any(text[i:i + length] in corpus[index] for i in range(len(text) - length + 1))
        else:
            assert index == -1


def test_longest_shared_substring_never_spans_two_texts():
    # Joined without a separator the corpus would contain "abcdef"; no single text does.
    assert metrics.longest_shared_substring("xxabcdefyy", ["zzabc", "defzz"]) == (3, 0)
    assert metrics.longest_shared_substring("cd", ["abc", "def"])[0] == 1
    assert metrics.longest_shared_substring("xyz", ["abc"]) == (0, -1)
    with pytest.raises(ValueError, match="NUL"):
        metrics.longest_shared_substring("a\0b", ["ab"])


def test_tune_memorisation_compares_generated_with_held_out_tunes():
    rng = random.Random(2)
    train = ["".join(rng.choice("abcdefg") for _ in range(60)) for _ in range(30)]
    held_out = ["".join(rng.choice("abcdefg") for _ in range(40)) for _ in range(12)]
    generated = [train[7][10:50]] + ["".join(rng.choice("abcdefg") for _ in range(40)) for _ in range(9)]
    out = metrics.tune_memorisation(generated, train, held_out)
    assert out["n"] == 10 and len(out["held_out"]["lengths"]) == 10
    g, h = out["generated"], out["held_out"]
    assert g["max"] == 40 and g["max_fraction"] == 1.0 and g["index"][g["which"].index(0)] == 7
    for group, tunes in ((g, generated), (h, held_out)):
        assert group["lengths"] == [_brute_longest(tunes[i], train) for i in group["which"]]
        assert group["fractions"] == [n / len(tunes[i]) for n, i in zip(group["lengths"], group["which"])]
    assert h["max"] < 40 and "held_out" in metrics.memorisation_report(out)
    with pytest.raises(ValueError, match=r"generated\[0\] must be a non-empty str"):
        metrics.tune_memorisation([""], train, held_out)


def test_every_chapter_gets_the_same_protocol_classifier_for_a_profile():
    assert metrics.protocol_classifier_config("cpu") == metrics.ClassifierConfig()
    assert metrics.protocol_classifier_config("gpu") == metrics.protocol_classifier_config("cpu")
    smoke = metrics.protocol_classifier_config("smoke")
    assert smoke.steps < metrics.ClassifierConfig().steps and smoke.feature_dim < 128


def test_mean_interval_is_the_mean_plus_minus_z_standard_errors():
    v = [1.0, 2.0, 4.0, 7.0]
    mean, lo, hi = metrics.mean_interval(v, z=2.0)
    s = math.sqrt(sum((x - 3.5) ** 2 for x in v) / 3)
    assert mean == 3.5 and math.isclose(hi - mean, 2 * s / 2) and math.isclose(mean - lo, s)
    assert math.isnan(metrics.mean_interval([3.0])[1])
    assert abs(metrics.Z95 - torch.distributions.Normal(0, 1).icdf(torch.tensor(0.975, dtype=torch.float64))) < 1e-12


def test_wilson_interval_closed_forms_and_coverage():
    z = metrics.Z95
    p, lo, hi = metrics.proportion_interval([False] * 10)        # p = 0: [0, z^2 / (n + z^2)]
    assert p == 0 and lo == 0 and math.isclose(hi, z**2 / (10 + z**2))
    p, lo, hi = metrics.proportion_interval([True] * 10)
    assert p == 1 and math.isclose(hi, 1) and math.isclose(lo, 10 / (10 + z**2))
    # Its coverage of a true p = 0.3 with n = 40, by exact binomial enumeration, is near 95%.
    n, true_p = 40, 0.3
    coverage = sum(math.comb(n, k) * true_p**k * (1 - true_p) ** (n - k)
                   for k in range(n + 1)
                   if metrics.proportion_interval([1] * k + [0] * (n - k))[1] <= true_p
                   <= metrics.proportion_interval([1] * k + [0] * (n - k))[2])
    assert 0.93 < coverage < 0.97
    with pytest.raises(ValueError, match="0/1"):
        metrics.proportion_interval([0.5, 1.0])


def test_jackknife_of_the_mean_equals_the_standard_error():
    g = torch.Generator().manual_seed(0)
    v = torch.randn(30, generator=g, dtype=torch.float64).tolist()
    value, lo, hi = metrics.jackknife_interval(lambda xs: sum(xs) / len(xs), v)
    mean, mlo, mhi = metrics.mean_interval(v)
    assert math.isclose(value, mean) and math.isclose(lo, mlo) and math.isclose(hi, mhi)


# ------------------------------------------------- colour datasets (OpenMoji-like, (3, S, S))

FAKE_CLASSES = 3


def _fake_colour_split(split: str, size: int = 16) -> "data.ImageDataset":
    """White images, each with one square of pure red, green or blue (the label) at a random
    place: a colour dataset whose classes a tiny classifier can learn in a few steps."""
    from genart_utils import data

    n = {"train": 240, "test": 30}[split]
    g = torch.Generator().manual_seed({"train": 0, "test": 1}[split])
    labels = torch.arange(n) % FAKE_CLASSES
    images = torch.ones(n, 3, size, size)
    corner = torch.randint(0, size - size // 2, (n, 2), generator=g)
    for i in range(n):
        r, c = corner[i].tolist()
        square = images[i, :, r:r + size // 2, c:c + size // 2]
        square.zero_()
        square[labels[i]] = 1.0
    images = (images + 0.05 * torch.rand(images.shape, generator=g)).clamp(0, 1)
    return data.ImageDataset(images, labels, "fakemoji", split)


@pytest.fixture
def fakemoji(tmp_path, monkeypatch):
    """A fake colour dataset "fakemoji" registered like an embedded one, with a fresh cache."""
    from genart_utils import data

    monkeypatch.setenv("GENART_DATA", str(tmp_path))
    monkeypatch.setitem(data.EMBEDDED_DATASETS, "fakemoji", lambda split="train", **kw: _fake_colour_split(split))
    return "fakemoji"


COLOUR_TINY = metrics.ClassifierConfig(channels=3, image_size=16, n_classes=FAKE_CLASSES, width=4,
                                       feature_dim=8, steps=60, batch_size=32)


def test_the_digits_classifier_keeps_its_cache_name_and_config():
    # A classifier cached by 0.2.0 is named by the sha256 of the repr 0.2.0 printed: the new
    # image_size field, at its default, must leave that name unchanged (no retraining).
    old_repr = ("ClassifierConfig(channels=1, width=32, feature_dim=128, n_classes=10, lr=0.001, "
                "steps=1500, batch_size=128, seed=0)")
    import hashlib

    assert metrics._classifier_tag(metrics.ClassifierConfig()) == hashlib.sha256(old_repr.encode()).hexdigest()[:10]
    assert metrics._classifier_tag(metrics.ClassifierConfig(image_size=32)) != metrics._classifier_tag(metrics.ClassifierConfig())
    for profile in ("smoke", "cpu", "gpu"):
        assert metrics.protocol_classifier_config(profile, "mnist5k") == metrics.CLASSIFIER_SIZES[profile]
    assert metrics.DigitClassifier().body[-2].in_features == 2 * 32 * 7 * 7      # 28 -> 14 -> 7, as in 0.2.0


def test_protocol_config_takes_shape_and_classes_from_the_data(fakemoji):
    cfg = metrics.protocol_classifier_config("smoke", fakemoji)
    assert (cfg.channels, cfg.image_size, cfg.n_classes) == (3, 16, FAKE_CLASSES)
    assert cfg.width == metrics.CLASSIFIER_SIZES["smoke"].width       # no entry: the default sizes
    openmoji = metrics.DATASET_CLASSIFIER_SIZES["openmoji"]
    assert set(openmoji) == {"smoke", "cpu", "gpu"} and openmoji["smoke"].steps < openmoji["cpu"].steps


def test_classifier_takes_colour_images_of_its_size_only():
    cfg = metrics.ClassifierConfig(channels=3, image_size=32, n_classes=9, width=2, feature_dim=5)
    model = metrics.DigitClassifier(cfg)
    assert model.body[-2].in_features == 2 * 2 * 8 * 8              # 32 -> 16 -> 8
    feats, preds = metrics.classifier_outputs(model, torch.rand(7, 3, 32, 32))
    assert feats.shape == (7, 5) and preds.shape == (7,) and preds.max() < 9
    with pytest.raises(ValueError, match=r"images of shape \(B, 3, 32, 32\)"):
        metrics.classifier_outputs(model, torch.rand(7, 1, 32, 32))
    with pytest.raises(ValueError, match=r"images of shape \(B, 3, 32, 32\)"):
        metrics.classifier_outputs(model, torch.rand(7, 3, 28, 28))
    with pytest.raises(ValueError, match="image_size must be at least 4"):
        metrics.ClassifierConfig(image_size=3)


def test_train_classifier_rejects_data_that_does_not_fit_its_config():
    images, labels = torch.rand(40, 3, 16, 16), torch.arange(40) % 3
    with pytest.raises(ValueError, match=r"images must have shape \(N, 1, 28, 28\)"):
        metrics.train_classifier(images, labels, metrics.ClassifierConfig(steps=1))
    with pytest.raises(ValueError, match=r"labels must lie in \[0, n_classes\) = \[0, 2\)"):
        metrics.train_classifier(images, labels, dataclasses.replace(COLOUR_TINY, n_classes=2))
    with pytest.raises(ValueError, match="labels must be int64"):
        metrics.train_classifier(images, labels.float(), COLOUR_TINY)


def test_a_cached_classifier_is_not_reused_for_other_data(tmp_path):
    a, b = _fake_colour_split("train"), _fake_colour_split("test")
    cfg = dataclasses.replace(COLOUR_TINY, steps=3, batch_size=16)
    first = metrics.train_classifier(a.images, a.labels, cfg, cache=tmp_path / "clf.pt")
    on_b = metrics.train_classifier(b.images, b.labels, cfg, cache=tmp_path / "clf.pt")    # retrains
    fresh_b = metrics.train_classifier(b.images, b.labels, cfg)
    same = lambda m1, m2: all(torch.equal(x, y) for x, y in zip(m1.state_dict().values(), m2.state_dict().values()))
    assert same(on_b, fresh_b) and not same(first, on_b)
    assert same(metrics.train_classifier(b.images, b.labels, cfg, cache=tmp_path / "clf.pt"), fresh_b)


def test_colour_classifier_learns_the_classes(fakemoji):
    test = _fake_colour_split("test")
    labels = metrics.predicted_labels(fakemoji, test.images, config=COLOUR_TINY)
    assert labels.shape == (30,) and labels.dtype == torch.int64
    acc, lo, hi = metrics.classifier_accuracy(fakemoji, test.images, test.labels, config=COLOUR_TINY)
    assert acc == float((labels == test.labels).float().mean()) and lo <= acc <= hi
    assert acc > 0.9                                           # chance is 1/3
    with pytest.raises(ValueError, match=r"labels must be a tensor of shape \(30,\)"):
        metrics.classifier_accuracy(fakemoji, test.images, test.labels[:5], config=COLOUR_TINY)
    with pytest.raises(ValueError, match="gan.from_tanh_range"):
        metrics.predicted_labels(fakemoji, 2 * test.images - 1, config=COLOUR_TINY)
    with pytest.raises(ValueError, match="does not fit fakemoji.*channels=1"):
        metrics.feature_classifier(fakemoji, dataclasses.replace(COLOUR_TINY, channels=1))


def test_frechet_protocol_on_colour_images(fakemoji):
    train, test = _fake_colour_split("train").images, _fake_colour_split("test").images
    n = metrics.frechet_sample_size(fakemoji)
    assert n == 30
    floor = metrics.frechet_floor(fakemoji)
    assert floor.shape == (n, 3, 16, 16) and torch.equal(floor, metrics.frechet_floor(fakemoji))
    d, idx = metrics.nearest_neighbours(floor, train)
    assert d.max() < 1e-6 and len(set(idx.tolist())) == n
    out = metrics.frechet_protocol(fakemoji, {"test": test, "floor again": floor}, config=COLOUR_TINY)
    assert list(out) == [metrics.FLOOR, "test", "floor again", metrics.MEAN_IMAGE, metrics.BLURRED_NOISE]
    assert abs(out["test"]) < 1e-6 and out["floor again"] == out[metrics.FLOOR] > 0
    assert out == metrics.frechet_protocol(fakemoji, {"test": test, "floor again": floor}, config=COLOUR_TINY)
    line = metrics.describe_frechet_protocol(fakemoji, COLOUR_TINY)
    assert "n = 30" in line and "fakemoji" in line and "non-default" in line
    assert "the smoke profile's" in metrics.describe_frechet_protocol(
        fakemoji, metrics.protocol_classifier_config("smoke", fakemoji))


def test_frechet_protocol_refuses_colour_candidates_it_cannot_compare(fakemoji):
    ok = _fake_colour_split("test").images
    with pytest.raises(ValueError, match=r"shape \(n, 3, 16, 16\), got \(30, 1, 16, 16\)"):
        metrics.frechet_protocol(fakemoji, {"grey": ok[:, :1]}, config=COLOUR_TINY)
    with pytest.raises(ValueError, match=r"got \(30, 3, 32, 32\).*F.interpolate\(images, size=16"):
        metrics.frechet_protocol(fakemoji, {"big": ok.repeat_interleave(2, -1).repeat_interleave(2, -2)},
                                 config=COLOUR_TINY)
    with pytest.raises(ValueError, match=r"candidates\['few'\] has 29 images.*draw 30 samples"):
        metrics.frechet_protocol(fakemoji, {"few": ok[:29]}, config=COLOUR_TINY)


def test_blurred_noise_keeps_each_colour_channel_apart():
    g = torch.Generator().manual_seed(0)
    means = torch.tensor([0.8, 0.2, 0.5])[:, None, None]
    reference = (means + 0.05 * torch.randn(400, 3, 8, 8, generator=g)).clamp(0, 1)
    noise = metrics.blurred_noise(reference, 3000, generator=torch.Generator().manual_seed(1))
    assert noise.shape == (3000, 3, 8, 8)
    assert (noise.mean((0, 2, 3)) - means.flatten()).abs().max() < 0.01
    mean = metrics.mean_images(reference, 5)
    assert mean.shape == (5, 3, 8, 8) and torch.equal(mean[4], reference.mean(0))


def test_memorisation_check_on_colour_images():
    g = torch.Generator().manual_seed(2)
    train, held_out = torch.rand(120, 3, 32, 32, generator=g), torch.rand(40, 3, 32, 32, generator=g)
    samples = torch.cat([torch.rand(18, 3, 32, 32, generator=g), train[[3, 77]]])
    out = metrics.memorisation_check(samples, train, held_out)
    assert out["n"] == 20 and out["samples"]["min"] == 0.0
    assert sorted(out["samples"]["neighbour"][:2].tolist()) == [3, 77]
    brute = torch.cdist(samples.flatten(1).double(), train.flatten(1).double(),
                        compute_mode="donot_use_mm_for_euclid_dist").min(1).values.sort().values
    torch.testing.assert_close(out["samples"]["distances"], brute)
    with pytest.raises(ValueError, match="same image shape"):
        metrics.memorisation_check(samples[:, :1], train, held_out)


def test_nats_to_bits_per_dim():
    assert metrics.nats_to_bits_per_dim(3072 * math.log(256), 3072) == pytest.approx(8.0)
    t = metrics.nats_to_bits_per_dim(torch.tensor([0.0, 784 * math.log(2)]), 784)
    assert torch.allclose(t, torch.tensor([0.0, 1.0]))
    with pytest.raises(ValueError, match="dims"):
        metrics.nats_to_bits_per_dim(1.0, 0)

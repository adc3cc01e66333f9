import math

import pytest
import torch

from genart_utils import metrics


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
    assert out == {"modes_covered": 2, "high_quality": 0.5, "n_modes": 3}


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


def test_frechet_distances_of_several_sets():
    from genart_utils import data

    torch.manual_seed(0)
    model = metrics.DigitClassifier(metrics.ClassifierConfig(width=4, feature_dim=8))
    test = data.load_mnist5k("test").images
    out = metrics.frechet_distances(model, test, {"same": test, "mean": metrics.mean_images(test, 50)})
    assert set(out) == {"same", "mean"}
    assert abs(out["same"]) < 1e-6 and out["mean"] > 1e-3

"""The shipped checkpoints and the one load-or-train helper (genart_utils.shipped)."""

from __future__ import annotations

import dataclasses
import json
import shutil

import pytest
import torch

from genart_utils import data, diffusion, shipped, training

TINY = diffusion.DiffusionRecipe(
    unet=diffusion.UNetConfig(image_size=32, patch=2, base=8, mults=(1, 2), attention_at=(8,), groups=4,
                              n_classes=9),
    schedule=diffusion.ScheduleConfig(T=20), steps=3, batch_size=8, warmup=1)


@pytest.fixture
def checkpoints(tmp_path, monkeypatch):
    """Trained models go to a temporary folder, never the reader's data home."""
    monkeypatch.setenv("GENART_CHECKPOINTS", str(tmp_path / "checkpoints"))
    return tmp_path / "checkpoints"


@pytest.fixture
def package_folder(tmp_path, monkeypatch):
    """A private copy of the package's checkpoints folder, so a test can tamper with it."""
    folder = tmp_path / "shipped"
    shutil.copytree(str(shipped._folder()), folder)
    monkeypatch.setattr(shipped, "_folder", lambda: folder)
    return folder


def test_every_shipped_checkpoint_matches_its_manifest_and_loads():
    models = shipped.shipped_models()
    assert "diffusion-openmoji32" in models
    for name, entry in models.items():
        path = shipped._folder() / entry.file
        assert data.sha256_of(path) == entry.sha256
        loaded = shipped.load_or_train(name, progress=False)
        assert loaded.source == "shipped" and not loaded.model.training
        assert loaded.history.step == entry.steps == loaded.recipe.steps
        assert name in loaded.describe()


def test_the_shipped_diffusion_model_is_the_chapter_recipe_and_samples():
    loaded = shipped.load_or_train("diffusion-openmoji32", progress=False)
    assert dataclasses.replace(loaded.recipe, steps=diffusion.DiffusionRecipe().steps) == diffusion.DiffusionRecipe()
    sched = diffusion.NoiseSchedule(loaded.recipe.schedule)
    x = diffusion.sample(loaded.model, sched, (2, 3, 32, 32), method="ddim", steps=2,
                         labels=torch.tensor([0, 8]), guidance=2.0, generator=torch.Generator().manual_seed(0))
    assert x.shape == (2, 3, 32, 32) and 0 <= float(x.min()) and float(x.max()) <= 1


def test_a_tampered_shipped_checkpoint_is_refused(package_folder):
    entry = shipped.shipped_models()["diffusion-openmoji32"]
    path = package_folder / entry.file
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0xFF                         # one flipped byte in the middle of the weights
    path.write_bytes(bytes(raw))
    with pytest.raises(data.ChecksumError, match="refused"):
        shipped.load_or_train("diffusion-openmoji32", progress=False)
    path.write_bytes(bytes(raw[: len(raw) // 3]))      # a truncated copy
    with pytest.raises(data.ChecksumError):
        shipped.load_or_train("diffusion-openmoji32", progress=False)


def test_a_missing_shipped_file_says_to_reinstall(package_folder):
    (package_folder / shipped.shipped_models()["diffusion-openmoji32"].file).unlink()
    with pytest.raises(FileNotFoundError, match="reinstall"):
        shipped.load_or_train("diffusion-openmoji32", progress=False)


def test_an_unshipped_name_needs_a_recipe(checkpoints):
    with pytest.raises(ValueError, match="pass the recipe"):
        shipped.load_or_train("no-such-model", progress=False)
    with pytest.raises(TypeError, match="DiffusionRecipe"):
        shipped.load_or_train("no-such-model", recipe={"steps": 3}, progress=False)


def test_train_then_reuse_then_extend_a_cached_run(checkpoints):
    first = shipped.load_or_train("tiny", recipe=TINY, progress=False)
    assert first.source == "trained" and first.history.step == 3
    again = shipped.load_or_train("tiny", recipe=TINY, progress=False)
    assert again.source == "cached"
    for a, b in zip(first.model.state_dict().values(), again.model.state_dict().values()):
        assert torch.equal(a, b)
    # a longer run of the same recipe resumes the cached one: equal to training 5 steps at once
    longer = shipped.load_or_train("tiny", recipe=dataclasses.replace(TINY, steps=5), progress=False)
    _, ema, history = diffusion.train_recipe(dataclasses.replace(TINY, steps=5), progress=False)
    assert longer.history.step == history.step == 5
    for a, b in zip(longer.model.state_dict().values(), ema.model.state_dict().values()):
        assert torch.equal(a, b)


def test_export_writes_the_ema_weights_and_a_manifest_entry(checkpoints, tmp_path):
    run = training.checkpoint_path("tiny-run.pt")
    _, ema, _ = diffusion.train_recipe(TINY, checkpoint=str(run), progress=False)
    folder = tmp_path / "ship"
    folder.mkdir()
    entry = shipped.export("tiny", run, family="diffusion", train_seconds=1.5, machine="a test",
                           command="pytest", folder=folder)
    manifest = json.loads((folder / shipped.MANIFEST).read_text())
    assert manifest["tiny"]["sha256"] == entry.sha256 == data.sha256_of(folder / entry.file)
    assert entry.steps == 3
    model = diffusion.build_model(TINY)[1].model
    stored = training.load_checkpoint(folder / entry.file, {"ema": model}, config_type=diffusion.DiffusionRecipe)
    assert stored.config == TINY
    for a, b in zip(model.state_dict().values(), ema.model.state_dict().values()):
        assert torch.equal(a, b)

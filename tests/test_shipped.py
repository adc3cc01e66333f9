"""The shipped checkpoints and the one load-or-train helper (genart_utils.shipped)."""

from __future__ import annotations

import dataclasses
import json
import shutil

import numpy as np
import pytest
import torch

from genart_utils import data, diffusion, gan, gpt, shipped, text, training

TINY = diffusion.DiffusionRecipe(
    unet=diffusion.UNetConfig(image_size=32, patch=2, base=8, mults=(1, 2), attention_at=(8,), groups=4,
                              n_classes=9),
    schedule=diffusion.ScheduleConfig(T=20), steps=3, batch_size=8, warmup=1)

# notebook 07's recipe at a size that trains in about a second: 40 tunes, one narrow layer
TINY_FOLK_SIZES = dict(max_tunes=40, n_layer=1, n_head=2, n_embd=16, block_size=32, batch_size=4, steps=6,
                       eval_every=2, monitor_every=1)


@pytest.fixture
def checkpoints(tmp_path, monkeypatch):
    """Trained models go to a temporary folder, never the reader's data home."""
    monkeypatch.setenv("GENART_CHECKPOINTS", str(tmp_path / "checkpoints"))
    return tmp_path / "checkpoints"


@pytest.fixture(scope="module")
def tiny_folk():
    """The tiny folk recipe (its vocabulary size is that of its 40 tunes)."""
    return gpt.folk_recipe(TINY_FOLK_SIZES, text.load_corpus("folk", max_documents=40).vocab.size)


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
        assert loaded.history.step == entry.steps == shipped.steps_of(loaded.recipe)
        assert name in loaded.describe()


def test_the_shipped_diffusion_model_is_the_chapter_recipe_and_samples():
    loaded = shipped.load_or_train("diffusion-openmoji32", progress=False)
    assert dataclasses.replace(loaded.recipe, steps=diffusion.DiffusionRecipe().steps) == diffusion.DiffusionRecipe()
    sched = diffusion.NoiseSchedule(loaded.recipe.schedule)
    x = diffusion.sample(loaded.model, sched, (2, 3, 32, 32), method="ddim", steps=2,
                         labels=torch.tensor([0, 8]), guidance=2.0, generator=torch.Generator().manual_seed(0))
    assert x.shape == (2, 3, 32, 32) and 0 <= float(x.min()) and float(x.max()) <= 1


@pytest.mark.parametrize("name", sorted(shipped.shipped_models()))
def test_a_tampered_shipped_checkpoint_is_refused(package_folder, name):
    entry = shipped.shipped_models()[name]
    path = package_folder / entry.file
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0xFF                         # one flipped byte in the middle of the weights
    path.write_bytes(bytes(raw))
    with pytest.raises(data.ChecksumError, match="refused"):
        shipped.load_or_train(name, progress=False)
    path.write_bytes(bytes(raw[: len(raw) // 3]))      # a truncated copy
    with pytest.raises(data.ChecksumError):
        shipped.load_or_train(name, progress=False)


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


# ------------------------------------------------------------------------ notebook 07's folk model

def test_the_folk_recipe_validates_and_round_trips_through_a_checkpoint(tmp_path):
    recipe = gpt.folk_recipe(gpt.FOLK_SIZES["cpu"], vocab_size=77)
    assert recipe.steps == recipe.train.steps == 6000 and recipe.train.warmup_steps == 300
    path = training.save_checkpoint(tmp_path / "r.pt", {}, config=recipe)
    back = training.load_checkpoint(path, config_type=gpt.FolkRecipe).config
    assert back == recipe and isinstance(back.model, gpt.GPTConfig) and isinstance(back.train, gpt.TrainConfig)
    shorter = dataclasses.replace(recipe, steps=100)               # as load_or_train and export do
    assert shorter.steps == shorter.train.steps == 100 and shorter.train.warmup_steps == 300
    assert dataclasses.replace(shorter, steps=6000) == recipe
    for bad in (dict(eval_every=0), dict(monitor_every=0), dict(max_tunes=1), dict(valid_fraction=0.0),
                dict(valid_fraction=1.0), dict(vocabulary="words"), dict(steps=0)):
        with pytest.raises(ValueError, match="FolkRecipe"):
            dataclasses.replace(recipe, **bad)
    with pytest.raises(TypeError, match="GPTConfig"):
        dataclasses.replace(recipe, model="small")


def test_a_folk_recipe_trains_with_the_notebook_code_then_is_cached_and_exports(checkpoints, tmp_path,
                                                                                 tiny_folk):
    first = shipped.load_or_train("tiny-folk", recipe=tiny_folk, family="folk", progress=False)
    assert first.source == "trained" and first.history.step == tiny_folk.steps == 6
    steps_v, bits_v = first.history.series("valid_bits")
    assert list(steps_v) == [2, 4, 6] and first.best_step == int(steps_v[np.argmin(bits_v)])
    assert f"step {first.best_step}" in first.describe()
    assert sorted(p.name for p in checkpoints.iterdir()) == ["tiny-folk.pt"]     # the run's own file is gone
    # the same weights as notebook 07's call of train_folk_model on the recipe's data
    corpus, monitor = gpt.folk_data(tiny_folk)
    direct = gpt.train_folk_model(corpus.vocab, corpus.text("train"), monitor, tiny_folk.model, tiny_folk.train,
                                  name="direct.pt", eval_every=tiny_folk.eval_every, device="cpu", progress=False)
    for a, b in zip(first.model.state_dict().values(), direct.model.state_dict().values()):
        assert torch.equal(a, b)
    assert float(gpt.bits_per_char(first.model, corpus.vocab, monitor)) == pytest.approx(bits_v.min(), abs=1e-6)

    again = shipped.load_or_train("tiny-folk", recipe=tiny_folk, family="folk", progress=False)
    assert again.source == "cached" and again.best_step == first.best_step
    for a, b in zip(first.model.state_dict().values(), again.model.state_dict().values()):
        assert torch.equal(a, b)
    other = shipped.load_or_train("tiny-folk", recipe=dataclasses.replace(tiny_folk, eval_every=3), family="folk",
                                  progress=False)
    assert other.source == "trained" and list(other.history.series("valid_bits")[0]) == [3, 6]

    folder = tmp_path / "ship"
    folder.mkdir()
    entry = shipped.export("tiny-folk", checkpoints / "tiny-folk.pt", family="folk", train_seconds=2.0,
                           machine="a test", command="pytest", folder=folder)
    stored = training.load_checkpoint(folder / entry.file, config_type=gpt.FolkRecipe)
    assert entry.steps == 6 and stored.config == dataclasses.replace(tiny_folk, eval_every=3)
    assert stored.extra == {"best_step": other.best_step}


def test_the_shipped_folk_model_is_notebook_07s_cpu_recipe_and_scores_what_it_recorded():
    corpus = text.load_corpus("folk", valid_fraction=0.05, seed=0)       # notebook 07's corpus
    recipe = gpt.folk_recipe(gpt.FOLK_SIZES["cpu"], corpus.vocab.size)
    loaded = shipped.load_or_train("gpt-folk-chars-cpu", recipe=recipe, progress=False)
    assert loaded.source == "shipped" and loaded.recipe == recipe and loaded.history.step == 6000
    steps_v, bits_v = loaded.history.series("valid_bits")
    assert loaded.best_step == int(steps_v[np.argmin(bits_v)])
    assert "gpt-folk-chars-cpu" in loaded.describe() and "the best by validation" in loaded.describe()
    monitor = "\n".join(corpus.valid[:: recipe.monitor_every])
    assert gpt.bits_per_char(loaded.model, corpus.vocab, monitor) == pytest.approx(bits_v.min(), abs=1e-4)
    # a shipped name with another recipe is refused, not silently answered with the shipped weights
    with pytest.raises(ValueError, match="train.steps 6000 != 40"):
        shipped.load_or_train("gpt-folk-chars-cpu", recipe=dataclasses.replace(recipe, steps=40), progress=False)


def test_the_text_to_image_parts_ship_with_the_chapter_recipes():
    from genart_utils import clip, latent

    assert shipped.load_or_train("autoencoder-openmoji32", progress=False).recipe == latent.AUTOENCODER_RECIPE
    assert shipped.load_or_train("clip-openmoji32", progress=False).recipe == clip.CLIP_RECIPE
    assert shipped.load_or_train("clip-evaluator-openmoji32", progress=False).recipe == clip.EVALUATOR_RECIPE
    # the evaluator is independent of the guide: other seeds and another architecture
    assert clip.EVALUATOR_RECIPE.clip.text != clip.CLIP_RECIPE.clip.text
    assert clip.EVALUATOR_RECIPE.optim.seed != clip.CLIP_RECIPE.optim.seed


def test_steps_of_and_with_steps_read_either_kind_of_recipe():
    from genart_utils import latent

    assert shipped.steps_of(diffusion.DiffusionRecipe(steps=7)) == 7
    assert shipped.with_steps(diffusion.DiffusionRecipe(), 9) == diffusion.DiffusionRecipe(steps=9)
    recipe = shipped.with_steps(latent.AUTOENCODER_RECIPE, 11)
    assert shipped.steps_of(recipe) == recipe.optim.steps == 11
    assert dataclasses.replace(recipe, optim=latent.AUTOENCODER_RECIPE.optim) == latent.AUTOENCODER_RECIPE


# ------------------------------------------------------------------------ the co-creation chapter's DCGAN

def test_the_shipped_dcgan_is_the_chapter_recipe_and_samples_colour_images():
    loaded = shipped.load_or_train("dcgan-openmoji32", progress=False)
    assert loaded.source == "shipped" and loaded.recipe == gan.GAN_RECIPE
    assert loaded.history.step == gan.GAN_RECIPE.steps and loaded.entry.family == "dcgan"
    G = loaded.model
    assert isinstance(G, gan.DCGANGenerator) and not G.training      # batch norm: running statistics
    x = gan.sample(G, 8, generator=torch.Generator().manual_seed(0))
    assert x.shape == (8, 3, 32, 32) and -1 <= float(x.min()) and float(x.max()) <= 1
    assert float(x.std(0).mean()) > 0.05                              # different codes, different images
    assert torch.equal(x, gan.sample(G, 8, generator=torch.Generator().manual_seed(0)))



def test_a_dcgan_recipe_trains_resumes_exports_loads_and_replays(checkpoints, package_folder):
    tiny = gan.GANRecipe(model=gan._openmoji_dcgan(4), steps=2, batch_size=8)
    first = shipped.load_or_train("tiny-dcgan", recipe=tiny, family="dcgan", progress=False)
    assert first.source == "trained" and isinstance(first.model, gan.DCGANGenerator) and not first.model.training
    # a longer run of the same recipe resumes the cached one: equal to training 3 steps at once
    longer = dataclasses.replace(tiny, steps=3)
    resumed = shipped.load_or_train("tiny-dcgan", recipe=longer, family="dcgan", progress=False)
    G, _, history = gan.train_recipe(longer, progress=False)
    assert resumed.history.records == history.records
    for a, b in zip(resumed.model.state_dict().values(), G.state_dict().values()):
        assert torch.equal(a, b)
    entry = shipped.export("tiny-dcgan", checkpoints / "tiny-dcgan.pt", family="dcgan", train_seconds=1.0,
                           machine="a test", command="pytest", folder=package_folder)
    assert entry.steps == 3 and entry.family == "dcgan"
    stored = training.load_checkpoint(package_folder / entry.file, config_type=gan.GANRecipe)
    assert stored.config == longer
    loaded = shipped.load_or_train("tiny-dcgan", progress=False)
    assert loaded.source == "shipped" and not loaded.model.training and loaded.recipe == longer
    for a, b in zip(loaded.model.state_dict().values(), G.state_dict().values()):
        assert torch.equal(a, b)
    series = shipped.replay("tiny-dcgan", 2)
    assert sorted(series) == ["d_fake", "d_real", "loss_d", "loss_g"]
    for key, (recorded, replayed) in series.items():
        np.testing.assert_array_equal(recorded, history.series(key)[1][:2])
        np.testing.assert_array_equal(replayed, recorded)


# ------------------------------------------------------------------------ the recipes reproduce their runs

# every shipped model whose first three steps train again in under 10 s on one thread
# (measured: autoencoder 8.7 s, latent diffusion 7.5 s, the others 1-3.5 s, on a busy 2-core machine)
REPLAYED = ["autoencoder-openmoji32", "clip-bow-openmoji32", "clip-evaluator-openmoji32", "clip-openmoji32",
            "dcgan-openmoji32", "diffusion-openmoji32", "gpt-folk-chars-cpu", "ldm-openmoji32"]


@pytest.mark.parametrize("name", REPLAYED)
def test_the_shipped_recipes_reproduce_the_start_of_their_runs(name):
    series = shipped.replay(name, 3)
    assert series, f"{name}: its history logged nothing at steps 1, 2, 3"
    for key, (recorded, replayed) in series.items():
        assert recorded.shape == replayed.shape == (3,)
        np.testing.assert_allclose(replayed, recorded, rtol=1e-4, atol=1e-5, err_msg=f"{name}: {key}")


def test_replay_refuses_unknown_names_and_step_counts():
    with pytest.raises(KeyError, match="not a shipped model"):
        shipped.replay("no-such-model")
    with pytest.raises(ValueError, match="positive int"):
        shipped.replay("diffusion-openmoji32", 0)

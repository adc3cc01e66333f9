"""Trained models that ship inside the package, and the one helper that loads them or trains
them again with the chapters' own code.

A reader who opens a chapter in Colab or on a laptop should see what a longer run of the
chapter's recipe draws without waiting hours for it, and a notebook that builds on an earlier
notebook's model (07b on notebook 07's character model) should not spend its own time budget
training that model again. So the weights of such runs ship as package data in
``genart_utils/checkpoints/``, listed in ``manifest.json`` with their sha256, the recipe
(inside the checkpoint), the number of steps, the training time and the machine.

:func:`load_or_train` is the only way the book loads a model that another notebook or a long
run trained:

* a shipped model is checked against its sha256 (a tampered or truncated file is refused)
  and loaded with ``weights_only=True``;
* ``retrain=True``, or a name that is not shipped, trains the recipe with the family's own
  training function (the same code the chapter runs), resuming from and caching to
  :func:`training.checkpoint_path`, so every notebook also runs alone.

The families of recipes (:data:`FAMILIES`) are the diffusion model of chapter 09, the folk
tune GPT of chapter 07, the autoencoder, CLIP and latent diffusion of chapters 12 and 13, and
the DCGAN on OpenMoji (chapter 11's network, trained longer for the co-creation chapter:
``dcgan-openmoji32``, :data:`gan.GAN_RECIPE`).

:func:`replay` checks that a shipped recipe is the one that trained its checkpoint: it trains
the first few steps again and returns them beside the values the shipped history recorded.

``python -m genart_utils.shipped export NAME RUN.pt --family F --seconds S --machine M --command C``
turns a finished run of a recipe into a shipped checkpoint and its manifest entry.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import tempfile
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from . import training
from .data import ChecksumError, sha256_of

MANIFEST = "manifest.json"


@dataclass(frozen=True)
class Family:
    """How to build and train the models of one recipe type.

    ``train`` writes, at ``checkpoint``, a checkpoint whose config is the recipe, whose
    history has ``recipe.steps`` steps when the run is finished, and whose ``weights`` state
    is the model to sample from; ``extra["best_step"]`` names the step of these weights when
    the run keeps its best weights by validation (else they are those of the last step)."""

    recipe_type: type
    build: Callable[..., nn.Module]          # build(recipe, device) -> the model to sample from
    train: Callable[..., nn.Module]          # train(recipe, device, checkpoint, progress) -> that model
    weights: str = "ema"                     # the checkpoint's state that holds that model


def _diffusion_family() -> Family:
    from . import diffusion

    def build(recipe, device):
        return diffusion.build_model(recipe, device)[1].model

    def train(recipe, device, checkpoint, progress):
        return diffusion.train_recipe(recipe, device=device, checkpoint=checkpoint, progress=progress)[1].model

    return Family(diffusion.DiffusionRecipe, build, train)


def _folk_family() -> Family:
    from . import gpt

    def build(recipe, device):
        return gpt.GPT(recipe.model).to(device)

    def train(recipe, device, checkpoint, progress):
        return gpt.train_recipe(recipe, checkpoint, device=device, progress=progress).model

    return Family(gpt.FolkRecipe, build, train, weights="model")


def _autoencoder_family() -> Family:
    from . import latent

    def train(recipe, device, checkpoint, progress):
        return latent.train_autoencoder(recipe, device=device, checkpoint=checkpoint, progress=progress)[1].model

    return Family(latent.AutoencoderRecipe, latent.build_autoencoder, train)


def _clip_family() -> Family:
    from . import clip

    def train(recipe, device, checkpoint, progress):
        return clip.train_clip(recipe, device=device, checkpoint=checkpoint, progress=progress)[1].model

    return Family(clip.CLIPRecipe, clip.build_clip, train)


def _latent_diffusion_family() -> Family:
    from . import text2img

    def train(recipe, device, checkpoint, progress):
        return text2img.train_latent_diffusion(recipe, device=device, checkpoint=checkpoint,
                                               progress=progress)[1].model

    return Family(text2img.LatentDiffusionRecipe, text2img.build_latent_diffusion, train)


def _dcgan_family() -> Family:
    from . import gan

    def train(recipe, device, checkpoint, progress):
        return gan.train_recipe(recipe, device=device, checkpoint=checkpoint, progress=progress)[0]

    return Family(gan.GANRecipe, gan.build_gan, train, weights="generator")


FAMILIES: dict[str, Callable[[], Family]] = {
    "diffusion": _diffusion_family, "folk": _folk_family, "autoencoder": _autoencoder_family,
    "clip": _clip_family, "latent-diffusion": _latent_diffusion_family, "dcgan": _dcgan_family}
"""Recipe families by name: ``"diffusion"`` (:class:`diffusion.DiffusionRecipe`), ``"folk"``
(:class:`gpt.FolkRecipe`), ``"autoencoder"`` (:class:`latent.AutoencoderRecipe`), ``"clip"``
(:class:`clip.CLIPRecipe`), ``"latent-diffusion"`` (:class:`text2img.LatentDiffusionRecipe`)
and ``"dcgan"`` (:class:`gan.GANRecipe`, whose shipped state is the generator). A later
chapter adds its own (its build and train functions, and the checkpoint state that holds the
weights when it is not ``"ema"``)."""


@dataclass(frozen=True)
class ShippedEntry:
    """One shipped checkpoint, as ``manifest.json`` describes it."""

    name: str
    family: str
    file: str
    sha256: str
    steps: int
    train_seconds: float
    machine: str
    command: str


@dataclass
class Loaded:
    """What :func:`load_or_train` returns: the model (in eval mode), its recipe and history,
    and where it came from (``"shipped"``, ``"cached"`` or ``"trained"``). ``best_step`` is
    the step whose weights these are when the run kept its best weights by validation
    (``None``: the weights after the last step); ``train_seconds`` the run's training time
    when it is known (the manifest's for a shipped model, else the checkpoint's
    ``extra["seconds"]``)."""

    model: nn.Module
    recipe: Any
    history: training.History
    source: str
    entry: ShippedEntry | None = None
    best_step: int | None = None
    train_seconds: float | None = None

    def describe(self) -> str:
        """One sentence for a notebook to print: what was loaded and how it was trained."""
        steps = self.history.step
        kept = "" if self.best_step is None else \
            f" (the weights of step {self.best_step:,}, the best by validation)"
        if self.entry is not None and self.source == "shipped":
            e = self.entry
            return (f"Loaded the shipped model {e.name!r}: {steps:,} steps of its recipe{kept}, trained in "
                    f"{_duration(e.train_seconds)} on {e.machine}.")
        took = "" if self.train_seconds is None else f", trained in {_duration(self.train_seconds)}"
        return f"{self.source.capitalize()} model: {steps:,} steps of the recipe{kept}{took}."


def _duration(seconds: float) -> str:
    if seconds >= 3600:
        return f"{seconds / 3600:.1f} hours"
    return f"{seconds / 60:.0f} minutes" if seconds >= 60 else f"{seconds:.0f} s"


def _folder():
    return resources.files("genart_utils") / "checkpoints"


def shipped_models() -> dict[str, ShippedEntry]:
    """The checkpoints that ship with this installation, by name."""
    manifest = _folder() / MANIFEST
    if not manifest.is_file():
        return {}
    return {name: ShippedEntry(name=name, **entry)
            for name, entry in json.loads(manifest.read_text()).items()}


def _family(name: str) -> Family:
    if name not in FAMILIES:
        raise KeyError(f"no recipe family {name!r}; known: {sorted(FAMILIES)}")
    return FAMILIES[name]()


def _load(path: Path, family: Family, device, source: str, entry: ShippedEntry | None) -> Loaded:
    stored = training.load_checkpoint(path, config_type=family.recipe_type)
    model = family.build(stored.config, "cpu")
    training.load_checkpoint(path, {family.weights: model})
    seconds = entry.train_seconds if source == "shipped" else stored.extra.get("seconds")
    return Loaded(model.to(device).eval(), stored.config, stored.history, source, entry,
                  stored.extra.get("best_step"), seconds)


def load_or_train(name: str, *, recipe: Any = None, family: str = "diffusion", retrain: bool = False,
                  device: torch.device | str = "cpu", progress: bool = True) -> Loaded:
    """Load the model ``name``: shipped, cached from an earlier run, or trained now.

    Args:
        name: a shipped model (:func:`shipped_models`) or any name for a model of ``recipe``.
        recipe: the recipe to train when there is no shipped model or ``retrain`` is set;
            by default the shipped checkpoint's own recipe (so ``retrain=True`` reproduces it).
            Given with a shipped name and without ``retrain``, it must be the shipped
            model's recipe: the shipped weights are not a model of any other.
        family: the recipe family (:data:`FAMILIES`) for names that are not shipped.
        retrain: train again with the chapter's code even when a shipped model exists.

    A trained model is cached at ``training.checkpoint_path(name + ".pt")``. A finished
    cached run of the same recipe is reused; an unfinished one is resumed where the family's
    training can resume (diffusion and the DCGAN, whose caches hold the optimiser states
    too; a folk run starts again).

    Raises:
        ChecksumError: when the shipped file does not match the sha256 of the manifest
            (it was changed or truncated): reinstall the package.
        ValueError: when ``recipe`` is not the recipe of the shipped model ``name`` (and
            ``retrain`` is not set).
    """
    entry = shipped_models().get(name)
    if entry is not None:
        fam = _family(entry.family)
        path = Path(str(_folder() / entry.file))
        if not path.is_file():
            raise FileNotFoundError(f"the shipped checkpoint {entry.file} is missing from {path.parent}; "
                                    "reinstall genart-utils")
        actual = sha256_of(path)
        if actual != entry.sha256:
            raise ChecksumError(f"{path} has sha256 {actual}, but the manifest says {entry.sha256}: the "
                                "file was changed or truncated; it is refused. Reinstall genart-utils.")
        if not retrain:
            loaded = _load(path, fam, device, "shipped", entry)
            if recipe is not None and recipe != loaded.recipe:
                raise ValueError(f"the shipped model {name!r} was trained with another recipe (differing: "
                                 f"{_differences(loaded.recipe, recipe)}); pass retrain=True to train this "
                                 "recipe under that name, or leave out recipe to load the shipped model")
            return loaded
        if recipe is None:
            recipe = training.load_checkpoint(path, config_type=fam.recipe_type).config
    else:
        fam = _family(family)
        if recipe is None:
            raise ValueError(f"{name!r} is not a shipped model (shipped: {sorted(shipped_models())}); "
                             "pass the recipe to train it")
    if not isinstance(recipe, fam.recipe_type):
        raise TypeError(f"recipe must be a {fam.recipe_type.__name__}, got {type(recipe).__name__}")
    cache = training.checkpoint_path(f"{name}.pt")
    if cache.is_file():
        stored = training.load_checkpoint(cache, config_type=fam.recipe_type)
        if stored.config == recipe and stored.history.step == steps_of(recipe):     # a finished run
            return _load(cache, fam, device, "cached", entry)
        if with_steps(stored.config, steps_of(recipe)) != recipe or stored.history.step > steps_of(recipe):
            cache.unlink()                          # another recipe: start afresh
    model = fam.train(recipe, device, str(cache), progress)
    return dataclasses.replace(_load(cache, fam, "cpu", "trained", entry), model=model.eval())


def steps_of(recipe: Any) -> int:
    """The number of steps a recipe trains: ``recipe.steps``, or ``recipe.optim.steps`` for a
    recipe optimised as a :class:`training.Optimisation` says."""
    return recipe.optim.steps if isinstance(getattr(recipe, "optim", None), training.Optimisation) else recipe.steps


def with_steps(recipe: Any, steps: int) -> Any:
    """The same recipe with ``steps`` steps (see :func:`steps_of`)."""
    if isinstance(getattr(recipe, "optim", None), training.Optimisation):
        return dataclasses.replace(recipe, optim=dataclasses.replace(recipe.optim, steps=steps))
    return dataclasses.replace(recipe, steps=steps)


def _differences(a: Any, b: Any, prefix: str = "") -> str:
    """The fields in which two recipes (nested dataclasses) differ, e.g. ``train.steps 6000 != 40``."""
    out = []
    for f in dataclasses.fields(a):
        x, y = getattr(a, f.name), getattr(b, f.name, None)
        if x != y:
            if dataclasses.is_dataclass(x) and type(x) is type(y):
                out.append(_differences(x, y, f"{prefix}{f.name}."))
            else:
                out.append(f"{prefix}{f.name} {x!r} != {y!r}")
    return ", ".join(out) or f"{type(a).__name__} != {type(b).__name__}"


def replay(name: str, steps: int = 3, *, device: torch.device | str = "cpu"
           ) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Train the first ``steps`` steps of the shipped model ``name``'s recipe again and put
    them beside what its run recorded: the check that the published recipe (and the
    family's training code as it is now) reproduces the checkpoint.

    The recipe stored in the shipped checkpoint, cut to ``steps`` steps
    (:func:`with_steps`), is trained with the family's own train function into a temporary
    folder (a family whose training loads other shipped models, such as latent diffusion,
    loads them as usual). Returns, for every series that the shipped history logged at each
    of the steps ``1 .. steps``, the pair ``(recorded, replayed)`` of float64 arrays of
    those ``steps`` values. A series logged only later (a validation every 500 steps) is
    left out.

    Raises:
        KeyError: when ``name`` is not shipped.
        ValueError: when ``steps`` is not a positive int.
    """
    from . import runtime

    if not runtime.is_int(steps) or steps < 1:
        raise ValueError(f"steps must be a positive int (the steps to train again), got {steps!r}")
    entry = shipped_models().get(name)
    if entry is None:
        raise KeyError(f"{name!r} is not a shipped model; shipped: {sorted(shipped_models())}")
    fam = _family(entry.family)
    stored = training.load_checkpoint(Path(str(_folder() / entry.file)), config_type=fam.recipe_type)
    first = list(range(1, steps + 1))
    recorded = {}
    for key in stored.history.keys():
        at, values = stored.history.series(key)
        if list(at[:steps]) == first:
            recorded[key] = values[:steps].astype(np.float64)
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / f"{name}-replay.pt"
        fam.train(with_steps(stored.config, steps), device, str(path), False)
        history = training.load_checkpoint(path, config_type=fam.recipe_type).history
    out = {}
    for key, values in recorded.items():
        at, again = history.series(key)
        if list(at[:steps]) != first:
            raise ValueError(f"the replay of {name!r} did not log {key!r} at steps 1..{steps} as its "
                             "shipped run did: the family's training code changed what it records")
        out[key] = (values, again[:steps].astype(np.float64))
    return out


# ------------------------------------------------------------------------ exporting

def export(name: str, run: str | os.PathLike, *, family: str, train_seconds: float, machine: str,
           command: str, folder: str | os.PathLike | None = None) -> ShippedEntry:
    """Write the weights to sample from of the finished run ``run`` (a checkpoint of the
    family's train function, e.g. :func:`diffusion.train_recipe` or :func:`gpt.train_recipe`)
    as the shipped checkpoint ``name`` and add it to the manifest. The stored recipe's
    ``steps`` is the number of steps the run really made; the step of the weights
    (``extra["best_step"]``), when the run has one, is kept."""
    fam = _family(family)
    stored = training.load_checkpoint(run, config_type=fam.recipe_type)
    recipe = with_steps(stored.config, stored.history.step)
    model = fam.build(recipe, "cpu")
    training.load_checkpoint(run, {fam.weights: model})
    folder = Path(folder) if folder is not None else Path(str(_folder()))
    extra = {"best_step": stored.extra["best_step"]} if "best_step" in stored.extra else None
    path = training.save_checkpoint(folder / f"{name}.pt", {fam.weights: model}, config=recipe,
                                    history=stored.history, extra=extra)
    entry = ShippedEntry(name=name, family=family, file=path.name, sha256=sha256_of(path),
                         steps=steps_of(recipe), train_seconds=round(float(train_seconds), 1),
                         machine=machine, command=command)
    manifest_path = folder / MANIFEST
    manifest = json.loads(manifest_path.read_text()) if manifest_path.is_file() else {}
    manifest[name] = {k: v for k, v in dataclasses.asdict(entry).items() if k != "name"}
    fd, tmp = tempfile.mkstemp(dir=folder, suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(manifest, f, indent=2, sort_keys=True)
        f.write("\n")
    os.replace(tmp, manifest_path)
    return entry


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m genart_utils.shipped", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    ex = sub.add_parser("export", help="ship the weights of a finished run")
    ex.add_argument("name")
    ex.add_argument("run", help="the run's checkpoint (diffusion.train_recipe(..., checkpoint=...), "
                                "gan.train_recipe(..., checkpoint=...) or gpt.train_recipe(recipe, checkpoint))")
    ex.add_argument("--family", default="diffusion", choices=sorted(FAMILIES))
    ex.add_argument("--seconds", type=float, required=True, help="the run's training time")
    ex.add_argument("--machine", required=True, help="the machine it ran on, in words")
    ex.add_argument("--command", required=True, help="the command that ran it")
    args = parser.parse_args(argv)
    entry = export(args.name, args.run, family=args.family, train_seconds=args.seconds,
                   machine=args.machine, command=args.command)
    print(json.dumps(dataclasses.asdict(entry), indent=2))


if __name__ == "__main__":
    main()

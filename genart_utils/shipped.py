"""Trained models that ship inside the package, and the one helper that loads them or trains
them again with the chapters' own code.

A reader who opens a chapter in Colab or on a laptop should see what a longer run of the
chapter's recipe draws without waiting hours for it. So the weights of such runs ship as
package data in ``genart_utils/checkpoints/``, listed in ``manifest.json`` with their sha256,
the recipe (inside the checkpoint), the number of steps, the training time and the machine.

:func:`load_or_train` is the only way the book loads a model that another notebook or a long
run trained:

* a shipped model is checked against its sha256 (a tampered or truncated file is refused)
  and loaded with ``weights_only=True``;
* ``retrain=True``, or a name that is not shipped, trains the recipe with the family's own
  training function (the same code the chapter runs), resuming from and caching to
  :func:`training.checkpoint_path`, so every notebook also runs alone.

``python -m genart_utils.shipped export NAME RUN.pt --seconds S --machine M`` turns a finished
run of a recipe into a shipped checkpoint and its manifest entry.
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

import torch
from torch import nn

from . import training
from .data import ChecksumError, sha256_of

MANIFEST = "manifest.json"


@dataclass(frozen=True)
class Family:
    """How to build and train the models of one recipe type."""

    recipe_type: type
    build: Callable[..., nn.Module]          # build(recipe, device) -> the model to sample from
    train: Callable[..., nn.Module]          # train(recipe, device, checkpoint, progress) -> that model


def _diffusion_family() -> Family:
    from . import diffusion

    def build(recipe, device):
        return diffusion.build_model(recipe, device)[1].model

    def train(recipe, device, checkpoint, progress):
        return diffusion.train_recipe(recipe, device=device, checkpoint=checkpoint, progress=progress)[1].model

    return Family(diffusion.DiffusionRecipe, build, train)


FAMILIES: dict[str, Callable[[], Family]] = {"diffusion": _diffusion_family}
"""Recipe families by name; a later chapter adds its own (its build and train functions)."""


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
    and where it came from (``"shipped"``, ``"cached"`` or ``"trained"``)."""

    model: nn.Module
    recipe: Any
    history: training.History
    source: str
    entry: ShippedEntry | None = None

    def describe(self) -> str:
        """One sentence for a notebook to print: what was loaded and how it was trained."""
        steps = self.history.step
        if self.entry is not None and self.source == "shipped":
            e = self.entry
            return (f"Loaded the shipped model {e.name!r}: {steps:,} steps of its recipe, trained in "
                    f"{e.train_seconds / 3600:.1f} hours on {e.machine}.")
        return f"{self.source.capitalize()} model: {steps:,} steps of the recipe."


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


def _load_model(path: Path, family: Family, device) -> tuple[nn.Module, Any, training.History]:
    stored = training.load_checkpoint(path, config_type=family.recipe_type)
    model = family.build(stored.config, "cpu")
    training.load_checkpoint(path, {"ema": model})
    return model.to(device).eval(), stored.config, stored.history


def load_or_train(name: str, *, recipe: Any = None, family: str = "diffusion", retrain: bool = False,
                  device: torch.device | str = "cpu", progress: bool = True) -> Loaded:
    """Load the model ``name``: shipped, cached from an earlier run, or trained now.

    Args:
        name: a shipped model (:func:`shipped_models`) or any name for a model of ``recipe``.
        recipe: the recipe to train when there is no shipped model or ``retrain`` is set;
            by default the shipped checkpoint's own recipe (so ``retrain=True`` reproduces it).
        family: the recipe family (:data:`FAMILIES`) for names that are not shipped.
        retrain: train again with the chapter's code even when a shipped model exists.

    A trained model is cached at ``training.checkpoint_path(name + ".pt")`` together with
    its optimiser state, and a cached run of the same recipe is resumed or reused.

    Raises:
        ChecksumError: when the shipped file does not match the sha256 of the manifest
            (it was changed or truncated): reinstall the package.
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
            model, stored_recipe, history = _load_model(path, fam, device)
            return Loaded(model, stored_recipe, history, "shipped", entry)
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
        if stored.config == recipe and stored.history.step == recipe.steps:
            model, _, history = _load_model(cache, fam, device)
            return Loaded(model, recipe, history, "cached", entry)
        if dataclasses.replace(stored.config, steps=recipe.steps) != recipe or stored.history.step > recipe.steps:
            cache.unlink()                          # another recipe: start afresh
    model = fam.train(recipe, device, str(cache), progress)
    _, _, history = _load_model(cache, fam, "cpu")
    return Loaded(model.eval(), recipe, history, "trained", entry)


# ------------------------------------------------------------------------ exporting

def export(name: str, run: str | os.PathLike, *, family: str, train_seconds: float, machine: str,
           command: str, folder: str | os.PathLike | None = None) -> ShippedEntry:
    """Write the averaged weights of the finished run ``run`` (a checkpoint of
    :func:`diffusion.train_recipe`) as the shipped checkpoint ``name`` and add it to the
    manifest. The stored recipe's ``steps`` is the number of steps the run really made."""
    fam = _family(family)
    stored = training.load_checkpoint(run, config_type=fam.recipe_type)
    recipe = dataclasses.replace(stored.config, steps=stored.history.step)
    model = fam.build(recipe, "cpu")
    training.load_checkpoint(run, {"ema": model})
    folder = Path(folder) if folder is not None else Path(str(_folder()))
    path = training.save_checkpoint(folder / f"{name}.pt", {"ema": model}, config=recipe,
                                    history=stored.history)
    entry = ShippedEntry(name=name, family=family, file=path.name, sha256=sha256_of(path),
                         steps=recipe.steps, train_seconds=round(float(train_seconds), 1),
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
    ex = sub.add_parser("export", help="ship the averaged weights of a finished run")
    ex.add_argument("name")
    ex.add_argument("run", help="the run's checkpoint (diffusion.train_recipe(..., checkpoint=...))")
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

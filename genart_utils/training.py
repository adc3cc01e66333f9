"""The one training loop of the book, its history, and checkpoints.

Nothing in this file knows which model it trains. A chapter supplies a *step function*
that takes one batch, updates its model and returns a dict of floats (losses, accuracies);
:func:`train` calls it, records the floats in a :class:`History`, shows them on a progress
bar and calls the callbacks (sample a grid every N steps, validate, save a checkpoint).

Checkpoints are plain dicts of tensors and Python numbers, so they load with
``torch.load(..., weights_only=True)``; each carries the model's config and the package
version, and is written atomically (to a temporary file, then renamed), so an interrupted
save never leaves a truncated checkpoint behind.
"""

from __future__ import annotations

import dataclasses
import math
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

StepFn = Callable[[Any], Mapping[str, float]]
Callback = Callable[[int, "History"], None]

CHECKPOINT_FORMAT = 1


@dataclass
class History:
    """Floats logged during training, each series with the steps at which it was logged.

    ``step`` counts the optimisation steps done so far; a resumed run continues from it.
    """

    step: int = 0
    records: dict[str, tuple[list[int], list[float]]] = field(default_factory=dict)

    def log(self, step: int, values: Mapping[str, float]) -> None:
        for key, value in values.items():
            steps, series = self.records.setdefault(key, ([], []))
            steps.append(int(step))
            series.append(float(value))

    def series(self, key: str) -> tuple[np.ndarray, np.ndarray]:
        """``(steps, values)`` of one logged quantity, as NumPy arrays."""
        if key not in self.records:
            raise KeyError(f"nothing logged under {key!r}; logged: {sorted(self.records)}")
        steps, values = self.records[key]
        return np.asarray(steps), np.asarray(values)

    def last(self, key: str) -> float:
        return self.records[key][1][-1]

    def keys(self) -> list[str]:
        return list(self.records)

    def to_dict(self) -> dict:
        return {"step": self.step,
                "records": {k: (list(s), list(v)) for k, (s, v) in self.records.items()}}

    @classmethod
    def from_dict(cls, state: Mapping) -> "History":
        return cls(step=int(state["step"]),
                   records={k: (list(s), list(v)) for k, (s, v) in state["records"].items()})


def every(n: int, fn: Callable[[int, History], None]) -> Callback:
    """A callback that calls ``fn(step, history)`` after every ``n``-th step."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")

    def callback(step: int, history: History) -> None:
        if step % n == 0:
            fn(step, history)

    return callback


def minibatches(*tensors: torch.Tensor, batch_size: int, seed: int = 0, start: int = 0
                ) -> Iterator[tuple[torch.Tensor, ...]]:
    """Endless shuffled minibatches of in-memory tensors, indexed along their first axis.

    Each epoch is a fresh permutation drawn from ``(seed, epoch)``, incomplete last batches
    are dropped, and ``start`` skips that many batches: the batch at step ``s`` depends only
    on ``(seed, s)``, so a run resumed at step ``s`` sees exactly the batches it would have.
    """
    n = len(tensors[0])
    if any(len(t) != n for t in tensors):
        raise ValueError(f"all tensors need the same first dimension, got {[len(t) for t in tensors]}")
    if not 1 <= batch_size <= n:
        raise ValueError(f"batch_size must be between 1 and the dataset size {n}, got {batch_size}")
    per_epoch = n // batch_size
    step = start
    while True:
        epoch, position = divmod(step, per_epoch)
        if position == 0 or step == start:
            order = torch.from_numpy(np.random.default_rng([seed, epoch]).permutation(n))
        idx = order[position * batch_size:(position + 1) * batch_size]
        yield tuple(t[idx.to(t.device)] for t in tensors)
        step += 1


def _format_postfix(values: Mapping[str, float]) -> dict[str, str]:
    return {k: f"{v:.4g}" for k, v in values.items()}


def train(step_fn: StepFn, batches: Iterable, steps: int, *, history: History | None = None,
          callbacks: Sequence[Callback] = (), progress: bool = True, desc: str | None = None,
          refresh_every: int = 10) -> History:
    """Run ``step_fn`` on batches until ``history.step == steps``.

    Args:
        step_fn: takes one batch, does one optimisation step, returns a dict of floats.
        batches: an iterable of batches; it must not run out before ``steps`` (use
            :func:`minibatches`, or wrap a DataLoader in ``itertools.cycle``-like logic).
        steps: the total number of steps. With a ``history`` from a checkpoint the loop
            starts from ``history.step``, so the same call resumes an interrupted run.
        history: where to record the floats; a new one if ``None``.
        callbacks: each called as ``callback(step, history)`` after every step.
        progress: show a ``tqdm`` progress bar with the latest values.
        refresh_every: update the bar's values every this many steps.

    Returns:
        The history, with ``history.step == steps``.

    Raises:
        FloatingPointError: when the step function returns a NaN or infinite value, with
            the step at which it happened.
    """
    history = History() if history is None else history
    if steps < history.step:
        raise ValueError(f"steps={steps} is fewer than the {history.step} steps already done")
    iterator = iter(batches)
    with tqdm(total=steps, initial=history.step, desc=desc, disable=not progress,
              dynamic_ncols=True) as bar:
        while history.step < steps:
            try:
                batch = next(iterator)
            except StopIteration:
                raise ValueError(
                    f"the batches ran out after step {history.step} of {steps}; pass an endless "
                    "iterable such as genart_utils.training.minibatches(...)") from None
            values = {k: float(v) for k, v in step_fn(batch).items()}
            history.step += 1
            bad = [k for k, v in values.items() if not math.isfinite(v)]
            if bad:
                raise FloatingPointError(
                    f"step {history.step}: {', '.join(bad)} became {values[bad[0]]}; lower the "
                    "learning rate or check the loss for log(0)")
            history.log(history.step, values)
            for callback in callbacks:
                callback(history.step, history)
            bar.update(1)
            if history.step % refresh_every == 0 or history.step == steps:
                bar.set_postfix(_format_postfix(values), refresh=False)
    return history


# ------------------------------------------------------------------------ checkpoints

@dataclass
class Checkpoint:
    """What :func:`load_checkpoint` returns (the modules' weights are already loaded)."""

    config: Any
    history: History
    version: str
    extra: dict


def _config_to_dict(config: Any) -> tuple[str, dict]:
    if config is None:
        return "", {}
    if dataclasses.is_dataclass(config) and not isinstance(config, type):
        return type(config).__qualname__, dataclasses.asdict(config)
    if isinstance(config, Mapping):
        return "dict", dict(config)
    raise TypeError(f"config must be a dataclass instance or a dict, got {type(config).__name__}")


def save_checkpoint(path: str | os.PathLike, modules: Mapping[str, Any], *, config: Any = None,
                    history: History | None = None, extra: Mapping | None = None) -> Path:
    """Save the state of ``modules`` (models, optimisers, schedulers) with config and history.

    ``modules`` maps names to objects with ``state_dict()``; ``extra`` holds any other plain
    values (tensors, numbers, strings). The file is written to a temporary name in the same
    folder and then renamed over ``path``.
    """
    from . import __version__

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    config_type, config_dict = _config_to_dict(config)
    payload = {
        "format": CHECKPOINT_FORMAT,
        "version": __version__,
        "config_type": config_type,
        "config": config_dict,
        "state": {name: obj.state_dict() for name, obj in modules.items()},
        "history": (history or History()).to_dict(),
        "extra": dict(extra or {}),
    }
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(payload, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def load_checkpoint(path: str | os.PathLike, modules: Mapping[str, Any] | None = None, *,
                    config_type: type | None = None, map_location: str | torch.device = "cpu"
                    ) -> Checkpoint:
    """Load a checkpoint written by :func:`save_checkpoint` with ``weights_only=True``.

    The states stored under the names in ``modules`` are loaded into those objects (a
    missing name is an error). With ``config_type``, the stored config is rebuilt as that
    dataclass, after checking that it was saved from a class of the same name.
    """
    from . import __version__

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    payload = torch.load(path, map_location=map_location, weights_only=True)
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path} is not a genart_utils checkpoint (format {CHECKPOINT_FORMAT})")
    for name, obj in (modules or {}).items():
        if name not in payload["state"]:
            raise KeyError(f"{path} has no state for {name!r}; it holds {sorted(payload['state'])}")
        obj.load_state_dict(payload["state"][name])
    config: Any = payload["config"]
    if config_type is not None:
        if payload["config_type"] != config_type.__qualname__:
            raise TypeError(f"{path} holds a {payload['config_type']} config, "
                            f"not a {config_type.__qualname__}")
        config = config_type(**config)
    if payload["version"] != __version__:
        import warnings

        warnings.warn(f"{path} was saved by genart_utils {payload['version']}, "
                      f"this is {__version__}", stacklevel=2)
    return Checkpoint(config=config, history=History.from_dict(payload["history"]),
                      version=payload["version"], extra=payload["extra"])

"""The one training loop of the book, its history, and checkpoints.

Nothing in this file knows which model it trains. A chapter supplies a *step function*
that takes one batch, updates its model and returns a dict of floats (losses, accuracies);
:func:`train` calls it, records the floats in a :class:`History`, shows them on a progress
bar and calls the callbacks (sample a grid every N steps, validate, save a checkpoint).

Checkpoints are plain dicts of tensors and Python numbers, so they load with
``torch.load(..., weights_only=True)``; each carries the model's config and the package
version, and is written atomically (to a temporary file, then renamed), so an interrupted
save never leaves a truncated checkpoint behind. A value that ``weights_only=True`` could not
load back is refused when saving, and a file that cannot be loaded raises one error,
:class:`CheckpointError`, that names it.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import os
import pickle
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import numpy as np
import torch
from torch import nn
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
        steps, values = self._record(key)
        return np.asarray(steps), np.asarray(values)

    def last(self, key: str) -> float:
        """The latest value logged under ``key``."""
        return self._record(key)[1][-1]

    def _record(self, key: str) -> tuple[list[int], list[float]]:
        if key not in self.records:
            raise KeyError(f"nothing logged under {key!r}; logged: {sorted(self.records)}")
        return self.records[key]

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


class EMA:
    r"""An exponential moving average of a model's parameters, :math:`\bar\theta \leftarrow
    d\,\bar\theta + (1 - d)\,\theta` after each step (buffers are copied): ``ema.model`` is
    the averaged copy, the one to sample from and evaluate."""

    def __init__(self, model: nn.Module, decay: float = 0.999):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"the EMA decay must lie in [0, 1), got {decay}")
        self.decay = decay
        self.model = copy.deepcopy(model).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        for avg, p in zip(self.model.parameters(), model.parameters()):
            avg.lerp_(p.detach(), 1 - self.decay)
        for avg, b in zip(self.model.buffers(), model.buffers()):
            avg.copy_(b)


@dataclass(frozen=True)
class Optimisation:
    """How a recipe is optimised: Adam with a linear learning-rate warm-up then a constant
    rate (so a run of ``steps`` steps is exactly the start of any longer run), gradient
    clipping and an exponential moving average of the weights (the copy that is sampled
    from and shipped). A recipe holds one as its ``optim`` field."""

    steps: int = 2000           # optimisation steps
    batch_size: int = 64
    lr: float = 2e-4            # Adam's learning rate after warm-up
    warmup: int = 200           # steps of linear warm-up
    grad_clip: float = 1.0      # gradient norm clipping
    ema_decay: float = 0.999
    seed: int = 0               # minibatch order and the step's random draws

    def __post_init__(self):
        from .runtime import check_fields

        check_fields(self, positive_ints=("steps", "batch_size"), nonneg_ints=("warmup", "seed"),
                     positive_floats=("lr", "grad_clip"), half_open_unit=("ema_decay",))


LossFn = Callable[[Any, torch.Generator], tuple[torch.Tensor, Mapping[str, float]]]


def fit_recipe(recipe: Any, model: nn.Module, loss_fn: LossFn, data: Sequence[torch.Tensor], *,
               checkpoint: str | os.PathLike | None = None, save_every: int = 500,
               progress: bool = True, desc: str | None = None,
               callbacks: Sequence[Callback] = ()) -> tuple[nn.Module, EMA, History]:
    """Train ``model`` as ``recipe.optim`` (an :class:`Optimisation`) says, resumably.

    ``loss_fn(batch, generator)`` returns the scalar loss of one minibatch of ``data``
    (tensors indexed along their first axis, :func:`minibatches`) and a dict of floats to
    log; all of its random draws must come from ``generator``, which is reseeded from
    ``(optim.seed, step)`` before every step. With ``checkpoint`` (a path) the full state
    (weights, EMA, optimiser, history, recipe) is written there atomically every
    ``save_every`` steps and at the end, and a run of the same recipe found there is
    resumed; batches and draws depend only on the seed and the step, so a resumed run
    equals an uninterrupted one. Returns ``(model, ema, history)``.
    """
    optim = recipe.optim
    if not isinstance(optim, Optimisation):
        raise TypeError(f"recipe.optim must be a training.Optimisation, got {type(optim).__name__}")
    if not isinstance(save_every, int) or save_every < 1:
        raise ValueError(f"save_every must be a positive int (steps between checkpoints), got {save_every!r}")
    ema = EMA(model, optim.ema_decay)
    optimizer = torch.optim.Adam(model.parameters(), lr=optim.lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / optim.warmup) if optim.warmup else 1.0)
    modules = {"model": model, "ema": ema.model, "optimizer": optimizer, "scheduler": scheduler}
    history = History()
    if checkpoint is not None and Path(checkpoint).is_file():
        stored = load_checkpoint(checkpoint, config_type=type(recipe))
        same = dataclasses.replace(stored.config, optim=dataclasses.replace(stored.config.optim,
                                                                            steps=optim.steps))
        if same != recipe:
            raise ValueError(f"{checkpoint} holds a run of another recipe; delete it or pass another path")
        load_checkpoint(checkpoint, modules)
        history = stored.history
    generator = torch.Generator()

    def step(batch) -> dict[str, float]:
        generator.manual_seed(optim.seed * 1_000_003 + history.step)
        loss, logged = loss_fn(batch, generator)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), optim.grad_clip)
        optimizer.step()
        scheduler.step()
        ema.update(model)
        return {"loss": loss.item(), **logged}

    def save(step_number: int, hist: History) -> None:
        if checkpoint is not None and (step_number % save_every == 0 or step_number == optim.steps):
            save_checkpoint(checkpoint, modules, config=recipe, history=hist)

    batches = minibatches(*data, batch_size=optim.batch_size, seed=optim.seed, start=history.step)
    train(step, batches, optim.steps, history=history, callbacks=[*callbacks, save],
          progress=progress, desc=desc)
    return model, ema, history


def train_for(seconds: float, run_until: Callable[[int], Any], *, first: int = 1,
              max_steps: int | None = None, clock: Callable[[], float] = time.perf_counter) -> dict:
    """Train for about ``seconds`` of wall-clock time, in chunks that resume one run.

    ``run_until(total)`` must continue training up to step ``total`` (for instance
    ``lambda total: train(step_fn, batches, total, history=history)``, which resumes from
    ``history``). The first call trains to ``first`` steps; after each call the rate so far,
    ``r = steps / elapsed``, aims the next total at nine tenths of the time left:

    .. math:: \\text{next} = \\text{steps} + \\lfloor 0.9\\,(\\text{seconds} - \\text{elapsed})\\, r \\rfloor,

    and training stops when that adds less than one step (less than about one step's time
    is left) or when ``max_steps`` is reached. So at a steady rate the run ends within about
    one step's time of the budget, never far past it; the time of the first chunk is spent
    whatever ``seconds`` is. An elapsed time of zero (a clock too coarse to see a chunk)
    doubles the total.

    Args:
        seconds: the wall-clock budget, a positive finite number.
        run_until: trains up to the given total number of steps.
        first: the first total, a positive int (a few steps measure the rate better than one
            when a step's time varies).
        max_steps: an optional cap on the total number of steps.
        clock: returns the time in seconds; ``time.perf_counter`` by default (tests pass a
            fake one).

    Returns:
        ``{"steps": total steps trained, "seconds": elapsed time}``.
    """
    if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or not 0 < seconds < math.inf:
        raise ValueError(f"seconds must be a positive finite number of seconds, got {seconds!r}")
    if not callable(run_until):
        raise TypeError(f"run_until must be a function that trains up to a total number of steps, "
                        f"got {type(run_until).__name__}")
    if isinstance(first, bool) or not isinstance(first, int) or first < 1:
        raise ValueError(f"first must be a positive int (the steps of the first chunk), got {first!r}")
    if max_steps is not None and (isinstance(max_steps, bool) or not isinstance(max_steps, int)
                                  or max_steps < first):
        raise ValueError(f"max_steps must be None or an int of at least first={first}, got {max_steps!r}")
    start, target = clock(), first
    while True:
        run_until(target)
        steps, spent = target, clock() - start
        if max_steps is not None and steps >= max_steps:
            return {"steps": steps, "seconds": spent}
        more = steps if spent <= 0 else int(0.9 * (seconds - spent) * steps / spent)
        if more < 1:
            return {"steps": steps, "seconds": spent}
        target = steps + more if max_steps is None else min(steps + more, max_steps)


def layer_shapes(model: nn.Module, inputs: torch.Tensor | tuple, parts: Mapping[str, nn.Module]
                 ) -> dict[str, tuple[int, ...]]:
    """The output shape of each named submodule on one forward pass of ``model``.

    ``model(inputs)`` runs once without gradients (``model(*inputs)`` for a tuple), with a
    forward hook on each module of ``parts`` that records the shape of its output (of the
    first element when it returns a tuple); the hooks are removed afterwards. The pass runs
    in eval mode and the previous modes are restored, so batch-norm statistics do not move.

    >>> net = nn.Sequential(nn.Linear(3, 5), nn.ReLU(), nn.Linear(5, 2))
    >>> layer_shapes(net, torch.zeros(4, 3), {"hidden": net[1], "out": net[2]})
    {'hidden': (4, 5), 'out': (4, 2)}
    """
    inside = {id(m) for m in model.modules()}
    for name, part in parts.items():
        if id(part) not in inside:
            raise ValueError(f"parts[{name!r}] is not a submodule of the model; pass modules "
                             "reached from the model, e.g. model.encoder.net[0]")
    shapes: dict[str, tuple[int, ...]] = {}

    def recorder(name: str):
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            first = output[0] if isinstance(output, (tuple, list)) else output
            shapes[name] = tuple(first.shape)
        return hook

    modes = {m: m.training for m in model.modules()}
    handles = [part.register_forward_hook(recorder(name)) for name, part in parts.items()]
    try:
        model.eval()
        with torch.no_grad():
            if isinstance(inputs, tuple):
                model(*inputs)
            else:
                model(inputs)
    finally:
        for handle in handles:
            handle.remove()
        for module, training in modes.items():
            module.training = training
    missing = [name for name in parts if name not in shapes]
    if missing:
        raise ValueError(f"parts {missing} did not run in the forward pass of the model")
    return {name: shapes[name] for name in parts}


def layer_table(model: nn.Module, inputs: torch.Tensor | tuple, layers: Iterable[nn.Module]) -> str:
    """A printable table of ``layers`` (submodules of ``model``, in order): each one's type,
    its output shape without the batch axis (from :func:`layer_shapes`) and its number of
    parameters.

    >>> net = nn.Sequential(nn.Linear(3, 5), nn.ReLU())
    >>> print(layer_table(net, torch.zeros(2, 3), net))
      Linear           -> (5,)                   20 parameters
      ReLU             -> (5,)                    0 parameters
    """
    parts = {str(i): layer for i, layer in enumerate(layers)}
    shapes = layer_shapes(model, inputs, parts)
    return "\n".join(
        f"  {type(layer).__name__:16s} -> {str(shapes[name][1:]):15s} "
        f"{sum(p.numel() for p in layer.parameters()):9,d} parameters"
        for name, layer in parts.items())


# ------------------------------------------------------------------------ checkpoints

@dataclass
class Checkpoint:
    """What :func:`load_checkpoint` returns (the modules' weights are already loaded)."""

    config: Any
    history: History
    version: str
    extra: dict


class CheckpointError(ValueError):
    """A file that cannot be loaded as a checkpoint: empty, truncated, not a checkpoint, or
    saved with a config class that has changed since. The message names the file."""


def checkpoint_path(name: str) -> Path:
    """Where a notebook keeps its checkpoint ``name``: ``$GENART_CHECKPOINTS/name`` when
    that variable is set, else ``data.data_home() / "checkpoints" / name``.

    Notebooks call this rather than hard-coding ``"../checkpoints"``, which depends on the
    working directory (Colab, the book build and a local Jupyter all differ). The folder is
    created.
    """
    if not isinstance(name, str) or name in ("", ".", "..") or Path(name).name != name \
            or "\\" in name:
        raise ValueError(f"checkpoint name must be a plain file name such as 'dcgan.pt', "
                         f"got {name!r}; set GENART_CHECKPOINTS to choose the folder")
    from . import data  # here, not at the top: data may import this module

    folder = os.environ.get("GENART_CHECKPOINTS")
    folder = Path(folder) if folder else data.data_home() / "checkpoints"
    folder.mkdir(parents=True, exist_ok=True)
    return folder / name


_PLAIN = (int, float, bool, str, type(None))


def _check_plain(value: Any, where: str) -> None:
    """Refuse what ``torch.load(..., weights_only=True)`` cannot load back.

    Allowed: tensors, ``int``/``float``/``bool``/``str``/``None``, and lists, tuples and
    dicts (keys ``str`` or ``int``) of those. Exact types are checked: ``np.float64`` is a
    subclass of ``float`` that pickles as a NumPy object and would not load.
    """
    if type(value) in _PLAIN or isinstance(value, torch.Tensor):
        return
    if type(value) in (list, tuple):
        for i, item in enumerate(value):
            _check_plain(item, f"{where}[{i}]")
        return
    if type(value) is dict:
        for key, item in value.items():
            if type(key) not in (str, int):
                raise TypeError(f"{where} has the key {key!r} of type {type(key).__name__}; "
                                "use str or int keys in a checkpoint")
            _check_plain(item, f"{where}[{key!r}]")
        return
    raise TypeError(f"{where} is a {type(value).__module__}.{type(value).__qualname__}, which "
                    f"torch.load(..., weights_only=True) cannot load back; {_plain_fix(value)}")


def _plain_fix(value: Any) -> str:
    if isinstance(value, np.generic):
        return "store x.item() (or float(x) / int(x))"
    if isinstance(value, np.ndarray):
        return "store torch.from_numpy(x) or x.tolist()"
    if isinstance(value, os.PathLike):
        return "store str(path)"
    if dataclasses.is_dataclass(value):
        return "store dataclasses.asdict(x), or pass it as config="
    if isinstance(value, (set, frozenset)):
        return "store sorted(x) or list(x)"
    return "store tensors, numbers, strings, None, or lists / tuples / dicts of them"


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
    values (tensors, numbers, strings, and lists / tuples / dicts of them). The file is
    written to a temporary name in the same folder and then renamed over ``path``.

    Raises:
        TypeError: when the config or ``extra`` holds a value that ``weights_only=True``
            cannot load back (a NumPy scalar, a Path, a dataclass, a set ...), naming where
            it is, e.g. ``extra['best']['value']``, and how to store it instead. Nothing
            is written then, so a good checkpoint is never replaced by one that cannot load.
    """
    from . import __version__

    path = Path(path)
    config_type, config_dict = _config_to_dict(config)
    extra = dict(extra or {})
    _check_plain(config_dict, "config")
    _check_plain(extra, "extra")
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "format": CHECKPOINT_FORMAT,
        "version": __version__,
        "config_type": config_type,
        "config": config_dict,
        "state": {name: obj.state_dict() for name, obj in modules.items()},
        "history": (history or History()).to_dict(),
        "extra": extra,
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

    Raises:
        FileNotFoundError: when there is no file at ``path``.
        CheckpointError: when the file is empty, truncated, not a checkpoint, holds objects
            ``weights_only`` refuses, or holds a config or weights that no longer fit the
            code (a config class or model that gained or lost fields or layers).
    """
    from . import __version__

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    payload = _read(path, map_location)
    for name, obj in (modules or {}).items():
        if name not in payload["state"]:
            raise KeyError(f"{path} has no state for {name!r}; it holds {sorted(payload['state'])}")
        try:
            obj.load_state_dict(payload["state"][name])
        except (RuntimeError, ValueError, KeyError) as err:
            raise CheckpointError(
                f"{path}: the saved state of {name!r} does not fit the object given "
                f"({str(err).splitlines()[0]}); build it from the checkpoint's config, or "
                "delete the file and train again") from err
    config: Any = payload["config"]
    if config_type is not None:
        if payload["config_type"] != config_type.__qualname__:
            raise TypeError(f"{path} holds a {payload['config_type']} config, "
                            f"not a {config_type.__qualname__}")
        config = _rebuild_config(path, config_type, config)
    if payload["version"] != __version__:
        import warnings

        warnings.warn(f"{path} was saved by genart_utils {payload['version']}, "
                      f"this is {__version__}", stacklevel=2)
    return Checkpoint(config=config, history=History.from_dict(payload["history"]),
                      version=payload["version"], extra=payload["extra"])


def _read(path: Path, map_location: str | torch.device) -> dict:
    """``torch.load(path, weights_only=True)``, with every way it fails turned into one
    :class:`CheckpointError` that names the file and says what to do."""
    remedy = "delete it and save the checkpoint again (or train again)"
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path} is empty (an interrupted copy?); {remedy}")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        raise CheckpointError(
            f"{path} cannot be loaded with weights_only=True ({_reason(err)}); it is not a "
            "genart_utils checkpoint, or holds objects other than tensors and plain values; "
            f"{remedy}") from err
    except Exception as err:  # EOFError, RuntimeError from the zip reader, a bad seek ...
        raise CheckpointError(f"{path} is truncated or not a checkpoint ({_reason(err)}); "
                              f"{remedy}") from err
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path} is not a genart_utils checkpoint "
                              f"(format {CHECKPOINT_FORMAT}); {remedy}")
    return payload


def _reason(err: Exception) -> str:
    """The informative sentence of a ``torch.load`` error (they run to a dozen lines)."""
    text = str(err)
    marker = "Unsupported global: "
    if marker in text:
        return marker + text.split(marker, 1)[1].split(" was not", 1)[0]
    first = text.strip().splitlines()[0].split(". ")[0] if text.strip() else ""
    return f"{type(err).__name__}: {first}" if first else type(err).__name__


def _rebuild_config(path: Path, config_type: type, config: Mapping) -> Any:
    """``config_type(**config)``, explaining a config class that changed since the save."""
    try:
        return config_type(**config)
    except (TypeError, ValueError) as err:
        names = {f.name for f in dataclasses.fields(config_type)} \
            if dataclasses.is_dataclass(config_type) else set(config)
        unknown = sorted(set(config) - names)
        raise CheckpointError(
            f"{path} holds a {config_type.__qualname__} that the current class cannot rebuild "
            f"({err}; fields saved but no longer in the class: {unknown or 'none'}); the "
            "class changed since the save: delete the file and train again, or load without "
            "config_type and adapt the dict") from err


def keep_best(path: str | os.PathLike, modules: Mapping[str, Any], key: str, *,
              config: Any = None, mode: str = "min",
              extra: Mapping | Callable[[], Mapping] | None = None) -> Callback:
    """A callback that saves a checkpoint whenever ``key`` reaches its best value so far.

    After a step at which ``key`` was logged, the checkpoint at ``path`` is written when
    the new value is strictly better (lower for ``mode="min"``, higher for ``"max"``) than
    every earlier value of ``key`` in the history. The best is read from the history, not
    kept in the callback, so a run resumed from a checkpoint (whose history holds the
    earlier values) never overwrites the best checkpoint with a worse one. Put it after the
    callback that logs ``key``.

    The checkpoint's ``extra`` is ``{"step": step, key: value, **extra}``; ``extra`` may be
    a function returning the dict, called at save time (e.g. for a generator's state).
    """
    if mode not in ("min", "max"):
        raise ValueError(f"mode must be 'min' or 'max', got {mode!r}")
    better = (lambda new, old: new < old) if mode == "min" else (lambda new, old: new > old)

    def callback(step: int, history: History) -> None:
        steps, values = history.records.get(key, ((), ()))
        if not steps or steps[-1] != step:
            return
        value = values[-1]  # a NaN is never the best, and never blocks a later best
        if not math.isnan(value) and all(better(value, old) for old in values[:-1]
                                          if not math.isnan(old)):
            more = extra() if callable(extra) else (extra or {})
            save_checkpoint(path, modules, config=config, history=history,
                            extra={"step": step, key: value, **more})

    return callback

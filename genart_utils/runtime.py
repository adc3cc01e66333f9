"""Where and how a notebook runs: device, seeds, execution profile, mixed precision.

Every notebook starts with :func:`setup_notebook`, which seeds every random number
generator, picks the device and the execution profile, and prints them together with the
package version. The profile only changes sizes (steps, widths, dataset sizes), never the
code path: see :func:`profile_config`.

Two conventions every model family shares also live here: :func:`check_fields`, the one
validation of config dataclasses, and :func:`seeded`, the one way a model's initial weights
are drawn from ``config.seed``.
"""

from __future__ import annotations

import contextlib
import os
import random
import sys
import math
import time
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator, Mapping, TypeVar

import numpy as np
import torch

PROFILES = ("smoke", "cpu", "gpu")
"""The execution profiles, from fastest to largest.

``smoke``: CI and ``make test`` (a whole notebook well under a minute on 2 CPU cores);
``cpu``: a reader without a GPU (each notebook at most 10 minutes on 2 cores);
``gpu``: Colab or any CUDA machine (the full-size run the chapter is written about).
"""

PROFILE_ENV = "GENART_PROFILE"

T = TypeVar("T")


def get_profile(value: str | None = None) -> str:
    """Return the execution profile.

    Args:
        value: a profile name; when ``None``, read the environment variable
            ``GENART_PROFILE``. An empty value or ``"auto"`` means the default:
            ``"gpu"`` when CUDA is available, else ``"cpu"``.

    Raises:
        ValueError: for a name that is not one of :data:`PROFILES`.
    """
    if value is None:
        value = os.environ.get(PROFILE_ENV, "")
    name = value.strip().lower()
    if name in ("", "auto"):
        return "gpu" if torch.cuda.is_available() else "cpu"
    if name not in PROFILES:
        raise ValueError(
            f"unknown execution profile {value!r} (from {PROFILE_ENV} or the argument); "
            f"use one of {', '.join(PROFILES)}, or 'auto' / unset for the default "
            "(gpu when CUDA is available, else cpu)"
        )
    return name


def profile_config(*, smoke: T, cpu: T, gpu: T, profile: str | None = None) -> T:
    """Pick the value for the active profile, e.g. a config or a dict of sizes.

    >>> profile_config(smoke=10, cpu=2_000, gpu=20_000, profile="cpu")
    2000
    """
    return {"smoke": smoke, "cpu": cpu, "gpu": gpu}[get_profile(profile)]


def get_device(name: str | None = None) -> torch.device:
    """Return ``name`` as a device, or the best available one: cuda, then mps, then cpu."""
    if name is not None:
        device = torch.device(name)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device {name!r} was asked for but CUDA is not available; use 'cpu'")
        return device
    if torch.cuda.is_available():
        return torch.device("cuda")
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def seed_everything(seed: int) -> torch.Generator:
    """Seed Python's, NumPy's and PyTorch's (CPU and CUDA) random number generators.

    Returns a fresh CPU :class:`torch.Generator` seeded with ``seed``, for functions that
    take an explicit generator.
    """
    _check_seed(seed)
    seed = int(seed)
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)  # also seeds every CUDA device
    return torch.Generator().manual_seed(seed)


@contextlib.contextmanager
def seeded(seed: int, device: torch.device | str | None = None) -> Iterator[None]:
    """Run a block with the CPU random number generator seeded by ``seed``, then put it back.

    This is THE way a ``build_*`` function turns ``config.seed`` into initial weights::

        with runtime.seeded(config.seed):
            model = VAE(config)      # nn.Linear, nn.Conv2d ... draw from the seeded RNG

    The weights then depend only on ``config.seed``, and the global RNG is exactly where it
    was before the block, so building a model never changes what a notebook draws next.
    Only the CPU generator is forked and seeded (``torch.manual_seed`` would also reseed
    every CUDA device): build on the CPU, then move the model with ``.to(device)``. With a
    CUDA ``device``, that device's generator is forked and seeded too (for random draws
    made on the GPU, such as dropout masks).
    """
    _check_seed(seed)
    device = torch.device(device) if device is not None else torch.device("cpu")
    cuda = [device.index if device.index is not None else torch.cuda.current_device()] \
        if device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda):
        torch.default_generator.manual_seed(int(seed))
        for index in cuda:
            torch.cuda.default_generators[index].manual_seed(int(seed))
        yield


def _check_seed(seed: Any) -> None:
    if not is_int(seed) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")


# ------------------------------------------------------------------ config validation

def is_int(value: Any) -> bool:
    """Python or NumPy integers; ``True``/``False`` are flags, not counts. Every argument
    check of the package uses this and :func:`is_real`."""
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def is_real(value: Any) -> bool:
    """A finite real number: ints and floats, Python or NumPy, but not bools."""
    return (is_int(value) or isinstance(value, (float, np.floating))) and math.isfinite(value)


_RULES = {
    # keyword: (test, what the field must be)
    "positive_ints": (lambda v: is_int(v) and v >= 1, "a positive int (1, 2, ...)"),
    "nonneg_ints": (lambda v: is_int(v) and v >= 0, "a non-negative int (0, 1, ...)"),
    "positive_floats": (lambda v: is_real(v) and v > 0, "a finite number > 0"),
    "nonneg_floats": (lambda v: is_real(v) and v >= 0, "a finite number >= 0"),
    "unit_interval": (lambda v: is_real(v) and 0 <= v <= 1, "a number in [0, 1]"),
    "half_open_unit": (lambda v: is_real(v) and 0 <= v < 1, "a number in [0, 1)"),
}


def check_fields(obj: Any, *, positive_ints: Iterable[str] = (), nonneg_ints: Iterable[str] = (),
                 positive_floats: Iterable[str] = (), nonneg_floats: Iterable[str] = (),
                 unit_interval: Iterable[str] = (), half_open_unit: Iterable[str] = (),
                 choices: Mapping[str, Iterable] | None = None) -> None:
    """Validate the fields of a config dataclass; call it from ``__post_init__``.

    Each keyword lists field names that must be: ``positive_ints`` >= 1, ``nonneg_ints``
    >= 0, ``positive_floats`` > 0, ``nonneg_floats`` >= 0 (finite), ``unit_interval`` in
    [0, 1] (a probability), ``half_open_unit`` in [0, 1) (dropout, Adam's beta1);
    ``choices`` maps a field to its allowed values. Floats accept ints; bools are neither.

    A NumPy scalar (``np.int64(3)``, ``np.float32(0.1)``) is accepted and stored back as
    the Python number, so the config saves into a checkpoint that loads with
    ``weights_only=True``. This works on frozen dataclasses too.

    Raises:
        ValueError: naming the class, the field, the value and what to pass instead, e.g.
            ``DCGANConfig.latent_dim must be a positive int (1, 2, ...), got 0``.
    """
    cls = type(obj).__name__
    groups = dict(positive_ints=positive_ints, nonneg_ints=nonneg_ints,
                  positive_floats=positive_floats, nonneg_floats=nonneg_floats,
                  unit_interval=unit_interval, half_open_unit=half_open_unit)
    for rule, names in groups.items():
        test, what = _RULES[rule]
        for name in names:
            value = getattr(obj, name)
            if not test(value):
                raise ValueError(f"{cls}.{name} must be {what}, got {value!r}; "
                                 f"fix the {name}=... argument of {cls}(...)")
            if isinstance(value, np.generic):
                object.__setattr__(obj, name, value.item())
    for name, allowed in (choices or {}).items():
        allowed = tuple(allowed)
        value = getattr(obj, name)
        if value not in allowed:
            raise ValueError(f"{cls}.{name} must be one of {', '.join(map(repr, allowed))}, "
                             f"got {value!r}; fix the {name}=... argument of {cls}(...)")


def check_parts(obj: Any, **parts: type) -> None:
    """Check the nested config fields of a recipe dataclass; call it from ``__post_init__``.

    ``parts`` maps a field name to its config class. A field that holds a dict (a recipe
    rebuilt from a checkpoint) becomes an instance of that class again, with lists turned
    back into tuples; anything else that is not an instance raises a ``TypeError``.
    """
    cls = type(obj).__name__
    for name, kind in parts.items():
        value = getattr(obj, name)
        if isinstance(value, Mapping):
            value = kind(**{k: tuple(v) if isinstance(v, list) else v for k, v in value.items()})
            object.__setattr__(obj, name, value)
        if not isinstance(value, kind):
            raise TypeError(f"{cls}.{name} must be a {kind.__name__}, got {type(value).__name__}")


def amp_dtype(device: torch.device) -> torch.dtype | None:
    """The mixed-precision dtype for ``device``: bf16 where supported, fp16 on older GPUs,
    ``None`` (full precision) on CPU and MPS."""
    if device.type != "cuda":
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def autocast(device: torch.device, enabled: bool = True) -> contextlib.AbstractContextManager:
    """Mixed-precision context for the forward pass; a no-op on CPU or when disabled.

    The same training code then runs everywhere (the nanoGPT ``nullcontext`` trick).
    With fp16 (pre-Ampere GPUs) pair it with :func:`grad_scaler`.
    """
    dtype = amp_dtype(device) if enabled else None
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def grad_scaler(device: torch.device, enabled: bool = True) -> torch.amp.GradScaler:
    """A gradient scaler that is active only for fp16 autocast (bf16 and fp32 need none)."""
    active = enabled and amp_dtype(device) == torch.float16
    return torch.amp.GradScaler(device.type if device.type == "cuda" else "cpu", enabled=active)


@dataclass
class NotebookRun:
    """What a notebook runs on; printed at its start, with the wall time at its end."""

    device: torch.device
    profile: str
    seed: int
    generator: torch.Generator = field(repr=False)
    started: float = field(default_factory=time.perf_counter, repr=False)

    def banner(self) -> str:
        from . import __version__

        n = torch.get_num_threads()
        threads = f"{n} CPU thread{'' if n == 1 else 's'}"
        if self.device.type == "cuda":
            where = f"cuda ({torch.cuda.get_device_name(self.device)}; {threads})"
        else:
            where = f"{self.device.type} ({threads})"
        return (
            f"genart_utils {__version__} | torch {torch.__version__} | python "
            f"{sys.version.split()[0]}\ndevice: {where} | profile: {self.profile} | seed: {self.seed}"
        )

    def elapsed(self) -> float:
        """Seconds since the notebook's setup cell ran."""
        return time.perf_counter() - self.started

    def report(self) -> str:
        """A closing line for the notebook: profile, device and wall time."""
        return (
            f"notebook wall time: {self.elapsed():.1f} s "
            f"(profile {self.profile}, device {self.device.type})"
        )


def setup_notebook(seed: int = 0, profile: str | None = None, device: str | None = None,
                   verbose: bool = True, threads: int | None = None) -> NotebookRun:
    """Seed everything, choose device and profile, and print them with the versions.

    ``threads`` sets ``torch.set_num_threads`` before the banner, which shows the count:
    the book's tiny models run fastest on one thread, and a notebook's timings are only
    comparable when the thread count is printed beside them. ``None`` keeps PyTorch's
    default (one thread per core).
    """
    if threads is not None:
        if not is_int(threads) or threads < 1:
            raise ValueError(f"threads must be a positive int or None, got {threads!r}; "
                             "pass threads=1 for the book's small models")
        torch.set_num_threads(int(threads))
    run = NotebookRun(
        device=get_device(device),
        profile=get_profile(profile),
        seed=seed,
        generator=seed_everything(seed),
    )
    if verbose:
        print(run.banner())
    return run


@contextlib.contextmanager
def eval_mode(model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """Run a block with ``model`` in evaluation mode (dropout off, batch norm on its running
    statistics), then put it back in the mode it was in, even if the block raises:
    ``with eval_mode(G): images = G(z)``. Sampling and evaluation use it so that they never
    leave a model that is being trained in evaluation mode."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


@contextlib.contextmanager
def timer() -> Iterator[dict[str, float]]:
    """Measure a block's wall time: ``with timer() as t: ...`` then ``t["seconds"]``."""
    result = {"seconds": float("nan")}
    start = time.perf_counter()
    try:
        yield result
    finally:
        result["seconds"] = time.perf_counter() - start

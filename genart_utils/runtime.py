"""Where and how a notebook runs: device, seeds, execution profile, mixed precision.

Every notebook starts with :func:`setup_notebook`, which seeds every random number
generator, picks the device and the execution profile, and prints them together with the
package version. The profile only changes sizes (steps, widths, dataset sizes), never the
code path: see :func:`profile_config`.
"""

from __future__ import annotations

import contextlib
import os
import random
import sys
import time
from dataclasses import dataclass, field
from typing import Iterator, TypeVar

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
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)  # also seeds every CUDA device
    return torch.Generator().manual_seed(seed)


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

        if self.device.type == "cuda":
            where = f"cuda ({torch.cuda.get_device_name(self.device)})"
        else:
            where = f"{self.device.type} ({torch.get_num_threads()} threads)"
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
                   verbose: bool = True) -> NotebookRun:
    """Seed everything, choose device and profile, and print them with the versions."""
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
def timer() -> Iterator[dict[str, float]]:
    """Measure a block's wall time: ``with timer() as t: ...`` then ``t["seconds"]``."""
    result = {"seconds": float("nan")}
    start = time.perf_counter()
    try:
        yield result
    finally:
        result["seconds"] = time.perf_counter() - start

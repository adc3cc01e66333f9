"""Speed of the diffusion chapter's U-Net (``diffusion.DiffusionRecipe``) on OpenMoji 32x32.

Prints one JSON line per measurement, each with the machine's load average
(``os.getloadavg()``, 1, 5 and 15 minutes) when it was taken:

* ``diffusion_step_profile``: where one training step's time goes (a ``torch.profiler`` run,
  operators grouped into convolutions, normalisation, attention, elementwise and the
  optimiser), for the recipe's U-Net and for the same U-Net without the pixel-unshuffle
  patch (``patch=1``, full 32x32 resolution inside);
* ``diffusion_training_throughput``: training images/s for the candidates the chapter had to
  choose between: patch 1 or 2, contiguous or channels-last memory, bf16 autocast on the
  CPU, each on 1 and 2 threads;
* ``diffusion_compile_throughput``: training images/s of the recipe with and without
  ``torch.compile`` on 1 thread (``--compile``), timed in interleaved rounds of ``--steps``
  steps so that a change of load hits both alike; when compiling fails, the error message is
  the result;
* ``diffusion_sampling_throughput``: images/s of the shipped model's U-Net
  (``shipped.load_or_train("diffusion-openmoji32")``) with DDIM at 10, 25, 50 and 100 steps
  (batch ``--sample-batch``) and the full 1,000-step DDPM chain (batch ``--chain-batch``),
  on 1 thread.

    .venv/bin/python benchmarks/bench_diffusion.py [--steps 20] [--compile] [--quick]
        [--parts profile throughput compile sampling]

Figures are measured, never asserted.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import platform
import time
from collections import defaultdict

import torch

from genart_utils import __version__, data, diffusion, shipped, training

GROUPS = (("convolution", ("conv",)), ("normalisation", ("group_norm", "native_group_norm", "norm")),
          ("attention", ("attention", "softmax", "bmm", "baddbmm")),
          ("optimiser", ("adam", "_foreach", "lerp")),
          ("linear", ("addmm", "mm", "linear")))


def _load() -> dict:
    """The 1, 5 and 15 minute load averages, to state the conditions of every line."""
    return {"loadavg_1_5_15": [round(v, 2) for v in os.getloadavg()]}


def _group(name: str) -> str:
    lower = name.lower()
    for group, keys in GROUPS:
        if any(k in lower for k in keys):
            return group
    return "elementwise and other"


def _setup(recipe: diffusion.DiffusionRecipe, channels_last: bool, bf16: bool, compile_: bool):
    model = diffusion.UNet(recipe.unet)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    if compile_:
        model = torch.compile(model)
    opt = torch.optim.Adam(model.parameters(), lr=recipe.lr)
    sched = diffusion.NoiseSchedule(recipe.schedule)
    step = diffusion.make_train_step(model, opt, sched, generator=torch.Generator().manual_seed(0),
                                     label_dropout=recipe.label_dropout)
    autocast = (torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext())
    train = data.load_dataset("openmoji", "train", size=recipe.unet.image_size)
    batches = training.minibatches(train.images, train.labels, batch_size=recipe.batch_size, seed=0)

    def run():
        with autocast:
            step(next(batches))
    return run


def throughput(recipe, *, channels_last, bf16, compile_, threads, steps, warmup) -> dict:
    torch.set_num_threads(threads)
    run = _setup(recipe, channels_last, bf16, compile_)
    for _ in range(warmup):
        run()
    start = time.perf_counter()
    for _ in range(steps):
        run()
    seconds = time.perf_counter() - start
    return {"benchmark": "diffusion_training_throughput", "patch": recipe.unet.patch,
            "channels_last": channels_last, "bf16_autocast": bf16, "compile": compile_,
            "threads": threads, "batch": recipe.batch_size, "steps": steps,
            "images_per_s": round(steps * recipe.batch_size / seconds, 1), **_load()}


def profile_step(recipe, threads: int, steps: int) -> dict:
    torch.set_num_threads(threads)
    run = _setup(recipe, channels_last=True, bf16=False, compile_=False)
    for _ in range(3):
        run()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            run()
    shares = defaultdict(float)
    for event in prof.key_averages():
        if event.key.startswith("aten::"):             # self times: each microsecond counted once
            shares[_group(event.key)] += event.self_cpu_time_total
    total = sum(shares.values())
    return {"benchmark": "diffusion_step_profile", "patch": recipe.unet.patch, "threads": threads,
            "share_of_self_cpu_time": {k: round(v / total, 3) for k, v in
                                       sorted(shares.items(), key=lambda kv: -kv[1])}, **_load()}


def compile_comparison(recipe, *, threads: int, steps: int, warmup: int, rounds: int = 6):
    """Training images/s without and with ``torch.compile``, timed in interleaved rounds of
    ``steps`` steps each (so that a change in the machine's load hits both alike): the median
    over the rounds (the upper of the middle two for an even number), and every round. A failed
    compile is recorded as the row's ``error``, not raised."""
    torch.set_num_threads(threads)
    runs, errors = {}, {}
    for compile_ in (False, True):
        try:
            run = _setup(recipe, channels_last=False, bf16=False, compile_=compile_)
            for _ in range(warmup):                    # compiling happens here, on the first calls
                run()
            runs[compile_] = run
        except Exception as err:                       # noqa: BLE001 (the failure is the measurement)
            errors[compile_] = f"{type(err).__name__}: {' '.join(str(err).split())[:500]}"
    rates = {compile_: [] for compile_ in runs}
    for _ in range(rounds):
        for compile_, run in runs.items():
            start = time.perf_counter()
            for _ in range(steps):
                run()
            rates[compile_].append(steps * recipe.batch_size / (time.perf_counter() - start))
    for compile_ in (False, True):
        row = {"benchmark": "diffusion_compile_throughput", "patch": recipe.unet.patch, "compile": compile_,
               "threads": threads, "batch": recipe.batch_size, "steps_per_round": steps, "rounds": rounds}
        if compile_ in errors:
            row["error"] = errors[compile_]
        else:
            row["images_per_s_median"] = round(sorted(rates[compile_])[len(rates[compile_]) // 2], 1)
            row["images_per_s_rounds"] = [round(r, 1) for r in rates[compile_]]
        yield {**row, **_load()}


@torch.no_grad()
def sampling(batch: int, threads: int, step_counts, chain_batch: int | None = None) -> list[dict]:
    torch.set_num_threads(threads)
    loaded = shipped.load_or_train("diffusion-openmoji32", progress=False)
    sched = diffusion.NoiseSchedule(loaded.recipe.schedule)
    shape = (batch, loaded.recipe.unet.channels, loaded.recipe.unet.image_size, loaded.recipe.unet.image_size)
    rows = []
    diffusion.sample(loaded.model, sched, (2, *shape[1:]), method="ddim", steps=2,
                     generator=torch.Generator().manual_seed(0))          # warm-up: first calls allocate
    for steps in step_counts:
        method = "ddpm" if steps == sched.T else "ddim"
        size = chain_batch if method == "ddpm" and chain_batch else batch
        start = time.perf_counter()
        diffusion.sample(loaded.model, sched, (size, *shape[1:]), method=method, steps=steps,
                         generator=torch.Generator().manual_seed(0))
        seconds = time.perf_counter() - start
        rows.append({"benchmark": "diffusion_sampling_throughput", "model": "diffusion-openmoji32",
                     "method": method, "steps": steps, "threads": threads, "batch": size,
                     "images_per_s": round(size / seconds, 2), "seconds_per_image": round(seconds / size, 4),
                     **_load()})
    return rows


PARTS = ("profile", "throughput", "compile", "sampling")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=20,
                        help="timed training steps per candidate (per round in the compile comparison)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--compile", action="store_true",
                        help="also time training with and without torch.compile (slow to start)")
    parser.add_argument("--sample-batch", type=int, default=16, help="images per DDIM sampling run")
    parser.add_argument("--chain-batch", type=int, default=4, help="images for the 1,000-step DDPM chain")
    parser.add_argument("--quick", action="store_true", help="skip the 1,000-step chain")
    parser.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS),
                        help="which measurements to run (default: all; 'compile' also needs --compile)")
    args = parser.parse_args()
    conditions = {"version": __version__, "torch": torch.__version__, "python": platform.python_version(),
                  "machine": platform.machine(), "cpu_threads_available": torch.get_num_threads(),
                  "cpu_count": os.cpu_count()}
    print(json.dumps({"benchmark": "conditions", **conditions, **_load()}), flush=True)
    recipe = diffusion.DiffusionRecipe()
    full_res = dataclasses.replace(recipe, unet=dataclasses.replace(recipe.unet, patch=1))
    if "profile" in args.parts:
        for r in (recipe, full_res):
            print(json.dumps(profile_step(r, threads=2, steps=5)), flush=True)
    if "throughput" in args.parts:
        for r in (recipe, full_res):
            for threads in (1, 2):
                for channels_last, bf16 in ((False, False), (True, False), (True, True)):
                    print(json.dumps(throughput(r, channels_last=channels_last, bf16=bf16, compile_=False,
                                                threads=threads, steps=args.steps, warmup=args.warmup)),
                          flush=True)
    if "compile" in args.parts and args.compile:
        for row in compile_comparison(recipe, threads=1, steps=args.steps, warmup=args.warmup):
            print(json.dumps(row), flush=True)
    if "sampling" in args.parts:
        counts = (10, 25, 50, 100) if args.quick else (10, 25, 50, 100, 1000)
        for row in sampling(args.sample_batch, threads=1, step_counts=counts, chain_batch=args.chain_batch):
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()

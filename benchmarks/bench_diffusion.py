"""Speed of the diffusion chapter's U-Net (``diffusion.DiffusionRecipe``) on OpenMoji 32x32.

Prints one JSON line per measurement:

* ``diffusion_step_profile``: where one training step's time goes (a ``torch.profiler`` run,
  operators grouped into convolutions, normalisation, attention, elementwise and the
  optimiser), for the recipe's U-Net and for the same U-Net without the pixel-unshuffle
  patch (``patch=1``, full 32x32 resolution inside);
* ``diffusion_training_throughput``: training images/s for the candidates the chapter had to
  choose between: patch 1 or 2, contiguous or channels-last memory, bf16 autocast on the
  CPU, and (with ``--compile``) ``torch.compile``, each on 1 and 2 threads;
* ``diffusion_sampling_throughput``: images/s of the shipped model's sampler at 10, 25, 50 and
  100 DDIM steps and the full 1,000-step DDPM chain (batch ``--sample-batch``).

    .venv/bin/python benchmarks/bench_diffusion.py [--steps 20] [--compile] [--quick]

Figures are measured, never asserted.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import platform
import time
from collections import defaultdict

import torch

from genart_utils import __version__, data, diffusion, shipped, training

GROUPS = (("convolution", ("conv",)), ("normalisation", ("group_norm", "native_group_norm", "norm")),
          ("attention", ("attention", "softmax", "bmm", "baddbmm")),
          ("optimiser", ("adam", "_foreach", "lerp")),
          ("linear", ("addmm", "mm", "linear")))


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
            "images_per_s": round(steps * recipe.batch_size / seconds, 1)}


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
                                       sorted(shares.items(), key=lambda kv: -kv[1])}}


@torch.no_grad()
def sampling(batch: int, threads: int, step_counts) -> list[dict]:
    torch.set_num_threads(threads)
    loaded = shipped.load_or_train("diffusion-openmoji32", progress=False)
    sched = diffusion.NoiseSchedule(loaded.recipe.schedule)
    shape = (batch, loaded.recipe.unet.channels, loaded.recipe.unet.image_size, loaded.recipe.unet.image_size)
    rows = []
    for steps in step_counts:
        method = "ddpm" if steps == sched.T else "ddim"
        start = time.perf_counter()
        diffusion.sample(loaded.model, sched, shape, method=method, steps=steps,
                         generator=torch.Generator().manual_seed(0))
        seconds = time.perf_counter() - start
        rows.append({"benchmark": "diffusion_sampling_throughput", "method": method, "steps": steps,
                     "threads": threads, "batch": batch, "images_per_s": round(batch / seconds, 2),
                     "seconds_per_image": round(seconds / batch, 4)})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=20, help="timed training steps per candidate")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--compile", action="store_true", help="also time torch.compile (slow to start)")
    parser.add_argument("--sample-batch", type=int, default=64)
    parser.add_argument("--quick", action="store_true", help="skip the 1,000-step chain")
    args = parser.parse_args()
    conditions = {"version": __version__, "torch": torch.__version__, "python": platform.python_version(),
                  "machine": platform.machine(), "cpu_threads_available": torch.get_num_threads()}
    print(json.dumps({"benchmark": "conditions", **conditions}), flush=True)
    recipe = diffusion.DiffusionRecipe()
    full_res = dataclasses.replace(recipe, unet=dataclasses.replace(recipe.unet, patch=1))
    for r in (recipe, full_res):
        print(json.dumps(profile_step(r, threads=2, steps=5)), flush=True)
    for r in (recipe, full_res):
        for threads in (1, 2):
            for channels_last, bf16 in ((False, False), (True, False), (True, True)):
                print(json.dumps(throughput(r, channels_last=channels_last, bf16=bf16, compile_=False,
                                            threads=threads, steps=args.steps, warmup=args.warmup)),
                      flush=True)
        if args.compile:
            print(json.dumps(throughput(r, channels_last=True, bf16=False, compile_=True, threads=2,
                                        steps=args.steps, warmup=args.warmup)), flush=True)
    counts = (10, 25, 50, 100) if args.quick else (10, 25, 50, 100, 1000)
    for row in sampling(args.sample_batch, threads=2, step_counts=counts):
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()

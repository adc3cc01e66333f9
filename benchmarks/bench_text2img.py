"""Speed of the text-to-image chapter's parts (``genart_utils.text2img``) on OpenMoji 32x32.

Prints one JSON line per measurement, each with the machine's load average
(``os.getloadavg()``, 1, 5 and 15 minutes) when it was taken:

* ``text2img_training_throughput``: training steps/s and examples/s of each part, timed
  inside the parts' own training functions (``latent.train_autoencoder``,
  ``clip.train_clip`` for the guide, evaluator and bag-of-words presets, and
  ``text2img.train_latent_diffusion`` on the shipped autoencoder and guide CLIP), over
  ``--steps`` steps after ``--warmup`` untimed ones;
* ``text2img_prompt_latency``: seconds from a prompt to a decoded 32x32 image with the
  latent-diffusion pipeline (``text2img.load_pipeline``: the shipped denoiser, or, when none
  ships, an untrained one of the recipe, which is as fast) at 25 and 50 DDIM steps with
  guidance (two U-Net evaluations per step), for one prompt and for a batch of
  ``--batch`` prompts, median of ``--repeats`` runs.

    .venv/bin/python benchmarks/bench_text2img.py [--steps 20] [--threads 1] [--parts training latency]

Figures are measured, never asserted.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import statistics
import time

import torch

from genart_utils import __version__, clip, diffusion, latent, shipped, text2img, training


def _load() -> dict:
    return {"loadavg_1_5_15": [round(v, 2) for v in os.getloadavg()]}


class StepClock:
    """A training callback that notes when each step ends."""

    def __init__(self):
        self.times: list[float] = []

    def __call__(self, step: int, history) -> None:
        self.times.append(time.perf_counter())

    def steps_per_second(self, warmup: int) -> float:
        timed = self.times[warmup:]
        return (len(timed) - 1) / (timed[-1] - timed[0])


def _short(recipe, steps: int):
    return dataclasses.replace(recipe, optim=dataclasses.replace(recipe.optim, steps=steps))


def training_throughput(steps: int, warmup: int) -> list[dict]:
    ldm = text2img.LatentDiffusionRecipe()
    parts = text2img.load_parts(ldm, progress=False)
    runs = {
        "autoencoder": (latent.AUTOENCODER_RECIPE, lambda r, cb: latent.train_autoencoder(r, progress=False, callbacks=[cb])),
        **{f"clip_{name}": (clip.clip_preset(name, steps=1500),
                            lambda r, cb: clip.train_clip(r, progress=False, callbacks=[cb]))
           for name in clip.CLIP_PRESETS},
        "latent_diffusion": (ldm, lambda r, cb: text2img.train_latent_diffusion(r, parts=parts, progress=False,
                                                                                 callbacks=[cb])),
    }
    out = []
    for part, (recipe, train) in runs.items():
        clock = StepClock()
        train(_short(recipe, warmup + steps), clock)
        rate = clock.steps_per_second(warmup)
        out.append({"bench": "text2img_training_throughput", "part": part, "batch_size": recipe.optim.batch_size,
                    "steps_per_s": round(rate, 3), "examples_per_s": round(rate * recipe.optim.batch_size, 1),
                    "timed_steps": steps, **_load()})
        print(json.dumps(out[-1]), flush=True)
    return out


def prompt_latency(batch: int, repeats: int) -> list[dict]:
    name = "ldm-openmoji32"
    if name in shipped.shipped_models():
        pipe, loaded = text2img.load_pipeline(name, progress=False)
        weights = "shipped"
    else:
        recipe = text2img.LatentDiffusionRecipe()
        ae, clip_model = text2img.load_parts(recipe, progress=False)
        denoiser = text2img.build_latent_diffusion(recipe).eval()
        denoiser.net.text.load_state_dict(clip_model.text.state_dict())
        pipe = text2img.TextToImage(ae, denoiser, diffusion.NoiseSchedule(recipe.schedule))
        weights = "untrained (no shipped denoiser yet)"
    out = []
    for steps in (25, 50):
        for n in (1, batch):
            prompts = ["red apple"] * n
            pipe(prompts, steps=steps, guidance=3.0)                     # warm-up
            times = []
            for seed in range(repeats):
                start = time.perf_counter()
                pipe(prompts, steps=steps, guidance=3.0, seed=seed)
                times.append(time.perf_counter() - start)
            median = statistics.median(times)
            out.append({"bench": "text2img_prompt_latency", "ddim_steps": steps, "prompts": n, "weights": weights,
                        "seconds": round(median, 4), "images_per_s": round(n / median, 2),
                        "repeats": repeats, **_load()})
            print(json.dumps(out[-1]), flush=True)
    return out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=20, help="timed training steps per part")
    parser.add_argument("--warmup", type=int, default=3, help="untimed training steps first")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batch", type=int, default=16, help="prompts per batch for the latency")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--parts", nargs="+", default=["training", "latency"], choices=["training", "latency"])
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(json.dumps({"bench": "text2img_setup", "genart_utils": __version__, "torch": torch.__version__,
                      "threads": args.threads, "machine": platform.processor() or platform.machine(),
                      **_load()}), flush=True)
    if "training" in args.parts:
        training_throughput(args.steps, args.warmup)
    if "latency" in args.parts:
        prompt_latency(args.batch, args.repeats)


if __name__ == "__main__":
    main()

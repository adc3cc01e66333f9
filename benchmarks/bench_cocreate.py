"""Latency of the co-creation tools (``genart_utils.cocreate``) with the shipped models.

Prints one JSON line per measurement, each with the machine's load average when it was
taken, the median of ``--repeats`` runs, for a batch of ``--batch`` images:

* ``sdedit``: :func:`cocreate.sdedit` with the pixel diffusion model
  (``diffusion-openmoji32``) at strengths 0.4 and 0.8 (DDIM steps in proportion, of
  ``--steps`` for a full-strength edit), and :meth:`text2img.TextToImage.edit` with the
  text-to-image pipeline at strength 0.6;
* ``inpaint``: :func:`cocreate.inpaint` of the centre quarter, without resampling and with
  4 repeats;
* ``evolution``: one generation (:func:`cocreate.next_generation` and decoding) for the DCGAN
  and for the diffusion model's DDIM noise at 20 steps, a population of 8.

    .venv/bin/python benchmarks/bench_cocreate.py [--threads 1] [--batch 8] [--steps 25]

Figures are measured, never asserted.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch

from genart_utils import __version__, cocreate, data, diffusion, gan, shipped, text2img


def _median_seconds(fn, repeats: int) -> float:
    fn()                                            # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _emit(kind: str, batch: int, seconds: float, **extra) -> None:
    print(json.dumps({"bench": kind, "batch": batch, "seconds": round(seconds, 4),
                      "seconds_per_image": round(seconds / batch, 4), **extra,
                      "loadavg_1_5_15": [round(v, 2) for v in os.getloadavg()],
                      "threads": torch.get_num_threads(), "version": __version__}), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    pixel = shipped.load_or_train("diffusion-openmoji32", progress=False)
    model, schedule = pixel.model, diffusion.NoiseSchedule(pixel.recipe.schedule)
    pipe, _ = text2img.load_pipeline(progress=False)
    G = shipped.load_or_train("dcgan-openmoji32", progress=False).model
    images = data.load_dataset("openmoji", "test", size=32).images[:args.batch]
    x0 = diffusion.to_model_range(cocreate.block_sketch(images))
    g = torch.Generator()

    for strength in (0.4, 0.8):
        s = _median_seconds(lambda: cocreate.sdedit(model, schedule, x0, strength, steps=args.steps, generator=g),
                            args.repeats)
        _emit("sdedit_pixel", args.batch, s, strength=strength, full_steps=args.steps)
    s = _median_seconds(lambda: pipe.edit(cocreate.block_sketch(images), ["red apple"] * args.batch, 0.6,
                                          steps=args.steps), args.repeats)
    _emit("sdedit_text_to_image", args.batch, s, strength=0.6, full_steps=args.steps, guidance=3.0)
    mask = cocreate.box_mask(32, 8, 8, 16, 16)
    for r in (1, 4):
        s = _median_seconds(lambda: cocreate.inpaint(model, schedule, diffusion.to_model_range(images), mask,
                                                     steps=args.steps, resample=r, generator=g), args.repeats)
        _emit("inpaint", args.batch, s, steps=args.steps, resample=r)
    z = torch.randn(8, G.config.latent_dim)
    s = _median_seconds(lambda: gan.sample(G, 8, z=cocreate.next_generation(z, [0, 1], generator=g)), args.repeats)
    _emit("evolution_dcgan", 8, s)
    x_T = torch.randn(8, 3, 32, 32)
    s = _median_seconds(lambda: diffusion.sample(model, schedule, (8, 3, 32, 32), method="ddim", steps=20,
                                                 x_T=cocreate.next_generation(x_T, [0, 1], generator=g)),
                        args.repeats)
    _emit("evolution_diffusion", 8, s, ddim_steps=20)


if __name__ == "__main__":
    main()

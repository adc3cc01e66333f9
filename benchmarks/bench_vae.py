"""Training throughput and held-out bounds of the convolutional VAE of notebooks/05_conv_vae.

For each profile's model (``vae.CONV_VAE_SIZES``, the dict the notebook reads, ``cpu`` and
``gpu`` profiles):

* throughput: training images per second of ``vae.make_train_step`` after a warm-up, on the
  CPU with one thread and with all of torch's threads, and on CUDA (with mixed precision)
  when a GPU is available (otherwise a ``skipped`` line);
* quality: the notebook's procedure for the profile's steps (train on 8/9 of the MNIST 5k
  training images binarised at 0.5, keep the checkpoint with the best validation negative
  ELBO, evaluated every ``eval_every`` steps, with ``training.keep_best``), then the negative
  ELBO and the IWAE bounds for k = 1, 10, 100, 1000 on the 500 binarised test images, in
  nats per image.

    .venv/bin/python benchmarks/bench_vae.py [--quality-steps N] [--no-quality] [--throughput-steps 60]

Prints one JSON line per measurement; figures are measured, never asserted.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from genart_utils import __version__, data, training, vae

# The sizes of the notebook's profiles: the same dict notebooks/05_conv_vae.ipynb reads.
PROFILES = vae.CONV_VAE_SIZES


def _common() -> dict:
    return {"genart_utils": __version__, "torch": torch.__version__,
            "machine": platform.processor() or platform.machine()}


def throughput(profile: str, device: torch.device, threads: int | None, steps: int = 60) -> dict:
    """Training images per second of one profile's model on ``device``."""
    spec = PROFILES[profile]
    if threads is not None:
        torch.set_num_threads(threads)
    x = data.load_mnist5k("train").images.to(device)
    model = vae.build_vae(spec["model"], device)
    opt = torch.optim.Adam(model.parameters(), lr=spec["model"].lr)
    step = vae.make_train_step(model, opt, device=device,
                               generator=torch.Generator(device=device).manual_seed(0))
    batches = training.minibatches(x, batch_size=spec["batch_size"])
    for _ in range(10):  # warm-up (allocator, kernel selection)
        step(next(batches))
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        step(next(batches))
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    return {"benchmark": "vae_train_throughput", "profile": profile, "device": device.type,
            "threads": torch.get_num_threads(), "batch_size": spec["batch_size"], "steps": steps,
            "images_per_s": round(steps * spec["batch_size"] / seconds, 1), **_common()}


def quality(profile: str, device: torch.device, steps: int | None = None) -> dict:
    """The notebook's training and evaluation, for the profile's steps unless ``steps``."""
    spec = PROFILES[profile]
    steps = spec["steps"] if steps is None else steps
    if steps < spec["eval_every"]:
        raise SystemExit(f"--quality-steps must be at least {spec['eval_every']} (the {profile} "
                         f"profile's eval_every), got {steps}")
    full = data.load_mnist5k("train")
    train_idx, val_idx = data.stratified_split(full.labels.numpy(), test_fraction=1 / 9, seed=1)
    x_train, x_val = full.images[train_idx], vae.binarize(full.images[val_idx])
    x_test = vae.binarize(data.load_mnist5k("test").images)
    model = vae.build_vae(spec["model"], device)
    opt = torch.optim.Adam(model.parameters(), lr=spec["model"].lr)
    history = training.History()
    step = vae.make_train_step(model, opt, device=device, history=history,
                               generator=torch.Generator(device=device).manual_seed(0))
    with tempfile.TemporaryDirectory() as tmp:
        best = Path(tmp) / "best.pt"
        callbacks = [vae.validation_callback(model, x_val.to(device), spec["eval_every"]),
                     training.keep_best(best, {"model": model}, "val_neg_elbo", config=model.config)]
        start = time.perf_counter()
        training.train(step, training.minibatches(x_train.to(device), batch_size=spec["batch_size"]),
                       steps, history=history, callbacks=callbacks, progress=False)
        train_s = time.perf_counter() - start
        extra = training.load_checkpoint(best, {"model": model}).extra
    start = time.perf_counter()
    scores = vae.evaluate(model, x_test, ks=(1, 10, 100, 1000), seed=0)
    return {"benchmark": "vae_heldout_nats", "profile": profile, "device": device.type,
            "threads": torch.get_num_threads(), "steps": steps, "best_step": extra["step"],
            "val_neg_elbo": round(extra["val_neg_elbo"], 2),
            **{f"test_{k}": round(v, 2) for k, v in scores.items()},
            "train_s": round(train_s, 1), "eval_s": round(time.perf_counter() - start, 1), **_common()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quality-steps", type=int, default=None,
                        help="training steps for the held-out numbers (default: the profile's)")
    parser.add_argument("--no-quality", action="store_true", help="only measure throughput")
    parser.add_argument("--throughput-steps", type=int, default=60, help="timed steps per CPU line")
    args = parser.parse_args()
    if args.throughput_steps < 1 or (args.quality_steps is not None and args.quality_steps < 1):
        parser.error("--throughput-steps and --quality-steps must be >= 1")
    np.random.seed(0)
    all_threads = torch.get_num_threads()

    for threads in sorted({1, all_threads}):
        print(json.dumps(throughput("cpu", torch.device("cpu"), threads, args.throughput_steps)), flush=True)
    if torch.cuda.is_available():
        print(json.dumps(throughput("gpu", torch.device("cuda"), None, steps=200)), flush=True)
    else:
        print(json.dumps({"benchmark": "vae_train_throughput", "profile": "gpu",
                          "skipped": "CUDA is not available"}), flush=True)

    if not args.no_quality:
        torch.set_num_threads(1)  # what the notebook uses on a CPU
        print(json.dumps(quality("cpu", torch.device("cpu"), args.quality_steps)), flush=True)
        if torch.cuda.is_available():
            print(json.dumps(quality("gpu", torch.device("cuda"), args.quality_steps)), flush=True)


if __name__ == "__main__":
    main()

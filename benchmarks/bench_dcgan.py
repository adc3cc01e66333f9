"""Training throughput of the DCGAN of notebooks/03_dcgan.ipynb, in images per second.

Times ``gan.make_train_step`` (one discriminator and one generator update per batch) on the
embedded MNIST 5k with the sizes of the notebook's ``cpu`` profile (``gan.DCGAN_SIZES``, the
dict the notebook reads: widths 32/32, batch 64), once with one CPU thread (what the notebook
uses) and once with PyTorch's default thread count, and with its ``gpu`` sizes (widths 64/64,
batch 128, mixed precision and channels_last) when CUDA is available; otherwise it says that
the GPU line was skipped.

    .venv/bin/python benchmarks/bench_dcgan.py [--steps 100] [--warmup 10]

Prints one JSON line per configuration; figures are measured, never asserted.
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import torch

from genart_utils import __version__, data, gan, runtime, training

# The sizes of the notebook's profiles: the same dict notebooks/03_dcgan.ipynb reads.
PROFILES = gan.DCGAN_SIZES


def measure(profile: str, device: torch.device, steps: int, warmup: int, threads: int | None) -> dict:
    sizes = PROFILES[profile]
    default_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        config = gan.DCGANConfig(g_width=sizes["g_width"], d_width=sizes["d_width"], seed=0)
        G, D = gan.build_dcgan(config, device)
        on_gpu = device.type == "cuda"
        if on_gpu:
            G, D = G.to(memory_format=torch.channels_last), D.to(memory_format=torch.channels_last)
        opt_g, opt_d = gan.adam_pair(G, D, config.lr, config.beta1)
        step = gan.make_train_step(G, D, opt_g, opt_d, device=device,
                                   generator=torch.Generator().manual_seed(1), channels_last=on_gpu)
        x = gan.to_tanh_range(data.load_mnist5k("train").images)
        if on_gpu:
            x = x.to(device)
        batches = training.minibatches(x, batch_size=sizes["batch_size"], seed=0)
        for _ in range(warmup):
            step(next(batches))
        if on_gpu:
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        for _ in range(steps):
            out = step(next(batches))   # .item() inside the step synchronises every step
        seconds = time.perf_counter() - start
        return {
            "benchmark": "dcgan_training_throughput", "profile": profile,
            "device": torch.cuda.get_device_name(device) if on_gpu else "cpu",
            "amp_dtype": str(runtime.amp_dtype(device)) if on_gpu else None,
            "channels_last": on_gpu, "threads": torch.get_num_threads(),
            "genart_utils": __version__, "torch": torch.__version__,
            "machine": platform.processor() or platform.machine(),
            "g_width": sizes["g_width"], "d_width": sizes["d_width"],
            "batch_size": sizes["batch_size"], "steps": steps,
            "steps_per_s": round(steps / seconds, 2),
            "images_per_s": round(steps * sizes["batch_size"] / seconds, 1),
            "last_loss_d": round(out["loss_d"], 4),
        }
    finally:
        torch.set_num_threads(default_threads)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=100, help="timed steps per configuration")
    parser.add_argument("--warmup", type=int, default=10, help="untimed steps first")
    args = parser.parse_args()
    if args.steps < 1 or args.warmup < 0:
        parser.error("--steps must be >= 1 and --warmup >= 0")

    cpu = torch.device("cpu")
    print(json.dumps(measure("cpu", cpu, args.steps, args.warmup, threads=1)))
    print(json.dumps(measure("cpu", cpu, args.steps, args.warmup, threads=None)))
    if torch.cuda.is_available():
        print(json.dumps(measure("gpu", torch.device("cuda"), args.steps, args.warmup, threads=None)))
    else:
        print(json.dumps({"benchmark": "dcgan_training_throughput", "profile": "gpu",
                          "skipped": "CUDA is not available on this machine"}))


if __name__ == "__main__":
    main()

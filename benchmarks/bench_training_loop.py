"""How much does the book's one training loop cost on top of the work it runs?

Trains the same small MLP classifier on the embedded MNIST 5k twice for the same number
of steps: once with a bare ``for`` loop, once through ``genart_utils.training.train``
(history, callbacks, progress bar). Also times loading the embedded dataset.

    .venv/bin/python benchmarks/bench_training_loop.py [--steps 600] [--batch-size 128]

Prints one JSON line; figures are measured, never asserted.
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import torch
from torch import nn

from genart_utils import __version__, data, runtime, training


def make_step(seed: int):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Flatten(), nn.Linear(784, 256), nn.ReLU(), nn.Linear(256, 10))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)

    def step(batch):
        x, y = batch
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return {"loss": loss.item()}

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--batch-size", type=int, default=128)
    args = parser.parse_args()

    data._mnist5k_arrays.cache_clear()
    with runtime.timer() as t_load:
        train_set = data.load_mnist5k("train")
    x, y = train_set.images, train_set.labels

    # Warm-up, then the two timed runs on identical work.
    bare_step = make_step(0)
    for _, batch in zip(range(20), training.minibatches(x, y, batch_size=args.batch_size)):
        bare_step(batch)
    bare_step = make_step(0)
    start = time.perf_counter()
    for _, batch in zip(range(args.steps), training.minibatches(x, y, batch_size=args.batch_size)):
        bare_step(batch)
    bare = time.perf_counter() - start

    loop_step = make_step(0)
    start = time.perf_counter()
    history = training.train(loop_step, training.minibatches(x, y, batch_size=args.batch_size),
                             args.steps, callbacks=[training.every(100, lambda s, h: None)])
    looped = time.perf_counter() - start

    print(json.dumps({
        "benchmark": "training_loop_overhead",
        "genart_utils": __version__, "torch": torch.__version__,
        "machine": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
        "steps": args.steps, "batch_size": args.batch_size,
        "load_mnist5k_s": round(t_load["seconds"], 3),
        "bare_steps_per_s": round(args.steps / bare, 1),
        "loop_steps_per_s": round(args.steps / looped, 1),
        "loop_overhead_pct": round(100 * (looped - bare) / bare, 2),
        "final_loss": round(history.last("loss"), 4),
    }))


if __name__ == "__main__":
    main()

"""Training throughput and quality of the folk-tune GPT (notebooks/07_gpt_folk_tunes).

For each model size of the notebook's profiles (cpu; gpu only when CUDA is available):

1. throughput: characters (tokens) per second of training steps after a warm-up, and an
   estimate of the achieved FLOP/s as 6 x parameters x tokens/s (the usual estimate of the
   forward and backward matrix products; attention scores add a little more);
2. quality after a fixed wall-clock budget: the number of steps that fit the budget at the
   measured speed is trained with the notebook's schedule (warm-up, cosine decay), then the
   whole validation split is scored in bits per character, next to the best Kneser-Ney
   n-gram baseline of orders 1..10 fitted on the same split.

    .venv/bin/python benchmarks/bench_gpt.py [--budget 120] [--configs cpu,gpu] [--threads N]

Prints one JSON line per config; figures are measured, never asserted.
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import torch

from genart_utils import __version__, gpt, runtime, text

# The model and batch sizes of notebooks/07_gpt_folk_tunes.ipynb's cpu and gpu profiles.
SIZES = {
    "cpu": dict(n_layer=3, n_head=4, n_embd=96, block_size=128, batch_size=8),
    "gpu": dict(n_layer=6, n_head=8, n_embd=256, block_size=256, batch_size=64),
}


def best_ngram_bits(train_ids: torch.Tensor, valid_ids: torch.Tensor, vocab_size: int) -> tuple[int, float]:
    best = (0, float("inf"))
    for order in range(1, 11):
        model = text.NGramModel(text.NGramConfig(order=order), vocab_size).fit(train_ids)
        bits = text.bits_per_char(model.nll(valid_ids))
        if bits < best[1]:
            best = (order, bits)
    return best


def run_config(name: str, corpus: text.Corpus, budget: float, device: torch.device) -> dict:
    sizes = SIZES[name]
    config = gpt.GPTConfig(vocab_size=corpus.vocab.size, block_size=sizes["block_size"],
                           n_layer=sizes["n_layer"], n_head=sizes["n_head"], n_embd=sizes["n_embd"],
                           attention="sdpa", seed=0)
    train_ids, valid_ids = corpus.ids("train"), corpus.ids("valid")
    tokens_per_step = sizes["batch_size"] * sizes["block_size"]
    peak_lr = 0.75 / config.n_embd                      # as in the notebook

    def make(steps: int):
        model = gpt.GPT(config).to(device)
        tc = gpt.TrainConfig(steps=steps, batch_size=sizes["batch_size"], lr=peak_lr,
                             min_lr=peak_lr / 10, warmup_steps=max(1, steps // 20))
        opt = gpt.configure_optimizer(model, tc)
        step = gpt.make_train_step(gpt.maybe_compile(model, device), opt,
                                   gpt.make_scheduler(opt, tc), device)
        return model, step, text.random_windows(train_ids, config.block_size, tc.batch_size, seed=0)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    # 1. Throughput, after warm-up steps (which include any compilation).
    model, step, batches = make(10_000)
    for _ in range(5):
        step(next(batches))
    sync()
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < min(30.0, budget / 4) or n < 5:
        step(next(batches))
        n += 1
    sync()
    seconds = time.perf_counter() - start
    tokens_per_s = n * tokens_per_step / seconds
    n_params = gpt.num_parameters(model)

    # 2. Quality after a wall-clock budget: as many steps as fit at the measured speed.
    steps = max(10, int(budget * tokens_per_s / tokens_per_step))
    model, step, batches = make(steps)
    start = time.perf_counter()
    for _ in range(steps):
        step(next(batches))
    sync()
    train_seconds = time.perf_counter() - start
    valid_bits = text.bits_per_char(gpt.evaluate_nll(model, valid_ids, batch_size=64))
    return {
        "config": name, "device": str(device), "threads": torch.get_num_threads(),
        "params": n_params, "tokens_per_step": tokens_per_step,
        "tokens_per_s": round(tokens_per_s), "flop_per_s_6N": float(f"{6 * n_params * tokens_per_s:.3e}"),
        "budget_s": budget, "steps": steps, "train_s": round(train_seconds, 1),
        "train_tokens": steps * tokens_per_step, "valid_bits_per_char": round(valid_bits, 4),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget", type=float, default=120.0, help="training seconds per config")
    parser.add_argument("--configs", default="cpu,gpu", help="comma-separated: cpu, gpu")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    runtime.seed_everything(0)
    corpus = text.load_corpus("folk", valid_fraction=0.05, seed=0)
    order, ngram_bits = best_ngram_bits(corpus.ids("train"), corpus.ids("valid"), corpus.vocab.size)
    common = {"genart_utils": __version__, "torch": torch.__version__, "python": platform.python_version(),
              "best_ngram": {"order": order, "smoothing": "kneser-ney", "valid_bits_per_char": round(ngram_bits, 4)}}
    for name in args.configs.split(","):
        name = name.strip()
        if name not in SIZES:
            raise SystemExit(f"unknown config {name!r}; choose from {sorted(SIZES)}")
        if name == "gpu" and not torch.cuda.is_available():
            print(json.dumps({"config": "gpu", "skipped": "CUDA is not available", **common}))
            continue
        device = torch.device("cuda") if name == "gpu" else torch.device("cpu")
        print(json.dumps({**run_config(name, corpus, args.budget, device), **common}), flush=True)


if __name__ == "__main__":
    main()

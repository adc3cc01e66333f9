"""Training throughput and quality of the folk-tune GPT (notebooks/07_gpt_folk_tunes).

For each model size of the notebook's profiles (cpu; gpu only when CUDA is available):

1. throughput: characters (tokens) per second of training steps after a warm-up, and an
   estimate of the achieved FLOP/s as 6 x parameters x tokens/s (the usual estimate of the
   forward and backward matrix products; attention scores add a little more);
2. quality after a fixed wall-clock budget: the number of steps that fit the budget at the
   measured speed is trained with the notebook's schedule (warm-up, cosine decay), then the
   whole validation split is scored in bits per character, next to the best Kneser-Ney
   n-gram baseline of orders 1..max_order fitted on the training split.

The sizes are ``gpt.FOLK_SIZES``, the dict the notebook reads.

With ``--sampling``, it measures instead how fast the music-token model of
notebooks/07b_tunes_that_scan samples tunes, with and without the metre constraint
(``gpt.generate_texts(..., constrain=...)``): the notebook's model (``gpt.SCAN_SIZES``,
``gpt.matched_music_vocab``, loaded from the checkpoint the notebook writes, or trained
with the notebook's recipe if it is missing, which takes as long as in the notebook), its
prompts (headers of validation tunes with a metre) and lengths, at temperature 1. It
reports tunes and tokens per second and the 1-minute load average before and after
(the constraint runs in Python on one core, so other work on the machine slows it).

    .venv/bin/python benchmarks/bench_gpt.py [--budget 120] [--configs cpu,gpu] [--threads N] [--max-order N]
    .venv/bin/python benchmarks/bench_gpt.py --sampling [--configs cpu] [--threads 1] [--n-tunes 100]

Prints one JSON line per config; figures are measured, never asserted.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

import torch

from genart_utils import __version__, gpt, runtime, text

# The sizes of the notebook's profiles: the same dict notebooks/07_gpt_folk_tunes.ipynb reads.
SIZES = {name: gpt.FOLK_SIZES[name] for name in ("cpu", "gpu")}


def best_ngram_bits(train_ids: torch.Tensor, valid_ids: torch.Tensor, vocab_size: int,
                    max_order: int) -> tuple[int, float]:
    best = (0, float("inf"))
    for order in range(1, max_order + 1):
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
        step = gpt.make_train_step(gpt.maybe_compile(model, device), opt, device=device,
                                   scheduler=gpt.make_scheduler(opt, tc))
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


def run_sampling(name: str, corpus: text.Corpus, n_tunes: int | None, device: torch.device) -> list[dict]:
    """Tunes per second of the notebook 07b music-token model, without and with the constraint."""
    from genart_utils import music

    sizes, scan = gpt.FOLK_SIZES[name], gpt.SCAN_SIZES[name]
    char_config = gpt.GPTConfig(vocab_size=corpus.vocab.size, block_size=sizes["block_size"],
                                n_layer=sizes["n_layer"], n_head=sizes["n_head"], n_embd=sizes["n_embd"],
                                attention="sdpa", seed=0)
    vocab, config = gpt.matched_music_vocab(corpus.train, char_config, scan["music_n_embd"])
    monitor = "\n".join(corpus.valid[:: sizes["monitor_every"]])
    trained = gpt.train_folk_model(vocab, corpus.text("train"), monitor, config,
                                   gpt.folk_train_config(sizes, config.n_embd),
                                   name=f"gpt_folk_music_{name}.pt", eval_every=sizes["eval_every"],
                                   device=device, progress=False)
    with_metre = []
    for tune in corpus.valid:
        fields, _ = music.split_header(tune)
        try:
            if music.parse_metre(fields.get("M", "none")) is not None:
                with_metre.append(f"M:{fields['M']}\nL:{fields['L']}\nK:{fields['K']}\n")
        except ValueError:
            continue
    n = n_tunes or scan["n_tunes"]
    prompts = with_metre[:: max(1, len(with_metre) // n)][:n]
    rows = []
    for constrain in (False, True):
        load_before = os.getloadavg()[0]
        start = time.perf_counter()
        texts = gpt.generate_texts(trained.model, vocab, prompts, scan["max_new_tokens"], temperature=1.0,
                                   seed=0, constrain=constrain)
        seconds = time.perf_counter() - start
        tokens = sum(len(vocab.encode(t)) for t in texts)
        rows.append({
            "benchmark": "sampling", "config": name, "device": str(device), "threads": torch.get_num_threads(),
            "constrain": constrain, "tunes": len(prompts), "max_new_tokens": scan["max_new_tokens"],
            "seconds": round(seconds, 2), "tunes_per_s": round(len(prompts) / seconds, 2),
            "tokens_per_s": round(tokens / seconds), "params": gpt.num_parameters(trained.model),
            "model_loaded": trained.loaded, "load_1min_before": round(load_before, 2),
            "load_1min_after": round(os.getloadavg()[0], 2),
        })
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget", type=float, default=120.0, help="training seconds per config")
    parser.add_argument("--configs", default="cpu,gpu", help="comma-separated: cpu, gpu")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--max-order", type=int, default=None,
                        help="highest n-gram order of the baseline (default: the profiles' max_order)")
    parser.add_argument("--sampling", action="store_true",
                        help="measure tunes per second with and without the metre constraint instead")
    parser.add_argument("--n-tunes", type=int, default=None,
                        help="with --sampling: prompts per condition (default: the profile's n_tunes)")
    args = parser.parse_args()
    names = [name.strip() for name in args.configs.split(",")]
    unknown = [name for name in names if name not in SIZES]
    if unknown:
        parser.error(f"unknown config {unknown[0]!r} in --configs; choose from {sorted(SIZES)}")
    if args.budget <= 0 or (args.max_order is not None and args.max_order < 1):
        parser.error("--budget must be > 0 and --max-order >= 1")
    if args.threads:
        torch.set_num_threads(args.threads)
    runtime.seed_everything(0)
    corpus = text.load_corpus("folk", valid_fraction=0.05, seed=0)
    if args.sampling:
        common = {"genart_utils": __version__, "torch": torch.__version__, "python": platform.python_version()}
        for name in names:
            if name == "gpu" and not torch.cuda.is_available():
                print(json.dumps({"benchmark": "sampling", "config": "gpu", "skipped": "CUDA is not available",
                                  **common}))
                continue
            device = torch.device("cuda") if name == "gpu" else torch.device("cpu")
            for row in run_sampling(name, corpus, args.n_tunes, device):
                print(json.dumps({**row, **common}), flush=True)
        return
    max_order = args.max_order or max(SIZES[name]["max_order"] for name in names)
    order, ngram_bits = best_ngram_bits(corpus.ids("train"), corpus.ids("valid"), corpus.vocab.size,
                                        max_order)
    common = {"genart_utils": __version__, "torch": torch.__version__, "python": platform.python_version(),
              "best_ngram": {"order": order, "max_order": max_order, "smoothing": "kneser-ney",
                             "valid_bits_per_char": round(ngram_bits, 4)}}
    for name in names:
        if name == "gpu" and not torch.cuda.is_available():
            print(json.dumps({"config": "gpu", "skipped": "CUDA is not available", **common}))
            continue
        device = torch.device("cuda") if name == "gpu" else torch.device("cpu")
        print(json.dumps({**run_config(name, corpus, args.budget, device), **common}), flush=True)


if __name__ == "__main__":
    main()

"""Resuming a run: stop at step k, checkpoint, rebuild everything from the checkpoint, finish.

For each model family the resumed run must log exactly the numbers of one uninterrupted run
(the same floats, compared with ==), and the best checkpoint kept by ``training.keep_best``
must be the uninterrupted run's: a resumed run never overwrites it with a worse model.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import torch
from torch import nn

from genart_utils import data, gan, gpt, text, training, vae


@dataclass
class Run:
    """Everything one training run needs, built fresh from a history and a seed."""

    modules: dict[str, Any]                   # models, optimisers, scheduler: all checkpointed
    step: Callable
    batches: Callable[[int], Iterator]        # the batches from a given step on
    generator: torch.Generator                # the run's only source of noise
    history: training.History
    config: Any
    callbacks: list = field(default_factory=list)


def check_resume(make_run: Callable[[training.History, int], Run], total: int, k: int, key: str,
                 tmp_path) -> None:
    """Run ``total`` steps at once, and ``k`` steps + checkpoint + a resume into objects built
    with another seed (so that only the checkpoint can make them agree); compare both."""

    def train(run: Run, steps: int, best: str) -> training.History:
        keep = training.keep_best(tmp_path / best, run.modules, key, config=run.config)

        def holds_the_best(step: int, history: training.History) -> None:   # after every step
            assert training.load_checkpoint(tmp_path / best).extra[key] == min(history.records[key][1])

        return training.train(run.step, run.batches(run.history.step), steps, history=run.history,
                              callbacks=[*run.callbacks, keep, holds_the_best], progress=False)

    full = train(make_run(training.History(), 0), total, "full.pt")

    first = make_run(training.History(), 0)
    train(first, k, "resumed.pt")
    assert first.history.step == k
    training.save_checkpoint(tmp_path / "at_k.pt", first.modules, config=first.config,
                             history=first.history, extra={"generator": first.generator.get_state()})
    del first

    stored = training.load_checkpoint(tmp_path / "at_k.pt")          # the history first
    second = make_run(stored.history, 1)
    training.load_checkpoint(tmp_path / "at_k.pt", second.modules)
    second.generator.set_state(stored.extra["generator"])
    resumed = train(second, total, "resumed.pt")

    assert resumed.step == full.step == total
    assert resumed.records == full.records                            # every logged float, exactly
    # The run got worse right after step k, so a best value kept in a closure (reset to
    # infinity by the resume) would have overwritten the best checkpoint with a worse model.
    values = full.records[key][1]
    assert values[k] > min(values[:k]), "choose k where the value gets worse right after it"

    def best(name: str) -> tuple[dict, list[torch.Tensor]]:
        run = make_run(training.History(), 2)
        extra = training.load_checkpoint(tmp_path / name, run.modules).extra
        return extra, [t for m in run.modules.values() if isinstance(m, nn.Module)
                       for t in m.state_dict().values()]

    (extra_full, weights_full), (extra_resumed, weights_resumed) = best("full.pt"), best("resumed.pt")
    assert extra_full == extra_resumed and extra_full[key] == min(values)
    assert all(torch.equal(a, b) for a, b in zip(weights_full, weights_resumed))


def test_dcgan_resumes_exactly(tmp_path):
    x = gan.to_tanh_range(data.load_mnist5k("train").images[:64])

    def make_run(history: training.History, seed: int) -> Run:
        config = gan.DCGANConfig(latent_dim=8, g_width=4, d_width=4, seed=seed)
        G, D = gan.build_dcgan(config)
        opt_g, opt_d = gan.adam_pair(G, D, config.lr, config.beta1)
        generator = torch.Generator().manual_seed(100 + seed)
        step = gan.make_train_step(G, D, opt_g, opt_d, generator=generator)
        return Run({"generator": G, "discriminator": D, "opt_g": opt_g, "opt_d": opt_d}, step,
                   lambda start: training.minibatches(x, batch_size=16, seed=0, start=start),
                   generator, history, config)

    check_resume(make_run, total=10, k=4, key="loss_g", tmp_path=tmp_path)


def test_vae_resumes_exactly_in_the_middle_of_the_kl_warm_up(tmp_path):
    images = data.load_mnist5k("train").images
    x, x_val = images[:64], vae.binarize(images[-32:])

    def make_run(history: training.History, seed: int) -> Run:
        config = vae.VAEConfig(latent_dim=4, width=4, hidden=16, lr=3e-3, kl_warmup_steps=20,
                               binarization="dynamic", seed=seed)
        model = vae.build_vae(config)
        opt = torch.optim.Adam(model.parameters(), lr=config.lr)
        generator = torch.Generator().manual_seed(100 + seed)
        step = vae.make_train_step(model, opt, generator=generator, history=history)
        return Run({"model": model, "optimizer": opt}, step,
                   lambda start: training.minibatches(x, batch_size=16, seed=0, start=start),
                   generator, history, config, [vae.validation_callback(model, x_val, 3)])

    check_resume(make_run, total=12, k=7, key="neg_elbo", tmp_path=tmp_path)


def test_gpt_resumes_exactly_with_its_schedule_and_dropout(tmp_path):
    ids = torch.randint(0, 7, (300,), generator=torch.Generator().manual_seed(0))
    tc = gpt.TrainConfig(steps=12, batch_size=4, lr=1e-2, min_lr=1e-3, warmup_steps=3)

    def make_run(history: training.History, seed: int) -> Run:
        config = gpt.GPTConfig(vocab_size=7, block_size=16, n_layer=1, n_head=2, n_embd=16,
                               dropout=0.1, seed=seed)
        model = gpt.GPT(config)
        opt = gpt.configure_optimizer(model, dataclasses.replace(tc, lr=tc.lr * (1 + seed)))
        scheduler = gpt.make_scheduler(opt, tc)
        generator = torch.Generator().manual_seed(100 + seed)
        step = gpt.make_train_step(model, opt, generator=generator, scheduler=scheduler,
                                   grad_clip=tc.grad_clip)
        return Run({"model": model, "optimizer": opt, "scheduler": scheduler}, step,
                   lambda start: text.random_windows(ids, 16, tc.batch_size, seed=0, start=start),
                   generator, history, config)

    check_resume(make_run, total=tc.steps, k=4, key="loss", tmp_path=tmp_path)

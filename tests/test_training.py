from dataclasses import dataclass

import pytest
import torch
from torch import nn

from genart_utils import training


@dataclass(frozen=True)
class TinyConfig:
    width: int = 4
    lr: float = 0.05
    sizes: tuple = (3, 1)


def _problem(seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(64, 3, generator=g)
    y = x @ torch.tensor([[1.5], [-2.0], [0.5]]) + 0.3
    return x, y


def _model_and_step(cfg=TinyConfig()):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, cfg.width), nn.Tanh(), nn.Linear(cfg.width, 1))
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)

    def step(batch):
        x, y = batch
        loss = nn.functional.mse_loss(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        return {"loss": loss.item(), "scale": torch.tensor(2.0)}

    return model, opt, step


def test_loop_trains_a_tiny_model_and_records_floats():
    x, y = _problem()
    model, _, step = _model_and_step()
    history = training.train(step, training.minibatches(x, y, batch_size=16), steps=300, progress=False)
    steps, losses = history.series("loss")
    assert history.step == 300 and steps.tolist() == list(range(1, 301))
    assert all(type(v) is float for v in history.records["scale"][1])
    assert losses[-20:].mean() < 0.05 * losses[:5].mean()


def test_callbacks_fire_every_n_steps():
    x, y = _problem()
    _, _, step = _model_and_step()
    seen = []
    training.train(step, training.minibatches(x, y, batch_size=8), steps=10, progress=False,
                   callbacks=[training.every(4, lambda s, h: seen.append((s, len(h.records["loss"][1]))))])
    assert seen == [(4, 4), (8, 8)]


def test_minibatches_cover_each_epoch_and_resume_exactly():
    x = torch.arange(10)
    first = [b for _, (b,) in zip(range(6), training.minibatches(x, batch_size=3, seed=5))]
    epoch0 = torch.cat(first[:3])
    assert sorted(epoch0.tolist()) == sorted(set(epoch0.tolist())) and len(epoch0) == 9
    resumed = [b for _, (b,) in zip(range(2), training.minibatches(x, batch_size=3, seed=5, start=4))]
    assert all(torch.equal(a, b) for a, b in zip(first[4:], resumed))
    assert not torch.equal(torch.cat(first[:3]), torch.cat(first[3:]))  # a new order each epoch
    with pytest.raises(ValueError, match="batch_size"):
        next(training.minibatches(x, batch_size=11))


def test_non_finite_values_stop_the_loop_with_the_step():
    def step(batch):
        return {"loss": float("nan") if batch[0] == 2 else 1.0}

    with pytest.raises(FloatingPointError, match="step 3: loss became nan"):
        training.train(step, iter([(0,), (1,), (2,), (3,)]), steps=4, progress=False)


def test_running_out_of_batches_is_explained():
    with pytest.raises(ValueError, match="batches ran out after step 2"):
        training.train(lambda b: {"loss": 0.0}, [1, 2], steps=3, progress=False)


def test_checkpoint_round_trip(tmp_path):
    cfg = TinyConfig(width=5)
    x, y = _problem()
    model, opt, step = _model_and_step(cfg)
    history = training.train(step, training.minibatches(x, y, batch_size=16), 20, progress=False)
    path = training.save_checkpoint(tmp_path / "ckpt" / "m.pt", {"model": model, "opt": opt},
                                    config=cfg, history=history, extra={"note": "hi"})
    assert [p.name for p in path.parent.iterdir()] == ["m.pt"]  # no temporary file left
    raw = torch.load(path, weights_only=True)  # plain data only
    assert raw["version"] and raw["config_type"] == "TinyConfig"

    fresh, fresh_opt, _ = _model_and_step(cfg)
    with torch.no_grad():
        for p in fresh.parameters():
            p.zero_()
    ckpt = training.load_checkpoint(path, {"model": fresh, "opt": fresh_opt}, config_type=TinyConfig)
    assert ckpt.config == cfg and ckpt.extra == {"note": "hi"}
    assert ckpt.history.to_dict() == history.to_dict()
    assert torch.equal(fresh(x), model(x))
    with pytest.raises(TypeError, match="holds a TinyConfig config"):
        training.load_checkpoint(path, config_type=dict)
    with pytest.raises(KeyError, match="no state for 'critic'"):
        training.load_checkpoint(path, {"critic": fresh})


def test_resume_from_checkpoint_continues_the_same_run(tmp_path):
    x, y = _problem()
    model, _, step = _model_and_step()
    straight = training.train(step, training.minibatches(x, y, batch_size=16, seed=1), 40, progress=False)

    model2, opt2, step2 = _model_and_step()
    h = training.train(step2, training.minibatches(x, y, batch_size=16, seed=1), 25, progress=False)
    training.save_checkpoint(tmp_path / "c.pt", {"model": model2, "opt": opt2}, history=h)

    model3, opt3, step3 = _model_and_step()
    ckpt = training.load_checkpoint(tmp_path / "c.pt", {"model": model3, "opt": opt3})
    resumed = training.train(step3, training.minibatches(x, y, batch_size=16, seed=1, start=ckpt.history.step),
                             40, history=ckpt.history, progress=False)
    assert resumed.step == 40
    assert resumed.series("loss")[0].tolist() == list(range(1, 41))
    torch.testing.assert_close(resumed.series("loss")[1], straight.series("loss")[1], rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(model3(x), model(x))


def test_loading_something_else_is_refused(tmp_path):
    torch.save({"weights": torch.zeros(2)}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not a genart_utils checkpoint"):
        training.load_checkpoint(tmp_path / "other.pt")
    with pytest.raises(FileNotFoundError):
        training.load_checkpoint(tmp_path / "missing.pt")

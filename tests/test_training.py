from dataclasses import dataclass
from pathlib import Path

import numpy as np
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


def test_history_round_trips_through_a_dict_and_explains_missing_keys():
    h = training.History()
    assert training.History.from_dict(h.to_dict()) == h
    h.log(1, {"loss": 2.5, "acc": 1})
    h.log(3, {"loss": 0.5})
    h.step = 3
    back = training.History.from_dict(h.to_dict())
    assert back == h and back.last("loss") == 0.5 and back.series("loss")[0].tolist() == [1, 3]
    back.log(4, {"loss": 0.1})
    assert h.series("loss")[1].tolist() == [2.5, 0.5]  # a copy, not a view of the same lists
    with pytest.raises(KeyError, match="nothing logged under 'val'"):
        h.last("val")


# ------------------------------------------------------------------ keep_best


def _run_keep_best(path, values, *, history=None, mode="min", marker=0.0):
    """Feed a keep_best callback the steps of ``values`` (None: "val" not logged)."""
    model = nn.Linear(1, 1)
    with torch.no_grad():
        model.weight.fill_(marker)
    callback = training.keep_best(path, {"model": model}, "val", mode=mode, config=TinyConfig(),
                                  extra={"run": "a"})
    history = history or training.History()
    start = history.step
    for i, v in enumerate(values):
        history.step = start + i + 1
        history.log(history.step, {"loss": 1.0} if v is None else {"loss": 1.0, "val": v})
        callback(history.step, history)
    return history


def _saved(path):
    model = nn.Linear(1, 1)
    ckpt = training.load_checkpoint(path, {"model": model}, config_type=TinyConfig)
    return ckpt.extra, model.weight.item()


def test_keep_best_saves_only_strict_improvements(tmp_path, monkeypatch):
    path = tmp_path / "best.pt"
    saves = []
    save = training.save_checkpoint
    monkeypatch.setattr(training, "save_checkpoint",
                        lambda *a, **k: saves.append(k["extra"]["step"]) or save(*a, **k))
    _run_keep_best(path, [3.0, None, 2.0, 2.0, 2.5, float("nan"), 1.0, None])
    assert saves == [1, 3, 7]  # not the tie at 4, the worse 5, the NaN, or steps without "val"
    extra, _ = _saved(path)
    assert extra == {"step": 7, "val": 1.0, "run": "a"}
    assert training.load_checkpoint(path).history.step == 7  # the history at the best step


def test_keep_best_mode_max_and_bad_mode(tmp_path):
    path = tmp_path / "best.pt"
    _run_keep_best(path, [0.1, 0.5, 0.3], mode="max")
    assert _saved(path)[0]["step"] == 2
    with pytest.raises(ValueError, match="mode must be 'min' or 'max'"):
        training.keep_best(path, {}, "val", mode="lowest")


def test_keep_best_on_a_resumed_run_never_overwrites_a_better_checkpoint(tmp_path):
    path = tmp_path / "best.pt"
    first = _run_keep_best(path, [2.0, 1.0, 3.0], marker=1.0)  # best: 1.0 at step 2
    resumed = training.History.from_dict(first.to_dict())        # as loaded from a checkpoint
    _run_keep_best(path, [1.5, 1.2], history=resumed, marker=2.0)
    assert _saved(path) == ({"step": 2, "val": 1.0, "run": "a"}, 1.0)
    _run_keep_best(path, [0.5], history=resumed, marker=3.0)
    assert _saved(path) == ({"step": 6, "val": 0.5, "run": "a"}, 3.0)


def test_keep_best_extra_may_be_computed_at_save_time(tmp_path):
    g = torch.Generator().manual_seed(0)
    model = nn.Linear(1, 1)
    callback = training.keep_best(tmp_path / "b.pt", {"model": model}, "val",
                                  extra=lambda: {"generator": g.get_state()})
    h = training.History(step=1)
    h.log(1, {"val": 1.0})
    torch.rand(3, generator=g)
    callback(1, h)
    assert torch.equal(training.load_checkpoint(tmp_path / "b.pt").extra["generator"], g.get_state())


# ------------------------------------------------------------- paths and shapes


def test_checkpoint_path_uses_the_environment_or_the_data_home(tmp_path, monkeypatch):
    monkeypatch.setenv("GENART_CHECKPOINTS", str(tmp_path / "ck"))
    assert training.checkpoint_path("dcgan.pt") == tmp_path / "ck" / "dcgan.pt"
    assert (tmp_path / "ck").is_dir()
    monkeypatch.delenv("GENART_CHECKPOINTS")
    monkeypatch.setenv("GENART_DATA", str(tmp_path / "data"))
    assert training.checkpoint_path("vae.pt") == tmp_path / "data" / "checkpoints" / "vae.pt"
    assert (tmp_path / "data" / "checkpoints").is_dir()
    for bad in ["", "..", "a/b.pt", "../x.pt", "a\\b.pt", 3]:
        with pytest.raises(ValueError, match="plain file name"):
            training.checkpoint_path(bad)


def test_layer_shapes_match_the_arithmetic_and_leave_the_model_unchanged():
    net = nn.Sequential(nn.Conv2d(1, 4, 4, 2, 1), nn.BatchNorm2d(4), nn.ReLU(),
                        nn.Flatten(), nn.Linear(4 * 14 * 14, 3))
    before = net.state_dict()
    before = {k: v.clone() for k, v in before.items()}
    shapes = training.layer_shapes(net, torch.randn(5, 1, 28, 28),
                                   {"conv": net[0], "flat": net[3], "out": net[4]})
    assert shapes == {"conv": (5, 4, 14, 14), "flat": (5, 784), "out": (5, 3)}  # (28 + 2 - 4) // 2 + 1
    assert all(torch.equal(v, net.state_dict()[k]) for k, v in before.items())  # BN stats unmoved
    assert net.training and net[1].training
    assert all(not m._forward_hooks for m in net.modules())  # hooks removed


def test_layer_shapes_tuple_outputs_and_errors():
    lstm = nn.LSTM(3, 7, batch_first=True)
    model = nn.Sequential(lstm)
    assert training.layer_shapes(lstm, (torch.zeros(2, 5, 3),), {"lstm": lstm}) == {"lstm": (2, 5, 7)}
    with pytest.raises(ValueError, match=r"parts\['other'\] is not a submodule"):
        training.layer_shapes(model, torch.zeros(2, 5, 3), {"other": nn.ReLU()})

    class Skip(nn.Module):
        def __init__(self):
            super().__init__()
            self.used, self.unused = nn.Linear(3, 3), nn.Linear(3, 3)

        def forward(self, x):
            return self.used(x)

    skip = Skip()
    with pytest.raises(ValueError, match=r"\['unused'\] did not run"):
        training.layer_shapes(skip, torch.zeros(1, 3), {"unused": skip.unused})
    assert all(not m._forward_hooks for m in skip.modules())


# ------------------------------------------------------------- checkpoint errors


def _good_checkpoint(path):
    model = nn.Linear(2, 2)
    training.save_checkpoint(path, {"model": model}, config=TinyConfig())
    return path


@pytest.mark.parametrize("damage, reason", [
    ("empty", "is empty"),
    ("truncated", "truncated or not a checkpoint"),
    ("random", "cannot be loaded with weights_only=True|truncated or not a checkpoint"),
    ("pickle", r"cannot be loaded with weights_only=True \(Unsupported global: GLOBAL pathlib"),
])
def test_unreadable_files_raise_one_error_naming_the_file(tmp_path, damage, reason):
    path = _good_checkpoint(tmp_path / "c.pt")
    data = path.read_bytes()
    if damage == "empty":
        path.write_bytes(b"")
    elif damage == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif damage == "random":
        path.write_bytes(torch.randint(0, 256, (4000,), generator=torch.Generator().manual_seed(0))
                         .to(torch.uint8).numpy().tobytes())
    else:
        import pathlib

        torch.save({"format": 1, "where": pathlib.PosixPath("/x")}, path)
    with pytest.raises(training.CheckpointError, match=reason) as info:
        training.load_checkpoint(path)
    assert str(path) in str(info.value) and "delete it" in str(info.value)
    assert isinstance(info.value, ValueError)


@dataclass(frozen=True)
class GrownConfig:  # TinyConfig after a field was renamed: ``width`` became ``hidden``
    hidden: int = 4
    lr: float = 0.05
    sizes: tuple = (3, 1)


def test_a_config_class_that_changed_is_explained(tmp_path):
    path = _good_checkpoint(tmp_path / "c.pt")
    GrownConfig.__qualname__ = "TinyConfig"  # same name, new fields
    try:
        with pytest.raises(training.CheckpointError,
                           match=r"c\.pt holds a TinyConfig that the current class cannot rebuild"
                                 r".*no longer in the class: \['width'\]"):
            training.load_checkpoint(path, config_type=GrownConfig)
    finally:
        GrownConfig.__qualname__ = "GrownConfig"


def test_weights_that_do_not_fit_are_explained(tmp_path):
    path = _good_checkpoint(tmp_path / "c.pt")
    with pytest.raises(training.CheckpointError, match=r"c\.pt: the saved state of 'model' does not fit"):
        training.load_checkpoint(path, {"model": nn.Linear(3, 2)})


@dataclass
class _Point:
    x: float = 0.0


@pytest.mark.parametrize("extra, where, fix", [
    ({"best": {"value": np.float64(0.5)}}, r"extra\['best'\]\['value'\] is a numpy.float64", r"x\.item\(\)"),
    ({"n": np.int64(3)}, r"extra\['n'\] is a numpy.int64", r"x\.item\(\)"),
    ({"grid": np.zeros(3)}, r"extra\['grid'\] is a numpy.ndarray", r"torch\.from_numpy\(x\)"),
    ({"paths": [Path("a.png")]}, r"extra\['paths'\]\[0\] is a pathlib\.\w+Path", r"str\(path\)"),
    ({"cfg": _Point()}, r"extra\['cfg'\] is a .*_Point", r"dataclasses\.asdict\(x\)"),
    ({"seen": {1, 2}}, r"extra\['seen'\] is a builtins\.set", r"sorted\(x\)"),
    ({"f": print}, r"extra\['f'\] is a builtins", "tensors, numbers, strings"),
    ({"d": {(1, 2): 3}}, r"extra\['d'\] has the key \(1, 2\)", "str or int keys"),
])
def test_save_refuses_what_weights_only_cannot_load(tmp_path, extra, where, fix):
    path = _good_checkpoint(tmp_path / "c.pt")
    before = path.read_bytes()
    with pytest.raises(TypeError, match=rf"{where}.*{fix}"):
        training.save_checkpoint(path, {"model": nn.Linear(2, 2)}, extra=extra)
    assert path.read_bytes() == before  # the good checkpoint is kept


def test_save_checks_the_config_too_and_accepts_plain_values(tmp_path):
    with pytest.raises(TypeError, match=r"config\['root'\] is a pathlib"):
        training.save_checkpoint(tmp_path / "c.pt", {}, config={"root": Path("/data")})
    plain = {"t": torch.ones(2), "n": 1, "x": 0.5, "ok": True, "s": "a", "none": None,
             "nested": [(1, 2.0), {"k": [torch.zeros(1)]}], 3: "int key"}
    training.save_checkpoint(tmp_path / "c.pt", {}, config={"root": "/data"}, extra=plain)
    loaded = training.load_checkpoint(tmp_path / "c.pt").extra
    assert loaded.keys() == plain.keys() and loaded["nested"][0] == (1, 2.0)


class _FakeRun:
    """A run whose steps each take `step_seconds` on a fake clock; records every total asked for."""

    def __init__(self, step_seconds):
        self.now, self.done, self.totals, self.step_seconds = 0.0, 0, [], step_seconds

    def clock(self):
        return self.now

    def run_until(self, total):
        self.totals.append(total)
        self.now += (total - self.done) * self.step_seconds
        self.done = total


@pytest.mark.parametrize("budget, step_seconds", [(10.0, 0.1), (3.0, 0.007), (1.0, 0.4)])
def test_train_for_ends_within_one_step_of_the_budget(budget, step_seconds):
    fake = _FakeRun(step_seconds)
    result = training.train_for(budget, fake.run_until, clock=fake.clock)
    assert result == {"steps": fake.done, "seconds": fake.now}
    assert fake.totals == sorted(set(fake.totals)) and fake.totals[0] == 1       # one run, resumed, growing
    # At a steady rate each chunk aims at 9/10 of the time left: never past the budget
    # (unless the first step alone is), and it stops when less than ~one step's time is left.
    assert fake.now <= max(budget, step_seconds) + 1e-9
    assert budget - fake.now < step_seconds / 0.9 + 1e-9


def test_train_for_stops_at_the_step_budget_and_resumes_from_first():
    fake = _FakeRun(1e-6)
    result = training.train_for(60.0, fake.run_until, first=5, max_steps=40, clock=fake.clock)
    assert result["steps"] == 40 and fake.totals[0] == 5 and max(fake.totals) == 40
    frozen = _FakeRun(0.0)                  # a clock that never moves: totals double up to the cap
    assert training.train_for(1.0, frozen.run_until, max_steps=10, clock=frozen.clock)["steps"] == 10
    assert frozen.totals == [1, 2, 4, 8, 10]


def test_train_for_refuses_bad_input():
    fake = _FakeRun(0.1)
    for seconds in (0, -1.0, float("nan"), float("inf"), True, "10"):
        with pytest.raises(ValueError, match="seconds must be a positive finite number"):
            training.train_for(seconds, fake.run_until, clock=fake.clock)
    with pytest.raises(TypeError, match="run_until must be a function"):
        training.train_for(1.0, 100)
    with pytest.raises(ValueError, match="first must be a positive int"):
        training.train_for(1.0, fake.run_until, first=0)
    with pytest.raises(ValueError, match="max_steps must be None or an int of at least first=3"):
        training.train_for(1.0, fake.run_until, first=3, max_steps=2)
    assert fake.totals == []                 # nothing trained on bad input


# ------------------------------------------------------------------ fit_recipe and check_parts

@dataclass(frozen=True)
class TinyRecipe:
    optim: training.Optimisation = training.Optimisation(steps=12, batch_size=8, lr=0.05, warmup=3,
                                                         ema_decay=0.5, seed=1)
    width: int = 4

    def __post_init__(self):
        from genart_utils import runtime
        runtime.check_parts(self, optim=training.Optimisation)


def _fit(recipe, checkpoint=None):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, recipe.width), nn.Tanh(), nn.Linear(recipe.width, 1))

    def loss_fn(batch, generator):
        x, y = batch
        jitter = 0.01 * torch.randn(x.shape, generator=generator)      # a random draw per step
        return nn.functional.mse_loss(model(x + jitter), y), {}

    return training.fit_recipe(recipe, model, loss_fn, _problem(), checkpoint=checkpoint,
                               save_every=5, progress=False)


def test_fit_recipe_trains_and_a_resumed_run_equals_an_uninterrupted_one(tmp_path):
    recipe = TinyRecipe()
    model, ema, history = _fit(recipe)
    losses = history.records["loss"]
    assert history.step == 12 and losses[1][-1] < losses[1][0]
    # the EMA is an average of the iterates, not a copy of the last one
    assert not torch.equal(ema.model[0].weight, model[0].weight)
    path = tmp_path / "run.pt"
    short = TinyRecipe(optim=training.Optimisation(**{**recipe.optim.__dict__, "steps": 7}))
    _fit(short, path)
    resumed, resumed_ema, resumed_history = _fit(recipe, path)
    for a, b in zip([*model.parameters(), *ema.model.parameters()],
                    [*resumed.parameters(), *resumed_ema.model.parameters()]):
        assert torch.equal(a, b)
    assert resumed_history.records["loss"] == losses


def test_fit_recipe_refuses_another_recipes_checkpoint_and_bad_input(tmp_path):
    path = tmp_path / "run.pt"
    _fit(TinyRecipe(), path)
    with pytest.raises(ValueError, match="another recipe"):
        _fit(TinyRecipe(width=5), path)
    with pytest.raises(ValueError, match="save_every must be a positive int"):
        training.fit_recipe(TinyRecipe(), nn.Linear(3, 1), None, _problem(), save_every=0)

    @dataclass(frozen=True)
    class NoOptim:
        optim: dict = None
    with pytest.raises(TypeError, match="recipe.optim must be a training.Optimisation"):
        training.fit_recipe(NoOptim(), nn.Linear(3, 1), None, _problem())


def test_check_parts_rebuilds_nested_configs_and_names_wrong_types():
    rebuilt = TinyRecipe(optim={"steps": 3, "batch_size": 2, "lr": 0.1, "warmup": 0, "grad_clip": 1.0,
                                "ema_decay": 0.9, "seed": 0})
    assert rebuilt.optim == training.Optimisation(steps=3, batch_size=2, lr=0.1, warmup=0, ema_decay=0.9)
    with pytest.raises(TypeError, match="TinyRecipe.optim must be a Optimisation, got int"):
        TinyRecipe(optim=3)
    with pytest.raises(ValueError, match="Optimisation.steps must be a positive int"):
        training.Optimisation(steps=0)

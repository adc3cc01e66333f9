import random
import re
from dataclasses import dataclass

import numpy as np
import pytest
import torch

from genart_utils import runtime


def test_profile_from_environment(monkeypatch):
    monkeypatch.setenv("GENART_PROFILE", "smoke")
    assert runtime.get_profile() == "smoke"
    monkeypatch.setenv("GENART_PROFILE", " GPU ")
    assert runtime.get_profile() == "gpu"


@pytest.mark.parametrize("value", ["", "auto"])
def test_default_profile_follows_cuda(monkeypatch, value):
    monkeypatch.setenv("GENART_PROFILE", value)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert runtime.get_profile() == "gpu"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert runtime.get_profile() == "cpu"


def test_unknown_profile_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("GENART_PROFILE", "fast")
    with pytest.raises(ValueError, match=r"unknown execution profile 'fast'.*smoke, cpu, gpu"):
        runtime.get_profile()


def test_profile_config_picks_the_active_value():
    sizes = dict(smoke=1, cpu=2, gpu=3)
    assert [runtime.profile_config(**sizes, profile=p) for p in runtime.PROFILES] == [1, 2, 3]


def test_device_order(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    assert runtime.get_device() == torch.device("cpu")
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    assert runtime.get_device() == torch.device("mps")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert runtime.get_device() == torch.device("cuda")


def test_asking_for_cuda_without_it_is_an_error(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="CUDA is not available"):
        runtime.get_device("cuda")


def _draws():
    return random.random(), float(np.random.rand()), float(torch.rand(()))


def test_seed_everything_reproduces_every_rng():
    g1 = runtime.seed_everything(123)
    first = _draws(), float(torch.rand((), generator=g1))
    g2 = runtime.seed_everything(123)
    second = _draws(), float(torch.rand((), generator=g2))
    assert first == second
    runtime.seed_everything(124)
    assert _draws() != first[0]


@pytest.mark.parametrize("bad", [-1, 1.5, True, "0"])
def test_seed_must_be_a_non_negative_int(bad):
    with pytest.raises(ValueError, match="non-negative int"):
        runtime.seed_everything(bad)


def test_autocast_is_a_no_op_on_cpu():
    cpu = torch.device("cpu")
    assert runtime.amp_dtype(cpu) is None
    a = torch.randn(4, 4)
    with runtime.autocast(cpu):
        y = a @ a
    assert y.dtype == torch.float32
    assert not runtime.grad_scaler(cpu).is_enabled()


def test_setup_notebook_prints_device_profile_and_version(capsys):
    from genart_utils import __version__

    run = runtime.setup_notebook(seed=7, profile="smoke", device="cpu")
    out = capsys.readouterr().out
    assert f"genart_utils {__version__}" in out and "profile: smoke" in out and "device: cpu" in out
    assert "seed: 7" in out and run.seed == 7 and run.profile == "smoke"
    assert torch.equal(torch.rand(3, generator=run.generator),
                       torch.rand(3, generator=torch.Generator().manual_seed(7)))


def test_elapsed_and_report_measure_the_clock(monkeypatch):
    before = runtime.time.perf_counter()
    run = runtime.setup_notebook(seed=0, profile="cpu", device="cpu", verbose=False)
    assert before <= run.started <= runtime.time.perf_counter()  # the clock starts at setup
    clock = iter([run.started + 12.25, run.started + 30.5])
    monkeypatch.setattr(runtime.time, "perf_counter", lambda: next(clock))
    assert run.elapsed() == 12.25
    assert run.report() == "notebook wall time: 30.5 s (profile cpu, device cpu)"


def test_setup_notebook_sets_threads_before_the_banner(capsys):
    torch.set_num_threads(1)
    runtime.setup_notebook(profile="smoke", device="cpu", threads=2)
    assert torch.get_num_threads() == 2
    assert "cpu (2 CPU threads)" in capsys.readouterr().out
    with pytest.raises(ValueError, match="threads must be a positive int"):
        runtime.setup_notebook(device="cpu", threads=0, verbose=False)
    with pytest.raises(ValueError, match="threads must be a positive int"):
        runtime.setup_notebook(device="cpu", threads=True, verbose=False)


def test_seeded_fixes_weights_and_leaves_the_global_rng_alone():
    torch.manual_seed(5)
    expected_next = torch.rand(4)
    torch.manual_seed(5)
    with runtime.seeded(3):
        a = torch.nn.Linear(4, 4).weight.detach().clone()
    assert torch.equal(torch.rand(4), expected_next)  # as if the block had not run
    with runtime.seeded(np.int64(3)):
        b = torch.nn.Linear(4, 4).weight.detach().clone()
    with runtime.seeded(4):
        c = torch.nn.Linear(4, 4).weight.detach().clone()
    assert torch.equal(a, b) and not torch.equal(a, c)
    torch.testing.assert_close(a, _linear_weight_reference(3))  # the CPU RNG, seeded with 3
    with pytest.raises(ValueError, match="non-negative int"):
        with runtime.seeded(-1):
            pass


def _linear_weight_reference(seed):
    """nn.Linear(4, 4)'s default init, drawn from a local generator: U(-1/2, 1/2)."""
    g = torch.Generator().manual_seed(seed)
    return torch.rand(4, 4, generator=g) - 0.5


@dataclass(frozen=True)
class _Config:
    width: int = 4
    steps: int = 0
    lr: float = 1e-3
    beta: float = 0.0
    p: float = 0.5
    dropout: float = 0.0
    loss: str = "bce"

    def __post_init__(self):
        runtime.check_fields(self, positive_ints=("width",), nonneg_ints=("steps",),
                             positive_floats=("lr",), nonneg_floats=("beta",),
                             unit_interval=("p",), half_open_unit=("dropout",),
                             choices={"loss": ("bce", "mse")})


@pytest.mark.parametrize("field, bad, rule", [
    ("width", 0, "a positive int"), ("width", 2.0, "a positive int"), ("width", True, "a positive int"),
    ("steps", -1, "a non-negative int"), ("steps", np.float64(1), "a non-negative int"),
    ("lr", 0.0, "a finite number > 0"), ("lr", float("inf"), "a finite number > 0"),
    ("lr", "1e-3", "a finite number > 0"), ("lr", False, "a finite number > 0"),
    ("beta", -0.5, "a finite number >= 0"), ("beta", float("nan"), "a finite number >= 0"),
    ("p", 1.5, r"a number in \[0, 1\]"), ("dropout", 1.0, r"a number in \[0, 1\)"),
    ("loss", "hinge", "one of 'bce', 'mse'"),
])
def test_check_fields_names_class_field_value_and_fix(field, bad, rule):
    with pytest.raises(ValueError, match=rf"_Config\.{field} must be {rule}.*, got {re.escape(repr(bad))}; "
                                         rf"fix the {field}=\.\.\. argument of _Config\(\.\.\.\)"):
        _Config(**{field: bad})


def test_check_fields_accepts_edges_and_numpy_numbers_and_stores_python_numbers():
    cfg = _Config(width=np.int64(3), steps=0, lr=np.float32(0.5), beta=0, p=1, dropout=0.0)
    assert cfg == _Config(width=3, steps=0, lr=0.5, beta=0, p=1, dropout=0.0)
    assert type(cfg.width) is int and type(cfg.lr) is float
    _Config(p=0.0, dropout=0.999, lr=1)  # ints are numbers; the closed / open ends hold


def test_eval_mode_restores_the_mode_even_when_the_block_raises():
    model = torch.nn.Sequential(torch.nn.Dropout(0.5))
    for start in (True, False):
        model.train(start)
        with runtime.eval_mode(model) as inside:
            assert inside is model and not model.training
        assert model.training is start
        with pytest.raises(RuntimeError, match="boom"):
            with runtime.eval_mode(model):
                raise RuntimeError("boom")
        assert model.training is start

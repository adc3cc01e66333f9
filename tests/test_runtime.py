import random

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
    assert run.elapsed() >= 0 and "wall time" in run.report()

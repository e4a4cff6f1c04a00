import os
import random

import numpy as np
import pytest
import torch

from afan_harness.runtime import rng_state, seed_everything, select_device, set_rng_state


@pytest.fixture(autouse=True)
def restore_torch_modes():
    """seed_everything changes process-wide flags; give the other tests their defaults back."""
    deterministic = torch.are_deterministic_algorithms_enabled()
    benchmark, cudnn_deterministic = torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic
    yield
    torch.use_deterministic_algorithms(deterministic)
    torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = benchmark, cudnn_deterministic


def draws():
    return random.random(), float(np.random.rand()), torch.rand(3).tolist(), torch.randint(0, 1000, (2,)).tolist()


def test_select_cpu_and_auto():
    assert select_device("cpu") == torch.device("cpu")
    assert select_device(" CPU ") == torch.device("cpu")
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert select_device().type == expected
    assert select_device("auto").type == expected


def test_cuda_without_cuda_names_the_fix(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for spec in ("cuda", "cuda:1"):
        with pytest.raises(ValueError, match="CUDA is not available") as info:
            select_device(spec)
        assert "device=cpu" in str(info.value) and "device=auto" in str(info.value)
    assert select_device("auto") == torch.device("cpu")


def test_gpu_index_beyond_device_count(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(ValueError, match=r"only 2 GPU\(s\)"):
        select_device("cuda:2")
    assert select_device("cuda:1") == torch.device("cuda:1")


@pytest.mark.parametrize("spec", ["gpu", "cuda:x", "cuda1", "tpu", ""])
def test_unknown_device_lists_valid_forms(spec):
    with pytest.raises(ValueError, match="'auto', 'cpu', 'cuda' or 'cuda:N'"):
        select_device(spec)


def test_seed_everything_repeats_draws():
    seed_everything(123)
    first = draws()
    seed_everything(123)
    assert draws() == first
    seed_everything(124)
    assert draws() != first


def test_seed_everything_sets_the_determinism_mode(monkeypatch):
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    seed_everything(0, deterministic=True)
    assert torch.are_deterministic_algorithms_enabled()
    assert torch.backends.cudnn.deterministic and not torch.backends.cudnn.benchmark
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
    seed_everything(0)
    assert not torch.are_deterministic_algorithms_enabled()
    assert torch.backends.cudnn.benchmark and not torch.backends.cudnn.deterministic


def test_seed_out_of_range():
    with pytest.raises(ValueError, match="seed"):
        seed_everything(-1)


def test_rng_state_round_trip():
    seed_everything(7)
    random.gauss(0, 1)  # leaves a cached gaussian in python's state
    np.random.standard_normal()  # and in numpy's
    state = rng_state()
    expected = draws() + (random.gauss(0, 1), float(np.random.standard_normal()))
    draws()  # move every generator on
    set_rng_state(state)
    assert draws() + (random.gauss(0, 1), float(np.random.standard_normal())) == expected


def test_rng_state_survives_weights_only_checkpoint(tmp_path):
    seed_everything(11)
    path = tmp_path / "state.pth"
    torch.save({"rng": rng_state()}, path)
    expected = draws()
    draws()
    set_rng_state(torch.load(path, weights_only=True)["rng"])
    assert draws() == expected

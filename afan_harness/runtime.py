"""Device choice, random seeding (restorable for an exact resume), mixed precision and
``torch.compile``."""

from __future__ import annotations

import contextlib
import os
import random
import re
import shutil

import numpy as np
import torch

from afan_harness.config import ConfigError

_DEVICE_FORMS = "'auto', 'cpu', 'cuda' or 'cuda:N' (N = GPU index)"


def select_device(spec: str = "auto") -> torch.device:
    """The torch.device for a config's ``device`` setting; "auto" takes a GPU when there is one.
    A device this machine lacks is a ``ConfigError`` that names it and the fix."""
    text = str(spec).strip().lower()
    if text == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if text == "cpu":
        return torch.device("cpu")
    match = re.fullmatch(r"cuda(?::(\d+))?", text)
    if match is None:
        raise ConfigError(f"unknown device {spec!r}: use {_DEVICE_FORMS}")
    if not torch.cuda.is_available():
        raise ConfigError(
            f"device={text} was asked for, but CUDA is not available here (this PyTorch build: "
            f"{torch.__version__}); use device=cpu, or device=auto to take a GPU only when present"
        )
    count = torch.cuda.device_count()
    if match.group(1) is not None and int(match.group(1)) >= count:
        raise ConfigError(
            f"device={text} was asked for, but only {count} GPU(s) are visible "
            f"(cuda:0 to cuda:{count - 1}); pick one of those, or use device=auto"
        )
    return torch.device(text)


def seed_everything(seed: int, deterministic: bool = False) -> None:
    """Seed python, numpy and torch (CPU and every GPU), and set the cuDNN/determinism mode.

    ``deterministic=True`` makes GPU runs repeatable at some speed cost; otherwise cuDNN may
    benchmark and pick the fastest (non-deterministic) kernels.
    """
    if not 0 <= seed < 2**32:
        raise ConfigError(f"seed={seed} is not valid: use an integer in [0, 2**32)")  # numpy's limit
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # seeds the CUDA generators of all devices too
    if deterministic:
        # cuBLAS reads this when it starts; deterministic matmuls need a fixed workspace.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    # Set both ways, so one call fully decides the mode whatever ran before.
    torch.use_deterministic_algorithms(deterministic)
    torch.backends.cudnn.deterministic = deterministic
    torch.backends.cudnn.benchmark = not deterministic


def rng_state() -> dict:
    """The state of every random generator, as tensors, numbers and dicts.

    That is what ``torch.load(weights_only=True)`` accepts, so the state can live in a checkpoint.
    """
    python_version, python_internal, gauss_next = random.getstate()
    _, numpy_keys, numpy_pos, has_gauss, cached_gaussian = np.random.get_state()
    state = {
        "python": {
            "version": python_version,
            "internal": torch.tensor(python_internal, dtype=torch.int64),
            "gauss_next": gauss_next,
        },
        "numpy": {
            "keys": torch.from_numpy(numpy_keys.astype(np.int64)),
            "pos": int(numpy_pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached_gaussian),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Restore the generators from :func:`rng_state`, so the next draws repeat exactly."""
    python = state["python"]
    random.setstate((python["version"], tuple(python["internal"].tolist()), python["gauss_next"]))
    numpy = state["numpy"]
    np.random.set_state(
        (
            "MT19937",
            numpy["keys"].cpu().numpy().astype(np.uint32),
            numpy["pos"],
            numpy["has_gauss"],
            numpy["cached_gaussian"],
        )
    )
    torch.set_rng_state(state["torch"].cpu())
    if "cuda" in state and torch.cuda.is_available():
        # A resume may see fewer GPUs than the run that saved; restore those that exist.
        for index, cuda_state in enumerate(state["cuda"][: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(cuda_state.cpu(), index)


PRECISIONS = ("auto", "fp32", "bf16", "fp16")


def resolve_precision(precision: str, device: torch.device) -> str:
    """``auto``: bf16 mixed precision on a CUDA device that has it, else fp16 on CUDA, fp32 on the CPU."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision={precision!r} is not valid; choose one of {', '.join(PRECISIONS)}")
    if precision != "auto":
        return precision
    if device.type != "cuda":
        return "fp32"
    return "bf16" if torch.cuda.is_bf16_supported() else "fp16"


def autocast(precision: str, device: torch.device):
    """The forward passes' mixed precision: ``torch.autocast`` in bf16 or fp16, nothing for fp32.
    Feature PGD keeps its perturbation in float32 either way (``afan.feature_pgd``)."""
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device.type, dtype=dtype)


def grad_scaler(precision: str, device: torch.device) -> torch.amp.GradScaler:
    """Loss scaling for fp16 (its small gradients would underflow); a pass-through otherwise."""
    return torch.amp.GradScaler(device.type, enabled=precision == "fp16")


def optimizer_step(loss: torch.Tensor, optimizer, scaler: torch.amp.GradScaler) -> None:
    """Back-propagate ``loss`` (scaled for fp16) and step; a step whose scaled gradients are
    not finite is skipped by the scaler, which then lowers its scale."""
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()


COMPILE_BACKENDS = ("off", "inductor", "eager")


def compile_parts(parts, backend: str, device: torch.device) -> str:
    """``torch.compile`` each module of ``parts`` in place, with ``backend``; returns the backend
    that took effect ("off" when it cannot run here, said in one printed line).

    A-FAN runs a model's stages one by one (head, tail, attacks) rather than its ``forward``,
    so the stages are what gets compiled; compiling in place keeps the state-dict keys, hence
    the checkpoints, unchanged. ``inductor`` generates kernels (C++ on the CPU, Triton on
    CUDA); ``eager`` only captures graphs, a quick check that a model compiles. A part that
    fails to compile later runs eagerly, with PyTorch's warning, instead of stopping the run.
    """
    if backend not in COMPILE_BACKENDS:
        raise ValueError(f"compile={backend!r} is not valid; choose one of {', '.join(COMPILE_BACKENDS)}")
    if backend == "off":
        return backend
    if backend == "inductor":
        missing = _inductor_missing(device)
        if missing:
            print(f"compile=inductor needs {missing}; training without torch.compile", flush=True)
            return "off"
    import torch._dynamo

    torch._dynamo.config.suppress_errors = True  # the fallback above: eager where compiling fails
    for part in parts:
        part.compile(backend=backend)
    return backend


def _inductor_missing(device: torch.device) -> str:
    """What inductor lacks on ``device`` ("" when nothing)."""
    if device.type == "cuda":
        from torch.utils._triton import has_triton

        return "" if has_triton() else "Triton (pip install triton)"
    compilers = [os.environ.get("CXX", ""), "g++", "c++", "clang++"]
    return "" if any(name and shutil.which(name) for name in compilers) else "a C++ compiler (set CXX or install g++)"

"""Shared fixtures: the devices to test on, a tiny CNN split into head and tail, small enough
for fast CPU tests, real models built once per test module, and the resume check of the
iteration-based trainers."""
import copy

import pytest
import torch
from torch import nn

from afan_harness.checkpoint import load_checkpoint

# Tests that take the ``device`` fixture run on the CPU and on CUDA; without a GPU the CUDA
# case is collected and skipped, so `pytest -m cuda --collect-only` lists every GPU test on
# any machine, and `pytest -m cuda` runs exactly those.
DEVICES = ["cpu", "cuda"]


def pytest_collection_modifyitems(items):
    """Mark ``cuda`` every test that asks for the GPU (the ``cuda`` fixture, or the ``device``
    fixture's CUDA case), by what it uses rather than by its name."""
    for item in items:
        params = getattr(item, "callspec", None)
        on_cuda = "cuda" in item.fixturenames or (params is not None and params.params.get("device") == "cuda")
        if on_cuda:
            item.add_marker(pytest.mark.cuda)


@pytest.fixture
def cuda():
    """The GPU, with float32 kept float32 (no TF32 matrix products), so results can be held to
    float32 tolerances; skips the test where there is none."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    flags = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield torch.device("cuda")
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = flags


@pytest.fixture(params=DEVICES)
def device(request):
    """A device to run on (see ``DEVICES``; on CUDA as the ``cuda`` fixture gives it)."""
    return request.getfixturevalue("cuda") if request.param == "cuda" else torch.device("cpu")


class TinyNet(nn.Module):
    """conv-BN-ReLU head, then a tail with two BatchNorms and a linear classifier."""

    def __init__(self, num_classes: int = 4):
        super().__init__()
        self.head = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.tail = nn.Sequential(
            nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
            nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, num_classes),
        )

    def forward(self, x):
        return self.tail(self.head(x))


@pytest.fixture
def tiny_net():
    torch.manual_seed(0)
    return TinyNet()


@pytest.fixture
def batch():
    g = torch.Generator().manual_seed(1)
    return torch.rand(6, 3, 8, 8, generator=g), torch.randint(0, 4, (6,), generator=g)


class BuiltOnce:
    """Models built once, handed out as deep copies (``get``), so that a test may train,
    convert or move its copy without another test seeing it, in any order.

    ``get(key, build, seed=None)`` builds with ``build()`` the first time ``key`` is asked for,
    after ``torch.manual_seed(seed)`` where ``seed`` is given. A seeded model is handed out with
    the global random state a fresh seeded build leaves: the CPU generator where ``build()``
    left it, the CUDA ones freshly seeded (a build on the CPU draws nothing from them). So a
    test that draws random numbers after building (inputs, RPN sampling) draws the same ones
    as when it built the model itself."""

    def __init__(self):
        self._built = {}

    def get(self, key, build, seed=None):
        if key not in self._built:
            if seed is not None:
                torch.manual_seed(seed)
            model = build()
            self._built[key] = model, seed, torch.get_rng_state() if seed is not None else None
        model, seed, cpu_state = self._built[key]
        if seed is not None:
            torch.manual_seed(seed)
            torch.set_rng_state(cpu_state)
        # On one thread: copying tensors is memory-bound, and with the cores busy the threads of
        # a parallel copy wait on each other (ten times slower on two loaded cores).
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            return copy.deepcopy(model)
        finally:
            torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def built_once():
    """A ``BuiltOnce`` shared by the tests of one module (its models freed after them)."""
    return BuiltOnce()


@pytest.fixture
def check_resume(tmp_path, monkeypatch):
    """``check(train_module, settings)``: runs the module's ``main`` with ``settings`` (4
    iterations, a checkpoint every 2) once whole and once stopped by an interrupt at the third
    step, resumes the stopped run, and asserts both end with the same weights and log rows."""
    def check(train_module, settings):
        assert train_module.main([*settings, f"out={tmp_path / 'whole'}"]) == 0
        real_step, calls = train_module.training_step, []

        def stop_at_third(*args, **kwargs):
            calls.append(1)
            if len(calls) == 3:
                raise KeyboardInterrupt
            return real_step(*args, **kwargs)

        monkeypatch.setattr(train_module, "training_step", stop_at_third)
        # An interrupt the guard did not turn into a polite stop (as a second Ctrl-C): exit 130.
        assert train_module.main([*settings, f"out={tmp_path / 'cut'}"]) == 130
        monkeypatch.setattr(train_module, "training_step", real_step)
        assert load_checkpoint(tmp_path / "cut" / "last.pth")["iteration"] == 2
        assert train_module.main(["--resume", f"out={tmp_path / 'cut'}"]) == 0
        whole, cut = (load_checkpoint(tmp_path / name / "last.pth")["model"] for name in ("whole", "cut"))
        for key, value in whole.items():
            assert torch.equal(value, cut[key]), key
        rows = (tmp_path / "cut" / "metrics.csv").read_text().splitlines()
        assert [r.split(",")[0] for r in rows[1:]] == ["1", "2", "3", "4"]
    return check

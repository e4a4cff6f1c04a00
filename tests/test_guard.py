"""afan_harness.guard: signals turned into a request to stop, and the non-finite loss policy."""
import os
import signal

import pytest
import torch

from afan_harness.distributed import Process
from afan_harness.guard import NonFiniteLoss, StopRequested, TrainingGuard

CPU = torch.device("cpu")


def _guard(**kwargs):
    return TrainingGuard(Process(), CPU, last_checkpoint="runs/x/last.pth", **kwargs)


def test_a_signal_becomes_a_stop_request_and_the_handlers_come_back():
    before = signal.getsignal(signal.SIGTERM)
    with _guard() as guard:
        os.kill(os.getpid(), signal.SIGTERM)
        assert guard.signum == signal.SIGTERM and not guard.stop_requested
        assert guard.accept(torch.tensor(1.0), {}, "step 1")  # the step still counts
        assert guard.stop_requested
        with pytest.raises(StopRequested) as info:
            guard.stop("step 1")
    assert signal.getsignal(signal.SIGTERM) is before
    assert info.value.signum == signal.SIGTERM
    assert str(info.value) == "stopped by SIGTERM after step 1; the training state is saved in runs/x/last.pth"


def test_a_second_ctrl_c_quits_at_once():
    with _guard() as guard:
        os.kill(os.getpid(), signal.SIGINT)
        assert guard.signum == signal.SIGINT
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)


def test_a_non_finite_loss_stops_naming_the_terms():
    with _guard() as guard:
        terms = {"loss_0": torch.tensor(0.5), "loss_sd": torch.tensor(float("inf"))}
        with pytest.raises(NonFiniteLoss) as info:
            guard.accept(torch.tensor(float("inf")), terms, "iteration 7")
    assert str(info.value).startswith("non-finite loss at iteration 7 (loss inf; loss_0 0.5, loss_sd inf); "
                                      "the last good state is runs/x/last.pth; lower optim.lr")
    assert guard.skipped == 0 and guard.counts() == {} and guard.counts(always=True) == {"skipped_steps": 0}


def test_skipping_counts_from_where_a_resumed_run_left_off():
    guard = _guard(on_nonfinite="skip", skipped=2)
    assert guard.accept(torch.tensor(1.0), {}, "a") is True
    assert guard.accept(torch.tensor(float("nan")), {}, "b") is False
    assert guard.counts() == {"skipped_steps": 3}
    with pytest.raises(ValueError, match="on_nonfinite must be 'stop' or 'skip'"):
        _guard(on_nonfinite="ignore")

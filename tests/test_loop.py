"""The shared training loop's pieces: positions in messages, the epoch-aligned batch stream,
the log window carried over a stop, and the refusal of an epoch-counting last.pth."""
from types import SimpleNamespace

import pytest
import torch
from torch.utils.data import TensorDataset

from afan_harness.checkpoint import CheckpointError, save_checkpoint
from afan_harness.distributed import Process
from afan_harness.loop import Job, _resume_position, batch_stream
from afan_harness.rundir import LogWindow, RunDir, continue_run
from afan_harness.sampler import ResumableSampler


def _job(epoch_steps=0, size=10, batch_size=3):
    cfg = SimpleNamespace(batch_size=batch_size, seed=4, data=SimpleNamespace(workers=0))
    data = TensorDataset(torch.arange(size))
    return Job(cfg, None, None, None, data, step=None, to_device=None, step_values=None, evaluate=None,
               best_key="acc", payload=None, iterations=9, log_every=3, checkpoint_every=3, epoch_steps=epoch_steps)


def test_positions_name_iterations_or_epochs_and_steps():
    plain, epochs = _job(), _job(epoch_steps=3)
    assert plain.where(7) == "iteration 7" and plain.stopped_after(7) == "iteration 7"
    assert epochs.where(5) == "epoch 1, step 2 of 3" and epochs.where(6) == "epoch 1, step 3 of 3"
    assert epochs.stopped_after(5) == "step 2 of 3 in epoch 1" and epochs.stopped_after(6) == "epoch 1"


def _indices(stream, count):
    return [next(stream)[0].tolist() for _ in range(count)]


@pytest.mark.parametrize("start", [0, 1, 3, 5])
def test_epoch_batches_start_each_epoch_at_its_own_shuffle_and_resume_anywhere(start):
    """10 samples in batches of 3: 3 steps an epoch, the 10th sample of each epoch dropped."""
    job = _job(epoch_steps=3)
    expected = []
    for epoch in range(3):
        order = ResumableSampler(10, 4).epoch_order(epoch).tolist()
        expected += [order[k * 3:(k + 1) * 3] for k in range(3)]
    assert _indices(batch_stream(job, Process(), start), 9 - start) == expected[start:]


def test_iteration_batches_are_one_endless_shuffle():
    job = _job()
    stream = [i for epoch in range(3) for i in ResumableSampler(10, 4).epoch_order(epoch).tolist()]
    whole = _indices(batch_stream(job, Process(), 0), 6)
    assert whole == [stream[k * 3:(k + 1) * 3] for k in range(6)]
    assert _indices(batch_stream(job, Process(), 4), 2) == whole[4:]


def test_a_log_window_cut_by_a_checkpoint_gives_the_same_means_after_a_resume():
    process, device = Process(), torch.device("cpu")
    whole, cut = LogWindow(), LogWindow()
    for value in (1.0, 2.0, 6.0):
        whole.add({"loss": value})
    cut.add({"loss": 1.0})
    cut.add({"loss": 2.0})
    resumed = LogWindow()
    resumed.restore(cut.state(process, device), process)
    resumed.add({"loss": 6.0})
    assert resumed.close(process, device)["loss"] == whole.close(process, device)["loss"] == 3.0
    assert LogWindow().state(process, device) is None  # nothing to carry at a window's end


def test_the_other_processes_restore_no_sums_so_the_window_is_counted_once():
    window = LogWindow()
    window.restore({"sums": {"loss": 8.0}, "count": 2}, Process(rank=1, world_size=2, distributed=True))
    assert window.sums == {"loss": 0.0} and window.count == 2


def test_an_epoch_counting_last_pth_is_refused_with_what_to_do(tmp_path):
    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda it: 1.0)
    run = RunDir(tmp_path / "run")
    save_checkpoint({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                     "scheduler": scheduler.state_dict(), "rng": {}, "epoch": 2, "best_val_acc": 0.5},
                    run.last_checkpoint)
    with pytest.raises(CheckpointError, match=r"last.pth counts epochs .* --overwrite"):
        continue_run(run.path, run, model, optimizer, scheduler, position="iteration", process=Process(),
                     check=_resume_position)

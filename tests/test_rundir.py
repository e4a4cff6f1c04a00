import math
from dataclasses import dataclass

import pytest
import torch

from afan_harness.config import ConfigError, load_config
from afan_harness.distributed import Process
from afan_harness.rundir import (LogWindow, MetricsLog, RunDir, continue_run, perturbation_sizes, progress,
                         save_training_state)


@dataclass
class SmallConfig:
    epochs: int = 3
    lr: float = 0.1


def make_run(path):
    """A finished-looking run folder: config, checkpoint and metrics."""
    run = RunDir(path)
    run.save_config(SmallConfig())
    run.last_checkpoint.write_bytes(b"weights")
    run.metrics.log(epoch=0, loss=1.0)
    return run


def test_new_folder(tmp_path):
    run = RunDir(tmp_path / "runs" / "a")
    assert run.path.is_dir() and list(run.path.iterdir()) == []
    assert run.file("x.png") == run.path / "x.png"
    assert run.last_checkpoint == run.path / "last.pth" and run.best_checkpoint == run.path / "best.pth"
    config_path = run.save_config(SmallConfig(lr=0.5))
    assert config_path == run.path / "config.yaml"
    assert load_config(SmallConfig, config_path) == SmallConfig(lr=0.5)


def test_existing_empty_folder_is_used(tmp_path):
    RunDir(tmp_path)
    assert RunDir(tmp_path).path == tmp_path


def test_existing_run_is_refused_and_untouched(tmp_path):
    make_run(tmp_path / "a")
    before = {p.name: p.read_bytes() for p in (tmp_path / "a").iterdir()}
    with pytest.raises(FileExistsError) as info:
        RunDir(tmp_path / "a")
    message = str(info.value)
    assert str(tmp_path / "a") in message and "--resume" in message and "--overwrite" in message
    assert {p.name: p.read_bytes() for p in (tmp_path / "a").iterdir()} == before


def test_overwrite_starts_again(tmp_path):
    make_run(tmp_path / "a")
    run = RunDir(tmp_path / "a", overwrite=True)
    assert list(run.path.iterdir()) == []
    assert run.metrics.rows() == []


def test_overwrite_refuses_a_folder_that_is_not_a_run(tmp_path):
    (tmp_path / "precious.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="does not look like a run folder"):
        RunDir(tmp_path, overwrite=True)
    assert (tmp_path / "precious.txt").read_text() == "keep me"


def test_resume_keeps_contents(tmp_path):
    make_run(tmp_path / "a")
    run = RunDir(tmp_path / "a", resume=True)
    assert run.last_checkpoint.read_bytes() == b"weights"
    run.metrics.log(epoch=1, loss=0.5)
    assert [row["epoch"] for row in run.metrics.rows()] == [0, 1]


def test_resume_needs_an_existing_run(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        RunDir(tmp_path / "missing", resume=True)
    with pytest.raises(FileNotFoundError, match="is empty"):
        RunDir(tmp_path, resume=True)


def test_resume_and_overwrite_together_refused(tmp_path):
    with pytest.raises(ConfigError, match="--resume and --overwrite"):
        RunDir(tmp_path, resume=True, overwrite=True)


def test_path_that_is_a_file(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(FileExistsError, match="is a file"):
        RunDir(tmp_path / "f")


def test_metrics_append_reopen_and_parse(tmp_path):
    path = tmp_path / "metrics.csv"
    log = MetricsLog(path)
    log.log(epoch=0, loss=1.25, phase="warmup")
    log.log(epoch=1, loss=torch.tensor(0.75), phase="main")  # tensors are stored as numbers
    reopened = MetricsLog(path)
    reopened.log(epoch=2, loss=0.5, phase="main")
    assert path.read_text().splitlines() == [
        "epoch,loss,phase", "0,1.25,warmup", "1,0.75,main", "2,0.5,main",
    ]
    rows = reopened.rows()
    assert rows[0] == {"epoch": 0, "loss": 1.25, "phase": "warmup"}
    assert isinstance(rows[2]["epoch"], int) and isinstance(rows[2]["loss"], float)


def test_metrics_new_column_widens_header(tmp_path):
    log = MetricsLog(tmp_path / "metrics.csv")
    log.log(epoch=0, loss=1.0)
    log.log(epoch=1, loss=0.5, val_acc=80.0)
    log.log(epoch=2, loss=0.25)
    assert (tmp_path / "metrics.csv").read_text().splitlines() == [
        "epoch,loss,val_acc", "0,1.0,", "1,0.5,80.0", "2,0.25,",
    ]
    assert [row["val_acc"] for row in log.rows()] == [None, 80.0, None]
    assert MetricsLog(tmp_path / "metrics.csv").columns == ["epoch", "loss", "val_acc"]


def test_metrics_keep_exact_floats(tmp_path):
    log = MetricsLog(tmp_path / "metrics.csv")
    log.log(step=1, lr=0.1 * 3, nan=math.nan)
    row = log.rows()[0]
    assert row["lr"] == 0.1 * 3 and math.isnan(row["nan"])


def test_truncate_after_resume_point(tmp_path):
    log = MetricsLog(tmp_path / "metrics.csv")
    for epoch in range(5):
        log.log(epoch=epoch, loss=1.0 / (epoch + 1))
    assert log.truncate_after("epoch", 2) == 2
    assert [row["epoch"] for row in MetricsLog(tmp_path / "metrics.csv").rows()] == [0, 1, 2]
    assert log.truncate_after("epoch", 10) == 0
    log.log(epoch=3, loss=0.1)
    assert [row["epoch"] for row in log.rows()] == [0, 1, 2, 3]


def test_plot_writes_png(tmp_path):
    log = MetricsLog(tmp_path / "metrics.csv")
    for epoch in range(4):
        log.log(epoch=epoch, loss=1.0 / (epoch + 1), acc=10.0 * epoch, lr=0.1, phase="train")
    log.log(epoch=4, val_acc=55.0)  # a column with gaps, and a text column that is skipped
    png = log.plot(tmp_path / "plots" / "metrics.png")
    data = png.read_bytes()
    assert data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) > 1000
    assert sorted(p.name for p in png.parent.iterdir()) == ["metrics.png"]


def test_plot_ticks_whole_epochs_and_draws_a_constant_without_offset(tmp_path):
    log = MetricsLog(tmp_path / "metrics.csv")
    for epoch in range(1, 4):  # three epochs: matplotlib's default ticks would be 1.0, 1.5, ...
        log.log(epoch=epoch, loss=1.0 / epoch, pert_linf=9.80401e-3 + epoch * 1e-13)
    figure = log.figure()
    figure.canvas.draw()
    loss, linf = [ax for ax in figure.axes if ax.get_visible()]
    ticks = [t for t in loss.get_xticks() if 1 <= t <= 3]
    assert ticks and all(float(t).is_integer() for t in ticks)
    assert linf.yaxis.get_offset_text().get_text() == ""
    low, high = linf.get_ylim()
    assert low < 9.80401e-3 < high and high - low == pytest.approx(0.1 * 9.80401e-3)


def test_plot_needs_the_x_column_and_numbers(tmp_path):
    log = MetricsLog(tmp_path / "metrics.csv")
    log.log(step=1, phase="train")
    with pytest.raises(ValueError, match="no column 'epoch'"):
        log.plot(tmp_path / "m.png")
    with pytest.raises(ValueError, match="no numeric columns"):
        log.plot(tmp_path / "m.png", x="step")


def test_progress_bar(capsys):
    assert list(progress(range(3), desc="train", disable=True)) == [0, 1, 2]
    bar = progress(range(3), total=3, desc="x", disable=False)
    assert bar.dynamic_ncols and bar.total == 3 and bar.desc == "x"
    assert sum(bar) == 3
    bar.close()
    assert "x" in capsys.readouterr().err


def test_perturbation_sizes_are_the_mean_l2_and_the_largest_entry():
    delta = torch.zeros(2, 3, 2, 2)
    delta[0, 0, 0, 0], delta[0, 1, 1, 1] = 3.0, -4.0  # sample norms 5 and 0
    sizes = perturbation_sizes("se", delta)
    assert sizes == {"se_l2": pytest.approx(2.5), "se_linf": pytest.approx(4.0)}
    assert perturbation_sizes("sd", None) == {}


def test_continue_run_restores_the_state_and_trims_the_log(tmp_path, capsys):
    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda it: 0.5 ** it)
    run = RunDir(tmp_path / "run")
    for it in (1, 2, 3):
        run.metrics.log(iteration=it, loss=1.0 / it)
    save_training_state(run, Process(), {"model": model.state_dict()}, optimizer, scheduler, {}, iteration=2)
    fresh = torch.nn.Linear(2, 2)
    fresh_optimizer = torch.optim.SGD(fresh.parameters(), lr=0.1)
    fresh_scheduler = torch.optim.lr_scheduler.LambdaLR(fresh_optimizer, lambda it: 0.5 ** it)
    state = continue_run(run.path, run, fresh, fresh_optimizer, fresh_scheduler, position="iteration", process=Process())
    assert state["iteration"] == 2 and torch.equal(fresh.weight, model.weight)
    assert [r["iteration"] for r in run.metrics.rows()] == [1, 2]
    assert f"resuming {run.path} after iteration 2" in capsys.readouterr().out
    # Other processes pass no run folder: they restore and touch no file.
    other = torch.nn.Linear(2, 2)
    continue_run(run.path, None, other, torch.optim.SGD(other.parameters(), lr=0.1), fresh_scheduler,
                 position="iteration", process=Process())
    assert torch.equal(other.weight, model.weight)


def test_log_window_means_over_its_steps_then_starts_again():
    window = LogWindow()
    window.add({"loss": 1.0, "acc": 0.5})
    window.add({"loss": 3.0, "acc": 1.0})
    means = window.close(Process(), torch.device("cpu"))
    assert means["loss"] == pytest.approx(2.0) and means["acc"] == pytest.approx(0.75) and means["sec_per_iter"] >= 0
    window.add({"loss": 5.0})
    assert window.close(Process(), torch.device("cpu"))["loss"] == pytest.approx(5.0)


def test_log_window_leaves_an_evaluation_out_of_the_seconds_per_step(monkeypatch):
    import afan_harness.rundir
    from afan_harness.distributed import Process

    # open; close after 2 steps (and the next window opens); the evaluation ends; close after 2 more
    clock = iter([0.0, 10.0, 10.0, 70.0, 80.0, 80.0])
    monkeypatch.setattr(afan_harness.rundir.time, "perf_counter", lambda: next(clock))
    window = afan_harness.rundir.LogWindow()
    single = Process(rank=0, world_size=1, local_rank=0)
    for _ in range(2):
        window.add({"loss": 1.0})
    assert window.close(single, "cpu")["sec_per_iter"] == 5.0
    window.restart_clock()  # the 60 s of evaluation
    for _ in range(2):
        window.add({"loss": 3.0})
    assert window.close(single, "cpu") == {"loss": 3.0, "sec_per_iter": 5.0}

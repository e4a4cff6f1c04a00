"""The run folder: its guarded creation, the metrics CSV with its plot, and progress bars.

A run folder holds ``config.yaml`` (the resolved config), ``metrics.csv``, ``last.pth`` and
``best.pth``. An existing run is never overwritten by accident: the user has to say
``--resume`` to continue it or ``--overwrite`` to start again.
"""

from __future__ import annotations

import csv
import json
import math
import shutil
import sys
import time
from pathlib import Path
from typing import Optional

from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from tqdm import tqdm

from afan_harness.checkpoint import (CheckpointError, atomic_open, key_mismatches, load_checkpoint, remove_partial_writes,
                             save_checkpoint)
from afan_harness import distributed
from afan_harness.config import ConfigError, config_to_dict, save_config
from afan_harness.runtime import rng_state, set_rng_state

CONFIG_NAME = "config.yaml"


class RunDir:
    """The folder of one run; create it on the main process only."""

    LAST = "last.pth"  # the full training state, in every run folder

    def __init__(self, path, *, resume: bool = False, overwrite: bool = False):
        if resume and overwrite:
            raise ConfigError("--resume and --overwrite contradict each other; pass only one")
        if not str(path).strip():  # Path("") is the working folder: never a run folder by accident
            raise ConfigError("out= is empty; name the run folder, e.g. out=runs/my_run")
        self.path = Path(path)
        if self.path.exists() and not self.path.is_dir():
            raise FileExistsError(f"{self.path} is a file, not a run folder; choose another output folder")
        in_use = self.path.is_dir() and any(self.path.iterdir())
        if resume and not in_use:
            state = "is empty" if self.path.is_dir() else "does not exist"
            raise FileNotFoundError(
                f"cannot resume: run folder {self.path} {state}; start a new run without --resume"
            )
        if in_use and not resume:
            if not overwrite:
                raise FileExistsError(
                    f"run folder {self.path} already exists and is not empty (nothing in it was "
                    "touched); pass --resume to continue that run or --overwrite to start it again"
                )
            # Deleting is only safe for a folder this module made: guards against
            # `--out . --overwrite` or a parent folder of many runs.
            if not (self.path / CONFIG_NAME).is_file():
                raise FileExistsError(
                    f"refusing to --overwrite {self.path}: it has no {CONFIG_NAME}, so it does not "
                    "look like a run folder; choose another output folder or delete it yourself"
                )
            shutil.rmtree(self.path)
        self.path.mkdir(parents=True, exist_ok=True)
        if resume:
            for leftover in remove_partial_writes(self.path):
                print(f"removed {leftover}, a checkpoint whose writing was cut off; its previous "
                      "version is intact", flush=True)
        self.metrics = MetricsLog(self.path / "metrics.csv")

    def file(self, name: str) -> Path:
        """The path of ``name`` inside the run folder."""
        return self.path / name

    @property
    def last_checkpoint(self) -> Path:
        """Written every epoch; what --resume continues from."""
        return self.path / self.LAST

    @property
    def best_checkpoint(self) -> Path:
        """The model that scored best on validation so far."""
        return self.path / "best.pth"

    def save_config(self, cfg) -> Path:
        """Write the resolved config to ``config.yaml`` in the run folder."""
        path = self.path / CONFIG_NAME
        save_config(cfg, path)
        return path


class MetricsLog:
    """A CSV of metrics, one row per :meth:`log` call, that grows a column when a new key appears."""

    def __init__(self, csv_path):
        self.path = Path(csv_path)
        self.columns: list[str] = []
        if self.path.is_file():  # resuming: keep appending under the existing header
            with open(self.path, newline="", encoding="utf-8") as file:
                self.columns = next(csv.reader(file), [])

    def log(self, **row) -> None:
        """Append one row, e.g. ``log(epoch=3, train_loss=0.41, val_acc=88.2)``."""
        row = {key: value.item() if hasattr(value, "item") else value for key, value in row.items()}
        new_columns = [key for key in row if key not in self.columns]
        if new_columns:  # the header must change, so the file is written again in full
            rows = self._read_text_rows()
            self.columns += new_columns
            self._write(rows + [row])
        else:
            with open(self.path, "a", newline="", encoding="utf-8") as file:
                self._writer(file).writerow(row)

    def rows(self) -> list[dict]:
        """The logged rows, with numbers parsed and missing values as None."""
        return [{key: _parse(text) for key, text in row.items()} for row in self._read_text_rows()]

    def truncate_after(self, key: str, value) -> int:
        """Drop rows whose ``key`` is greater than ``value`` (e.g. epochs after the resume point).

        Returns how many rows were dropped.
        """
        rows = self._read_text_rows()
        kept = [row for row in rows if _parse(row.get(key)) is None or _parse(row.get(key)) <= value]
        if len(kept) < len(rows):
            self._write(kept)
        return len(rows) - len(kept)

    def plot(self, png_path, x: str = "epoch") -> Path:
        """Save a PNG with one panel per numeric column against column ``x``."""
        figure = self.figure(x)
        with atomic_open(png_path, "wb") as file:
            figure.savefig(file, format="png", dpi=100)
        return Path(png_path)

    def figure(self, x: str = "epoch") -> Figure:
        """The figure :meth:`plot` saves: one panel per numeric column against column ``x``."""
        rows = self.rows()
        if x not in self.columns:
            raise ValueError(f"cannot plot {self.path}: no column {x!r} (columns: {', '.join(self.columns)})")
        metrics = [name for name in self.columns if name != x and _is_numeric(rows, name)]
        if not metrics:
            raise ValueError(f"cannot plot {self.path}: no numeric columns besides {x!r}")
        ncols = min(3, len(metrics))
        nrows = math.ceil(len(metrics) / ncols)
        # A bare Figure draws with Agg: no display is needed and pyplot's global state is untouched.
        figure = Figure(figsize=(4 * ncols, 3 * nrows), layout="constrained")
        axes = list(figure.subplots(nrows, ncols, squeeze=False).flat)
        for ax, name in zip(axes, metrics):
            points = [(row[x], row[name]) for row in rows if row[x] is not None and row[name] is not None]
            xs, ys = [p[0] for p in points], [p[1] for p in points]
            ax.plot(xs, ys, marker=".")
            ax.set_title(name)
            ax.set_xlabel(x)
            ax.grid(alpha=0.3)
            if all(isinstance(value, int) for value in xs):  # epochs and iterations: no 2.5
                ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            # A constant metric (a fixed-size perturbation) drew as 1e-11 + 9.8e-3 on an offset
            # axis; plain numbers, and a flat line in the middle of a readable range.
            ax.ticklabel_format(axis="y", useOffset=False)
            if ys and max(ys) - min(ys) <= 1e-6 * max(abs(max(ys)), abs(min(ys)), 1e-12):
                centre = (max(ys) + min(ys)) / 2
                half = 0.05 * abs(centre) or 1.0
                ax.set_ylim(centre - half, centre + half)
        for ax in axes[len(metrics) :]:  # the panels left over in the last row of the grid
            ax.set_visible(False)
        return figure

    def _writer(self, file) -> csv.DictWriter:
        return csv.DictWriter(file, fieldnames=self.columns, restval="", lineterminator="\n")

    def _read_text_rows(self) -> list[dict]:
        if not self.path.is_file():
            return []
        with open(self.path, newline="", encoding="utf-8") as file:
            return list(csv.DictReader(file))

    def _write(self, rows: list[dict]) -> None:
        # Atomic, so a crash while the header widens cannot lose the rows already logged.
        with atomic_open(self.path, "w", newline="", encoding="utf-8") as file:
            writer = self._writer(file)
            writer.writeheader()
            writer.writerows(rows)


def _parse(text):
    """A CSV cell back as int, float or str; an empty cell as None."""
    if text is None or text == "":
        return None
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def _is_numeric(rows: list[dict], name: str) -> bool:
    values = [row[name] for row in rows if row[name] is not None]
    return bool(values) and all(isinstance(value, (int, float)) for value in values)


def progress(iterable=None, *, total=None, desc=None, disable=None, **kwargs):
    """A tqdm progress bar; pass ``disable=True`` on processes that should stay quiet (rank > 0).

    ``disable=None`` keeps tqdm's default: no bar when the output is not a terminal (then
    ``log_line`` is what a log file or a pipe sees).
    """
    kwargs.setdefault("dynamic_ncols", True)
    return tqdm(iterable, total=total, desc=desc, disable=disable, **kwargs)


def duration(seconds: float) -> str:
    """``1m40s``, ``2h05m``: a time left, for progress lines."""
    minutes, seconds = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{seconds:02d}s"


def log_line(done: int, total: int, lr: float, means: dict) -> str:
    """One plain-text progress line of an iteration-based run, e.g. ``iteration 20/320: loss
    1.234 (loss_0 0.9, ...), lr 0.02, 0.31 s/it, ETA 1m40s`` (and the ``val_*`` scores of an
    evaluation at this iteration), printed above the progress bar
    (``tqdm.write``), so it reaches the terminal, a pipe or a log file alike. Returns it."""
    speed = means.get("sec_per_iter", 0.0)
    terms = ", ".join(f"{k} {v:.4g}" for k, v in means.items() if k.startswith("loss_"))
    scores = "".join(f", {k} {v:.4g}" for k, v in means.items() if k.startswith("val_") and isinstance(v, float))
    line = (f"iteration {done}/{total}: loss {means.get('loss', float('nan')):.4g}" + (f" ({terms})" if terms else "")
            + f", lr {lr:.3g}, {speed:.3g} s/it, ETA {duration(speed * (total - done))}{scores}")
    tqdm.write(line, file=sys.stdout)
    sys.stdout.flush()  # a pipe or file is block-buffered: show the line now
    return line


def epoch_line(row: dict, left: float) -> str:
    """The progress line of an epoch's log row, ``epoch 3: iteration 12 lr 0.1 train_loss ...
    ETA 1m40s`` (``left``: seconds), printed as :func:`log_line` prints. Returns it."""
    line = (f"epoch {row['epoch']}: " + " ".join(f"{k} {v:.4g}" for k, v in row.items() if k != "epoch")
            + f" ETA {duration(left)}")
    tqdm.write(line, file=sys.stdout)
    sys.stdout.flush()
    return line


def training_state(payload: dict, optimizer, scheduler, cfg, *, rngs: list[dict], scaler=None,
                   **progress_marks) -> dict:
    """What ``last.pth`` holds to continue a run exactly: the model ``payload`` (the task's
    checkpoint format), optimizer, scheduler, fp16 grad scaler, the RNG states ``rngs`` (one
    per process, in rank order, so each process of a torchrun resume draws on as it would
    have), the config and the position (e.g. ``epoch=``, ``iteration=``)."""
    scaler_state = {"scaler": scaler.state_dict()} if scaler is not None and scaler.is_enabled() else {}
    by_process = {"rng_by_process": rngs} if len(rngs) > 1 else {}
    return {**payload, "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), **scaler_state,
            "rng": rngs[0], **by_process, "config": config_to_dict(cfg), **progress_marks}


def save_training_state(run_dir, process, payload: dict, optimizer, scheduler, cfg, *, scaler=None,
                        **progress_marks) -> None:
    """Write ``last.pth`` (a :func:`training_state`) into ``run_dir`` (process 0's; None on the
    others). Every process calls it at the same step: they exchange their RNG states."""
    rngs = distributed.gather(rng_state(), process)
    if run_dir:
        save_checkpoint(training_state(payload, optimizer, scheduler, cfg, rngs=rngs, scaler=scaler, **progress_marks),
                        run_dir.last_checkpoint)


def restore_training_state(state: dict, model, optimizer, scheduler, scaler, process) -> None:
    """Put a ``training_state`` back into fresh model, optimizer, scheduler, scaler and RNGs:
    each process takes its own RNG state when the run had as many processes, else process 0's."""
    model.load_state_dict(state["model"])  # continue_run has checked that it fits
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    if scaler is not None and "scaler" in state:
        scaler.load_state_dict(state["scaler"])
    by_process = state.get("rng_by_process", [])
    same_processes = len(by_process) == process.world_size
    set_rng_state(by_process[process.rank] if same_processes else state["rng"])


def continue_run(out, run_dir, model, optimizer, scheduler, *, position: str, process, scaler=None,
                 check=None) -> dict:
    """Restore ``out/last.pth`` into model, optimizer, scheduler and RNGs (on every process)
    and return it; ``run_dir`` (process 0 only, else None) drops the logged rows after the
    checkpoint's ``position`` (e.g. ``"iteration"``). ``check(state, path)``, if given, sees
    the checkpoint first (raising CheckpointError for one it cannot continue)."""
    path = Path(out) / RunDir.LAST
    if not path.is_file():
        raise CheckpointError(f"cannot resume {out}: it has no {RunDir.LAST} (the run stopped before its first "
                              "checkpoint); start it again with --overwrite")
    state = load_checkpoint(path)
    if check is not None:
        check(state, path)
    problems = key_mismatches(model.state_dict(), state.get("model", {}))
    if problems:
        raise CheckpointError(f"{path} does not fit the model this run builds: {'; '.join(problems)}. "
                              "Were the data (its class count), the model or the mode changed since the run "
                              "started? Resume with the settings it was started with")
    restore_training_state(state, model, optimizer, scheduler, scaler, process)
    if run_dir:
        run_dir.metrics.truncate_after(position, state[position])
        print(f"resuming {run_dir.path} after {position} {state[position]}", flush=True)
    return state


def write_summary(run: RunDir, summary: dict) -> None:
    """Save ``summary.json`` and print the one line ``SUMMARY {json}`` scripts parse."""
    run.file("summary.json").write_text(json.dumps(summary, indent=1))
    print("SUMMARY " + json.dumps(summary), flush=True)


def perturbation_sizes(name: str, delta) -> dict:
    """``{name}_l2`` (mean per-sample L2 norm) and ``{name}_linf`` (largest entry) of a
    perturbation batch, for the metrics log; nothing when there is no perturbation."""
    if delta is None:
        return {}
    flat = delta.detach().flatten(1)
    return {f"{name}_l2": flat.norm(dim=1).mean().item(), f"{name}_linf": flat.abs().max().item()}


class LogWindow:
    """The per-step values of the steps since the last log line, summed; ``close`` gives their
    means over the steps and over all processes (every process must call it at the same step)
    with the seconds per step, and starts a new window."""

    def __init__(self):
        self._start()

    def _start(self):
        self.sums: dict[str, float] = {}
        self.count, self.tic = 0, time.perf_counter()

    def add(self, values: dict) -> None:
        for key, value in values.items():
            self.sums[key] = self.sums.get(key, 0.0) + value
        self.count += 1

    def restart_clock(self) -> None:
        """Leave out of ``sec_per_iter`` the time since the window opened (an evaluation)."""
        self.tic = time.perf_counter()

    def close(self, process, device) -> dict:
        totals = distributed.sum_over_processes(list(self.sums.values()), device)
        means = {k: v / (self.count * process.world_size) for k, v in zip(self.sums, totals)}
        means["sec_per_iter"] = (time.perf_counter() - self.tic) / self.count
        self._start()
        return means

    def state(self, process, device) -> Optional[dict]:
        """The open window's sums over all processes and its step count, for a checkpoint
        written inside a window (None when it is empty); every process must call it."""
        if not self.count:
            return None
        totals = distributed.sum_over_processes(list(self.sums.values()), device)
        return {"sums": dict(zip(self.sums, totals)), "count": self.count}

    def restore(self, state: Optional[dict], process) -> None:
        """Reopen the window a checkpoint carried: process 0 takes the sums of all processes,
        so that :meth:`close` adds them up once."""
        if state:
            self.sums = {k: (v if process.is_main else 0.0) for k, v in state["sums"].items()}
            self.count = state["count"]

"""Per-step time and peak memory of ``base``, ``afan`` and ``advprop`` training for each task.

    python -m bench                                   # every task and mode on the best device
    python -m bench --device cpu --tasks classification --repeats 10
    python -m bench --tiny                            # small models and batches: a quick check
    python -m bench --tasks segmentation channels_last=false batch_size=16   # config overrides

Each (task, mode) runs in a fresh process on the task's Shapes setting (see ``bench.cases``)
and reports the median step time after warm-up and the peak memory the steps add. The table
gives both as ratios to ``base``; for ``afan`` it also gives ``needed``, the sum of the passes
the method cannot avoid (clean forward+backward, ``steps`` attack passes, ``n`` strength
passes, and the SD ones), each timed on its own, and ``step / needed``: the overhead of the
implementation itself. The rows go to a CSV file (``--csv``).
"""
from __future__ import annotations

import argparse
import csv
import platform
import sys
from pathlib import Path

import torch

from afan.runtime import PRECISIONS
from bench.cases import MODES, TASKS, TINY
from bench.measure import measure_apart

COLUMNS = ("task", "mode", "device", "precision", "step_ms", "x_base", "peak_mb", "mem_x_base", "needed_ms", "step_over_needed",
           "description")


def rows_of(results: list[dict]) -> list[dict]:
    """Table rows: times in ms, memory in MiB, ratios to the same task's ``base``."""
    base = {r["task"]: r for r in results if r["mode"] == "base"}
    rows = []
    for r in results:
        ref = base.get(r["task"])
        needed = sum(p["seconds"] * p["count"] for p in r["passes"].values()) if r["passes"] else None
        peak, ref_peak = r["peak_bytes"], ref and ref["peak_bytes"]
        rows.append({
            "task": r["task"], "mode": r["mode"], "device": r["device"], "precision": r["precision"],
            "step_ms": 1000 * r["step_s"],
            "x_base": r["step_s"] / ref["step_s"] if ref else None,
            "peak_mb": None if peak is None else peak / 2 ** 20,
            "mem_x_base": peak / ref_peak if peak is not None and ref_peak else None,
            "needed_ms": None if needed is None else 1000 * needed,
            "step_over_needed": None if needed is None else r["step_s"] / needed,
            "description": r["description"],
        })
    return rows


def _cell(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.2f}" if abs(value) < 100 else f"{value:.0f}"
    return str(value)


def format_table(rows: list[dict]) -> str:
    """A Markdown table of the rows (without the descriptions, which follow it)."""
    columns = COLUMNS[:-1]
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_cell(row[c]) for c in columns) + " |" for row in rows]
    described = {row["task"]: row["description"] for row in rows}
    lines += [""] + [f"{task}: {text}" for task, text in described.items()]
    return "\n".join(lines)


def write_csv(rows: list[dict], path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)


def machine() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", default=",".join(TASKS), help=f"comma-separated, from {', '.join(TASKS)}")
    parser.add_argument("--modes", default=",".join(MODES), help=f"comma-separated, from {', '.join(MODES)}")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    parser.add_argument("--repeats", type=int, default=5, help="timed steps; the median is reported")
    parser.add_argument("--precision", default="fp32", help="fp32, bf16, fp16, or auto (bf16 on CUDA)")
    parser.add_argument("--tiny", action="store_true", help="small models and batches (a quick check)")
    parser.add_argument("--data-root", default="data", help="where the Shapes detection data is written")
    parser.add_argument("--csv", default="runs/bench.csv", help="where the rows are written")
    parser.add_argument("settings", nargs="*", metavar="KEY=VALUE",
                        help="config overrides for every task benchmarked, e.g. channels_last=false")
    args = parser.parse_args(argv)
    tasks, modes = args.tasks.split(","), args.modes.split(",")
    unknown = sorted(set(tasks) - set(TASKS)) + sorted(set(modes) - set(MODES))
    if unknown or args.warmup < 0 or args.repeats < 1 or args.precision not in PRECISIONS:
        print(f"error: unknown task or mode {unknown}; choose from {TASKS} and {MODES}, with --warmup >= 0, "
              f"--repeats >= 1 and --precision one of {', '.join(PRECISIONS)}", file=sys.stderr)
        return 2
    if "base" not in modes:
        modes.insert(0, "base")  # the ratios need it
    results = []
    for task in tasks:
        overrides = [*(TINY[task] if args.tiny else []), *([f"data.root={args.data_root}"] if task == "detection" else []),
                     *args.settings]
        for mode in modes:
            results.append(measure_apart(task, mode, args.device, overrides, args.warmup, args.repeats,
                                         args.precision))
            print(f"{task} {mode}: {1000 * results[-1]['step_s']:.1f} ms/step", file=sys.stderr, flush=True)
    rows = rows_of(results)
    print(f"machine: {machine()}; torch {torch.__version__}; median of {args.repeats} steps after {args.warmup}")
    print(format_table(rows))
    write_csv(rows, args.csv)
    print(f"rows written to {args.csv}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Per-step time and peak memory of ``base``, ``afan`` and ``advprop`` training for each task.

    python -m bench                                   # every task and mode on the best device
    python -m bench --device cpu --tasks classification --repeats 10
    python -m bench --tiny                            # small models and batches: a quick check
    python -m bench --tasks segmentation channels_last=false batch_size=16   # config overrides
    python -m bench --batched                         # A-FAN's strengths one pass each, or joined

The modes of a task (see ``bench.cases``) each run in a process of their own, kept alive, and
are timed interleaved: ``--repeats`` rounds, each timing every mode's step twice, in the order
``base, afan, advprop, passes`` and back (``bench.rounds``), after ``--warmup`` steps. Each
round gives its ratios; the table reports their median and range over the rounds: the step
time as a multiple of ``base`` and of ``advprop``, the peak memory the steps add, and for
``afan`` ``needed``, the passes the method cannot avoid (clean forward+backward, ``steps``
attack passes, ``n`` strength passes, and the SD ones) run back to back, and ``step /
needed``, the overhead of the implementation itself. A ``step / needed`` below 0.9 cannot be
(the step runs those passes) and marks the row unreliable; above 1.05 the row names the
operators the step spends the difference on (``torch.profiler``). ``--batched`` times the
cases of ``bench.batched`` instead. The rows go to a CSV file (``--csv``).
"""
from __future__ import annotations

import argparse
import csv
import platform
import sys
from pathlib import Path

import torch

from afan_harness.runtime import PRECISIONS
from bench import batched, cases
from bench.measure import free_threads, measure_rounds
from bench.rounds import OVERHEAD_ABOVE, UNRELIABLE_BELOW, Spread

# What one run times: the cases, their modes, the mode the ratios are to, the one compared
# against (or None), and the small settings of --tiny.
SUITES = {
    "tasks": (cases.BUILDERS, cases.MODES, "base", "advprop", cases.TINY),
    "batched": (batched.BUILDERS, batched.MODES, "per_strength", None, batched.TINY),
}

COLUMNS = ("task", "mode", "device", "precision", "rounds", "step_ms", "ref", "x_ref", "x_ref_low", "x_ref_high",
           "versus", "x_versus", "x_versus_low", "x_versus_high", "peak_mb", "mem_x_ref", "needed_ms",
           "step_over_needed", "step_over_needed_low", "step_over_needed_high", "reliable", "note", "description")


def _spread_fields(name: str, spread: Spread | None) -> dict:
    if spread is None:
        return {name: None, f"{name}_low": None, f"{name}_high": None}
    return {name: spread.median, f"{name}_low": spread.low, f"{name}_high": spread.high}


def _note(summary, profile) -> str | None:
    if not summary.reliable:
        return (f"unreliable: step / needed {_range(summary.step_over_needed)} is below {UNRELIABLE_BELOW}, "
                "impossible for a step that runs those passes: they were timed under other conditions")
    if summary.overhead:
        spent = ", ".join(f"{name} +{ms:.1f} ms ({calls:+d} calls)" for name, ms, calls in profile) or "nothing profiled"
        return (f"step / needed above {OVERHEAD_ABOVE}; profiled self time, step minus passes: {spent}")
    return None


def rows_of(task: str, measured: dict, reference: str, versus: str | None) -> list[dict]:
    """Table rows of one task's ``measure_rounds`` result: times in ms, memory in MiB, ratios
    as median and range over the rounds."""
    summaries, peaks, info = measured["summaries"], measured["peaks"], measured["info"]
    ref_peak = peaks[reference]
    rounds = len(measured["times"][(reference, "step")]) // 2
    rows = []
    for mode, summary in summaries.items():
        peak = peaks[mode]
        rows.append({
            "task": task, "mode": mode, "device": info[mode]["device"], "precision": info[mode]["precision"],
            "rounds": rounds, "step_ms": 1000 * summary.step_s, "ref": reference,
            **_spread_fields("x_ref", summary.x_ref),
            "versus": versus if summary.x_versus is not None else None, **_spread_fields("x_versus", summary.x_versus),
            "peak_mb": None if peak is None else peak / 2 ** 20,
            "mem_x_ref": peak / ref_peak if peak is not None and ref_peak else None,
            "needed_ms": None if summary.needed_s is None else 1000 * summary.needed_s,
            **_spread_fields("step_over_needed", summary.step_over_needed),
            "reliable": summary.reliable, "note": _note(summary, measured["profiles"].get(mode)),
            "description": info[mode]["description"],
        })
    return rows


def _number(value) -> str:
    if value is None:
        return "-"
    return f"{value:.2f}" if abs(value) < 100 else f"{value:.0f}"


def _range(spread: Spread) -> str:
    return f"{spread.median:.2f} ({spread.low:.2f}–{spread.high:.2f})"


def _ratio_cell(row: dict, name: str) -> str:
    if row[name] is None:
        return "-"
    return _range(Spread(row[name], row[f"{name}_low"], row[f"{name}_high"]))


def format_table(rows: list[dict]) -> str:
    """A Markdown table of the rows, ratios as median (range) over the rounds (the ``× advprop``
    and ``needed`` columns where some row has them); a row's note and each task's description
    follow it. An unreliable row shows no ``needed`` figures."""
    reference = rows[0]["ref"]
    versus = next((row["versus"] for row in rows if row["versus"]), None)
    with_needed = any(row["needed_ms"] is not None for row in rows)
    header = ["task", "mode", "device", "precision", "step ms", f"× {reference}", *([f"× {versus}"] if versus else []),
              "peak MiB", f"mem × {reference}", *(["needed ms", "step / needed"] if with_needed else [])]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        needed = ([_number(row["needed_ms"]), _ratio_cell(row, "step_over_needed")] if row["reliable"]
                  else ["unreliable", "unreliable"])
        cells = [row["task"], row["mode"], row["device"], row["precision"], _number(row["step_ms"]),
                 _ratio_cell(row, "x_ref"), *([_ratio_cell(row, "x_versus")] if versus else []),
                 _number(row["peak_mb"]), _number(row["mem_x_ref"]), *(needed if with_needed else [])]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    lines += [f"{row['task']} {row['mode']}: {row['note']}" for row in rows if row["note"]]
    described = {row["task"]: row["description"] for row in rows}
    lines += [f"{task}: {text}" for task, text in described.items()]
    return "\n".join(lines)


def write_csv(rows: list[dict], path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)


def machine(threads: int | None) -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return f"{platform.processor() or platform.machine()}, {threads or torch.get_num_threads()} threads"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batched", action="store_true",
                        help=f"time A-FAN's strengths one pass each or joined, on {', '.join(batched.BUILDERS)}")
    parser.add_argument("--tasks", help="comma-separated: the tasks (or with --batched the cases) to time; default all")
    parser.add_argument("--modes", help="comma-separated: the modes to time; default all")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first, in each mode's process")
    parser.add_argument("--repeats", type=int, default=5,
                        help="rounds; each times every mode twice, and the ratios are their median over the rounds")
    parser.add_argument("--precision", default="fp32", help="fp32, bf16, fp16, or auto (bf16 on CUDA)")
    parser.add_argument("--threads", type=int, help="intra-op threads in each mode's process (default on the CPU: "
                                                    "torch's, at most the cores other work leaves free)")
    parser.add_argument("--tiny", action="store_true", help="small models and batches (a quick check)")
    parser.add_argument("--data-root", default="data", help="where the Shapes detection data is written")
    parser.add_argument("--csv", default="runs/bench.csv", help="where the rows are written")
    parser.add_argument("settings", nargs="*", metavar="KEY=VALUE",
                        help="config overrides for every case benchmarked, e.g. channels_last=false")
    args = parser.parse_args(argv)
    builders, all_modes, reference, versus, tiny = SUITES["batched" if args.batched else "tasks"]
    tasks = args.tasks.split(",") if args.tasks else list(builders)
    modes = args.modes.split(",") if args.modes else list(all_modes)
    unknown = sorted(set(tasks) - set(builders)) + sorted(set(modes) - set(all_modes))
    if unknown or args.warmup < 0 or args.repeats < 1 or args.precision not in PRECISIONS or (args.threads or 1) < 1:
        print(f"error: unknown task or mode {unknown}; choose from {tuple(builders)} and {all_modes}, with --warmup >= 0, "
              f"--repeats >= 1, --threads >= 1 and --precision one of {', '.join(PRECISIONS)}", file=sys.stderr)
        return 2
    if reference not in modes:
        modes.insert(0, reference)  # the ratios need it
    on_cpu = args.device == "cpu" or (args.device == "auto" and not torch.cuda.is_available())
    if on_cpu and args.threads is None:
        args.threads, busy = free_threads(torch.get_num_threads())
        if busy is not None:
            print(f"{args.threads} thread(s) per process: {busy:.1f} of the cores were busy with other work "
                  "(--threads N to choose)", file=sys.stderr)
    rows = []
    for task in tasks:
        overrides = [*(tiny[task] if args.tiny else []), *([f"data.root={args.data_root}"] if task == "detection" else []),
                     *args.settings]
        measured = measure_rounds(builders[task], modes, args.device, overrides, args.warmup, args.repeats,
                                  args.precision, reference=reference, versus=versus, threads=args.threads, label=task)
        rows += rows_of(task, measured, reference, versus)
    print(f"machine: {machine(args.threads)}; torch {torch.__version__}; {args.repeats} rounds after {args.warmup} warm-up steps, "
          "ratios as median (range) over the rounds")
    print(format_table(rows))
    write_csv(rows, args.csv)
    print(f"rows written to {args.csv}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

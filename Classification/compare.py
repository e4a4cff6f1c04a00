"""The main job on a fresh machine: train a baseline and an A-FAN model on the built-in
Shapes data, print a side-by-side table and save a comparison plot beside the runs.

    python -m Classification.compare                 # runs/compare/{base,afan}
    python -m Classification.compare epochs=2        # overrides apply to both runs
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from afan.cli import FAILURES, failure_status
from afan.config import load_config
from afan.rundir import MetricsLog
from Classification.train import run
from Classification.config import TrainConfig

CONFIGS = Path(__file__).resolve().parent / "configs"
MODES = ("base", "afan")


def plot(runs: dict[str, Path], path: Path) -> None:
    """Validation accuracy and training loss per epoch of each run, side by side."""
    figure = Figure(figsize=(9, 3.5))
    axes = figure.subplots(1, 2)
    for mode, folder in runs.items():
        rows = MetricsLog(folder / "metrics.csv").rows()
        epochs = [r["epoch"] for r in rows]
        axes[0].plot(epochs, [100 * r["val_acc"] for r in rows], marker="o", label=mode)
        axes[1].plot(epochs, [r["train_loss"] for r in rows], marker="o", label=mode)
    for ax, title in zip(axes, ("validation accuracy (%)", "training loss")):
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend()
    figure.suptitle("Small CNN on the built-in Shapes data: baseline vs A-FAN")
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100)


def table(summaries: list[dict]) -> str:
    lines = ["| mode | best val. acc. | test acc. | s / epoch |", "| --- | --- | --- | --- |"]
    for s in summaries:
        lines.append(f"| {s['mode']} | {100 * s['best_val_acc']:.1f}% | {100 * s['test_acc']:.1f}% "
                     f"| {s['sec_per_epoch']:.1f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="settings for both runs")
    parser.add_argument("--out", default="runs/compare", help="folder of the two runs (replaced)")
    # The plot goes with the runs it shows; the repository's Figs/ picture changes only when
    # asked (--figure Figs/shapes_base_vs_afan.png), so a demo leaves the checkout clean.
    parser.add_argument("--figure", help="where to write the comparison plot (default: OUT/base_vs_afan.png)")
    args = parser.parse_intermixed_args(argv)
    summaries, folders, cfg = [], {}, None
    try:
        for mode in MODES:
            folders[mode] = Path(args.out) / mode
            cfg = load_config(TrainConfig, CONFIGS / f"shapes_{mode}.yaml",
                              [*args.overrides, f"out={folders[mode]}"])
            summaries.append(run(cfg, overwrite=True))
    except FAILURES as error:
        return failure_status(error, cfg, module="Classification.train", configs=CONFIGS)
    figure = Path(args.figure or Path(args.out) / "base_vs_afan.png")
    plot(folders, figure)
    print(table(summaries))
    print(f"plot: {figure}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

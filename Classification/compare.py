"""The main job on a fresh machine: train a baseline, an A-FAN and an AdvProp model on the
built-in Shapes data, then score each best model on the test split clean, under input PGD,
under a feature attack and under common corruptions; print the table side by side with each
run's training time, and save the plots beside the runs.

    python -m Classification.compare                 # runs/compare/{base,afan,advprop}
    python -m Classification.compare epochs=2        # overrides apply to every run

The schedule (each mode's ``configs/shapes_<mode>.yaml``: 12 epochs) and the evaluation
below were fixed before any of their results were seen, and are not tuned towards them.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from afan_harness.cli import FAILURES, failure_status
from afan_harness.config import load_config
from afan_harness.rundir import MetricsLog, duration
from afan_harness.robustness import CORRUPTIONS, FeatureAttack, corruption_sweep
from afan_harness.runtime import select_device
from afan_harness.settings import AdvPropConfig
from Classification.config import TrainConfig
from Classification.data import build_datasets, make_loader
from Classification.evaluation import evaluate, feature_logits, pgd_logits
from Classification.models import load_model
from Classification.train import run

CONFIGS = Path(__file__).resolve().parent / "configs"
MODES = ("base", "afan", "advprop")
# The release's robustness evaluation: 10 PGD steps of 0.5/255 in an eps ball of 2/255.
PGD = AdvPropConfig(steps=10, step_size=0.5, eps=2.0, random_start=True)
# A feature attack where A-FAN trains (after block1), four times its training step, scored
# on the adversarial feature itself.
FEATURE = FeatureAttack(layer="block1", gamma=2.0, steps=5, strength=1.0)
COLUMNS = {"clean": "clean", "pgd": "PGD 2/255", "feature": "feature (block1)", "corruption": "corruptions"}


def robustness(checkpoint: Path, cfg: TrainConfig, device) -> dict:
    """Test accuracy of the model in ``checkpoint``: clean, under PGD, under the feature attack
    and the mean over every corruption at severities 1-5."""
    splits = build_datasets(cfg.data, seed=cfg.seed)
    model = load_model(checkpoint).to(device)

    def accuracy(dataset, predict=None) -> float:
        loader = make_loader(dataset, cfg.batch_size, train=False, workers=cfg.data.workers, seed=cfg.seed)
        return evaluate(model, loader, device, predict=predict, desc="score")["top1"]

    return {"clean": accuracy(splits.test), "pgd": accuracy(splits.test, pgd_logits(model, PGD)),
            "feature": accuracy(splits.test, feature_logits(model, FEATURE)),
            "corruption": corruption_sweep(splits.test, accuracy, list(CORRUPTIONS), seed=cfg.seed)[-1]["score"]}


def plot(runs: dict[str, Path], scores: dict[str, dict], path: Path) -> None:
    """Validation accuracy per epoch of each run, and its test accuracy under each evaluation."""
    figure = Figure(figsize=(11, 3.8), layout="constrained")
    curves, bars = figure.subplots(1, 2)
    for mode, folder in runs.items():
        rows = MetricsLog(folder / "metrics.csv").rows()
        curves.plot([r["epoch"] for r in rows], [100 * r["val_acc"] for r in rows], marker="o", label=mode)
    curves.set(title="validation accuracy (%)", xlabel="epoch")
    curves.xaxis.set_major_locator(MaxNLocator(integer=True))
    width = 0.8 / len(scores)
    for k, (mode, result) in enumerate(scores.items()):
        bars.bar([i + k * width for i in range(len(COLUMNS))], [100 * result[c] for c in COLUMNS], width, label=mode)
    bars.set_xticks([i + width * (len(scores) - 1) / 2 for i in range(len(COLUMNS))], list(COLUMNS.values()))
    bars.set_title("test accuracy (%)")
    for ax in (curves, bars):
        ax.grid(alpha=0.3)
        ax.legend()
    figure.suptitle("Small CNN on the built-in Shapes data: baseline, A-FAN and AdvProp")
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100)


def table(scores: dict[str, dict], seconds: dict[str, float]) -> str:
    """The Markdown table of the test accuracies and training times."""
    lines = ["| mode | " + " | ".join(COLUMNS.values()) + " | training time |",
             "| --- |" + " --- |" * (len(COLUMNS) + 1)]
    for mode, result in scores.items():
        lines.append(f"| {mode} | " + " | ".join(f"{100 * result[c]:.1f}%" for c in COLUMNS)
                     + f" | {duration(seconds[mode])} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="settings for every run")
    parser.add_argument("--out", default="runs/compare", help="folder of the runs (replaced)")
    # The plot goes with the runs it shows; the repository's Figs/ picture changes only when
    # asked (--figure Figs/shapes_base_vs_afan.png), so a demo leaves the checkout clean.
    parser.add_argument("--figure", help="where to write the comparison plot (default: OUT/base_vs_afan.png)")
    args = parser.parse_intermixed_args(argv)
    folders, seconds, scores, cfg = {}, {}, {}, None
    try:
        for mode in MODES:
            folders[mode] = Path(args.out) / mode
            cfg = load_config(TrainConfig, CONFIGS / f"shapes_{mode}.yaml", [*args.overrides, f"out={folders[mode]}"])
            tic = time.perf_counter()
            run(cfg, overwrite=True)
            seconds[mode] = time.perf_counter() - tic
            scores[mode] = robustness(folders[mode] / "best.pth", cfg, select_device(cfg.device))
    except FAILURES as error:
        return failure_status(error, cfg, module="Classification.train", configs=CONFIGS)
    figure = Path(args.figure or Path(args.out) / "base_vs_afan.png")
    plot(folders, scores, figure)
    print(table(scores, seconds))
    print(f"plot: {figure}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Evaluate a segmentation checkpoint: mIoU, pixel accuracy, mean class accuracy, per-class IoU
as CSV and a few colourised predictions (image | ground truth | prediction) as PNG.

    python -m Segmentation.test --checkpoint runs/shapes_seg_afan/final.pth
    python -m Segmentation.test --checkpoint best_deeplabv3plus_resnet50_voc_os16.pth \
        data.name=voc12 eval.mode=sliding

The data and evaluation settings are those of the run that wrote the checkpoint (its
``config.yaml``); ``data.KEY=VALUE`` and ``eval.KEY=VALUE`` change them, and the script says
which. Accepts this project's checkpoints, DeepLabV3Plus-Pytorch's ``{'model_state': ...}``
files and plain state dicts (the architecture is read off the keys; no ``config.yaml``: name
the data). Prints one line ``SUMMARY {json}``.
"""
from __future__ import annotations

import dataclasses
import sys

from afan_harness.cli import pgd_settings, robustness_arguments, test_main, test_output
from afan_harness.robustness import corruption_score
from Segmentation.config import TrainConfig
from Segmentation.data import build_datasets
from Segmentation.evaluation import evaluate, run_evaluation
from Segmentation.models import load_model
from Segmentation.steps import pixel_pgd


def arguments(parser) -> None:
    parser.add_argument("--output-stride", type=int, choices=(8, 16), help="default: the one training recorded, else 16")
    robustness_arguments(parser)


def load(args, cfg, splits, device):
    return load_model(args.checkpoint, name=args.model, num_classes=splits.num_classes,
                      output_stride=args.output_stride).to(device)


def score(args, cfg, splits, model, device) -> dict:
    out = test_output(args, cfg.data.name)
    metrics = run_evaluation(model, splits, device, out, cfg.eval, workers=cfg.data.workers)
    quiet = dataclasses.replace(cfg.eval, save_images=0)

    def miou(dataset, attack=None) -> float:
        return evaluate(model, dataset, device, splits.num_classes, quiet, workers=cfg.data.workers,
                        attack=attack)["miou"]

    if args.pgd_eps > 0:
        attack = pgd_settings(args)
        metrics.update(pgd_miou=miou(splits.val, lambda images, masks: pixel_pgd(model, images, masks, attack)),
                       pgd_eps=args.pgd_eps, pgd_steps=args.pgd_steps)
    if args.corruptions:
        metrics["corruption_miou"] = corruption_score(splits.val, miou, args.corruptions, args.severities, cfg.seed,
                                                      "miou", out)
    return {**metrics, "out": str(out)}


def main(argv=None) -> int:
    return test_main(argv, description="Evaluate a DeepLabv3+ checkpoint.", config_cls=TrainConfig,
                     sections=("data", "eval"), build_datasets=build_datasets, load=load, score=score,
                     model_help="architecture name, if it cannot be read off the file",
                     out_help="folder for per_class_iou.csv and pred_*.png (default: test_<data> next to the "
                              "checkpoint, never over an earlier one)", arguments=arguments)


if __name__ == "__main__":
    sys.exit(main())

"""Evaluate a segmentation checkpoint: mIoU, pixel accuracy, mean class accuracy, per-class IoU
as CSV and a few colourised predictions (image | ground truth | prediction) as PNG.

    python -m Segmentation.test --checkpoint runs/shapes_seg_afan/final.pth
    python -m Segmentation.test --checkpoint best_deeplabv3plus_resnet50_voc_os16.pth \
        data.name=voc12 eval.mode=sliding

On request also its robustness: under input PGD (the release's ``--eval_pgd``), with a backbone
feature perturbed and under common corruptions (``--pgd-eps``, ``--feature-layer``,
``--corruptions``; see ``--help``).

The data and evaluation settings are those of the run that wrote the checkpoint (its
``config.yaml``); ``data.KEY=VALUE`` and ``eval.KEY=VALUE`` change them, and the script says
which. Accepts this project's checkpoints, DeepLabV3Plus-Pytorch's ``{'model_state': ...}``
files and plain state dicts (the architecture is read off the keys; no ``config.yaml``: name
the data). Prints one line ``SUMMARY {json}``.
"""
from __future__ import annotations

import dataclasses
import sys

from afan_harness.cli import robustness_scores, test_entry, test_output
from Segmentation.config import TrainConfig
from Segmentation.data import build_datasets
from Segmentation.evaluation import evaluate, feature_logits, pgd_logits, run_evaluation
from Segmentation.models import load_model
from Segmentation.train import build_model


def arguments(parser) -> None:
    parser.add_argument("--output-stride", type=int, choices=(8, 16), help="default: the one training recorded, else 16")


def load(args, cfg, splits, device):
    return load_model(args.checkpoint, name=args.model, num_classes=splits.num_classes,
                      output_stride=args.output_stride).to(device)


def score(args, cfg, splits, model, device) -> dict:
    out = test_output(args, cfg.data.name)
    metrics = run_evaluation(model, splits, device, out, cfg.eval, workers=cfg.data.workers)
    quiet = dataclasses.replace(cfg.eval, save_images=0)

    def scores(dataset, forward=None) -> dict:
        found = evaluate(model, dataset, device, splits.num_classes, quiet, workers=cfg.data.workers, forward=forward)
        return {k: v for k, v in found.items() if k != "per_class_iou"}

    return {**metrics, **robustness_scores(args, splits.val, scores, pgd=lambda attack, bn: pgd_logits(model, attack, bn),
                                           feature=lambda attack: feature_logits(model, attack), metric="miou",
                                           seed=cfg.seed, out=out), "out": str(out)}


main = test_entry(description="Evaluate a DeepLabv3+ checkpoint.", config_cls=TrainConfig,
                  sections=("data", "eval"), build_datasets=build_datasets, load=load, build=build_model,
                  score=score, writes="per_class_iou.csv and pred_*.png", arguments=arguments,
                  model_help="architecture name, if it cannot be read off the file")


if __name__ == "__main__":
    sys.exit(main())

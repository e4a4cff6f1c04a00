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

import argparse
import json
import sys

from afan.checkpoint import CheckpointError
from afan.cli import add_test_arguments, test_config, test_output
from afan.config import ConfigError
from afan.loading import DataError
from afan.runtime import select_device
from Segmentation.config import TrainConfig
from Segmentation.data import build_datasets
from Segmentation.evaluation import run_evaluation
from Segmentation.models import load_model


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Evaluate a DeepLabv3+ checkpoint.")
    parser.add_argument("--checkpoint", required=True, help="checkpoint file to evaluate")
    parser.add_argument("--model", help="architecture name, if it cannot be read off the file")
    parser.add_argument("--output-stride", type=int, choices=(8, 16), help="default: the one training recorded, else 16")
    parser.add_argument("--out", help="folder for per_class_iou.csv and pred_*.png (default: test_<data> next to the "
                                      "checkpoint, never over an earlier one)")
    add_test_arguments(parser, "data. and eval.,")
    args = parser.parse_intermixed_args(argv)
    try:
        cfg = test_config(TrainConfig, args, ("data", "eval"))
        data_cfg, eval_cfg = cfg.data, cfg.eval
        splits = build_datasets(data_cfg, seed=cfg.seed)
        device = select_device(args.device)
        model = load_model(args.checkpoint, name=args.model, num_classes=splits.num_classes,
                           output_stride=args.output_stride).to(device)
    except (ConfigError, DataError, CheckpointError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    out = test_output(args, data_cfg.name)
    metrics = run_evaluation(model, splits, device, out, eval_cfg, workers=data_cfg.workers)
    print("SUMMARY " + json.dumps({"checkpoint": args.checkpoint, "data": data_cfg.name, **metrics,
                                   "out": str(out)}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Evaluate a detection checkpoint: VOC mAP@0.5 (11-point for VOC07 data, all-point
otherwise), COCO AP for COCO-format data, per-class AP as CSV, a few drawn predictions.

    python -m Detection.test --checkpoint runs/shapes_det_afan/final.pth
    python -m Detection.test --checkpoint fasterrcnn.pth --model fasterrcnn_resnet50_fpn data.name=voc07

The data settings are those of the run that wrote the checkpoint (its ``config.yaml``);
``data.KEY=VALUE`` changes them, and the script says which. Accepts this project's
checkpoints and plain torchvision FasterRCNN state dicts (no ``config.yaml``: name the data).
Prints one line ``SUMMARY {json}``.
"""
from __future__ import annotations

import argparse
import json
import sys

from afan.checkpoint import CheckpointError
from afan.cli import add_test_arguments, non_negative_int, test_config, test_output
from afan.config import ConfigError
from afan.loading import DataError
from afan.runtime import select_device
from Detection.data import build_datasets
from Detection.evaluation import run_evaluation
from Detection.models import load_model
from Detection.train import TrainConfig


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Evaluate a Faster R-CNN checkpoint.")
    parser.add_argument("--checkpoint", required=True, help="checkpoint file to evaluate")
    parser.add_argument("--model", help="architecture name, needed for plain state dicts")
    parser.add_argument("--out", help="folder for per_class_ap.csv and predictions/ (default: test_<data> next to the "
                                      "checkpoint, never over an earlier one)")
    parser.add_argument("--draw", type=non_negative_int, help="test images drawn with their predictions "
                                                                   "(default: the run's draw_images)")
    add_test_arguments(parser, "data.")
    args = parser.parse_intermixed_args(argv)
    try:
        cfg = test_config(TrainConfig, args, ("data",))
        data_cfg = cfg.data
        splits = build_datasets(data_cfg, seed=cfg.seed)
        device = select_device(args.device)
        model = load_model(args.checkpoint, name=args.model, num_classes=splits.num_classes).to(device)
    except (ConfigError, DataError, CheckpointError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    out = test_output(args, data_cfg.name)
    metrics = run_evaluation(model, splits, device, out, draw=cfg.draw_images if args.draw is None else args.draw)
    print("SUMMARY " + json.dumps({"checkpoint": args.checkpoint, "data": data_cfg.name, **metrics,
                                   "out": str(out)}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

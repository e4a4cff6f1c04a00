"""Evaluate a detection checkpoint: VOC mAP@0.5 (11-point for VOC07 data, all-point
otherwise), COCO AP for COCO-format data, per-class AP as CSV, a few drawn predictions; and on
request its robustness: under input PGD (the release's ``eval_rob.py``), with a backbone
feature perturbed (its ``eval_sat_layers.py``) and under common corruptions.

    python -m Detection.test --checkpoint runs/shapes_det_afan/final.pth
    python -m Detection.test --checkpoint fasterrcnn.pth --model fasterrcnn_resnet50_fpn data.name=voc07
    python -m Detection.test --checkpoint runs/voc07_afan/final.pth --pgd-eps 2 --feature-layer layer3

The data settings are those of the run that wrote the checkpoint (its ``config.yaml``);
``data.KEY=VALUE`` changes them, and the script says which. Accepts this project's
checkpoints and plain torchvision FasterRCNN state dicts (no ``config.yaml``: name the data).
Prints one line ``SUMMARY {json}``.
"""
from __future__ import annotations

import sys

from afan_harness.cli import non_negative_int, robustness_scores, test_entry, test_output
from Detection.config import TrainConfig
from Detection.data import build_datasets
from Detection.evaluation import evaluate, feature_outputs, pgd_outputs, predict, run_evaluation
from Detection.models import load_model
from Detection.train import build_model


def arguments(parser) -> None:
    parser.add_argument("--draw", type=non_negative_int, help="test images drawn with their predictions "
                                                              "(default: the run's draw_images)")


def load(args, cfg, splits, device):
    return load_model(args.checkpoint, name=args.model, num_classes=splits.num_classes).to(device)


def score(args, cfg, splits, model, device) -> dict:
    out = test_output(args, cfg.data.name)
    metrics = run_evaluation(model, splits, device, out, draw=cfg.draw_images if args.draw is None else args.draw)
    key = "AP" if splits.eval_info.kind == "coco" else "mAP"

    def scores(dataset, outputs=None) -> dict:
        found = evaluate(splits.eval_info, predict(model, dataset, device, outputs=outputs), splits.class_names)
        return {k: v for k, v in found.items() if k != "per_class"}

    return {**metrics, **robustness_scores(args, splits.test, scores, pgd=lambda attack, bn: pgd_outputs(model, attack, bn),
                                           feature=lambda attack: feature_outputs(model, attack), metric=key,
                                           seed=cfg.seed, out=out), "out": str(out)}


main = test_entry(description="Evaluate a Faster R-CNN checkpoint.", config_cls=TrainConfig,
                  sections=("data",), build_datasets=build_datasets, load=load, build=build_model, score=score,
                  writes="per_class_ap.csv and predictions/", arguments=arguments)


if __name__ == "__main__":
    sys.exit(main())

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

import sys

from afan_harness.cli import non_negative_int, pgd_settings, robustness_arguments, test_main, test_output
from afan_harness.robustness import corruption_score
from Detection.config import TrainConfig
from Detection.data import build_datasets
from Detection.evaluation import evaluate, predict, run_evaluation
from Detection.models import load_model
from Detection.steps import pixel_pgd


def arguments(parser) -> None:
    parser.add_argument("--draw", type=non_negative_int, help="test images drawn with their predictions "
                                                              "(default: the run's draw_images)")
    robustness_arguments(parser)


def load(args, cfg, splits, device):
    return load_model(args.checkpoint, name=args.model, num_classes=splits.num_classes).to(device)


def score(args, cfg, splits, model, device) -> dict:
    out = test_output(args, cfg.data.name)
    metrics = run_evaluation(model, splits, device, out, draw=cfg.draw_images if args.draw is None else args.draw)
    key = "AP" if splits.eval_info.kind == "coco" else "mAP"

    def score_of(dataset, attack=None) -> float:
        return evaluate(splits.eval_info, predict(model, dataset, device, attack=attack), splits.class_names)[key]

    if args.pgd_eps > 0:
        attack = pgd_settings(args)
        metrics.update({f"pgd_{key}": score_of(splits.test, lambda images, targets: pixel_pgd(model, images, targets,
                                                                                             attack)),
                        "pgd_eps": args.pgd_eps, "pgd_steps": args.pgd_steps})
    if args.corruptions:
        metrics[f"corruption_{key}"] = corruption_score(splits.test, score_of, args.corruptions, args.severities,
                                                         cfg.seed, key, out)
    return {**metrics, "out": str(out)}


def main(argv=None) -> int:
    return test_main(argv, description="Evaluate a Faster R-CNN checkpoint.", config_cls=TrainConfig,
                     sections=("data",), build_datasets=build_datasets, load=load, score=score,
                     model_help="architecture name, needed for plain state dicts",
                     out_help="folder for per_class_ap.csv and predictions/ (default: test_<data> next to the "
                              "checkpoint, never over an earlier one)", arguments=arguments)


if __name__ == "__main__":
    sys.exit(main())

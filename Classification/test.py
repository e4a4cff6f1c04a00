"""Score a classifier checkpoint: top-1/top-5 on validation or test data, optionally under
pixel PGD.

    python -m Classification.test --checkpoint runs/shapes_afan/best.pth
    python -m Classification.test --checkpoint AFAN_resnet56.pth.tar data.name=cifar10 --pgd-eps 2

The data settings are those of the run that wrote the checkpoint (its ``config.yaml``), so a
run is scored on what it was trained and tested on; ``data.KEY=VALUE`` changes them, and the
script says which. Accepts this project's checkpoints, plain state dicts (with --model) and
the original release's checkpoints (no ``config.yaml``: name the data). Prints one line
``SUMMARY {json}``.
"""
from __future__ import annotations

import sys

import torch

from afan.cli import non_negative_float, non_negative_int, positive_int, test_main
from Classification.config import AdvPropConfig, TrainConfig
from Classification.data import build_datasets, make_loader
from Classification.evaluation import evaluate
from Classification.models import load_model


def arguments(parser) -> None:
    parser.add_argument("--split", choices=("val", "test"), default="test")
    parser.add_argument("--batch-size", type=positive_int, default=256)
    parser.add_argument("--contiguous", action="store_true", help="NCHW instead of channels_last tensors")
    parser.add_argument("--pgd-eps", type=non_negative_float, default=0.0, help="PGD radius in 1/255 (0: clean only)")
    parser.add_argument("--pgd-steps", type=non_negative_int, default=10)
    parser.add_argument("--pgd-step-size", type=non_negative_float, help="PGD step in 1/255 (default eps/4)")


def layout(args) -> torch.memory_format:
    return torch.contiguous_format if args.contiguous else torch.channels_last


def load(args, splits, device):
    model = load_model(args.checkpoint, name=args.model, num_classes=splits.num_classes)
    return model.to(device, memory_format=layout(args))


def score(args, cfg, splits, model, device) -> dict:
    loader = make_loader(getattr(splits, args.split), args.batch_size, train=False, workers=cfg.data.workers,
                         seed=cfg.seed)
    result = {"split": args.split, **evaluate(model, loader, device, layout(args), desc=args.split)}
    if args.pgd_eps > 0:
        attack = AdvPropConfig(steps=args.pgd_steps, eps=args.pgd_eps, random_start=True,
                               step_size=args.pgd_step_size or args.pgd_eps / 4)
        robust = evaluate(model, loader, device, layout(args), attack=attack, desc="pgd")
        result.update({f"pgd_{k}": v for k, v in robust.items()}, pgd_eps=args.pgd_eps, pgd_steps=args.pgd_steps)
    return result


def main(argv=None) -> int:
    return test_main(argv, description="Evaluate a classification checkpoint.", config_cls=TrainConfig,
                     sections=("data",), build_datasets=build_datasets, load=load, score=score,
                     model_help="architecture name, needed for plain state dicts", arguments=arguments)


if __name__ == "__main__":
    sys.exit(main())

"""Score a classifier checkpoint: top-1/top-5 on validation or test data, and on request its
robustness: under input PGD (attacked through the main or the auxiliary BN), with the feature
after a split point perturbed, and under common corruptions.

    python -m Classification.test --checkpoint runs/shapes_afan/best.pth
    python -m Classification.test --checkpoint AFAN_resnet56.pth.tar data.name=cifar10 --pgd-eps 2
    python -m Classification.test --checkpoint runs/shapes_advprop/last.pth --pgd-eps 2 --pgd-bn aux \\
        --feature-layer layer2 --corruptions all

The data settings are those of the run that wrote the checkpoint (its ``config.yaml``), so a
run is scored on what it was trained and tested on; ``data.KEY=VALUE`` changes them, and the
script says which. Accepts this project's checkpoints, plain state dicts (with --model) and
the original release's checkpoints (no ``config.yaml``: name the data). Prints one line
``SUMMARY {json}``.
"""
from __future__ import annotations

import sys

import torch

from afan_harness.cli import positive_int, robustness_scores, test_entry, test_output
from Classification.config import TrainConfig
from Classification.data import build_datasets, make_loader
from Classification.evaluation import evaluate, feature_logits, pgd_logits
from Classification.models import load_model
from Classification.train import build_model


def arguments(parser) -> None:
    parser.add_argument("--split", choices=("val", "test"), default="test")
    parser.add_argument("--batch-size", type=positive_int, default=256)
    parser.add_argument("--contiguous", action="store_true", help="NCHW instead of channels_last tensors")


def layout(args) -> torch.memory_format:
    return torch.contiguous_format if args.contiguous else torch.channels_last


def load(args, cfg, splits, device):
    return load_model(args.checkpoint, name=args.model, num_classes=splits.num_classes).to(device)


def score(args, cfg, splits, model, device) -> dict:
    # The plain model of load() or, for --pgd-bn aux, the run's own (test_main): this script's layout.
    model = model.to(memory_format=layout(args))

    def accuracy(data, predict=None) -> dict:
        loader = make_loader(data, args.batch_size, train=False, workers=cfg.data.workers, seed=cfg.seed)
        return evaluate(model, loader, device, layout(args), predict=predict, desc="score")

    dataset = getattr(splits, args.split)
    out = test_output(args, cfg.data.name)
    result = {"split": args.split, **accuracy(dataset),
              **robustness_scores(args, dataset, accuracy, pgd=lambda attack, bn: pgd_logits(model, attack, bn),
                                  feature=lambda attack: feature_logits(model, attack), metric="top1", seed=cfg.seed,
                                  out=out)}
    return {**result, "out": str(out)} if args.corruptions else result


main = test_entry(description="Evaluate a classification checkpoint.", config_cls=TrainConfig,
                  sections=("data",), build_datasets=build_datasets, load=load, build=build_model, score=score,
                  writes="corruptions.csv and .png", arguments=arguments)


if __name__ == "__main__":
    sys.exit(main())

"""Score a classifier checkpoint: top-1/top-5 on validation or test data, and on request its
robustness: under input PGD (attacked through the main or the auxiliary BN), with the feature
after a split point perturbed, and under common corruptions.

    python -m Classification.test --checkpoint runs/shapes_afan/best.pth
    python -m Classification.test --checkpoint AFAN_resnet56.pth.tar data.name=cifar10 --pgd-eps 2
    python -m Classification.test --checkpoint runs/shapes_advprop/last.pth --pgd-eps 2 --pgd-bn aux \
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

import afan
from afan_harness.checkpoint import CheckpointError, load_checkpoint
from afan_harness.cli import (non_negative_float, pgd_settings, positive_int, robustness_arguments, test_main,
                              test_output)
from afan_harness.robustness import corruption_score
from Classification.config import TrainConfig
from Classification.data import build_datasets, make_loader
from Classification.evaluation import evaluate, feature_logits, pgd_logits
from Classification.models import load_model
from Classification.train import build_model


def arguments(parser) -> None:
    parser.add_argument("--split", choices=("val", "test"), default="test")
    parser.add_argument("--batch-size", type=positive_int, default=256)
    parser.add_argument("--contiguous", action="store_true", help="NCHW instead of channels_last tensors")
    robustness_arguments(parser)
    parser.add_argument("--pgd-bn", choices=("main", "aux"), default="main",
                        help="the BN the attack's passes use; aux needs a checkpoint with auxiliary BN (last.pth "
                             "of an advprop or afan.aux_bn run)")
    parser.add_argument("--feature-layer", help="also score with the feature after this split point perturbed")
    parser.add_argument("--feature-gamma", type=non_negative_float, default=1.0,
                        help="the feature attack's step, in 1/255 (the release's gamma)")
    parser.add_argument("--feature-steps", type=positive_int, default=1)


def layout(args) -> torch.memory_format:
    return torch.contiguous_format if args.contiguous else torch.channels_last


def load_with_aux_bn(path, cfg: TrainConfig, num_classes: int, device) -> torch.nn.Module:
    """The model of ``path`` with its auxiliary BN, built as the run built it (``cfg``)."""
    state = load_checkpoint(path).get("model", {})
    if len(afan.strip_aux_state_dict(state)) == len(state):
        raise CheckpointError(f"{path} has no auxiliary BN (best.pth and final.pth keep the main BN only); for "
                              "--pgd-bn aux pass the last.pth of a run with mode=advprop or afan.aux_bn=true")
    model = build_model(cfg, num_classes, device)
    model.load_state_dict(state)
    return model.eval()


def load(args, cfg, splits, device):
    if args.pgd_bn == "aux":
        model = load_with_aux_bn(args.checkpoint, cfg, splits.num_classes, device)
    else:
        model = load_model(args.checkpoint, name=args.model, num_classes=splits.num_classes)
    if args.feature_layer is not None and args.feature_layer not in model.split_points:
        raise ValueError(f"--feature-layer {args.feature_layer!r} is not a split point of {model.arch}; "
                         f"valid: {', '.join(model.split_points[:12])}")
    return model.to(device, memory_format=layout(args))


def score(args, cfg, splits, model, device) -> dict:
    dataset = getattr(splits, args.split)

    def accuracy(data, predict=None, desc=args.split) -> dict:
        loader = make_loader(data, args.batch_size, train=False, workers=cfg.data.workers, seed=cfg.seed)
        return evaluate(model, loader, device, layout(args), predict=predict, desc=desc)

    result = {"split": args.split, **accuracy(dataset)}
    if args.pgd_eps > 0:
        robust = accuracy(dataset, pgd_logits(model, pgd_settings(args), args.pgd_bn), desc="pgd")
        result.update({f"pgd_{k}": v for k, v in robust.items()}, pgd_eps=args.pgd_eps, pgd_steps=args.pgd_steps,
                      pgd_bn=args.pgd_bn)
    if args.feature_layer is not None:
        attacked = accuracy(dataset, feature_logits(model, args.feature_layer, args.feature_gamma, args.feature_steps),
                            desc="feature")
        result.update({f"feature_{k}": v for k, v in attacked.items()}, feature_layer=args.feature_layer,
                      feature_gamma=args.feature_gamma, feature_steps=args.feature_steps)
    if args.corruptions:
        out = test_output(args, cfg.data.name)
        mean = corruption_score(dataset, lambda data: accuracy(data, desc="corrupted")["top1"], args.corruptions,
                                args.severities, cfg.seed, "top1", out)
        result.update(corruption_top1=mean, out=str(out))
    return result


def main(argv=None) -> int:
    return test_main(argv, description="Evaluate a classification checkpoint.", config_cls=TrainConfig,
                     sections=("data",), build_datasets=build_datasets, load=load, score=score,
                     model_help="architecture name, needed for plain state dicts",
                     out_help="folder for corruptions.csv and .png (default: test_<data> next to the checkpoint, "
                              "never over an earlier one)", arguments=arguments)


if __name__ == "__main__":
    sys.exit(main())

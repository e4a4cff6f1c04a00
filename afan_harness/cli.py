"""The command lines every task shares: ``train.py``'s config, ``--resume``, ``--overwrite``
and how a run ends other than by finishing (one clear message and an exit status, see
``failure_status``), and ``test.py``'s settings taken from the run that wrote a checkpoint."""
from __future__ import annotations

import argparse
import dataclasses
import errno
import json
import math
import os
import signal
import sys
from pathlib import Path
from typing import Callable

from afan_harness.checkpoint import CheckpointError, load_with_aux_norms
from afan_harness.config import ConfigError, add_config_arguments, config_yaml, load_config
from afan_harness.guard import NonFiniteLoss, StopRequested
from afan_harness.loading import DataError
from afan_harness.loop import launcher
from afan_harness.robustness import FeatureAttack, corruption_score, parse_corruptions
from afan_harness.rundir import CONFIG_NAME, RunDir
from afan_harness.settings import AdvPropConfig
from afan_harness.runtime import select_device


def config_path(given, configs: Path):
    """``--config``'s file: the path as given (from the working folder) if it is there, else the
    same path from the task folder (``configs/shapes_afan.yaml``, as its README writes it) or a
    file of the task's ``configs`` folder by name (``shapes_afan.yaml``)."""
    if given is None or Path(given).exists():
        return given
    for candidate in (configs.parent / given, configs / Path(given).name):
        if candidate.is_file():
            return candidate
    return given  # load_config names the missing file


def parse_train_args(config_cls, description: str, argv=None, configs: Path = None):
    """``(cfg, args)``: defaults, ``--config`` YAML (see ``config_path``), then ``KEY=VALUE``
    overrides; with ``--resume`` the run's saved ``config.yaml`` replaces the defaults and the
    YAML file, so a resumed run continues with the settings it was started with (plus new
    overrides)."""
    parser = argparse.ArgumentParser(description=description)
    add_config_arguments(parser)
    parser.add_argument("--resume", action="store_true", help="continue the run in `out` from last.pth")
    parser.add_argument("--overwrite", action="store_true", help="start `out` again, deleting the old run")
    parser.add_argument("--print-config", action="store_true",
                        help="print the resolved settings (every key, as config.yaml would hold them) and exit")
    args = parser.parse_intermixed_args(argv)  # KEY=VALUE overrides may follow flags
    cfg = load_config(config_cls, args.config if configs is None else config_path(args.config, Path(configs)),
                      args.overrides)
    if args.resume:
        cfg = load_config(config_cls, RunDir(cfg.out, resume=True).file("config.yaml"), args.overrides)
    return cfg, args


def train_entry(train: Callable, config_cls, module: str, file: str, description: str) -> tuple[Callable, Callable]:
    """A task's ``train.py`` entry points from its ``train(cfg, process, device, resume=,
    overwrite=)``: ``run(cfg, resume=False, overwrite=False)`` (in this process's place of a
    torchrun run, or as the one process; ``afan_harness.loop.launcher``) and ``main(argv)``,
    the command line of module ``module`` (whose ``configs`` folder sits beside ``file``)."""
    run = launcher(train)
    configs = Path(file).resolve().parent / "configs"

    def main(argv=None) -> int:
        return train_main(argv, config_cls=config_cls, run=run, description=description, module=module,
                          configs=configs)
    return run, main


def train_main(argv, *, config_cls, run: Callable, description: str, module: str, configs: Path) -> int:
    """Parse, run, and turn how the run ended into one message on stderr and an exit status
    (see ``failure_status``)."""
    cfg = None
    try:
        cfg, args = parse_train_args(config_cls, description, argv, configs)
        if args.print_config:
            print(config_yaml(cfg), end="")
            return 0
        run(cfg, resume=args.resume, overwrite=args.overwrite)
    except FAILURES as error:
        return failure_status(error, cfg, module=module, configs=configs)
    return 0


# How a run can end other than by finishing, each reported by failure_status.
FAILURES = (DataError, ConfigError, CheckpointError, NonFiniteLoss, StopRequested, OSError, KeyboardInterrupt)
_NO_ROOM = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM}


def failure_status(error: BaseException, cfg, *, module: str, configs: Path) -> int:
    """Print one message for ``error`` (one of ``FAILURES``) on stderr and return the exit
    status: 2 for bad input, a missing or unwritable folder or a full disk (a missing data set
    also names the command that trains on the built-in data), 1 for a non-finite loss, 128 +
    the signal's number after a polite stop (130 for Ctrl-C, 143 for SIGTERM) or a second
    Ctrl-C, with the command that resumes. ``cfg`` is None when the settings did not parse."""
    resume = f"python -m {module} --resume out={cfg.out}" if cfg is not None else None
    if isinstance(error, StopRequested):
        print(f"{error}\nTo continue: {resume}", file=sys.stderr)
        return 128 + error.signum
    if isinstance(error, KeyboardInterrupt):
        print(f"stopped at once by a second Ctrl-C; the last checkpoint written is intact. To continue "
              f"from it: {resume}", file=sys.stderr)
        return 128 + signal.SIGINT
    if isinstance(error, NonFiniteLoss):
        print(f"error: {error}", file=sys.stderr)
        return 1
    message = f"error: {error}"
    if isinstance(error, DataError) and cfg is not None:
        message += f"\nTo train on the built-in data instead: python -m {module} --config {Path(configs) / f'shapes_{cfg.mode}.yaml'}"
    elif isinstance(error, OSError) and error.errno in _NO_ROOM:
        message += ("; make room (or choose a writable out=)"
                    + (f", then continue from the last checkpoint: {resume}" if cfg is not None and
                       (Path(cfg.out) / RunDir.LAST).is_file() else ", then start the run again"))
    print(message, file=sys.stderr)
    return 2


def _number(kind: type, least, name: str):
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {name}") from None
        if not (math.isfinite(value) and value >= least):
            raise argparse.ArgumentTypeError(f"{text!r} is not {name}")
        return value
    return parse


positive_int = _number(int, 1, "a positive integer")
non_negative_int = _number(int, 0, "an integer >= 0")
non_negative_float = _number(float, 0.0, "a finite number >= 0")


def test_entry(**settings) -> Callable:
    """A task's ``test.py`` ``main(argv=None)``: :func:`test_main` with the task's ``settings``."""
    return lambda argv=None: test_main(argv, **settings)


def test_main(argv, *, description: str, config_cls, sections: tuple[str, ...], build_datasets: Callable,
              load: Callable, build: Callable, score: Callable, writes: str,
              model_help: str = "architecture name, needed for plain state dicts",
              arguments: Callable = lambda parser: None) -> int:
    """A task's ``test.py``: parse ``--checkpoint``, ``--model``, ``--out`` (the folder of the
    files named by ``writes``), the task's own ``arguments(parser)``, the robustness options
    (``robustness_arguments``) and the settings (``add_test_arguments``); build the data of
    the run's settings (``test_config``) and the model, ``load(args, cfg, splits, device)``,
    or with ``--pgd-bn aux`` the run's model with its auxiliary norms (``build(cfg,
    num_classes, device)`` as training built it, then the file's state); then print
    ``SUMMARY {json}`` of ``score(args, cfg, splits, model, device)``. Bad input (settings, data,
    checkpoint, a split point the model lacks) is one ``error:`` line on stderr and exit
    status 2, before anything is evaluated."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--checkpoint", required=True, help="checkpoint file to evaluate")
    parser.add_argument("--model", help=model_help)
    parser.add_argument("--out", help=f"folder for {writes} (default: test_<data> next to the checkpoint, never over "
                                      "an earlier one)")
    arguments(parser)
    robustness_arguments(parser)
    add_test_arguments(parser, " and ".join(f"{section}." for section in sections))
    args = parser.parse_intermixed_args(argv)
    try:
        cfg = test_config(config_cls, args, sections)
        splits = build_datasets(cfg.data, seed=cfg.seed)
        device = select_device(args.device)
        if args.pgd_bn == "aux":
            model = load_with_aux_norms(args.checkpoint, lambda: build(rebuild_settings(cfg), splits.num_classes, device))
        else:
            model = load(args, cfg, splits, device)
        if args.feature_layer is not None and args.feature_layer not in model.split_points:
            raise ValueError(f"--feature-layer {args.feature_layer!r} is not a split point of {model.arch}; valid: "
                             f"{', '.join(list(model.split_points)[:12])}")
    except (ConfigError, DataError, CheckpointError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    result = score(args, cfg, splits, model, device)
    print("SUMMARY " + json.dumps({"checkpoint": args.checkpoint, "data": cfg.data.name, **result}), flush=True)
    return 0


def rebuild_settings(cfg):
    """The run's settings for building its model again to read a checkpoint into: no
    compilation and no backbone file (the checkpoint holds every weight)."""
    model = cfg.model
    if dataclasses.is_dataclass(model) and hasattr(model, "backbone_weights"):
        model = dataclasses.replace(model, backbone_weights="")
    return dataclasses.replace(cfg, model=model, compile="off")


def robustness_arguments(parser: argparse.ArgumentParser) -> None:
    """The robustness options of every ``test.py``: input PGD (``--pgd-*``; the release's
    evaluation: ``--pgd-eps 2``, 10 steps of 0.5/255), through the main or the auxiliary
    norms; a feature attack (``--feature-*``, ``afan_harness.robustness.FeatureAttack``, the
    release's ``eval_sat_layers.py`` settings by default); common corruptions
    (``--corruptions``, ``--severities``; ``afan_harness.robustness``)."""
    parser.add_argument("--pgd-eps", type=non_negative_float, default=0.0,
                        help="also score under input PGD of this radius in 1/255 (the release: 2; 0: not)")
    parser.add_argument("--pgd-steps", type=non_negative_int, default=10)
    parser.add_argument("--pgd-step-size", type=non_negative_float, help="PGD step in 1/255 (default eps/4)")
    parser.add_argument("--pgd-bn", choices=("main", "aux"), default="main",
                        help="the norms the attack's passes use (the scores always use the main ones); aux needs a "
                             "checkpoint with auxiliary norms: the last.pth of a run with mode=advprop or "
                             "afan.aux_bn=true")
    defaults = FeatureAttack(layer="")
    parser.add_argument("--feature-layer", metavar="SPLIT_POINT",
                        help="also score with the feature after this split point perturbed (the release's "
                             "eval_sat_layers.py)")
    parser.add_argument("--feature-gamma", type=non_negative_float, default=defaults.gamma,
                        help="the feature attack's step, in 1/255 (default %(default)s)")
    parser.add_argument("--feature-steps", type=non_negative_int, default=defaults.steps)
    parser.add_argument("--feature-eps", type=non_negative_float, default=defaults.eps,
                        help="radius in 1/255 for --feature-random-start and --feature-project")
    parser.add_argument("--feature-random-start", action="store_true")
    parser.add_argument("--feature-project", action="store_true")
    parser.add_argument("--feature-strength", type=_fraction, default=defaults.strength,
                        help="score on clean + s * (adversarial - clean) (default %(default)s: the release's "
                             "--sat_layer 1 of 5 points)")
    parser.add_argument("--feature-mix", action="store_true",
                        help="re-normalise that feature to the clean one's channel statistics (the release's --mix)")
    parser.add_argument("--corruptions", type=_corruption_names, metavar="all|NAME,...",
                        help="also score under these common corruptions (ImageNet-C families), writing "
                             "corruptions.csv and corruptions.png")
    parser.add_argument("--severities", type=_severities, default=(1, 2, 3, 4, 5), metavar="S,...",
                        help="corruption severities, 1 to 5 (default: all five)")


def pgd_settings(args) -> AdvPropConfig:
    """The input PGD ``robustness_arguments`` ask for, from a uniform random start."""
    return AdvPropConfig(steps=args.pgd_steps, eps=args.pgd_eps, random_start=True,
                         step_size=args.pgd_eps / 4 if args.pgd_step_size is None else args.pgd_step_size)


def feature_settings(args) -> FeatureAttack:
    """The feature attack ``robustness_arguments`` ask for."""
    return FeatureAttack(layer=args.feature_layer, gamma=args.feature_gamma, steps=args.feature_steps,
                         eps=args.feature_eps, random_start=args.feature_random_start, project=args.feature_project,
                         strength=args.feature_strength, mix=args.feature_mix)


def robustness_scores(args, dataset, score: Callable, *, pgd: Callable, feature: Callable, metric: str, seed: int,
                      out: Path) -> dict:
    """The robustness entries of a test's summary, as ``args`` ask: ``score(dataset, attack)``
    (the task's scores, a dict, with ``attack`` None for the clean model) under input PGD,
    ``pgd(AdvPropConfig, bn)`` -> attack, as ``pgd_<score>``; under the feature attack,
    ``feature(FeatureAttack)`` -> attack, as ``feature_<score>``; and the mean ``metric``
    over the corruptions, ``corruption_<metric>`` (the sweep written to ``out``)."""
    result = {}
    if args.pgd_eps > 0:
        scores = score(dataset, pgd(pgd_settings(args), args.pgd_bn))
        result.update({f"pgd_{k}": v for k, v in scores.items()}, pgd_eps=args.pgd_eps, pgd_steps=args.pgd_steps,
                      pgd_bn=args.pgd_bn)
    if args.feature_layer is not None:
        attack = feature_settings(args)
        result.update({f"feature_{k}": v for k, v in score(dataset, feature(attack)).items()}, **attack.summary())
    if args.corruptions:
        result[f"corruption_{metric}"] = corruption_score(dataset, lambda data: score(data, None)[metric],
                                                          args.corruptions, args.severities, seed, metric, out)
    return result


def _fraction(text: str) -> float:
    value = non_negative_float(text)
    if value > 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a fraction from 0 to 1")
    return value


def _corruption_names(text: str) -> list[str]:
    try:
        return parse_corruptions(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def _severities(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(part) for part in text.split(","))
    except ValueError:
        values = ()
    if not values or not all(1 <= v <= 5 for v in values):
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of severities 1 to 5")
    return values


def add_test_arguments(parser: argparse.ArgumentParser, sections: str) -> None:
    """The arguments every task's ``test.py`` shares besides ``--checkpoint``: device, seed,
    ``--no-run-config`` and the ``KEY=VALUE`` settings of ``sections`` (e.g. "data., eval.")."""
    parser.add_argument("--device", default="auto")
    parser.add_argument("--seed", type=non_negative_int, help="seed of the Shapes data (default: the run's)")
    parser.add_argument("--no-run-config", action="store_true",
                        help=f"ignore the {CONFIG_NAME} beside the checkpoint: start from the default settings")
    parser.add_argument("--fallback", action="append", default=[], metavar="KEY=VALUE",
                        help=f"a setting used only when there is no run {CONFIG_NAME} (the cmd/run_test.sh "
                             "scripts name the released data set so)")
    parser.add_argument("settings", nargs="*", metavar="KEY=VALUE", help=f"settings of {sections} e.g. data.name=shapes")


def test_config(config_cls, args, sections: tuple[str, ...]):
    """The settings a test script scores ``args.checkpoint`` with: those of the run that wrote
    it (the ``config.yaml`` beside it: data set, sizes, evaluation), else the defaults, then
    ``args.settings`` (keys of ``sections`` only) and ``args.seed``; ``args.fallback`` settings
    come first where there is no run config. Says on stdout which
    run's settings it took and which of them the command line changed."""
    prefixes = tuple(f"{section}." for section in sections)
    unknown = [s for s in args.settings if not s.startswith(prefixes)]
    if unknown:
        raise ConfigError(f"unknown setting(s) {unknown}: a test takes only {', '.join(p + 'KEY=VALUE' for p in prefixes)}")
    beside = Path(args.checkpoint).resolve().parent / CONFIG_NAME
    path = beside if beside.is_file() and not args.no_run_config else None
    seed = [] if args.seed is None else [f"seed={args.seed}"]
    fallback = args.fallback if path is None else []
    cfg = load_config(config_cls, path, [*fallback, *args.settings, *seed])
    if path is not None:
        run = load_config(config_cls, path)
        changed = [f"{key}={_get(cfg, key)!r} (the run: {_get(run, key)!r})" for key in
                   dict.fromkeys(s.partition("=")[0] for s in [*args.settings, *seed]) if _get(cfg, key) != _get(run, key)]
        print(f"settings of the run in {path}" + (f"; changed here: {', '.join(changed)}" if changed else ""), flush=True)
    return cfg


def _get(cfg, dotted: str):
    for name in dotted.split("."):
        cfg = getattr(cfg, name)
    return cfg


def test_output(args, data_name: str) -> Path:
    """Where a test script writes its files: ``--out``, else ``test_<data>`` beside the
    checkpoint, numbered (``test_<data>-2``, ...) rather than over an earlier one, and under
    ``runs/`` of the working folder when the checkpoint's folder cannot be written."""
    if args.out:
        return Path(args.out)
    folder = Path(args.checkpoint).resolve().parent
    stem = f"test_{data_name}"
    if not os.access(folder, os.W_OK):
        folder, stem = Path("runs"), f"test_{folder.name}_{data_name}"
    out, number = folder / stem, 1
    while out.exists():
        number += 1
        out = folder / f"{stem}-{number}"
    return out


def warn_random_backbone(cfg) -> None:
    """Say loudly, on stderr, when a run on a real data set starts its backbone from random
    weights: the released runs start from torchvision's ImageNet weights
    (``model.backbone_weights``), and without them the paper's numbers are out of reach."""
    if cfg.data.name != "shapes" and not cfg.model.backbone_weights:
        print(f"warning: model.backbone_weights is empty, so the {cfg.model.name} backbone starts from random "
              f"weights; the released {cfg.data.name} runs start from torchvision's ImageNet weights (e.g. "
              "https://download.pytorch.org/models/resnet50-0676ba61.pth): set model.backbone_weights=PATH",
              file=sys.stderr, flush=True)

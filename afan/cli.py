"""The command line every task's ``train.py`` shares: config, ``--resume``, ``--overwrite``,
and how a run ends other than by finishing: one clear message with exit status 2 for bad
input, 1 for a non-finite loss, and 128 + the signal's number (130 for Ctrl-C, 143 for
SIGTERM) after a polite stop, with the command that resumes."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Callable

from afan.checkpoint import CheckpointError
from afan.config import ConfigError, add_config_arguments, load_config
from afan.guard import NonFiniteLoss, StopRequested
from afan.loading import DataError
from afan.rundir import RunDir


def parse_train_args(config_cls, description: str, argv=None):
    """``(cfg, args)``: defaults, ``--config`` YAML, then ``KEY=VALUE`` overrides; with
    ``--resume`` the run's saved ``config.yaml`` replaces the defaults and the YAML file, so a
    resumed run continues with the settings it was started with (plus new overrides)."""
    parser = argparse.ArgumentParser(description=description)
    add_config_arguments(parser)
    parser.add_argument("--resume", action="store_true", help="continue the run in `out` from last.pth")
    parser.add_argument("--overwrite", action="store_true", help="start `out` again, deleting the old run")
    args = parser.parse_intermixed_args(argv)  # KEY=VALUE overrides may follow flags
    cfg = load_config(config_cls, args.config, args.overrides)
    if args.resume:
        cfg = load_config(config_cls, RunDir(cfg.out, resume=True).file("config.yaml"), args.overrides)
    return cfg, args


def train_main(argv, *, config_cls, run: Callable, description: str, module: str, configs: Path) -> int:
    """Parse, run, and turn bad input into one message on stderr and exit status 2. A missing
    data set also names the command that trains on the built-in Shapes data instead."""
    cfg = None
    try:
        cfg, args = parse_train_args(config_cls, description, argv)
        run(cfg, resume=args.resume, overwrite=args.overwrite)
    except DataError as error:
        shapes = Path(configs) / f"shapes_{cfg.mode}.yaml"
        print(f"error: {error}\nTo train on the built-in data instead: python -m {module} --config {shapes}",
              file=sys.stderr)
        return 2
    except (ConfigError, CheckpointError, FileExistsError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except NonFiniteLoss as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    except StopRequested as stop:
        print(f"{stop}\nTo continue: python -m {module} --resume out={cfg.out}", file=sys.stderr)
        return 128 + stop.signum
    return 0

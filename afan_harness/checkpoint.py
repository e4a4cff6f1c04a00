"""Checkpoints that survive crashes and cannot run code when loaded.

Writing goes to a temporary file next to the target which then replaces it in one step, so a
crash leaves either the old file or the new one, never half a file. Loading always uses
``torch.load(weights_only=True)``: tensors, numbers, strings and plain containers only, so a
crafted file cannot execute code; every failure becomes a CheckpointError naming the file.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from afan.norm import strip_aux_state_dict


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be loaded; the message names the file and the reason."""


PARTIAL_MARK = ".tmp-"  # in the names of files being written; see remove_partial_writes


@contextlib.contextmanager
def atomic_open(path, mode: str = "wb", **open_kwargs):
    """Open a temporary file that replaces ``path`` only when the ``with`` block succeeds.

    The data is flushed to disk before the rename and the folder entry after it, so even a
    power cut leaves the old or the new content at ``path``. On error the temporary file is
    removed and ``path`` is untouched. Parent folders are created.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Same folder, so os.replace is a rename on one file system and therefore atomic.
    temporary = path.with_name(f"{path.name}{PARTIAL_MARK}{os.getpid()}")
    try:
        with open(temporary, mode, **open_kwargs) as file:
            yield file
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException as error:
        # A failed clean-up (a read-only folder) must not hide why the write failed.
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        failure = _os_error_in(error) if isinstance(error, (OSError, RuntimeError)) else None
        if failure is not None:
            raise OSError(failure.errno, f"{failure.strerror}: cannot write {path}; the file there before (if any) "
                                         "is intact") from error
        raise
    _fsync_folder(path.parent)


def _os_error_in(error: BaseException):
    """The operating system's error behind ``error`` (torch.save turns a full disk into a
    RuntimeError raised while handling the OSError), or None."""
    while error is not None:
        if isinstance(error, OSError) and error.errno is not None:
            return error
        error = error.__context__
    return None


def remove_partial_writes(folder) -> list[Path]:
    """Delete the temporary files that a process killed while writing (SIGKILL, power cut)
    left in ``folder``; the files they were meant to replace are intact. Returns them."""
    leftovers = [p for p in Path(folder).glob(f"*{PARTIAL_MARK}*") if p.is_file()]
    for leftover in leftovers:
        leftover.unlink()
    return leftovers


def _fsync_folder(folder: Path) -> None:
    """Make the rename itself durable; skipped where folders cannot be opened (Windows)."""
    try:
        descriptor = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(descriptor)
    except OSError:  # some file systems do not support syncing a folder
        pass
    finally:
        os.close(descriptor)


def save_checkpoint(obj, path) -> None:
    """``torch.save`` ``obj`` to ``path`` atomically.

    Keep ``obj`` to tensors, numbers, strings and containers (state_dicts, epoch, RNG state):
    anything else would be refused by load_checkpoint.
    """
    with atomic_open(path, "wb") as file:
        torch.save(obj, file)


def load_checkpoint(path, map_location="cpu") -> dict:
    """Load a checkpoint dict saved by torch.save, refusing anything that would run code."""
    path = Path(path)
    if not path.is_file():
        reason = "is a folder, not a file" if path.is_dir() else "does not exist"
        raise CheckpointError(f"checkpoint {path} {reason}; check the path")
    try:
        checkpoint = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as error:
        # torch names the import it refused as "GLOBAL module.name" (wording varies by version).
        needed = re.search(r"GLOBAL (\S+)", str(error))
        if needed is None:  # not a refused import: bytes that are no pickle at all
            raise _unreadable(path, error) from error
        raise CheckpointError(
            f"refused to load checkpoint {path}: it holds more than tensors and plain Python "
            f"values, and unpickling it would execute code from the file (it asks for {needed.group(1)}). It was not "
            "loaded. Use only checkpoints from sources you trust; re-save a trusted one as "
            "plain state_dicts to load it here."
        ) from None
    # torch reports damaged files in many ways (RuntimeError from the zip reader, EOFError,
    # KeyError for text files, ...), so anything it raises here means "cannot read this file".
    except Exception as error:
        raise _unreadable(path, error) from error
    if not isinstance(checkpoint, Mapping):
        raise CheckpointError(
            f"{path} holds a {type(checkpoint).__name__}, not a checkpoint dict; "
            "save checkpoints as dicts, e.g. {'model': model.state_dict(), 'epoch': epoch}"
        )
    return checkpoint


def load_state_dict(path) -> dict:
    """The tensors of a plain state dict file, e.g. torchvision's ImageNet weights; also one
    wrapped as ``{"state_dict": ...}``, with DataParallel's ``module.`` prefixes dropped."""
    checkpoint = load_checkpoint(path)
    state = checkpoint["state_dict"] if isinstance(checkpoint.get("state_dict"), Mapping) else checkpoint
    if not is_state_dict(state):
        raise CheckpointError(f"{path} is not a state dict (a dict of tensors); its top-level keys are "
                              f"{list(checkpoint)[:EXAMPLE_KEYS]}")
    return {k.removeprefix("module."): v for k, v in state.items()}


def _unreadable(path, error) -> CheckpointError:
    # torch's own text for bytes that are no pickle is a long advice about weights_only that
    # does not apply here.
    reason = ("no pickle data PyTorch can read" if isinstance(error, pickle.UnpicklingError)
              else f"{type(error).__name__}: {str(error).strip().splitlines()[0] if str(error).strip() else ''}")
    return CheckpointError(f"cannot load checkpoint {path}: the file may be truncated, corrupt or not a "
                           f"PyTorch checkpoint ({reason})")


def key_mismatches(expected: Mapping, state: Mapping, *, optional: Callable[[str], bool] = lambda key: False,
                   examples: int = 5) -> list[str]:
    """What keeps ``state`` from loading strictly where ``expected`` (a model's state dict)
    is wanted: missing keys (those ``optional`` accepts aside), unexpected keys and shape
    mismatches, each with a count and a few examples; empty when it loads."""
    missing = [k for k in expected if k not in state and not optional(k)]
    unexpected = [k for k in state if k not in expected]
    shapes = [f"{k} (file {tuple(getattr(state[k], 'shape', ()))}, model {tuple(v.shape)})"
              for k, v in expected.items() if k in state and getattr(state[k], "shape", None) != v.shape]
    return [f"{label} ({len(keys)}): {', '.join(keys[:examples])}{', ...' if len(keys) > examples else ''}"
            for label, keys in (("missing keys", missing), ("unexpected keys", unexpected),
                                ("shape mismatches", shapes)) if keys]


def resolve_architecture(path, requested: Optional[str], recorded: Optional[str], check: Callable[[str], object],
                         names) -> str:
    """The architecture to build for the file at ``path``: the ``requested`` name or the one
    the file ``recorded`` (they must agree), checked with ``check`` (raises ``ValueError``
    for a name it does not know); ``names`` are listed when neither says."""
    if requested is not None and recorded is not None and requested != recorded:
        raise CheckpointError(f"{path} holds a {recorded} model, not the requested {requested}")
    name = requested or recorded
    if name is None:
        raise CheckpointError(f"{path} does not say which architecture it holds (a plain state dict?); "
                              f"name the architecture (--model NAME on the command line, name= in Python; one of {', '.join(names)})")
    try:
        check(name)
    except ValueError as error:  # only a name read from the file gets here
        raise CheckpointError(f"{path}: {error}") from None
    return name


def resolve_num_classes(path, requested: Optional[int], declared: Optional[int], classifier) -> Optional[int]:
    """The class count of the file at ``path``: the one it ``declared``, else the rows of its
    ``classifier`` weight; a ``requested`` count must agree. None when nothing tells."""
    if declared is None and isinstance(classifier, torch.Tensor):
        declared = classifier.shape[0]
    if requested is not None and declared is not None and requested != declared:
        raise CheckpointError(f"{path} holds a model for {declared} classes, but num_classes={requested} was asked for")
    return requested or declared


EXAMPLE_KEYS = 5  # keys quoted in messages about a file's contents


def is_state_dict(obj) -> bool:
    """Whether ``obj`` is a plain state dict: a non-empty dict of tensors."""
    return isinstance(obj, Mapping) and len(obj) > 0 and all(isinstance(v, torch.Tensor) for v in obj.values())


def model_payload(model: nn.Module) -> dict:
    """``{"model", "arch", "num_classes", "model_kwargs"}``, what a detection or segmentation
    run saves of a model and :func:`unpack_model_file` reads back: enough to rebuild the very
    same network (``model_kwargs``: the builder's keywords, plain values only; auxiliary BN is
    saved as it is, the loader drops it)."""
    return {"model": model.state_dict(), "arch": model.arch, "num_classes": model.num_classes,
            "model_kwargs": dict(model.model_kwargs)}


def foreign_file(path, checkpoint: Mapping, task: str, expected: str) -> CheckpointError:
    """The error for a file that holds none of the formats a task reads (``expected`` names them)."""
    return CheckpointError(f"{path} is not a {task} checkpoint this project reads (top-level keys: "
                           f"{list(checkpoint)[:EXAMPLE_KEYS]}). Expected {expected}")


def unpack_model_file(path, checkpoint: Mapping, task: str, others: str):
    """A ``ModelFormat.unpack`` for :func:`model_payload` files and plain state dicts (the
    architecture and class count then unknown); any other file is refused, naming ``task``
    and the ``others`` formats its own unpack reads."""
    if isinstance(checkpoint.get("model"), Mapping):
        return (dict(checkpoint["model"]), checkpoint.get("arch"), checkpoint.get("num_classes"),
                dict(checkpoint.get("model_kwargs") or {}))
    if is_state_dict(checkpoint):
        return dict(checkpoint), None, None, {}
    raise foreign_file(path, checkpoint, task, "{'model': state_dict, 'arch', 'num_classes', 'model_kwargs'} as "
                       f"training writes it, {others}")


@dataclass(frozen=True)
class ModelFormat:
    """How one task's model files are read by :func:`load_model_file`."""

    names: Sequence[str]  # the architectures, listed when a file does not say which it holds
    check_name: Callable[[str], object]  # raises ValueError for a name the task does not know
    # unpack(path, checkpoint) -> (state dict, recorded architecture, declared class count,
    # recorded build keywords), the unknown ones None / {}; a CheckpointError for a foreign file
    unpack: Callable
    classifier: Callable[[str, Mapping], Optional[torch.Tensor]]  # (name, state) -> its classifier weight
    build: Callable  # build(name, num_classes, **keywords) -> the model
    infer_arch: Callable[[Mapping], Optional[str]] = lambda state: None  # the architecture off the keys
    prepare: Callable[[str, Mapping], dict] = lambda name, state: dict(state)  # a state into the model's names
    # Keys that may be missing from or extra in a file (e.g. BatchNorm's step counters).
    optional: Callable[[str], bool] = lambda key: False
    describe: Callable = lambda model: f"{model.arch} with {model.num_classes} classes"  # in the fit error
    fit_hint: str = "Is it a checkpoint of another architecture? Name the right one (--model NAME, or name= in Python)"


def load_with_aux_norms(path, build: Callable[[], nn.Module]) -> nn.Module:
    """The model of the training state at ``path`` (a ``last.pth``) with its auxiliary norms,
    in eval mode: ``build()`` makes the model as its run did (auxiliary norms included), then
    the file's state is loaded strictly. ``best.pth`` and ``final.pth`` keep the main norms
    only and are refused with one CheckpointError that names the file to use."""
    state = load_checkpoint(path).get("model")
    if not isinstance(state, Mapping) or len(strip_aux_state_dict(state)) == len(state):
        raise CheckpointError(f"{path} holds no auxiliary norms (best.pth and final.pth keep the main ones only); "
                              "to attack through them pass the last.pth of a run with mode=advprop or afan.aux_bn=true")
    model = build()
    problems = key_mismatches(model.state_dict(), state)
    if problems:
        raise CheckpointError(f"{path} does not fit the model its run's settings build; " + "; ".join(problems))
    model.load_state_dict(state)
    return model.eval()


def load_model_file(path, fmt: ModelFormat, name: Optional[str] = None, num_classes: Optional[int] = None,
                    **keywords):
    """The model stored at ``path`` in eval mode, with plain BatchNorm: every task's loader.

    ``name`` and ``num_classes`` are read from the file (or its keys) when not given; given,
    they must agree with it. ``keywords`` override the build keywords the file recorded.
    ``module.`` prefixes and auxiliary-BN entries (``*.aux_bn.*``) are dropped. Every problem
    is one CheckpointError naming the file; nothing is loaded partially."""
    path = Path(path)
    if name is not None:
        fmt.check_name(name)  # a bad argument is reported before the file is read
    state, arch, declared, recorded = fmt.unpack(path, load_checkpoint(path))
    state = {k.removeprefix("module."): v for k, v in strip_aux_state_dict(state).items()}
    name = resolve_architecture(path, name, arch or fmt.infer_arch(state), fmt.check_name, fmt.names)
    num_classes = resolve_num_classes(path, num_classes, declared, fmt.classifier(name, state))
    state = fmt.prepare(name, state)
    settings = {**recorded, **keywords}
    try:
        # Without a classifier weight the count is unknown; the key check then fails anyway.
        model = fmt.build(name, num_classes or 2, **settings)
    except (TypeError, ValueError) as error:
        raise CheckpointError(f"{path}: cannot build {name} with {settings}: {error}") from None
    expected = model.state_dict()
    state = {k: v for k, v in state.items() if k in expected or not fmt.optional(k)}
    problems = key_mismatches(expected, state, optional=fmt.optional)
    if problems:
        raise CheckpointError(f"{path} does not fit {fmt.describe(model)}; " + "; ".join(problems) + ". "
                              + fmt.fit_hint)
    model.load_state_dict(state, strict=False)  # strict up to the optional keys, checked above
    return model.eval()

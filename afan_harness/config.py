"""Run configuration: dataclass defaults, then a YAML file of overrides, then command-line overrides.

A task describes its settings as (possibly nested) dataclasses. ``load_config`` checks every
override against the dataclass's type annotations, so a misspelled key or a value of the wrong
type stops the run with one message naming the key, where it came from and what was expected,
instead of being ignored or failing deep inside training.

    parser = argparse.ArgumentParser()
    add_config_arguments(parser)
    args = parser.parse_args()   # train.py --config configs/cifar.yaml optim.lr=0.05 optim.momentum=0.8
    cfg = load_config(TrainConfig, args.config, args.overrides)
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import math
import re
import types
import typing
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from afan_harness.checkpoint import atomic_open

COMMAND_LINE = "command line"

# `int | None` has its own origin type (Python >= 3.10), distinct from typing.Union.
_UNION_ORIGINS = {Union, getattr(types, "UnionType", Union)}


class ConfigError(ValueError):
    """A configuration that cannot be used; the message says which key, from where, and why."""


class _YamlLoader(yaml.SafeLoader):
    """SafeLoader that also reads ``5e-4`` and ``1e5`` as floats.

    PyYAML follows YAML 1.1, where a float needs a dot and a signed exponent, so ``lr: 5e-4``
    would arrive as the string "5e-4" and be rejected for a float field.
    """


_YamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


@dataclasses.dataclass
class _Setting:
    """One override: its value, where it came from, and (command line only) the raw text."""

    value: Any
    source: str
    text: str | None = None


class _Mismatch(Exception):
    """A value does not fit a type annotation (turned into a ConfigError by the caller)."""


def load_config(cls, path=None, overrides=()):
    """Build ``cls`` from its defaults, the YAML file at ``path``, then ``"key=value"`` overrides."""
    if not (isinstance(cls, type) and dataclasses.is_dataclass(cls)):
        raise TypeError(f"load_config needs a dataclass type, got {cls!r}")
    tree: dict[str, Any] = {}
    if path is not None:
        _merge_mapping(tree, cls, _read_yaml_file(path), str(path), prefix="")
    for override in overrides:
        key, sep, text = override.partition("=")
        if not sep or not key.strip():
            raise ConfigError(
                f"malformed override {override!r} on the command line: write KEY=VALUE, "
                "e.g. lr=0.1 or optim.momentum=0.9"
            )
        text = text.strip()
        try:
            value = yaml.load(text, Loader=_YamlLoader)
        except yaml.YAMLError as error:
            raise ConfigError(f"cannot parse the value of override {override!r}: {error}") from None
        _set(tree, cls, key.strip().split("."), _Setting(value, COMMAND_LINE, text), prefix="")
    return _build(cls, tree, base=None, prefix="")


def config_to_dict(cfg) -> dict:
    """The config as plain YAML-safe data, keys in field order, tuples as lists."""
    if dataclasses.is_dataclass(cfg) and not isinstance(cfg, type):
        return {name: config_to_dict(getattr(cfg, name)) for name in _field_types(type(cfg))}
    if isinstance(cfg, (list, tuple)):
        return [config_to_dict(item) for item in cfg]
    if isinstance(cfg, dict):
        return {key: config_to_dict(value) for key, value in cfg.items()}
    return cfg


def config_yaml(cfg) -> str:
    """The resolved config, every key, as YAML (what ``config.yaml`` holds)."""
    return yaml.safe_dump(config_to_dict(cfg), sort_keys=False, default_flow_style=None)


def save_config(cfg, path) -> None:
    """Write the resolved config as YAML; ``load_config(type(cfg), path)`` gives it back."""
    with atomic_open(path, "w", encoding="utf-8") as file:
        file.write(config_yaml(cfg))


def add_config_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add ``--config PATH`` and positional ``KEY=VALUE`` overrides to a task's parser."""
    parser.add_argument("--config", metavar="PATH", help="YAML file overriding the default settings")
    parser.add_argument(
        "overrides",
        nargs="*",
        metavar="KEY=VALUE",
        help="settings applied after the YAML file, e.g. optim.lr=0.05 batch_size=64 afan.mask=0011",
    )
    return parser


def _read_yaml_file(path) -> dict:
    path = Path(path)
    if not path.is_file():
        reason = "is a folder" if path.is_dir() else "does not exist"
        raise ConfigError(f"config file {path} {reason}; check the path given to --config")
    try:
        data = yaml.load(path.read_text(encoding="utf-8"), Loader=_YamlLoader)
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as error:
        raise ConfigError(f"cannot read config file {path}: {error}") from None
    if data is None:  # an empty file overrides nothing
        return {}
    if not isinstance(data, dict):
        raise ConfigError(
            f"config file {path} must hold a mapping of keys to values (like `lr: 0.1`) "
            f"at its top level, not a {type(data).__name__}"
        )
    return data


def _field_types(cls) -> dict[str, Any]:
    """The resolved annotation of every field the constructor accepts, in field order."""
    try:
        hints = typing.get_type_hints(cls)
    except NameError as error:
        raise TypeError(
            f"cannot resolve the type annotations of {cls.__name__} ({error}); "
            "define config dataclasses at module level"
        ) from None
    return {field.name: hints[field.name] for field in dataclasses.fields(cls) if field.init}


def _section_type(annotation):
    """The dataclass a field holds (also through Optional), or None for a plain value."""
    if dataclasses.is_dataclass(annotation):
        return annotation
    if typing.get_origin(annotation) in _UNION_ORIGINS:
        sections = [arg for arg in typing.get_args(annotation) if dataclasses.is_dataclass(arg)]
        if len(sections) == 1:
            return sections[0]
    return None


def _merge_mapping(tree: dict, cls, mapping: dict, source: str, prefix: str) -> None:
    for key, value in mapping.items():
        _set(tree, cls, str(key).split("."), _Setting(value, source), prefix)


def _set(tree: dict, cls, parts: list[str], setting: _Setting, prefix: str) -> None:
    """Record ``setting`` at the dotted key ``parts`` of section ``cls``, rejecting unknown keys.

    ``tree`` mirrors the dataclass nesting: a dict for a section with overrides, a _Setting for a
    value. Later settings replace earlier ones, which is what makes the command line win.
    """
    name, rest = parts[0], parts[1:]
    fields = _field_types(cls)
    if name not in fields:
        _unknown_key(prefix + ".".join(parts), name, fields, setting.source, prefix)
    key = prefix + name
    section = _section_type(fields[name])
    if section is None:
        if rest:
            raise ConfigError(
                f"unknown key '{key}.{'.'.join(rest)}' (from {setting.source}): "
                f"'{key}' is a single value, not a section with keys"
            )
        tree[name] = setting
    elif rest or isinstance(setting.value, dict):
        if not isinstance(tree.get(name), dict):
            tree[name] = {}
        if rest:
            _set(tree[name], section, rest, setting, key + ".")
        else:
            _merge_mapping(tree[name], section, setting.value, setting.source, key + ".")
    else:  # e.g. `optim: null` for an Optional section; checked against the type in _build
        tree[name] = setting


def _unknown_key(key: str, name: str, fields: dict, source: str, prefix: str):
    message = f"unknown key '{key}' (from {source})."
    close = [prefix + match for match in difflib.get_close_matches(name, list(fields), n=1)]
    if not close:  # `lr=0.1` is most likely meant for a section that has an `lr`, e.g. `optim.lr`
        nested = list(_nested_keys(fields, prefix))
        leaves = difflib.get_close_matches(name, {path.rsplit(".", 1)[1] for path in nested}, n=1)
        close = [path for path in nested if path.rsplit(".", 1)[1] in leaves]
    if close:
        message += f" Did you mean {' or '.join(repr(path) for path in close)}?"
    where = f"section '{prefix[:-1]}'" if prefix else "the top level"
    raise ConfigError(f"{message} Valid keys in {where}: {', '.join(fields)}")


def _nested_keys(fields: dict, prefix: str):
    """The dotted keys inside the sections among ``fields``."""
    for name, annotation in fields.items():
        section = _section_type(annotation)
        if section is not None:
            for inner in _field_types(section):
                yield f"{prefix}{name}.{inner}"
            yield from _nested_keys(_field_types(section), f"{prefix}{name}.")


def _build(cls, tree: dict, base, prefix: str):
    """Construct ``cls`` (or a copy of ``base``) with the overrides in ``tree`` applied.

    Objects are made through the dataclass constructors so their ``__post_init__`` checks run on
    the final values.
    """
    fields = _field_types(cls)
    changes = {}
    for name, entry in tree.items():
        if isinstance(entry, dict):
            section = _section_type(fields[name])
            current = getattr(base, name) if base is not None else _default(cls, name)
            start = current if isinstance(current, section) else None
            changes[name] = _build(section, entry, start, prefix + name + ".")
        else:
            changes[name] = _checked(entry, fields[name], prefix + name)
    if base is None:
        for field in dataclasses.fields(cls):
            required = field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING
            if field.init and required and field.name not in changes:
                key = prefix + field.name
                raise ConfigError(
                    f"key '{key}' has no default: set it in the YAML file or on the command line ({key}=...)"
                )
    try:
        return dataclasses.replace(base, **changes) if base is not None else cls(**changes)
    except (ValueError, TypeError) as error:
        section = f" (section '{prefix[:-1]}')" if prefix else ""
        raise ConfigError(f"invalid configuration{section}: {cls.__name__} rejected it: {error}") from error


def _default(cls, name: str):
    field = next(field for field in dataclasses.fields(cls) if field.name == name)
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return None if field.default is dataclasses.MISSING else field.default


def _checked(setting: _Setting, annotation, key: str):
    try:
        return _convert(setting.value, annotation)
    except _Mismatch:
        pass
    # On the command line the shell has already eaten any quotes, so `mask=0011` reaches YAML
    # as the number 11; for a field that takes text, fall back to the text as typed.
    if setting.text is not None:
        try:
            return _convert(setting.text, annotation)
        except _Mismatch:
            pass
    value = setting.value
    message = (
        f"key '{key}' (from {setting.source}) expects {_describe(annotation)}, "
        f"got {value!r} ({type(value).__name__})"
    )
    if isinstance(value, (bool, int, float)) and _accepts_text(annotation):
        message += "; quote a value in YAML to keep it as text (mask: '0011', not mask: 0011)"
    raise ConfigError(message)


def _accepts_text(annotation) -> bool:
    try:
        _convert("", annotation)
    except _Mismatch:
        return False
    return True


def _convert(value, annotation):
    """``value`` checked against ``annotation``; an int becomes a float and a list a tuple where
    the annotation asks for it. Raises _Mismatch when the value does not fit."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if annotation is Any:
        return value
    if annotation is None or annotation is type(None):
        if value is None:
            return None
        raise _Mismatch
    if origin is Literal:
        # Compare types too: True == 1, but True is not an allowed value of Literal[0, 1].
        if any(type(value) is type(choice) and value == choice for choice in args):
            return value
        raise _Mismatch
    if origin in _UNION_ORIGINS:
        for arg in args:
            try:
                return _convert(value, arg)
            except _Mismatch:
                pass
        raise _Mismatch
    if annotation is bool:
        if isinstance(value, bool):
            return value
        raise _Mismatch
    if annotation is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise _Mismatch
    if annotation is float:
        # inf and nan parse as YAML floats, but no setting means them: refuse them here.
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            return float(value)
        raise _Mismatch
    if annotation is list or origin is list:
        if not isinstance(value, list):
            raise _Mismatch
        return [_convert(item, args[0]) for item in value] if args else list(value)
    if annotation is tuple or origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise _Mismatch
        if not args:
            return tuple(value)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_convert(item, args[0]) for item in value)
        if len(value) != len(args):
            raise _Mismatch
        return tuple(_convert(item, arg) for item, arg in zip(value, args))
    if annotation is dict or origin is dict:
        if not isinstance(value, dict):
            raise _Mismatch
        if not args:
            return dict(value)
        return {_convert(k, args[0]): _convert(v, args[1]) for k, v in value.items()}
    if isinstance(annotation, type):
        if isinstance(value, annotation):
            return value
        raise _Mismatch
    raise TypeError(f"config fields of type {annotation!r} are not supported")


def _describe(annotation) -> str:
    """A reader-friendly name for a type annotation, listing the choices of a Literal."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if annotation is None or annotation is type(None):
        return "null"
    if origin is Literal:
        return "one of " + ", ".join(repr(choice) for choice in args)
    if origin in _UNION_ORIGINS:
        return " or ".join(_describe(arg) for arg in args)
    if dataclasses.is_dataclass(annotation):
        return f"a section of {annotation.__name__} keys"
    if annotation is float:
        return "a finite float"
    if origin in (list, tuple, dict):
        if origin is tuple and len(args) == 2 and args[1] is Ellipsis:
            return f"tuple[{_describe(args[0])}, ...]"
        return f"{origin.__name__}[{', '.join(_describe(arg) for arg in args)}]"
    return getattr(annotation, "__name__", repr(annotation))

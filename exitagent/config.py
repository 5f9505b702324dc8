"""Configs are frozen dataclasses built from argparse and written as JSON into the run directory.

Each entry point declares ``@dataclass(frozen=True) class XConfig`` with a docstring per field
(``field(metadata={"help": ...})``); ``add_arguments`` turns the fields into flags and ``from_args``
builds the config back, so flags, defaults and the saved JSON never drift apart.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import types
import typing
from enum import Enum
from pathlib import Path
from typing import Any, TypeVar

from exitagent.errors import ConfigError

C = TypeVar("C")


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _base_type(annotation: Any) -> tuple[Any, bool]:
    """(the type to parse, whether None is allowed) for a field annotation."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        return args[0], True
    return annotation, False


def add_arguments(parser: argparse.ArgumentParser, config_type: type[Any], *, skip: tuple[str, ...] = ()) -> None:
    """Add one flag per field of ``config_type`` (a dataclass) to ``parser``."""
    hints = typing.get_type_hints(config_type)
    for f in dataclasses.fields(config_type):
        if f.name in skip or not f.init:
            continue
        kind, _ = _base_type(hints[f.name])
        help_text = f.metadata.get("help", "")
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        default = None if required else (f.default if f.default is not dataclasses.MISSING else f.default_factory())  # type: ignore[operator]
        if kind is bool:
            parser.add_argument(_flag(f.name), action=argparse.BooleanOptionalAction, default=default, help=help_text)
            continue
        if typing.get_origin(kind) is tuple:  # tuple[str, ...]: the flag may be given several times
            parser.add_argument(_flag(f.name), action="append", type=str, default=None,
                                help=f"{help_text} (repeatable; default: {' '.join(map(str, default or ()))})")
            continue
        parse: Any = kind
        choices = f.metadata.get("choices")  # a str field with a fixed set of values
        if isinstance(kind, type) and issubclass(kind, Enum):
            choices = [e.value for e in kind]
            parse = str
        elif kind is Path:
            parse = Path
        elif kind not in (int, float, str):
            continue  # not settable from the command line (e.g. nested configs)
        shown = default.value if isinstance(default, Enum) else default
        parser.add_argument(
            _flag(f.name), type=parse, default=shown, required=required, choices=choices,
            help=f"{help_text} (default: {shown})" if not required else help_text,
        )


def from_args(config_type: type[C], args: argparse.Namespace, **overrides: Any) -> C:
    """Build ``config_type`` from parsed flags (fields with no flag keep their defaults)."""
    hints = typing.get_type_hints(config_type)
    values: dict[str, Any] = {}
    for f in dataclasses.fields(config_type):  # type: ignore[arg-type]
        if not f.init or not hasattr(args, f.name):
            continue
        value = getattr(args, f.name)
        kind, _ = _base_type(hints[f.name])
        if typing.get_origin(kind) is tuple:
            if value is None:
                continue  # not given: the field's default
            value = tuple(value)
        if value is not None and isinstance(kind, type) and issubclass(kind, Enum):
            value = kind(value)
        values[f.name] = value
    values.update(overrides)
    try:
        return config_type(**values)
    except (TypeError, ValueError) as error:
        raise ConfigError(f"bad configuration: {error}") from error


def to_json(config: Any) -> str:
    def encode(value: Any) -> Any:
        if isinstance(value, Enum):
            return value.value
        if isinstance(value, Path):
            return str(value)
        raise TypeError(type(value))

    return json.dumps(dataclasses.asdict(config), indent=2, default=encode, sort_keys=True)


def save(config: Any, run_dir: Path, name: str) -> Path:
    """Write ``config`` as ``RUN/config/NAME.json`` (atomically: a reader never sees half a file)."""
    path = run_dir / "config" / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(to_json(config) + "\n", encoding="utf-8")
    os.replace(tmp, path)
    return path

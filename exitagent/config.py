"""Configs are frozen dataclasses built from argparse and written as JSON into the run directory.

Each entry point declares ``@dataclass(frozen=True) class XConfig`` with a docstring per field
(``field(metadata={"help": ...})``); ``add_arguments`` turns the fields into flags and ``from_args``
builds the config back, so flags, defaults and the saved JSON never drift apart.

``--config FILE.toml`` (every entry point; ``parse_args`` below) sets flags from a file, with
defaults < file < flags. The format (recipes/README.md has examples):

- keys are flag names without ``--``, with ``_`` or ``-`` (``group_size``, ``group-size``); where a
  field spells its flag otherwise (``metadata["flags"]``), the field's name (collect's ``task_source``
  for ``--source``), as in the saved JSON; and
  TOML values of the flag's type: ``true``/``false`` for on/off flags, a list for repeatable ones;
- a section ``[serve]``, ``[collect]``, ``[evaluate]``, ``[update]``, ``[run]``, ``[variants]``
  (or ``[models]``, ``[curriculum]``, ``[competitions]``) holds the keys of ``python -m
  ...NAME`` alone; other sections are ignored by that command but must be known names;
- a key at the top level (before any section) is shared: it applies to every command that has
  such a flag (serve, collect, evaluate, run, update), so one ``temperature`` serves collect and
  update alike; the command's own section wins over it;
- relative paths are relative to the working directory, as on the command line.

An unknown section or key, a value of the wrong type, a file that is missing or not TOML: one
error naming the file, the section and the key, and exit 2 (argparse's usage error).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import os
import sys
import tomllib
import types
import typing
from collections.abc import Iterator, Sequence
from enum import Enum
from pathlib import Path
from typing import Any, TypeVar

from exitagent.errors import ConfigError, ExitCode
from exitagent.run_dir import RunDir

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
    own = vars(config_type).get("__annotations__", {})  # its own flags first in --help, shared blocks after
    for f in sorted(dataclasses.fields(config_type), key=lambda f: f.name not in own):
        if f.name in skip or not f.init:
            continue
        kind, _ = _base_type(hints[f.name])
        help_text = f.metadata.get("help", "")
        names = f.metadata.get("flags", (_flag(f.name),))  # a field may name its flags (the first is shown)
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        default = None if required else (f.default if f.default is not dataclasses.MISSING else f.default_factory())  # type: ignore[operator]
        if kind is bool:
            parser.add_argument(*names, dest=f.name, action=argparse.BooleanOptionalAction, default=default,
                                help=help_text)
            continue
        if typing.get_origin(kind) is tuple:  # tuple[str, ...]: the flag may be given several times
            parser.add_argument(*names, dest=f.name, action="append", type=str, default=None,
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
        metavar = names[0].lstrip("-").replace("-", "_").upper() if "flags" in f.metadata else None
        parser.add_argument(
            *names, dest=f.name, metavar=metavar, type=parse, default=shown, required=required, choices=choices,
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
    path = RunDir(run_dir).config(name)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(to_json(config) + "\n", encoding="utf-8")
    os.replace(tmp, path)
    return path


# --- --config FILE.toml --------------------------------------------------------------------------

# The commands whose config dataclass a shared (top-level) key may name: a top-level key none of
# them has is a typo. Imported only when the command reading the file lacks the key itself.
SHARED_BY: dict[str, str] = {
    "serve": "exitagent.serve:ServeConfig",
    "collect": "exitagent.collect:CollectConfig",
    "evaluate": "exitagent.evaluate:EvalConfig",
    "run": "exitagent.run:RunConfig",
    "update": "training.config:UpdateConfig",
}
SECTIONS = (*SHARED_BY, "variants", "models", "curriculum", "competitions", "memory")
_NOT_FROM_FILE = ("help", "version", "config")
MAX_FILE_BYTES = 2**20
Settable = dict[str, list[tuple[argparse.ArgumentParser, argparse.Action]]]


def parse_args(parser: argparse.ArgumentParser, argv: Sequence[str] | None, section: str) -> argparse.Namespace:
    """``parser.parse_args(argv)`` with ``--config FILE.toml`` (its ``[section]`` and shared keys)
    setting defaults first, so that flags given on the command line still win."""
    args, _ = _parse(parser, argv, section, known=False)
    return args


def parse_known_args(parser: argparse.ArgumentParser, argv: Sequence[str] | None,
                     section: str) -> tuple[argparse.Namespace, list[str]]:
    """``parse_known_args`` with ``--config``; the flags left over keep ``--config FILE`` so that the
    commands they are passed to read their own sections of the same file."""
    return _parse(parser, argv, section, known=True)


def _parse(parser: argparse.ArgumentParser, argv: Sequence[str] | None, section: str,
           known: bool) -> tuple[argparse.Namespace, list[str]]:
    if section not in SECTIONS:
        raise ValueError(f"no config section {section!r}: add it to SECTIONS")
    argv = list(sys.argv[1:] if argv is None else argv)
    if not any(action.dest == "config" for action in parser._actions):
        parser.add_argument("--config", type=Path, metavar="FILE.toml", default=None,
                            help=f"set flags from this TOML file (its [{section}] section and top-level keys); "
                                 "flags given here still win")
    early = argparse.ArgumentParser(prog=parser.prog, add_help=False, allow_abbrev=False)
    early.add_argument("--config", type=Path, default=None)
    path = early.parse_known_args(argv)[0].config
    if path is not None:
        try:
            _apply(load(path, section, _settable(parser), command=parser.prog))
        except ConfigError as error:  # about the file, not the command line: no usage text
            parser.exit(ExitCode.USAGE, f"{parser.prog}: error: {error}\n")
    if known:
        args, rest = parser.parse_known_args(argv)
    else:
        args, rest = parser.parse_args(argv), []
    if args.config != path:  # "--conf FILE": argparse took the abbreviation, the early parse did not
        parser.error("spell --config out in full")
    return args, [*rest, "--config", str(path)] if known and path is not None else rest


def _settable(parser: argparse.ArgumentParser) -> Settable:
    """Each flag's name (its ``dest``) -> the (parser, action) pairs that define it, subcommands included."""
    found: Settable = {}

    def walk(owner: argparse.ArgumentParser) -> Iterator[tuple[argparse.ArgumentParser, argparse.Action]]:
        for action in owner._actions:
            if isinstance(action, argparse._SubParsersAction):
                for sub in dict.fromkeys(typing.cast(dict[str, argparse.ArgumentParser], action.choices).values()):
                    yield from walk(sub)
            elif action.option_strings and action.dest not in _NOT_FROM_FILE:
                yield owner, action

    for owner, action in walk(parser):
        found.setdefault(action.dest, []).append((owner, action))
    return found


def read_file(path: Path) -> dict[str, Any]:
    """The TOML document at ``path``, or a ConfigError saying why not."""
    try:
        if path.exists() and not path.is_file():  # a FIFO or a device would block or never end
            raise ConfigError(f"--config {path}: not a regular file")
        if path.exists() and path.stat().st_size > MAX_FILE_BYTES:
            raise ConfigError(f"--config {path}: larger than {MAX_FILE_BYTES // 2**20} MiB; not a recipe")
        with path.open("rb") as handle:
            return tomllib.load(handle)
    except FileNotFoundError:
        raise ConfigError(f"--config {path}: no such file") from None
    except OSError as error:
        raise ConfigError(f"--config {path}: cannot read it ({error.strerror})") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as error:
        raise ConfigError(f"--config {path}: not valid TOML ({error})") from None


def load(path: Path, section: str, settable: Settable,
         command: str = "this command") -> dict[tuple[argparse.ArgumentParser, argparse.Action], Any]:
    """The values ``path`` sets for ``command`` (which reads ``[section]``), checked and converted."""
    document = read_file(path)
    shared = {key: value for key, value in document.items() if not isinstance(value, dict)}
    for name in document.keys() - shared.keys():
        if name not in SECTIONS:
            raise ConfigError(f"{path}: unknown section [{name}] (known: {', '.join(SECTIONS)})")
    chosen: dict[str, tuple[str, Any]] = {}
    for key, value in _normalised(path, "(top level)", shared).items():
        if key in settable:
            chosen[key] = ("(top level)", value)
        elif not _shared_somewhere(key):
            raise ConfigError(f"{path} (top level): unknown key {key!r}: no command has a --{_flag(key)[2:]} flag")
    for key, value in _normalised(path, f"[{section}]", document.get(section, {})).items():
        if key not in settable:
            raise ConfigError(f"{path} [{section}]: unknown key {key!r} ({command} has no {_flag(key)} flag)")
        chosen[key] = (f"[{section}]", value)
    return {pair: _coerce(pair[1], value, f"{path} {where}: {key}")
            for key, (where, value) in chosen.items() for pair in settable[key]}


def _normalised(path: Path, where: str, table: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in table.items():
        name = key.replace("-", "_")
        if name in out:
            raise ConfigError(f"{path} {where}: {key!r} is given twice (as {name!r} too)")
        if isinstance(value, dict):
            raise ConfigError(f"{path} {where}: {key!r} is a table; only [section] tables are known")
        out[name] = value
    return out


def _shared_somewhere(key: str) -> bool:
    for target in SHARED_BY.values():
        module, _, name = target.partition(":")
        try:
            fields = dataclasses.fields(getattr(importlib.import_module(module), name))
        except ImportError:  # e.g. a command whose optional packages are missing here
            continue
        if any(f.name == key for f in fields):
            return True
    return False


def _kind(action: argparse.Action) -> str:
    if isinstance(action, (argparse.BooleanOptionalAction, argparse._StoreTrueAction, argparse._StoreFalseAction)):
        return "bool"
    if isinstance(action, argparse._AppendAction) or action.nargs in ("*", "+"):
        return "list"
    return "one"


def _coerce(action: argparse.Action, value: Any, where: str) -> Any:
    kind = _kind(action)
    if kind == "bool":
        if not isinstance(value, bool):
            raise ConfigError(f"{where} must be true or false, not {value!r}")
        return value  # the value the flag's name takes (store_false flags included)
    if kind == "list":
        if not isinstance(value, list):
            raise ConfigError(f"{where} must be a list, not {value!r}")
        return [_scalar(action, item, where) for item in value]
    return _scalar(action, value, where)


def _scalar(action: argparse.Action, value: Any, where: str) -> Any:
    parse = action.type or str
    if isinstance(value, (dict, list, bool)) or value is None:
        raise ConfigError(f"{where} must be a single {getattr(parse, '__name__', 'value')}, not {value!r}")
    if parse is int and not isinstance(value, int):
        raise ConfigError(f"{where} must be an integer, not {value!r}")
    if parse is float and not isinstance(value, (int, float)):
        raise ConfigError(f"{where} must be a number, not {value!r}")
    if parse in (str, Path) and not isinstance(value, str):
        raise ConfigError(f"{where} must be a string, not {value!r}")
    try:
        converted = parse(value) if callable(parse) else value
    except (TypeError, ValueError, argparse.ArgumentTypeError) as error:
        raise ConfigError(f"{where}: {error}") from None
    if action.choices is not None and converted not in action.choices:
        raise ConfigError(f"{where} must be one of {', '.join(map(str, action.choices))}, not {value!r}")
    return converted


def _apply(values: dict[tuple[argparse.ArgumentParser, argparse.Action], Any]) -> None:
    for (owner, action), value in values.items():
        owner.set_defaults(**{action.dest: value})
        action.required = False  # the file gave it

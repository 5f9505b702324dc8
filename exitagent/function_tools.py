"""Tools from typed Python functions: the schema from the signature and docstring, a call that
cannot hang, crash or return junk into the episode.

``function_tool(fn)`` reads ``fn``'s parameters (each must have a type hint: the JSON schema the
model sees is built from them, so a missing one is a ``ConfigError`` at construction) and its
docstring (the first paragraph describes the tool; an ``Args:`` section, Google style, describes
the parameters). A first parameter named ``state`` is not shown to the model: it receives the
episode's state (``FunctionTool.bound``), so each rollout acts on its own copy.

Running one is the model's business, so every failure is data the model sees as the tool result,
and the episode goes on: a tool that raises (``tool_raised``), returns something that is not
JSON-serialisable (``tool_bad_result``), or does not return within ``timeout_s``
(``tool_timeout``). A synchronous tool runs in a worker thread; Python cannot kill a thread, so
one that never returns is abandoned (it keeps its thread until the process ends), not stopped.
"""

from __future__ import annotations

import inspect
import json
import re
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from functools import partial
from typing import Any

import anyio
import structlog

from exitagent.errors import ConfigError, ExitAgentError
from exitagent.tools import ToolResult

log = structlog.get_logger(__name__)

STATE = "state"  # the parameter name that receives the episode's state
MAX_RESULT_CHARS = 4000  # of one tool result the model sees
_ARG = re.compile(r"^\s+(\w+)\s*(?:\([^)]*\))?\s*:\s*(.*)$")  # "    name (type): text"
_SCALARS: dict[Any, str] = {str: "string", int: "integer", float: "number", bool: "boolean"}


def json_schema(hint: Any, where: str) -> dict[str, Any]:
    """The JSON schema of one parameter type; ``ConfigError`` naming ``where`` for a type JSON cannot carry."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint in _SCALARS:
        return {"type": _SCALARS[hint]}
    if hint in (list, dict):
        return {"type": "array" if hint is list else "object"}
    if origin is list:
        return {"type": "array", "items": json_schema(args[0], where)}
    if origin is dict:
        return {"type": "object", "additionalProperties": json_schema(args[1], where)}
    if origin is typing.Literal and args and len({type(a) for a in args}) == 1 and type(args[0]) in _SCALARS:
        return {"type": _SCALARS[type(args[0])], "enum": list(args)}
    if origin in (typing.Union, types.UnionType) and len(args) == 2 and type(None) in args:
        return json_schema(next(a for a in args if a is not type(None)), where)  # optional: not required
    raise ConfigError(f"{where}: type {hint!r} cannot be given as JSON (use str, int, float, bool, list[...], "
                      "dict[str, ...], Literal[...] or X | None)")


def _doc_parts(doc: str) -> tuple[str, dict[str, str]]:
    """(the description, {parameter: description}) from a Google-style docstring."""
    head, _, args = doc.partition("\nArgs:\n")
    described: dict[str, str] = {}
    name, indent = "", None
    for line in args.splitlines():
        if line.strip() and not line[0].isspace():
            break  # the next section (Returns:, Raises:)
        depth, match = len(line) - len(line.lstrip()), _ARG.match(line)
        if match and indent in (None, depth):
            indent, name = depth, match[1]
            described[name] = match[2].strip()
        elif name and line.strip():
            described[name] += " " + line.strip()
    return " ".join(head.split("\n\n")[0].split()), described


@dataclass  # not frozen: the Tool protocol's attributes are plain ones
class FunctionTool:
    """A ``Tool`` (``exitagent.tools``) that calls a Python function with the model's arguments."""

    fn: Callable[..., Any]
    name: str
    description: str
    parameters: Mapping[str, Any]
    takes_state: bool = False
    timeout_s: float = 10.0
    state: Any = None

    def bound(self, state: Any) -> FunctionTool:
        """This tool acting on one episode's ``state``."""
        return replace(self, state=state)

    async def run(self, arguments: Mapping[str, Any]) -> ToolResult:
        if self.takes_state and STATE in arguments:  # the model must not swap the episode's state for its own
            return ToolResult(f"error: {self.name} has no argument {STATE!r}", "tool_raised")
        kwargs = {STATE: self.state, **arguments} if self.takes_state else dict(arguments)
        try:
            with anyio.fail_after(self.timeout_s):
                if inspect.iscoroutinefunction(self.fn):
                    value = await self.fn(**kwargs)
                else:
                    value = await anyio.to_thread.run_sync(partial(self.fn, **kwargs), abandon_on_cancel=True)
        except TimeoutError:
            log.warning("tool_timed_out", tool=self.name, timeout_s=self.timeout_s)
            return ToolResult(f"error: {self.name} did not return within {self.timeout_s:g} s", "tool_timeout")
        except ExitAgentError:
            raise  # infrastructure the tool reached (a dead sandbox): a person has to fix it
        except Exception as error:  # the tool's own failure on the model's input: the model sees it
            log.info("tool_raised", tool=self.name, error=repr(error)[:200])
            return ToolResult(f"error: {self.name} raised {type(error).__name__}: {str(error)[:500]}", "tool_raised")
        return _as_result(self.name, value)


def _as_result(name: str, value: Any) -> ToolResult:
    if isinstance(value, str):
        text = value
    else:
        try:
            text = json.dumps(value, allow_nan=False)
        except (TypeError, ValueError) as error:
            log.warning("tool_result_unserialisable", tool=name, type=type(value).__name__)
            return ToolResult(f"error: {name} returned a {type(value).__name__}, which is not JSON ({error})",
                              "tool_bad_result")
    if len(text) > MAX_RESULT_CHARS:
        text = f"{text[:MAX_RESULT_CHARS]}\n... [{len(text) - MAX_RESULT_CHARS} characters cut]"
    return ToolResult(text)


def function_tool(fn: Callable[..., Any], *, timeout_s: float = 10.0) -> FunctionTool:
    """``fn`` as a tool; ``ConfigError`` for a parameter without a type hint or a type JSON cannot carry."""
    name = getattr(fn, "__name__", "")
    if not callable(fn) or not name.isidentifier():
        raise ConfigError(f"a tool must be a named function, not {fn!r}")
    try:
        hints = typing.get_type_hints(fn)
    except Exception as error:  # a hint naming something undefined: the user's code, said plainly
        raise ConfigError(f"tool {name}: its type hints do not resolve: {error}") from None
    description, described = _doc_parts(inspect.getdoc(fn) or "")
    params = list(inspect.signature(fn).parameters.values())
    takes_state = bool(params) and params[0].name == STATE
    properties: dict[str, Any] = {}
    required = []
    for param in params[takes_state:]:
        if param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD, param.POSITIONAL_ONLY):
            raise ConfigError(f"tool {name}: parameter {param.name!r} must be an ordinary named parameter")
        if param.name not in hints:
            raise ConfigError(f"tool {name}: parameter {param.name!r} has no type hint; a tool's parameters "
                              "need type hints (the JSON schema the model sees is built from them)")
        properties[param.name] = json_schema(hints[param.name], f"tool {name}, parameter {param.name!r}")
        if param.name in described:
            properties[param.name]["description"] = described[param.name]
        if param.default is param.empty:
            required.append(param.name)
    schema = {"type": "object", "properties": properties, "required": required}
    return FunctionTool(fn, name, description or name, schema, takes_state, timeout_s)

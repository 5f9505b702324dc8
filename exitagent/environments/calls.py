"""The safe executor: a model-written call string becomes one method call, or an error the model sees.

Threat model: the call text is hostile. BFCL's own harness prefixes method names with a global
instance name and ``eval()``s the string; here nothing the model wrote is ever evaluated. A call
must parse (``ast``, mode ``eval``) as exactly ``name(literal, ..., key=literal, ...)``: a plain
function name, and arguments that ``ast.literal_eval`` accepts (strings, numbers, booleans, None,
and lists, tuples, dicts and sets of those). Names, attribute access, subscripts, comprehensions,
lambdas, calls inside arguments, ``*args`` and ``**kwargs`` are refused before anything runs. The
name is then looked up among the public methods of the episode's own instances and dispatched
with ``getattr``; the arguments must bind to the method's signature.

Everything that can go wrong is the model's mistake and comes back as a ``CallResult`` whose
``output`` starts with ``"Error during execution: "`` (the text BFCL shows for a failing call)
and whose ``error`` names the kind, for the loop's metrics. Successful results are rendered the
way BFCL renders them (a string as is, a dict as JSON, anything else through ``str``), so the
checker compares the same strings the official checker would.
"""

from __future__ import annotations

import ast
import inspect
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

MAX_CALL_CHARS = 100_000  # a call longer than this is refused unparsed (parsing cost is the model's to bound)
ERROR_PREFIX = "Error during execution: "


@dataclass(frozen=True)
class ParsedCall:
    name: str
    args: tuple[Any, ...]
    kwargs: Mapping[str, Any]


@dataclass(frozen=True)
class CallResult:
    """What one call returned, as the model sees it. ``error``: "" when the call ran and returned."""

    output: str
    error: str = ""  # "unsafe_call" | "unknown_function" | "bad_arguments" | "execution_error"


class UnsafeCall(ValueError):
    """The text is not a plain call with literal arguments (turned into a ``CallResult`` by ``execute``)."""


def render_call(name: str, arguments: Mapping[str, Any]) -> str:
    """``name(key=repr(value), ...)``: the call string of a JSON tool call (parses back to the same values)."""
    return f"{name}({', '.join(f'{key}={value!r}' for key, value in arguments.items())})"


def _literal(node: ast.expr) -> Any:
    if isinstance(node, ast.Starred):
        raise UnsafeCall("*args are not allowed: write each argument")
    try:
        return ast.literal_eval(node)
    except (ValueError, TypeError, SyntaxError, RecursionError, MemoryError) as error:
        raise UnsafeCall(f"arguments must be literal values (strings, numbers, lists, dicts), "
                         f"not {ast.unparse(node)[:80]!r}") from error


def parse_call(text: str) -> ParsedCall:
    """The name and literal arguments of ``text``; ``UnsafeCall`` for anything else."""
    if len(text) > MAX_CALL_CHARS:
        raise UnsafeCall(f"the call is longer than {MAX_CALL_CHARS} characters")
    try:
        node = ast.parse(text.strip(), mode="eval").body
    except (SyntaxError, ValueError, RecursionError, MemoryError) as error:
        raise UnsafeCall(f"not a function call: {getattr(error, 'msg', error)}") from error
    if not isinstance(node, ast.Call):
        raise UnsafeCall("not a function call")
    if not isinstance(node.func, ast.Name):
        raise UnsafeCall("call a function by its plain name (no attribute access, no expressions)")
    args = tuple(_literal(arg) for arg in node.args)
    kwargs: dict[str, Any] = {}
    for keyword in node.keywords:
        if keyword.arg is None:
            raise UnsafeCall("**kwargs are not allowed: name each argument")
        kwargs[keyword.arg] = _literal(keyword.value)
    return ParsedCall(node.func.id, args, kwargs)


def public_methods(instance: object) -> list[str]:
    """The names a model may call on ``instance``: its bound methods not starting with ``_``."""
    return [name for name, _ in inspect.getmembers(instance, inspect.ismethod) if not name.startswith("_")]


def as_text(value: Any) -> str:
    """BFCL's rendering of a result: strings as they are, dicts as JSON (str if not serialisable)."""
    if type(value) is str:
        return value
    if type(value) is dict:
        try:
            return json.dumps(value)
        except (TypeError, ValueError):
            pass
    try:
        return str(value)
    except ValueError as error:  # e.g. an integer past Python's 4300-digit str() limit
        return f"{ERROR_PREFIX}{error}"


def execute(text: str, instances: Mapping[str, object], methods: Mapping[str, str]) -> CallResult:
    """Run ``text`` on ``instances[methods[name]]``. ``methods`` maps a public method name to its class."""
    try:
        call = parse_call(text)
    except UnsafeCall as error:
        return CallResult(f"{ERROR_PREFIX}{error}", "unsafe_call")
    owner = methods.get(call.name)
    if owner is None or call.name.startswith("_"):
        return CallResult(f"{ERROR_PREFIX}unknown function {call.name!r}", "unknown_function")
    method = getattr(instances[owner], call.name)
    try:
        inspect.signature(method).bind(*call.args, **call.kwargs)
    except TypeError as error:
        return CallResult(f"{ERROR_PREFIX}{call.name}: {error}", "bad_arguments")
    try:
        value = method(*call.args, **call.kwargs)
    except Exception as error:  # the API classes raise on bad input: the model's mistake, shown to it
        return CallResult(f"{ERROR_PREFIX}{error}", "execution_error")
    return CallResult(as_text(value))

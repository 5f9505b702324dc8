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

Bounds, since a model chooses the sizes: ``render_call`` renders only a valid identifier name and
keys and bounded literal values (``tools.call_problem``), so a name like ``rm(...)#`` cannot become
a second call; parsed arguments get the same value check; the Math API's size-driven arguments
(``power`` on integers, ``precision``, ``decimal_places``) are bounded before the call
(``heavy_problem``), which keeps every call fast (milliseconds). The decimal context and mpmath's
precision, which ``square_root`` and ``logarithm`` set process-wide, are restored after each call.
Calls run one at a time in the process (``_ONE_CALL``), from whatever thread: mpmath's precision
is global, so two concurrent calls could change it under each other.
"""

from __future__ import annotations

import ast
import decimal
import inspect
import json
import sys
import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from exitagent.tools import call_problem, value_problem

MAX_RESULT_BITS = 14_000  # of an integer power: its decimal form stays under Python's 4300-digit str() limit
MAX_PRECISION = 1000  # digits of a Math API precision or rounding position
_ONE_CALL = threading.Lock()
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
    """``name(key=repr(value), ...)``: the call string of a JSON tool call (parses back to the same values).

    ``UnsafeCall`` unless the name and keys are plain identifiers and the values bounded literals:
    only validated parts are ever rendered.
    """
    problem = call_problem(name, dict(arguments) if isinstance(arguments, Mapping) else arguments)
    if problem:
        raise UnsafeCall(problem)
    return f"{name}({', '.join(f'{key}={value!r}' for key, value in arguments.items())})"


def _literal(node: ast.expr, text: str) -> Any:
    if isinstance(node, ast.Starred):
        raise UnsafeCall("*args are not allowed: write each argument")
    try:
        value = ast.literal_eval(node)
    except (ValueError, TypeError, SyntaxError, RecursionError, MemoryError, OverflowError) as error:
        # The source text, not ast.unparse: unparse recurses per level and fails on a deep expression.
        source = ast.get_source_segment(text, node) or type(node).__name__
        raise UnsafeCall(f"arguments must be literal values (strings, numbers, lists, dicts), "
                         f"not {source[:80]!r}") from error
    if problem := value_problem(value):
        raise UnsafeCall(problem)
    return value


def parse_call(text: str) -> ParsedCall:
    """The name and literal arguments of ``text``; ``UnsafeCall`` for anything else."""
    if len(text) > MAX_CALL_CHARS:
        raise UnsafeCall(f"the call is longer than {MAX_CALL_CHARS} characters")
    text = text.strip()
    try:
        node = ast.parse(text, mode="eval").body
    except (SyntaxError, ValueError, RecursionError, MemoryError, OverflowError) as error:
        raise UnsafeCall(f"not a function call: {getattr(error, 'msg', error)}") from error
    if not isinstance(node, ast.Call):
        raise UnsafeCall("not a function call")
    if not isinstance(node.func, ast.Name):
        raise UnsafeCall("call a function by its plain name (no attribute access, no expressions)")
    args = tuple(_literal(arg, text) for arg in node.args)
    kwargs: dict[str, Any] = {}
    for keyword in node.keywords:
        if keyword.arg is None:
            raise UnsafeCall("**kwargs are not allowed: name each argument")
        kwargs[keyword.arg] = _literal(keyword.value, text)
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
        except (TypeError, ValueError, RecursionError):
            pass
    try:
        return str(value)
    except Exception as error:  # e.g. an integer past Python's 4300-digit str() limit, or a deep list
        return f"{ERROR_PREFIX}the result cannot be shown: {type(error).__name__}"


def _int(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def heavy_problem(owner: str, name: str, arguments: Mapping[str, Any]) -> str:
    """Why a Math API call would take a model-chosen amount of time or memory, else "".

    ``power`` on integers computes an exact integer (``power(10, 10**7)`` took 10 s); a
    ``precision`` is a digit count for mpmath and decimal; ``round_number`` on an integer builds
    ``10**-decimal_places``.
    """
    if owner != "MathAPI":
        return ""
    base, exponent = _int(arguments.get("base")), _int(arguments.get("exponent"))
    if name == "power" and base is not None and exponent is not None and exponent > 0 and abs(base) > 1 \
            and exponent * base.bit_length() > MAX_RESULT_BITS:
        return f"power: the result would have more than {MAX_RESULT_BITS} bits"
    for key in ("precision", "decimal_places"):
        value = _int(arguments.get(key))
        if value is not None and abs(value) > MAX_PRECISION:
            return f"{name}: {key} must be at most {MAX_PRECISION} in size"
    return ""


@contextmanager
def _numeric_state() -> Iterator[None]:
    """Restore the decimal context and mpmath's precision after a call (the Math API sets both)."""
    mpmath = sys.modules.get("mpmath")  # only an imported mpmath can have been changed
    prec = mpmath.mp.prec if mpmath is not None else None
    try:
        with decimal.localcontext():
            yield
    finally:
        if mpmath is not None:
            mpmath.mp.prec = prec


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
        bound = inspect.signature(method).bind(*call.args, **call.kwargs)
    except TypeError as error:
        return CallResult(f"{ERROR_PREFIX}{call.name}: {error}", "bad_arguments")
    if problem := heavy_problem(owner, call.name, bound.arguments):
        return CallResult(f"{ERROR_PREFIX}{problem}", "bad_arguments")
    with _ONE_CALL, _numeric_state():
        try:
            value = method(*call.args, **call.kwargs)
        except Exception as error:  # the API classes raise on bad input: the model's mistake, shown to it
            return CallResult(f"{ERROR_PREFIX}{error}", "execution_error")
        return CallResult(as_text(value))  # rendered at the call's precision, as BFCL renders it

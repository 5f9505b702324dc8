"""Tools an agent can call, how calls are read from the model's text, and how they are executed.

The paper's action format: a JSON call ``{"name": ..., "arguments": {...}}`` inside
``<tool>...</tool>``, and ``<TASK_FINISHED>`` / ``<TASK_ERROR>`` as stop markers. OpenAI-native
``tool_calls`` are accepted too when the server parses them. Every mistake the model can make
(unknown tool, bad JSON, wrong arguments, a tool that fails on its input) becomes a tool message
it sees, with an error kind the loop counts; only infrastructure failures (a dead sandbox) raise.

Model text is hostile input. Reading it is bounded before any parser runs: the message length,
the ``<tool>`` block length, the bracket depth, the number of calls, the digits of a number;
NaN and Infinity are refused. Whatever the text, the result is an ``Action`` whose
``parse_errors`` say what was wrong, never an exception. A stage that renders a call as source
(BFCL) first checks it with ``call_problem``: name and keys plain identifiers, values bounded.
"""

from __future__ import annotations

import json
import keyword
import math
import re
import unicodedata
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from exitagent.types import Message, ToolCall
from sandboxes.base import Sandbox

FINISHED = "<TASK_FINISHED>"
GAVE_UP = "<TASK_ERROR>"
_TOOL_BLOCK = re.compile(r"<tool>(.*?)</tool>", re.DOTALL)
MAX_MESSAGE_CHARS = 200_000  # a longer message is not searched for calls (it is far past any max_tokens)
MAX_ACTION_CHARS = 32_000  # one <tool> block
MAX_DEPTH = 32  # nested brackets in one action (json and repr recurse per level)
MAX_NUMBER_CHARS = 100  # characters of one number literal (int(str) is quadratic, and capped at 4300 digits)
MAX_CALLS = 32  # calls in one message
_MAX_INT_BITS = int(MAX_NUMBER_CHARS * 3.33)  # bits of a MAX_NUMBER_CHARS-digit integer
_JSON_TYPES: dict[str, Any] = {"string": str, "integer": int, "number": (int, float), "boolean": bool,
                               "object": dict, "array": list}


class Tool(Protocol):
    name: str
    description: str
    parameters: Mapping[str, Any]  # JSON schema of the arguments object

    async def run(self, arguments: Mapping[str, Any]) -> ToolResult: ...


@dataclass(frozen=True)
class ToolResult:
    content: str
    error: str = ""  # "" when the call worked; otherwise a short kind counted in metrics


@dataclass(frozen=True)
class Action:
    """What one assistant message asks for."""

    calls: tuple[ToolCall, ...] = ()
    parse_errors: tuple[str, ...] = ()  # one message per <tool> block that was not a valid call
    finished: bool = False
    gave_up: bool = False


class ActionError(ValueError):
    """Model text that cannot be read as an action; the message is shown to the model."""


def _number(text: str, convert: Any) -> Any:
    if len(text) > MAX_NUMBER_CHARS:
        raise ActionError(f"a number longer than {MAX_NUMBER_CHARS} characters")
    value = convert(text)
    if isinstance(value, float) and not math.isfinite(value):
        raise ActionError(f"number {text[:20]} is out of range")
    return value


def _no_constant(text: str) -> Any:
    raise ActionError(f"{text} is not a JSON value")


def nesting_depth(text: str) -> int:
    """The deepest bracket nesting of JSON ``text`` (brackets inside strings do not count)."""
    depth = deepest = 0
    in_string = escaped = False
    for char in text:
        if in_string:
            escaped, in_string = (False, True) if escaped else (char == "\\", char != '"')
        elif char == '"':
            in_string = True
        elif char in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif char in "]}":
            depth -= 1
    return deepest


def load_json(text: str) -> Any:
    """``json.loads`` for model text: bounded in size, depth and number length; ``ActionError`` otherwise."""
    if len(text) > MAX_ACTION_CHARS:
        raise ActionError(f"the action is longer than {MAX_ACTION_CHARS} characters")
    if nesting_depth(text) > MAX_DEPTH:
        raise ActionError(f"the action nests brackets deeper than {MAX_DEPTH} levels")
    try:
        return json.loads(text, parse_int=lambda t: _number(t, int), parse_float=lambda t: _number(t, float),
                          parse_constant=_no_constant)
    except ActionError:
        raise
    except json.JSONDecodeError as error:
        raise ActionError(f"invalid JSON: {error.msg} at position {error.pos}") from None
    except (ValueError, RecursionError, MemoryError, OverflowError) as error:  # past the bounds above: still data
        raise ActionError(f"unreadable JSON ({type(error).__name__})") from None


def _identifier(text: object) -> bool:
    """A plain Python name that means itself: not a keyword, and unchanged by NFKC (which the parser applies)."""
    return (isinstance(text, str) and text.isidentifier() and not keyword.iskeyword(text)
            and unicodedata.normalize("NFKC", text) == text)


def value_problem(value: Any, depth: int = 0) -> str:
    """Why ``value`` is not a bounded JSON-like literal (str, number, bool, None, list, dict), else ""."""
    if depth > MAX_DEPTH:
        return f"arguments nest deeper than {MAX_DEPTH} levels"
    if value is None or isinstance(value, (str, bool)):
        return ""
    if isinstance(value, int):
        return "" if value.bit_length() <= _MAX_INT_BITS else f"an integer longer than {MAX_NUMBER_CHARS} digits"
    if isinstance(value, float):
        return "" if math.isfinite(value) else "NaN and infinite numbers are not allowed"
    if isinstance(value, (list, tuple)):
        return next((p for item in value if (p := value_problem(item, depth + 1))), "")
    if isinstance(value, dict):
        if not all(isinstance(key, str) for key in value):
            return "object keys must be strings"
        return next((p for item in value.values() if (p := value_problem(item, depth + 1))), "")
    return f"a value of type {type(value).__name__} is not allowed"


def call_problem(name: object, arguments: object) -> str:
    """Why ``name(**arguments)`` is not a call that can be rendered safely, else ""."""
    if not _identifier(name):
        return f"the function name must be a plain identifier, not {str(name)[:60]!r}"
    if not isinstance(arguments, dict):
        return "arguments must be an object"
    bad = [key for key in arguments if not _identifier(key)]
    if bad:
        return f"argument names must be plain identifiers, not {str(bad[0])[:60]!r}"
    return value_problem(arguments)


def _read_block(block: str, index: int, calls: list[ToolCall], errors: list[str]) -> None:
    try:
        payload = load_json(block)
    except ActionError as error:
        errors.append(f"in <tool> block: {error}")
        return
    for item in payload if isinstance(payload, list) else [payload]:
        if len(calls) + len(errors) >= MAX_CALLS:
            errors.append(f"more than {MAX_CALLS} calls in one message: the rest were not read")
            return
        if not (isinstance(item, dict) and isinstance(item.get("name"), str)
                and isinstance(item.get("arguments", {}), dict)):
            errors.append('a tool call must be {"name": "...", "arguments": {...}}')
        else:
            calls.append(ToolCall(item["name"], item.get("arguments", {}), id=f"call_{index}", raw=block.strip()))


def parse_action(text: str, native: Iterable[ToolCall] = ()) -> Action:
    """Read tool calls and stop markers from an assistant message. Never raises, whatever the text."""
    calls, errors = list(native), list[str]()
    if len(text) > MAX_MESSAGE_CHARS:
        errors.append(f"the message is longer than {MAX_MESSAGE_CHARS} characters: no call was read")
    else:
        for index, block in enumerate(_TOOL_BLOCK.findall(text)[:MAX_CALLS + 1]):
            _read_block(block, index, calls, errors)
            if len(calls) + len(errors) > MAX_CALLS:
                break
    return Action(tuple(calls), tuple(errors), FINISHED in text, GAVE_UP in text)


def check_arguments(schema: Mapping[str, Any], arguments: Mapping[str, Any]) -> str:
    """A short complaint when ``arguments`` do not fit ``schema`` (required, known, typed), else ""."""
    properties: Mapping[str, Any] = schema.get("properties", {})
    missing = [name for name in schema.get("required", []) if name not in arguments]
    unknown = [name for name in arguments if name not in properties]
    if missing or unknown:
        return f"missing arguments {missing}, unknown arguments {unknown}; expected {sorted(properties)}"
    for name, value in arguments.items():
        expected = _JSON_TYPES.get(properties[name].get("type", ""), object)
        if not isinstance(value, expected) or (expected is not bool and isinstance(value, bool) and
                                               properties[name].get("type") != "boolean"):
            return f"argument {name!r} should be of type {properties[name].get('type')}"
    return ""


NO_ACTION = (f"error: no action: call a function in <tool>...</tool>, or write {FINISHED} when the request is "
             f"done or {GAVE_UP} if it cannot be done")


@dataclass
class Toolbox:
    """The tools of an episode, by name, and the rules of acting with them.

    ``native=False`` (the paper's setting): the tools are described in the system prompt and called
    in the text. ``native=True``: their schemas go to the server as OpenAI ``tools`` (the server must
    parse tool calls, e.g. vLLM's ``--enable-auto-tool-choice``); in-text calls still work.

    The rules (``respond``): ``calls_per_turn`` N runs only the LAST N calls of a message (tool use:
    one action per turn; a divergence answer ends with its new response after quoting the old one),
    each earlier call gets an error. ``require_action``: a message with no call and no stop marker
    is answered with an error and the episode goes on, instead of ending as answered.
    """

    tools: Mapping[str, Tool] = field(default_factory=dict)
    native: bool = False
    calls_per_turn: int | None = None
    require_action: bool = False

    @classmethod
    def of(cls, *tools: Tool, native: bool = False, calls_per_turn: int | None = None,
           require_action: bool = False) -> Toolbox:
        return cls({tool.name: tool for tool in tools}, native, calls_per_turn, require_action)

    def executed(self, calls: Sequence[ToolCall]) -> tuple[Sequence[ToolCall], Sequence[ToolCall]]:
        """(calls skipped, calls run) of one message under ``calls_per_turn``."""
        skipped = max(len(calls) - self.calls_per_turn, 0) if self.calls_per_turn else 0
        return calls[:skipped], calls[skipped:]

    async def respond(self, action: Action) -> tuple[list[Message], list[str]]:
        """The tool messages answering one assistant action, and the error kinds to count."""
        results = [Message("tool", f"error: {e}", name="parse_error") for e in action.parse_errors]
        kinds = ["bad_json" for _ in action.parse_errors]
        skipped, run = self.executed(action.calls)
        for call in skipped:
            results.append(Message("tool", f"error: one action per turn: only the last {self.calls_per_turn} "
                                   "call(s) of a message run; this one did not", tool_call_id=call.id or None,
                                   name=call.name))
            kinds.append("extra_call")
        for call in run:
            message, error = await self.execute(call)
            results.append(message)
            kinds += [error] if error else []
        if self.require_action and not (results or action.finished or action.gave_up):
            results.append(Message("tool", NO_ACTION, name="no_action"))
            kinds.append("no_action")
        return results, kinds

    async def replay(self, prefix: Sequence[Message]) -> None:
        """Run the calls of ``prefix``'s assistant messages again, in order (a branch resuming at a
        turn rebuilds its state this way when the tools are deterministic)."""
        for message in prefix:
            if message.role == "assistant":
                for call in self.executed(message.tool_calls)[1]:
                    await self.execute(call)

    def server_tools(self) -> list[dict[str, Any]] | None:
        return self.schemas() if self.native and self.tools else None

    def schemas(self) -> list[dict[str, Any]]:
        """OpenAI function-tool specs."""
        return [{"type": "function", "function": {"name": t.name, "description": t.description,
                                                  "parameters": dict(t.parameters)}} for t in self.tools.values()]

    def describe(self) -> str:
        """The tools and the action format, for a system prompt."""
        specs = "\n".join(json.dumps({"name": t.name, "description": t.description, "parameters": t.parameters})
                          for t in self.tools.values())
        return (f"You can use these tools:\n{specs}\n\nTo call a tool, write "
                f'<tool>{{"name": "TOOL", "arguments": {{...}}}}</tool> and wait for its result. '
                f"When the task is done, write {FINISHED}. If it cannot be done, write {GAVE_UP}.")

    async def execute(self, call: ToolCall) -> tuple[Message, str]:
        """Run one call. Returns the tool message for the model and an error kind ("" if none)."""
        tool = self.tools.get(call.name)
        if tool is None:
            result = ToolResult(f"error: unknown tool {call.name!r}; available: {sorted(self.tools)}", "unknown_tool")
        elif complaint := check_arguments(tool.parameters, call.arguments):
            result = ToolResult(f"error: bad arguments for {call.name}: {complaint}", "bad_arguments")
        else:
            result = await tool.run(call.arguments)
        return Message("tool", result.content, tool_call_id=call.id or None, name=call.name), result.error


@dataclass
class PythonTool:
    """Run a Python program in a sandbox (a fresh interpreter each call) and report what it printed."""

    sandbox: Sandbox
    wall_s: float = 30.0
    max_chars: int = 2000
    name: str = "python"
    description: str = "Run a Python 3 program and return its exit code, stdout and stderr."
    parameters: Mapping[str, Any] = field(default_factory=lambda: {
        "type": "object", "properties": {"code": {"type": "string", "description": "the whole program"}},
        "required": ["code"],
    })

    async def run(self, arguments: Mapping[str, Any]) -> ToolResult:
        result = await self.sandbox.run_python(str(arguments["code"]), wall_s=self.wall_s)
        parts = [f"exit code: {result.exit_code}"]
        if result.timed_out:
            parts.append(f"(killed after {self.wall_s:.0f} s)")
        if result.out_of_memory:
            parts.append("(out of memory)")
        text = " ".join(parts) + f"\nstdout:\n{_clip(result.stdout, self.max_chars)}"
        if result.stderr:
            text += f"\nstderr:\n{_clip(result.stderr, self.max_chars)}"
        failed = result.timed_out or result.out_of_memory or result.exit_code != 0
        return ToolResult(text, "code_failed" if failed else "")


def _clip(text: str, limit: int) -> str:
    if len(text) <= limit:
        return text
    half = limit // 2
    return f"{text[:half]}\n... [{len(text) - limit} characters cut] ...\n{text[-half:]}"

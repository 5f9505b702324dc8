"""Tools an agent can call, how calls are read from the model's text, and how they are executed.

The paper's action format: a JSON call ``{"name": ..., "arguments": {...}}`` inside
``<tool>...</tool>``, and ``<TASK_FINISHED>`` / ``<TASK_ERROR>`` as stop markers. OpenAI-native
``tool_calls`` are accepted too when the server parses them. Every mistake the model can make
(unknown tool, bad JSON, wrong arguments, a tool that fails on its input) becomes a tool message
it sees, with an error kind the loop counts; only infrastructure failures (a dead sandbox) raise.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from exitagent.types import Message, ToolCall
from sandboxes.base import Sandbox

FINISHED = "<TASK_FINISHED>"
GAVE_UP = "<TASK_ERROR>"
_TOOL_BLOCK = re.compile(r"<tool>(.*?)</tool>", re.DOTALL)
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


def parse_action(text: str, native: Iterable[ToolCall] = ()) -> Action:
    """Read tool calls and stop markers from an assistant message."""
    calls, errors = list(native), []
    for index, block in enumerate(_TOOL_BLOCK.findall(text)):
        try:
            payload = json.loads(block)
        except json.JSONDecodeError as error:
            errors.append(f"invalid JSON in <tool> block: {error.msg} at position {error.pos}")
            continue
        for item in payload if isinstance(payload, list) else [payload]:
            if not (isinstance(item, dict) and isinstance(item.get("name"), str)
                    and isinstance(item.get("arguments", {}), dict)):
                errors.append('a tool call must be {"name": "...", "arguments": {...}}')
                continue
            calls.append(ToolCall(item["name"], item.get("arguments", {}), id=f"call_{index}", raw=block.strip()))
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


@dataclass
class Toolbox:
    """The tools of an episode, by name.

    ``native=False`` (the paper's setting): the tools are described in the system prompt and called
    in the text. ``native=True``: their schemas go to the server as OpenAI ``tools`` (the server must
    parse tool calls, e.g. vLLM's ``--enable-auto-tool-choice``); in-text calls still work.
    """

    tools: Mapping[str, Tool] = field(default_factory=dict)
    native: bool = False

    @classmethod
    def of(cls, *tools: Tool, native: bool = False) -> Toolbox:
        return cls({tool.name: tool for tool in tools}, native)

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

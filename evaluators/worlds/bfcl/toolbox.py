"""The BFCL environment as the agent loop's ``Toolbox``: prompts, calls, the call record, snapshots.

The paper's action format: the function schemas in the system prompt, one JSON call inside
``<tool>...</tool>`` per message (``calls_per_turn=1``; every message an action: ``require_action``),
``<TASK_FINISHED>`` when a request is done, ``<TASK_ERROR>`` when it cannot be; an example action ends
the system prompt and a one-line reminder of the format ends each request (``request_text``).
A JSON call is rendered as a Python call
string (``calls.render_call``) and run through the safe executor; that same string goes into the
call record the checker replays, so the episode and the checker see identical semantics (no
schema pre-check here: BFCL's harness has none either, and the API classes report bad input).

A ``BfclToolbox`` keeps a deep copy of its environment after every call it runs
(``snapshots``): the state at any turn of the episode, for branches that resume there.
``replay`` rebuilds that state from a turn prefix instead, when no snapshot is at hand.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import anyio

from evaluators.worlds.bfcl.calls import ERROR_PREFIX, CallResult, UnsafeCall, render_call
from evaluators.worlds.bfcl.env import BfclEnv, Entry, entry_docs, function_docs
from exitagent.tools import FINISHED, GAVE_UP, Toolbox
from exitagent.types import Message, ToolCall

# BFCL's own words when withheld functions appear (DEFAULT_USER_PROMPT_FOR_ADDITIONAL_FUNCTION_FC).
REVEAL = "I have updated some more functions you can choose from. What about now?"
ACTION_REMINDER = f"Reply with one function call in <tool></tool>, or {FINISHED} when done."
REFUSED_CALL = "<refused call>"  # recorded for a call that could not be rendered; never parses as a call
_SPLIT = "Tool description: "  # BFCL docs open with a sentence about their class, then this


def _class_line(name: str) -> str:
    description = str(function_docs(name)[0]["description"])
    about = description.split(_SPLIT)[0].strip() if _SPLIT in description else ""
    return f"# {name}: {about}".rstrip(": ")


def _function_line(doc: Mapping[str, Any]) -> str:
    description = str(doc["description"]).split(_SPLIT)[-1].strip()
    return json.dumps({"name": doc["name"], "description": description, "parameters": doc["parameters"]})


def render_docs(entry: Entry, docs: Sequence[Mapping[str, Any]]) -> str:
    """Schemas grouped by class (each class's shared sentence once, not once per function)."""
    names = {d["name"] for d in docs}
    lines = []
    for cls in entry.involved_classes:
        mine = [d for d in function_docs(cls) if d["name"] in names]
        if mine:
            lines += [_class_line(cls), *(_function_line(d) for d in mine)]
    return "\n".join(lines)


def _example(docs: Sequence[Mapping[str, Any]]) -> str:
    first = docs[0]
    arguments = {name: "..." for name in first["parameters"].get("required", [])}
    return "<tool>" + json.dumps({"name": first["name"], "arguments": arguments}) + "</tool>"


def system_prompt(entry: Entry) -> str:
    """The system message: the functions shown at the first request, the action format, an example."""
    docs = entry_docs(entry, 0)
    return (
        "You help a user by calling functions. Each of your messages is exactly one action: either one "
        'function call written as <tool>{"name": "FUNCTION", "arguments": {...}}</tool>, after which you '
        f"get its result, or {FINISHED} when the user's request is done, or {GAVE_UP} when it cannot be "
        f"done with these functions.\n\nFunctions:\n{render_docs(entry, docs)}\n\nExample action: {_example(docs)}"
    )


def request_text(text: str) -> str:
    """A request as the model sees it: BFCL's words, then a one-line reminder of the action format
    (as math prompts end with their \\boxed{} instruction; a 135M model ignores the system prompt's)."""
    return f"{text}\n\n{ACTION_REMINDER}" if text else ACTION_REMINDER


def request_message(entry: Entry, index: int) -> Message:
    """The user message of request ``index``; a miss_func reveal turn lists the new functions."""
    text = entry.requests[index]
    if index in entry.missed:
        shown = set(entry.missed[index])
        new = [d for d in entry_docs(entry, index) if d["name"] in shown]
        text = "\n\n".join(part for part in (render_docs(entry, new), REVEAL, text) if part)
    return Message("user", request_text(text))


@dataclass
class BfclToolbox(Toolbox):
    """Runs calls on one rollout's ``BfclEnv`` and records them per request."""

    env: BfclEnv = field(kw_only=True)
    calls_per_turn: int | None = 1
    require_action: bool = True
    request: int = 0
    calls: list[list[str]] = field(default_factory=lambda: [[]])
    snapshots: list[BfclEnv] = field(default_factory=list)  # the env after each call this toolbox ran

    def begin_request(self, index: int) -> None:
        while len(self.calls) <= index:
            self.calls.append([])
        self.request = index

    def server_tools(self) -> list[dict[str, Any]] | None:
        return None  # the schemas are in the system prompt (the paper's setting)

    async def execute(self, call: ToolCall) -> tuple[Message, str]:
        try:
            text = render_call(call.name, call.arguments)
        except UnsafeCall as error:
            # Nothing of it can be rendered safely; the record keeps a call that fails the same way
            # in the checker's replay, so the request still counts as one with a call made.
            text, result = REFUSED_CALL, CallResult(f"{ERROR_PREFIX}{error}", "unsafe_call")
        else:
            result = await anyio.to_thread.run_sync(self.env.run, text)  # off the event loop
        self.calls[self.request].append(text)
        self.snapshots.append(self.env.copy())
        return Message("tool", result.output, tool_call_id=call.id or None, name=call.name), result.error


def executed_calls(message: Message, calls_per_turn: int = 1) -> tuple[ToolCall, ...]:
    """The calls of an assistant message that the loop ran (the last ``calls_per_turn``)."""
    return message.tool_calls[-calls_per_turn:] if message.tool_calls else ()


async def replay(toolbox: BfclToolbox, prefix: Sequence[Message], calls_per_turn: int = 1) -> None:
    """Run the calls of ``prefix``'s assistant messages again, in order, on ``toolbox``.

    The API classes are deterministic, so this reaches the state the original episode had at the
    end of ``prefix``. The prefix holds one request (training uses the first).
    """
    for message in prefix:
        if message.role == "assistant":
            for call in executed_calls(message, calls_per_turn):
                await toolbox.execute(call)

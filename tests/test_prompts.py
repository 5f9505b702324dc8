"""Step prompts (exit-spec.md section 3): a single-turn improve or divergence step is the paper's
template alone, so the request appears once; earlier turns of a multi-turn task stay as history."""

from __future__ import annotations

import pytest

from exitagent.prompts import DIVERGE_STEPS, IMPROVE_INSTRUCTION, step_messages
from exitagent.types import Message, StepKind

REQUEST = "What is 17 + 25?"


@pytest.mark.parametrize("kind", [StepKind.IMPROVE, StepKind.DIVERGE])
def test_a_single_turn_iteration_step_states_the_request_once(kind: StepKind) -> None:
    messages = step_messages(kind, REQUEST, (), "The answer is 41.")
    assert len(messages) == 1 and messages[0].role == "user"
    text = messages[0].content
    assert sum(m.content.count(REQUEST) for m in messages) == 1
    assert f"## Request:\n{REQUEST}\n\n## Current response:\nThe answer is 41." in text
    assert text.startswith(IMPROVE_INSTRUCTION if kind is StepKind.IMPROVE else "Consider your current response")
    assert text.endswith(DIVERGE_STEPS) == (kind is StepKind.DIVERGE)


def test_first_attempts_are_the_plain_request_and_later_turns_keep_their_history() -> None:
    assert step_messages(StepKind.BASE, REQUEST) == (Message("user", REQUEST),)
    prefix = (Message("assistant", "ls()"), Message("tool", "a.txt"))
    assert step_messages(StepKind.REPLAY, REQUEST, prefix) == (Message("user", REQUEST), *prefix)
    revised = step_messages(StepKind.IMPROVE, REQUEST, prefix, "cat('a.txt')")
    assert revised[:3] == (Message("user", REQUEST), *prefix)  # the conversation the turn continues
    assert revised[3].content.startswith(IMPROVE_INSTRUCTION) and len(revised) == 4

"""Prompt texts of the self-iteration steps (exit-spec.md section 3), math and tool use.

A first attempt (or a replay) is the request as the first user message, then the earlier turns'
final messages as ordinary history. An improve or divergence step of a single-turn task (no earlier
turns) is the paper's template alone, one user message: the iteration instruction, the request and
the latest iterate, so the request appears once. When earlier turns exist (tool use past its first
action), they stay as history after the request and the template follows them. No correctness feedback
appears anywhere: the model must judge its own response. MLE has its own template (later).
"""

from __future__ import annotations

from collections.abc import Sequence

from exitagent.types import Message, StepKind

IMPROVE_INSTRUCTION = "Improve your current response to the request below."

DIVERGE_INSTRUCTION = (
    "Consider your current response to the request below, then produce a new response whose "
    "approach SIGNIFICANTLY DIFFERS from it."
)

DIVERGE_STEPS = (
    "Answer in three parts:\n"
    "(1) Briefly summarize the approach of the current response.\n"
    "(2) Describe a meaningfully different approach to the request.\n"
    "(3) Write the new response using that different approach."
)

# Which step kinds carry an iteration prompt; BASE and REPLAY re-attempt the plain request.
ITERATION_KINDS = (StepKind.IMPROVE, StepKind.DIVERGE)


def _blocks(request: str, current: str) -> str:
    return f"## Request:\n{request}\n\n## Current response:\n{current}"


def improve_prompt(request: str, current: str) -> str:
    """The user message of an improve step."""
    return f"{IMPROVE_INSTRUCTION}\n\n{_blocks(request, current)}"


def diverge_prompt(request: str, current: str) -> str:
    """The user message of a divergence step."""
    return f"{DIVERGE_INSTRUCTION}\n\n{_blocks(request, current)}\n\n{DIVERGE_STEPS}"


def iteration_prompt(kind: StepKind, request: str, current: str) -> str:
    """The iteration user message for ``kind`` (improve or diverge)."""
    if kind is StepKind.IMPROVE:
        return improve_prompt(request, current)
    if kind is StepKind.DIVERGE:
        return diverge_prompt(request, current)
    raise ValueError(f"no iteration prompt for a {kind.value} step (math and tool use: improve or diverge)")


def step_messages(
    kind: StepKind, request: str, prefix: Sequence[Message] = (), iterate: str = ""
) -> tuple[Message, ...]:
    """The conversation (no system message: the caller owns that) for one step.

    ``request`` is the task's prompt; ``prefix`` the history after it (earlier turns' final
    messages); ``iterate`` the latest iterate of the turn being revised. BASE and REPLAY steps
    continue the plain history, so the model re-attempts the turn after ``prefix``.
    """
    history = (Message("user", request), *prefix)
    if kind in (StepKind.BASE, StepKind.REPLAY):
        return history
    iteration = Message("user", iteration_prompt(kind, request, iterate))
    # Single-turn: the template already carries the request; a copy before it was the same text twice.
    return (iteration,) if not prefix else (*history, iteration)

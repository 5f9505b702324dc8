"""Greedy search over programs: the MLE inference scaffold (exit-spec.md section 7).

K + 1 attempts: the first improves an empty template; each later one debugs the last attempt when
that attempt crashed, and otherwise improves the best program so far (the highest score, the
earliest on ties; a program that crashed is never "best"). As in AIDE, at most ``max_debug_depth``
debug steps follow one another before the search goes back to the best program (or, with no
program that ran yet, to a fresh draft from the template). The result is what the search holds
after every step: the attempts, and the best score so far at each k (the score curve).

The search knows nothing about prompts or sandboxes: ``propose(kind, program, trace)`` returns one
response (None when the prompt would not fit the model's context), ``judge(response)`` scores it,
``extract(response)`` finds the program in it. The MLE domain supplies all three; an embedding API
can supply its own.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import structlog

from exitagent.errors import score_or_failure
from exitagent.types import Sample, Score, StepKind

log = structlog.get_logger(__name__)

MAX_DEBUG_DEPTH = 3  # AIDE's default: consecutive debug steps before going back to the best program

Propose = Callable[[StepKind, str, str], Awaitable[Sample | None]]
Judge = Callable[[str], Awaitable[Score]]
Extract = Callable[[str], str | None]


@dataclass(frozen=True)
class Node:
    """One attempt: the step that asked for it, the response, its program and its score."""

    step: int
    kind: StepKind
    response: str
    program: str | None  # None: no fenced code block (a format failure), or nothing was generated
    score: Score | None  # None: the evaluator failed (``failure`` says why) or nothing was generated
    version: str = ""
    truncated: bool = False
    context_full: bool = False  # the prompt did not fit: no attempt was made at this step
    failure: str = ""

    @property
    def crashed(self) -> bool:
        return self.score is not None and self.score.components.get("errored", 0.0) > 0

    @property
    def trace(self) -> str:
        return self.score.detail if self.crashed and self.score is not None else ""


@dataclass(frozen=True)
class SearchResult:
    nodes: tuple[Node, ...]
    best_by_step: tuple[float | None, ...]  # best score among attempts 0..k (None: nothing scored yet)

    @property
    def best(self) -> Node | None:
        return best_node(self.nodes)


def best_node(nodes: tuple[Node, ...] | list[Node]) -> Node | None:
    """The highest-scoring program that ran (earliest on ties), or None."""
    ran = [n for n in nodes if n.program is not None and n.score is not None and not n.crashed]
    return max(ran, key=lambda n: (n.score.total if n.score else 0.0, -n.step)) if ran else None


def next_step(nodes: list[Node], template: str, max_debug_depth: int = MAX_DEBUG_DEPTH) -> tuple[StepKind, str, str]:
    """(kind, program, trace) of the next attempt, by the rules of the module docstring."""
    if not nodes:
        return StepKind.BASE, template, ""
    last = nodes[-1]
    depth = 0
    for node in reversed(nodes):
        if node.kind is not StepKind.DEBUG:
            break
        depth += 1
    if last.crashed and last.program is not None and depth < max_debug_depth:
        return StepKind.DEBUG, last.program, last.trace
    best = best_node(nodes)
    if best is None or best.program is None:
        return StepKind.BASE, template, ""
    return StepKind.IMPROVE, best.program, ""


async def greedy_search(propose: Propose, judge: Judge, extract: Extract, *, steps: int, template: str,
                        max_debug_depth: int = MAX_DEBUG_DEPTH,
                        on_node: Callable[[Node], object] | None = None) -> SearchResult:
    """``steps + 1`` attempts chosen by ``next_step``; every response scored by ``judge``."""
    nodes: list[Node] = []
    best: list[float | None] = []
    for step in range(steps + 1):
        kind, program, trace = next_step(nodes, template, max_debug_depth)
        sample = await propose(kind, program, trace)
        node = await _attempt(step, kind, sample, judge, extract)
        nodes.append(node)
        scored = [n.score.total for n in nodes if n.score is not None]
        best.append(max(scored) if scored else None)
        log.debug("search_step", step=step, kind=kind.value, score=node.score.total if node.score else None,
                  crashed=node.crashed, best=best[-1])
        if on_node is not None:
            on_node(node)
    return SearchResult(tuple(nodes), tuple(best))


async def _attempt(step: int, kind: StepKind, sample: Sample | None, judge: Judge, extract: Extract) -> Node:
    if sample is None:
        return Node(step, kind, "", None, None, context_full=True, failure="the prompt did not fit the context")
    truncated = sample.finish_reason == "length"
    score, failure = await score_or_failure(judge(sample.text), "search_scoring_failed", step=step)
    if score is None:
        return Node(step, kind, sample.text, extract(sample.text), None, str(sample.version), truncated,
                    failure=failure)
    return Node(step, kind, sample.text, extract(sample.text), score, str(sample.version), truncated)

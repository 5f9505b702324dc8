"""ML engineering: the policy writes a whole ``solution.py``; it runs in a sandbox and is graded.

Tasks are competitions (``evaluators.worlds.mle``): the offline catalog, prepared on first use
under ``$EXITAGENT_HOME/competitions`` (``--source offline``; math's CLI default ``arithmetic``
means the same here), a directory of prepared competitions, one prepared competition, or a real
MLE-bench competition directory (``--source PATH``). ``--split`` is train, heldout or all;
``--levels`` picks competitions by id.

A collect group is one prompt (mle_prompts.step_prompt: goal, current program, trace, description,
data previews, rules) and G programs, each run and graded by ``evaluators.mle.MLEEvaluator``.
Rewards (exit-spec.md section 4): improve and debug steps earn max(0, (r - r_prev) / (1 - r_prev)),
with r_prev the raw score of the start's program; base tasks, replays and divergence steps earn r.
``rollout.reward`` is that shaped reward, ``rollout.score.total`` the raw normalised score r, which
a buffer child keeps. A child's iterate is its program, plus the error output when it crashed
(``mle_prompts.encode_iterate``), so a later debug step sees both. A response with no code block
is a format failure (``format_error`` component, counted in the logs and evaluation metrics); it
makes no buffer child, having no program to revise.

An evaluation trajectory is a greedy search of K steps (``evaluators.worlds.mle.search``): ``Step.score`` is
the best score so far (the search's result at that budget), so ``accuracy_by_step`` is the
search's score curve; ``metrics`` add each attempt's own score and the crash and format rates.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import replace
from pathlib import Path

import anyio
import structlog

from evaluators.base import Evaluator
from evaluators.mle import MLEEvaluator, competition_of, extract_program
from evaluators.worlds import mle as competitions
from evaluators.worlds.mle import Competition, load_competition
from evaluators.worlds.mle.search import Node, SearchResult, greedy_search
from exitagent.curriculum import Start
from exitagent.domains.base import DomainSettings, TaskSpec
from exitagent.domains.mle_prompts import (
    TEMPLATE_PROGRAM,
    clip_trace,
    data_preview,
    decode_iterate,
    encode_iterate,
    step_prompt,
)
from exitagent.errors import ConfigError
from exitagent.iterates import MIN_ANSWER_TOKENS
from exitagent.policy import Policy, SamplingParams
from exitagent.policy import room as context_room
from exitagent.rollouts import roll_out
from exitagent.trajectories import Step, TaskResult
from exitagent.types import Group, Message, Rollout, Sample, Score, StepKind, Task

log = structlog.get_logger(__name__)

PROMPT_TRACE_CHARS = 1200  # of error output in a debug prompt: the model's context is small
PREVIEW_ROWS = (3, 1, 0)  # data preview rows to try, fewest last, until the prompt fits
OFFLINE_SOURCES = ("offline",)


def step_reward(kind: StepKind, score: float, prev: float | None) -> float:
    """The training reward of a response scoring ``score`` from a start whose program scored ``prev``.

    Improve and debug: the share of the remaining gap closed, max(0, (r - r_prev) / (1 - r_prev)).
    A start already at 1 has no gap; there the reward is r, so keeping the top score is what pays
    (default, not from the paper). Base, replay and divergence steps: r.
    """
    if kind not in (StepKind.IMPROVE, StepKind.DEBUG):
        return score
    prev = prev or 0.0
    if prev >= 1.0:
        return score
    return max(0.0, (score - prev) / (1.0 - prev))


def task_for(competition: Competition) -> Task:
    """The task of one prepared competition: its description is the prompt."""
    return Task(id=competition.id, domain="mle", prompt=competition.description(),
                metadata={"competition_dir": str(competition.root), "metric": competition.metric})


def _competitions(source: str, split: str) -> list[Competition]:
    if source in OFFLINE_SOURCES:
        return competitions.prepare(ids=competitions.catalog_ids(split))
    path = Path(source).expanduser()
    if not path.is_dir():
        raise ConfigError(f"mle: --source is 'offline' or a directory of prepared competitions, not {source!r}")
    if (path / competitions.METADATA).is_file() or (path / "prepared" / "public").is_dir():
        return [load_competition(path)]
    found = [load_competition(p) for p in sorted(path.iterdir())
             if (p / competitions.METADATA).is_file() or (p / "prepared" / "public").is_dir()]
    if split != "all":
        found = [c for c in found if c.split in (split, "")]  # MLE-bench ones have no split: always in
    if not found:
        raise ConfigError(f"mle: no prepared competitions in {path} (split {split})")
    return found


class MLEDomain:
    name = "mle"
    default_source = "offline"  # what --source means when not given

    def load_tasks(self, spec: TaskSpec) -> list[Task]:
        found = _competitions(spec.source, spec.split)
        if spec.levels:
            unknown = sorted(set(spec.levels) - {c.id for c in found})
            if unknown:
                raise ConfigError(f"mle: no competitions {unknown} in {spec.source}/{spec.split}; "
                                  f"there are {sorted(c.id for c in found)}")
            found = [c for c in found if c.id in spec.levels]
        tasks = [task_for(c) for c in found]
        return tasks[: spec.n] if spec.n is not None else tasks

    def open_evaluator(self, settings: DomainSettings) -> AbstractAsyncContextManager[Evaluator]:
        return MLEEvaluator(time_limit_s=settings.eval_timeout_s, memory_mb=settings.memory_mb,
                            backend=settings.sandbox, workers=settings.eval_workers)

    # --- prompts ---------------------------------------------------------------------------------

    def messages(self, task: Task, kind: StepKind, program: str, trace: str, settings: DomainSettings,
                 policy: Policy) -> tuple[Message, ...] | None:
        """The step's one user message, with fewer preview rows until it fits; None if it never does."""
        competition = competition_of(task)
        for rows in PREVIEW_ROWS:
            text = step_prompt(kind, program, clip_trace(trace, PROMPT_TRACE_CHARS), task.prompt,
                               data_preview(competition.public_dir, rows), time_limit_s=settings.eval_timeout_s,
                               memory_mb=settings.memory_mb)
            if policy.max_context - policy.estimate_tokens(text) >= MIN_ANSWER_TOKENS:
                return (Message("user", text),)
        return None

    def start_messages(self, start: Start, settings: DomainSettings, policy: Policy) -> tuple[Message, ...] | None:
        if start.entry is None or start.step_kind in (StepKind.BASE, StepKind.REPLAY):
            return self.messages(start.task, StepKind.BASE, TEMPLATE_PROGRAM, "", settings, policy)
        program, trace = decode_iterate(start.entry.iterate)
        return self.messages(start.task, start.step_kind, program, trace, settings, policy)

    # --- collect ---------------------------------------------------------------------------------

    async def roll_out(self, start: Start, policy: Policy, evaluator: Evaluator, *, group_size: int,
                       params: SamplingParams, settings: DomainSettings) -> Group:
        messages = self.start_messages(start, settings, policy)
        if messages is None and start.entry is not None:
            log.warning("start_shortened", entry_id=start.entry.id, task_id=start.task.id)
            start = start.base()
            messages = self.start_messages(start, settings, policy)
        if messages is None:
            raise ConfigError(f"mle task {start.task.id} does not fit in a {policy.max_context}-token context")
        room = context_room(policy, messages)
        params = replace(params, max_tokens=min(params.max_tokens, room))
        scored = await roll_out(start.task, messages, policy, evaluator, group_size=group_size, params=params)
        prev = start.entry.reward if start.entry is not None else None
        rollouts = tuple(_shaped(r, start.step_kind, prev) for r in scored)
        log.info("mle_group_rolled", task_id=start.task.id, step_kind=start.step_kind.value,
                 scores=[round(r.score.total, 4) if r.score else None for r in rollouts],
                 rewards=[round(r.reward, 4) if r.reward is not None else None for r in rollouts],
                 crashed=sum(_component(r, "errored") for r in rollouts),
                 format_failures=sum(_component(r, "format_error") for r in rollouts))
        return start.group(rollouts, [_history(r) for r in rollouts])

    # --- evaluate --------------------------------------------------------------------------------

    async def evaluate_task(self, policy: Policy, evaluator: Evaluator, task: Task, *, steps: int, samples: int,
                            params: SamplingParams, settings: DomainSettings,
                            tick: Callable[[int], object]) -> TaskResult:
        searches: list[SearchResult | None] = [None] * samples

        async def propose(kind: StepKind, program: str, trace: str) -> Sample | None:
            messages = self.messages(task, kind, program, trace, settings, policy)
            if messages is None:
                return None
            room = context_room(policy, messages)
            return (await policy.sample(messages, n=1, params=replace(params, max_tokens=min(params.max_tokens,
                                                                                              room))))[0]

        async def judge(response: str) -> Score:
            return await evaluator.score(task, response)

        async def one(index: int) -> None:
            searches[index] = await greedy_search(propose, judge, extract_program, steps=steps,
                                                  template=TEMPLATE_PROGRAM, on_node=lambda _: tick(1))

        async with anyio.create_task_group() as group:
            for index in range(samples):
                group.start_soon(one, index)
        done = [s for s in searches if s is not None]
        return TaskResult(task, tuple(_trajectory(s) for s in done), search_metrics(done))


def _component(rollout: Rollout, name: str) -> int:
    return int(rollout.score is not None and rollout.score.components.get(name, 0.0) > 0)


def _shaped(rollout: Rollout, kind: StepKind, prev: float | None) -> Rollout:
    if rollout.score is None:
        return rollout  # the evaluator failed: no reward, never trained on
    return replace(rollout, reward=step_reward(kind, rollout.score.total, prev))


def _history(rollout: Rollout) -> tuple[Message, ...]:
    """The buffer child of a rollout: its program (and trace, if it crashed); none without a program."""
    if rollout.score is None:
        return ()
    program = extract_program(rollout.episode.final_text)
    if program is None:
        return ()
    trace = rollout.score.detail if _component(rollout, "errored") else ""
    return (Message("assistant", encode_iterate(program, clip_trace(trace, PROMPT_TRACE_CHARS))),)


def _step_text(node: Node) -> str:
    if node.program is None:
        return node.response
    return encode_iterate(node.program, clip_trace(node.trace, PROMPT_TRACE_CHARS))


def _trajectory(search: SearchResult) -> tuple[Step, ...]:
    return tuple(
        Step(_step_text(node), best, node.version, node.truncated, node.context_full, node.failure)
        for node, best in zip(search.nodes, search.best_by_step, strict=True)
    )


def search_metrics(searches: Sequence[SearchResult]) -> dict[str, float]:
    """Means over a task's searches: each attempt's own score, and how attempts went."""
    nodes = [n for s in searches for n in s.nodes]
    if not nodes:
        return {}

    def share(predicate: Callable[[Node], bool]) -> float:
        return sum(predicate(n) for n in nodes) / len(nodes)

    def flag(node: Node, name: str) -> bool:
        return node.score is not None and node.score.components.get(name, 0.0) > 0

    out = {
        "crash_rate": share(lambda n: n.crashed),
        "format_failure_rate": share(lambda n: flag(n, "format_error")),
        "valid_submission_rate": share(lambda n: flag(n, "valid_submission")),
        "debug_step_rate": share(lambda n: n.kind is StepKind.DEBUG),
    }
    for k in range(max(len(s.nodes) for s in searches)):
        scores = [score.total for s in searches if k < len(s.nodes) and (score := s.nodes[k].score) is not None]
        if scores:
            out[f"attempt_score_step_{k:02d}"] = sum(scores) / len(scores)
    return out

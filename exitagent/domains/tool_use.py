"""Multi-turn tool use on BFCL v3: episodes of function calls, judged by BFCL's state and response checks.

Tasks. One ``Task`` per entry (``Task.id`` is the entry id, ``prompt`` its first request). Sources:
``bfcl`` or ``base`` (multi_turn_base), ``miss_func``, ``miss_param``, ``long_context``; splits
``train`` / ``test`` (``heldout`` means test) / ``all``, by the fixed stratified split in
``exitagent/data/bfcl``. ``--n-tasks`` draws a seeded subset.

Actions. Each assistant message is one action (``bfcl_toolbox``): one call in ``<tool>...</tool>``
(only the last call of a message runs), ``<TASK_FINISHED>`` or ``<TASK_ERROR>``. A message that is
none of these is told so and costs a turn (``Toolbox.require_action``), as a malformed call
is; it does not end the request.

Collect (``roll_out``). Training uses the first user request with a 10-turn budget (a turn is one
assistant action). A start at turn t restores the environment at the end of its prefix (a
deep-copied snapshot taken during an earlier episode, else a replay of the prefix's calls), asks
for G first actions in one request (a replay or base start: the ordinary history; an improve or
divergence start: the iteration prompt on the latest iterate of turn t, earlier turns as ordinary
history), then lets each continue with the ordinary history, the revised action in place of the
old one, for the turns left (10 - t). Each rollout is scored by replaying its calls in the checker
(``evaluators.tool_use``): 1 when the first request passes, else 0. ``histories`` are the
conversations after the request, so every per-turn prefix becomes a buffer entry.

Evaluate (``evaluate_task``). All requests, one after another as in the entry, up to 60 turns in
all and 10 per request (then the next request comes); ``miss_func`` entries show their withheld
functions at the request that reveals them. K revisions per turn, as the paper evaluates tool use
(exit-spec.md section 7): iterate k is a whole episode in which EVERY action was revised k times
before it ran (``RevisingPolicy``: each improve step sees the request, the earlier turns as
ordinary history and only the latest iterate of this turn, through ``prompts.step_messages`` as in
training), then the episode moved on. So y^0 is the plain episode and Delta_K is what K revisions
per turn change. The first action's chain y_1^0..y_1^K is sampled once and shared by the K + 1
episodes (paired); each episode after it is its own. Cost per trajectory: about
(K + 1)(K + 2) / 2 requests per turn of an episode. A step scores 1 when the first request passed
(first-request accuracy, the paper's headline: ``score_name``); its secondary score
``all_requests_accuracy`` is 1 when every request passed (BFCL's entry accuracy).
``TaskResult.metrics``: ``first_request_accuracy`` and ``total_return`` (requests passed) of y^0,
and of y^K (``_final``); ``revisions_changed``, the share of improve steps that changed the action,
and ``revisions_without_room``, the share skipped because the prompt left no room to answer.
"""

from __future__ import annotations

import json
import random
from collections import OrderedDict
from collections.abc import Callable, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field, replace
from typing import Any

import anyio
import structlog

from evaluators.base import Evaluator
from evaluators.tool_use import CallRecord, ToolUseEvaluator
from evaluators.worlds.bfcl.env import CATEGORIES, BfclEnv, Entry, get_entry, split_entries
from evaluators.worlds.bfcl.toolbox import (
    BfclToolbox,
    executed_calls,
    replay,
    request_message,
    request_text,
    system_prompt,
)
from exitagent.curriculum import Start, entry_key, render_iterate
from exitagent.domains.base import DomainSettings, TaskSpec
from exitagent.errors import ConfigError, score_or_failure
from exitagent.loop import EpisodeLimits, run_episode
from exitagent.policy import DEFAULT_PARAMS, Policy, SamplingParams
from exitagent.policy import room as context_room
from exitagent.prompts import step_messages
from exitagent.rollouts import CUT_OFF, roll_out, score_rollout
from exitagent.tools import parse_action
from exitagent.trajectories import Step, TaskResult
from exitagent.types import Episode, Group, Message, Rollout, Sample, StepKind, StopReason, Task

log = structlog.get_logger(__name__)

TRAIN_TURNS = 10
EVAL_TURNS = 60
MIN_ANSWER_TOKENS = 16
SNAPSHOTS_KEPT = 2048  # per-turn environment snapshots kept for buffer starts (a miss replays the prefix)
ENDS_EPISODE = (StopReason.CONTEXT_FULL, StopReason.WALL_CLOCK, StopReason.MAX_TOKENS)


def task_of(entry: Entry) -> Task:
    return Task(entry.id, "tool_use", request_text(entry.requests[0]),
                metadata={"category": entry.category, "requests": len(entry.requests)})


def _limits(turns: int, params: SamplingParams) -> EpisodeLimits:
    """The turn and token budget (the action rules, one call per message, are ``BfclToolbox``'s)."""
    return EpisodeLimits(max_turns=turns, max_total_tokens=params.max_tokens * turns)


async def _sample(policy: Policy, messages: Sequence[Message], n: int, params: SamplingParams,
                  tools: Sequence[dict[str, Any]] | None = None) -> list[Sample] | None:
    room = context_room(policy, messages)
    if room < MIN_ANSWER_TOKENS:
        return None
    return await policy.sample(messages, n=n, params=replace(params, max_tokens=min(params.max_tokens, room)),
                               tools=tools)


@dataclass
class RevisingPolicy:
    """``policy``, but every action it returns was revised ``revisions`` times with the improve prompt
    (K improve steps per turn; module docstring). Counts its improve steps for the metrics."""

    policy: Policy
    revisions: int
    revised: int = field(default=0, init=False)  # improve steps sampled
    changed: int = field(default=0, init=False)  # ... whose action differs from the iterate it revised
    no_room: int = field(default=0, init=False)  # improve steps skipped: no room to answer

    @property
    def max_context(self) -> int:
        return self.policy.max_context

    def estimate_tokens(self, text: str) -> int:
        return self.policy.estimate_tokens(text)

    async def sample(self, messages: Sequence[Message], *, n: int = 1, params: SamplingParams = DEFAULT_PARAMS,
                     tools: Sequence[dict[str, Any]] | None = None) -> list[Sample]:
        firsts = await self.policy.sample(messages, n=n, params=params, tools=tools)
        return [(await self.chain(messages, first, params, tools))[-1] for first in firsts]

    async def chain(self, messages: Sequence[Message], first: Sample, params: SamplingParams,
                    tools: Sequence[dict[str, Any]] | None = None) -> list[Sample]:
        """y_t^0 = ``first`` and its revisions y_t^1..y_t^K, for the turn after ``messages`` (system
        message, request, earlier turns). Where a prompt leaves no room, the latest iterate stands."""
        out = [first]
        for _ in range(self.revisions):
            latest = out[-1]
            action = Message("assistant", latest.text, tool_calls=parse_action(latest.text, latest.tool_calls).calls)
            prompt = (messages[0], *step_messages(StepKind.IMPROVE, messages[1].content, messages[2:],
                                                  render_iterate(action)))
            samples = await _sample(self.policy, prompt, 1, params, tools)
            if samples is None:
                self.no_room += 1
                out.append(latest)
                continue
            self.revised, self.changed = self.revised + 1, self.changed + (samples[0].text != latest.text)
            # Its prompt ids are the improve prompt's, not the episode's history: without them the
            # loop estimates the episode's context from the history, as for a server without ids.
            out.append(replace(samples[0], prompt_ids=()))
        return out


def _branch(toolbox: BfclToolbox) -> BfclToolbox:
    return BfclToolbox(env=toolbox.env.copy(), request=toolbox.request, calls=[list(c) for c in toolbox.calls])


@dataclass(frozen=True)
class Attempt:
    """One episode: the whole conversation (system message first), its turns, why it ended, its calls."""

    history: tuple[Message, ...]
    episodes: tuple[Episode, ...]
    stop: StopReason
    toolbox: BfclToolbox


class ToolUseDomain:
    name = "tool_use"
    default_source = "bfcl"  # what --source means when not given
    # The paper's tool-use headline (exit-spec.md section 4): the first request, the one training
    # practises. All-requests (BFCL's entry) accuracy is each step's secondary score.
    score_name = "first_request_accuracy"

    def __init__(self) -> None:
        self._snapshots: OrderedDict[str, BfclToolbox] = OrderedDict()

    def load_tasks(self, spec: TaskSpec) -> list[Task]:
        category = "base" if spec.source == "bfcl" else spec.source
        if category not in CATEGORIES:
            raise ConfigError(f"tool_use tasks come from BFCL: --source bfcl, {', '.join(CATEGORIES)} "
                              f"(not {spec.source!r})")
        entries = split_entries(category, "test" if spec.split == "heldout" else spec.split)
        if spec.n is not None and spec.n < len(entries):
            entries = sorted(random.Random(spec.seed).sample(entries, spec.n), key=lambda e: e.index)
        return [task_of(entry) for entry in entries]

    def open_evaluator(self, settings: DomainSettings) -> AbstractAsyncContextManager[Evaluator]:
        return ToolUseEvaluator()

    # --- environments at a turn prefix -----------------------------------------------------------

    async def toolbox_at(self, entry: Entry, prefix: Sequence[Message]) -> BfclToolbox:
        """A toolbox whose environment is where ``prefix`` left it (snapshot, else replay)."""
        key = entry_key(entry.id, prefix, None)
        if key in self._snapshots:
            self._snapshots.move_to_end(key)
            return _branch(self._snapshots[key])
        toolbox = BfclToolbox(env=BfclEnv.fresh(entry))
        await replay(toolbox, prefix)
        toolbox.snapshots.clear()
        self._keep(key, toolbox)
        return _branch(toolbox)

    def _keep(self, key: str, toolbox: BfclToolbox) -> None:
        self._snapshots[key] = toolbox
        self._snapshots.move_to_end(key)
        while len(self._snapshots) > SNAPSHOTS_KEPT:
            self._snapshots.popitem(last=False)

    def _keep_turns(self, entry: Entry, base: BfclToolbox, toolbox: BfclToolbox, history: Sequence[Message],
                    start_turn_at: int) -> None:
        """Snapshot of every new turn's prefix: the env after the calls of the turns before it."""
        ran, done = len(base.calls[0]), 0
        for index in range(start_turn_at, len(history)):
            message = history[index]
            if message.role != "assistant":
                continue
            env = toolbox.snapshots[done - 1] if done else base.env
            self._keep(entry_key(entry.id, history[:index], None),
                       BfclToolbox(env=env.copy(), calls=[toolbox.calls[0][: ran + done]]))
            done += len(executed_calls(message))

    # --- collect ---------------------------------------------------------------------------------

    async def roll_out(self, start: Start, policy: Policy, evaluator: Evaluator, *, group_size: int,
                       params: SamplingParams, settings: DomainSettings) -> Group:
        entry, budget = get_entry(start.task.id), settings.max_turns or TRAIN_TURNS
        system = Message("system", system_prompt(entry))
        if start.entry is not None and context_room(policy, (system, *start.messages())) < MIN_ANSWER_TOKENS:
            log.warning("start_shortened", entry_id=start.entry.id, task_id=start.task.id)
            start = start.base()
        if context_room(policy, (system, *start.messages())) < MIN_ANSWER_TOKENS:
            raise ConfigError(f"task {start.task.id} does not fit in a {policy.max_context}-token context")
        base = await self.toolbox_at(entry, start.prefix)
        ordinary = (system, Message("user", start.task.prompt), *start.prefix)
        toolboxes = [_branch(base) for _ in range(group_size)]

        async def score(index: int, episode: Episode) -> Rollout:
            self._keep_turns(entry, base, toolboxes[index], episode.messages[2:], len(start.prefix))
            return await _scored(evaluator, start.task, entry, episode, toolboxes[index], requests=1)

        rollouts = await roll_out(start.task, ordinary, policy, evaluator, group_size=group_size, params=params,
                                toolboxes=toolboxes, limits=_limits(max(budget - start.start_turn, 1), params),
                                prompt=(system, *start.messages()), score=score)
        return start.group(rollouts, [r.episode.messages[2:] for r in rollouts])

    # --- evaluate --------------------------------------------------------------------------------

    async def run_requests(self, policy: Policy, entry: Entry, task: Task, toolbox: BfclToolbox,
                           history: Sequence[Message], first: Sample | None, budget: int,
                           params: SamplingParams) -> Attempt:
        """Continue the current request from ``history``, then every later one: at most 10 turns a request
        (the training budget; then the next request comes, as BFCL's harness force-quits a turn) and
        ``budget`` in all."""
        history, episodes = tuple(history), list[Episode]()

        def left() -> int:
            return budget - sum(m.role == "assistant" for m in history)

        stop = StopReason.MAX_TURNS
        while left() >= 1:
            limits = _limits(min(left(), TRAIN_TURNS), params)
            episode = await run_episode(task, policy, toolbox, history, limits=limits, params=params, first=first)
            first, history, stop = None, episode.messages, episode.stop_reason
            episodes.append(episode)
            if stop in ENDS_EPISODE or toolbox.request + 1 >= len(entry.requests) or left() < 1:
                break
            toolbox.begin_request(toolbox.request + 1)
            history = (*history, request_message(entry, toolbox.request))
        return Attempt(history, tuple(episodes), stop, toolbox)

    async def evaluate_task(self, policy: Policy, evaluator: Evaluator, task: Task, *, steps: int, samples: int,
                            params: SamplingParams, settings: DomainSettings,
                            tick: Callable[[int], object]) -> TaskResult:
        entry, budget = get_entry(task.id), settings.max_turns or EVAL_TURNS
        head = (Message("system", system_prompt(entry)), Message("user", task.prompt))
        firsts = await _sample(policy, head, samples, params)
        if firsts is None:
            raise ConfigError(f"task {task.id}: the request alone does not fit the context; raise --max-context")
        trajectories: list[tuple[Step, ...]] = [()] * len(firsts)
        numbers: list[list[dict[str, float]]] = [[] for _ in firsts]
        revisers: list[RevisingPolicy] = []

        async def one(index: int) -> None:
            shared = RevisingPolicy(policy, steps)  # the first action's chain, one for every depth
            revisers.append(shared)
            chain = await shared.chain(head, firsts[index], params)
            out: list[tuple[Step, dict[str, float]] | None] = [None] * (steps + 1)

            async def depth(k: int) -> None:  # the episode with k revisions per turn
                revisers.append(reviser := RevisingPolicy(policy, k))
                toolbox = BfclToolbox(env=BfclEnv.fresh(entry))
                attempt = await self.run_requests(reviser, entry, task, toolbox, head, chain[k], budget, params)
                out[k] = await _step(evaluator, task, entry, attempt)
                tick(1)

            for k in range(steps + 1):  # one after another: at most ``samples`` answers in flight per task
                await depth(k)
            done = [step for step in out if step is not None]
            trajectories[index], numbers[index] = tuple(s for s, _ in done), [n for _, n in done]

        async with anyio.create_task_group() as group:
            for index in range(len(firsts)):
                group.start_soon(one, index)
        return TaskResult(task, tuple(trajectories), _metrics(numbers, revisers))


def _metrics(numbers: Sequence[Sequence[dict[str, float]]], revisers: Sequence[RevisingPolicy]) -> dict[str, float]:
    def mean(at: int, key: str) -> float:
        values = [run[at][key] for run in numbers if run and key in run[at]]
        return sum(values) / len(values) if values else float("nan")

    out = {"first_request_accuracy": mean(0, "first_request"), "total_return": mean(0, "passed"),
           "first_request_accuracy_final": mean(-1, "first_request"), "total_return_final": mean(-1, "passed")}
    revised, no_room = sum(r.revised for r in revisers), sum(r.no_room for r in revisers)
    if revised + no_room:  # absent, not NaN, where nothing was revised (K = 0): a NaN would spoil the task mean
        out["revisions_changed"] = sum(r.changed for r in revisers) / revised if revised else 0.0
        out["revisions_without_room"] = no_room / (revised + no_room)
    return out


async def _scored(evaluator: Evaluator, task: Task, entry: Entry, episode: Episode, toolbox: BfclToolbox, *,
                  requests: int) -> Rollout:
    """The rollout's first ``requests`` requests judged; a crash or evaluator failure is a failed rollout, not a 0."""
    record = CallRecord(entry.id, tuple(tuple(c) for c in toolbox.calls[:requests]))
    return await score_rollout(evaluator, task, episode, record.to_json())


async def _step(evaluator: Evaluator, task: Task, entry: Entry, attempt: Attempt) -> tuple[Step, dict[str, float]]:
    """One evaluation iterate: 1.0 when the first request passed; secondary ``all_requests_accuracy``
    1.0 when every request was reached and passed. Beside it, the numbers ``_metrics`` averages."""
    record = CallRecord(entry.id, tuple(tuple(c) for c in attempt.toolbox.calls))
    actions = [m.content[:500] for m in attempt.history if m.role == "assistant"]
    text = json.dumps({**json.loads(record.to_json()), "actions": actions})  # the record, and what the model wrote
    version = str(attempt.episodes[0].turns[0].sample.version) if attempt.episodes and attempt.episodes[0].turns \
        else ""
    truncated = attempt.stop in CUT_OFF
    score, failure = await score_or_failure(evaluator.score(task, record.to_json()), "iterate_scoring_failed",
                                            task_id=task.id)
    if score is None:
        return Step(text, None, version, truncated, failure=failure), {}
    complete = len(record.calls) == len(entry.requests)
    return (Step(text, score.components["first_request"], version, truncated,
                 secondary={"all_requests_accuracy": float(score.total == 1.0 and complete)}),
            {"first_request": score.components["first_request"], "passed": score.components["passed"]})

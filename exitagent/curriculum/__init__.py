"""The ExIt curriculum: which start each group gets, and how a scored group updates the buffer.

Pure rules (exit-spec.md sections 2 and 6) over a ``store.Buffer``; randomness comes from the
``random.Random`` passed in, I/O from the store. The collector's loop per group::

    with store.view() as buffer:
        start = curriculum.choose_start(buffer)
    messages = start.messages()            # BASE/REPLAY: the plain request; else an iteration prompt
    group = await domain.roll_out(start, ...)  # G responses, scored: start.group(rollouts, histories)
    curriculum.record(store, start, replace(group, id=group_id))

What the buffer looks like: ``view.py``; show a run's: ``python -m exitagent.curriculum show RUN_DIR``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import random
import statistics
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import structlog

from exitagent.curriculum.paper import paper_values
from exitagent.curriculum.store import Buffer, CurriculumStore
from exitagent.errors import ConfigError
from exitagent.prompts import step_messages
from exitagent.types import (
    APP_TASK_PREFIX,
    BufferEntry,
    Group,
    Message,
    PolicyVersion,
    Rollout,
    StepKind,
    Task,
    Variant,
    group_version,
)

log = structlog.get_logger(__name__)

@dataclass(frozen=True)
class CurriculumConfig:
    """The ExIt buffer and start selection. Defaults are the paper's math values."""

    variant: Variant = field(default=Variant.EXIT, metadata={"help": "which of the paper's five variants to run"})
    capacity: int = field(default=512, metadata={"help": "buffer capacity N"})
    min_buffer: int = field(default=128, metadata={"help": "B_min: the buffer is sampled only once this full"})
    p_buffer: float = field(default=0.5, metadata={"help": "p: probability a group starts from the buffer"})
    p_diverge: float = field(default=0.2, metadata={"help": "p_div: probability a buffer start is a divergence step"})
    kappa: float = field(
        default=10.0, metadata={"help": "softmax temperature over scores, P(i) ~ exp(kappa*S_i) (not from the paper)"}
    )
    group_size: int = field(default=8, metadata={"help": "G: responses per prompt"})
    dedup: bool = field(default=True, metadata={"help": "skip a child whose exact text is already in the buffer"})

    def __post_init__(self) -> None:
        if self.capacity < 1 or self.min_buffer < 0 or self.group_size < 1:
            raise ConfigError("curriculum: capacity and group_size must be >= 1, min_buffer >= 0")
        if not (0.0 <= self.p_buffer <= 1.0 and 0.0 <= self.p_diverge <= 1.0):
            raise ConfigError("curriculum: p_buffer and p_diverge must lie in [0, 1]")

    @property
    def uses_buffer(self) -> bool:
        return self.variant not in (Variant.GRPO, Variant.CHAINS)  # chains: no buffer (chains.py)

    @property
    def diversity_bonus(self) -> bool:
        """Full ExIt multiplies advantages by the diversity multiplier (diversity.py)."""
        return self.variant is Variant.EXIT

    @classmethod
    def for_domain(cls, domain: str, variant: Variant = Variant.EXIT, **overrides: object) -> CurriculumConfig:
        """The paper's values for ``domain`` and ``variant`` (``paper.py``), then ``overrides``."""
        values: dict[str, object] = {**paper_values(domain, variant).curriculum(), "variant": variant}
        return cls(**{**values, **overrides})  # type: ignore[arg-type]


# --- choosing a start ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Start:
    """Where a group starts: a base task (``entry`` None) or a buffer entry, and the step kind."""

    task: Task
    step_kind: StepKind
    entry: BufferEntry | None = None
    variant: Variant = Variant.EXIT  # the run's variant (``choose_start``), which its group is recorded under

    @property
    def depth(self) -> int:
        """Depth of the group's responses: a replay re-attempts its turn, so it is a first attempt."""
        if self.entry is None or self.step_kind is StepKind.REPLAY:
            return 0
        return self.entry.depth + 1

    @property
    def start_turn(self) -> int:
        return self.entry.start_turn if self.entry else 0

    @property
    def prefix(self) -> tuple[Message, ...]:
        return self.entry.prefix if self.entry else ()

    def messages(self) -> tuple[Message, ...]:
        """The conversation the policy sees (math and tool use; no system message)."""
        return step_messages(self.step_kind, self.task.prompt, self.prefix, self.entry.iterate if self.entry else "")

    def base(self) -> Start:
        """The task itself: what a domain rolls out when a buffer start does not fit the context."""
        return dataclasses.replace(self, step_kind=StepKind.BASE, entry=None)

    def group(self, rollouts: Sequence[Rollout], histories: Sequence[Sequence[Message]] | None = None) -> Group:
        """``rollouts`` sampled from this start as a ``Group``, unnamed (the collector names it)."""
        return Group(
            id="", task_id=self.task.id, step_kind=self.step_kind, variant=self.variant,
            version=group_version([r.episode for r in rollouts]), depth=self.depth, rollouts=tuple(rollouts),
            entry_id=self.entry.id if self.entry else None, start_turn=self.start_turn,
            histories=None if histories is None else tuple(tuple(h) for h in histories),
        )


def softmax(scores: Sequence[float], kappa: float) -> list[float]:
    """P(i) proportional to exp(kappa * S_i), shifted by the maximum so it never overflows."""
    top = max(scores)
    weights = [math.exp(kappa * (s - top)) for s in scores]
    total = sum(weights)
    return [w / total for w in weights]


def sample_entry(buffer: Buffer, kappa: float, rng: random.Random) -> BufferEntry | None:
    """One live entry drawn by softmax(kappa * S); it stays in the buffer."""
    pairs = buffer.scores()
    if not pairs:
        return None
    ids = [i for i, _ in pairs]
    chosen = rng.choices(ids, weights=softmax([s for _, s in pairs], kappa))[0]
    return buffer.get(chosen)


def step_kind_for(config: CurriculumConfig, entry: BufferEntry, rng: random.Random) -> StepKind:
    """The variant switch (exit-spec.md section 6): one draw per group."""
    if config.variant is Variant.CURRICULUM:
        return StepKind.REPLAY
    kind = StepKind.IMPROVE
    if config.variant in (Variant.DIVERGE, Variant.EXIT) and rng.random() < config.p_diverge:
        kind = StepKind.DIVERGE
    # An iterate that crashed is debugged rather than improved (MLE; others never set errored).
    return StepKind.DEBUG if kind is StepKind.IMPROVE and entry.errored else kind


def choose_start(
    config: CurriculumConfig, tasks: Sequence[Task], buffer: Buffer, rng: random.Random,
    tasks_by_id: Mapping[str, Task] | None = None,
) -> Start:
    """A base task (uniform) or, once |B| >= B_min and with probability p, a buffer entry."""
    if config.uses_buffer and buffer.size() >= config.min_buffer and rng.random() < config.p_buffer:
        entry = sample_entry(buffer, config.kappa, rng)
        if entry is not None:
            index = tasks_by_id if tasks_by_id is not None else {t.id: t for t in tasks}
            if entry.task_id not in index and entry.task_id.startswith(APP_TASK_PREFIX):
                # An app's request (exitagent.recorder) in the run's buffer: only the app can score
                # answers to it (collect's evaluator has no gold answer for it), so a collector that
                # draws one starts a base task instead. The app's own groups still train.
                return Start(rng.choice(tasks), StepKind.BASE, variant=config.variant)
            if entry.task_id not in index:
                raise ConfigError(f"buffer entry {entry.id} is for task {entry.task_id!r}, not in this task set")
            return Start(index[entry.task_id], step_kind_for(config, entry, rng), entry, config.variant)
    return Start(rng.choice(tasks), StepKind.BASE, variant=config.variant)


# --- updating the buffer -------------------------------------------------------------------------


def group_score(rewards: Sequence[float]) -> float:
    """S: population variance of the group's rewards (0 when fewer than two were scored)."""
    return statistics.pvariance(rewards) if len(rewards) >= 2 else 0.0


def entry_key(task_id: str, prefix: Sequence[Message], iterate: str | None) -> str:
    """Dedup key: the exact text of a start. ``iterate`` None keys the start alone (replays)."""
    payload = [task_id, [dataclasses.asdict(m) for m in prefix], iterate]
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


def render_iterate(message: Message) -> str:
    """An assistant message as iterate text; tool calls the content does not show are appended."""
    calls = [c.raw or json.dumps({"name": c.name, "arguments": dict(c.arguments)}) for c in message.tool_calls]
    return "\n".join([message.content, *(c for c in calls if c not in message.content)]).strip()


def split_turns(history: Sequence[Message]) -> list[tuple[tuple[Message, ...], str]]:
    """(turn prefix, that turn's iterate) for each assistant turn of ``history`` (after the request)."""
    return [(tuple(history[:i]), render_iterate(m)) for i, m in enumerate(history) if m.role == "assistant"]


def rollout_errored(rollout: Rollout) -> bool:
    """Convention: an evaluator marks a crashed iterate with a positive ``errored`` component."""
    return rollout.score is not None and rollout.score.components.get("errored", 0.0) > 0


@dataclass(frozen=True)
class BufferUpdate:
    """What a scored group does to the buffer: refresh its start's score, offer its children."""

    score: float
    refresh: int | None
    children: tuple[BufferEntry, ...]


def plan_update(
    config: CurriculumConfig, start: Start, group: Group,
    histories: Sequence[Sequence[Message]] | None = None,
    errored: Callable[[Rollout], bool] = rollout_errored,
) -> BufferUpdate:
    """Children of ``group``: every per-turn prefix from the start's turn on, score S inherited.

    ``histories[i]`` is rollout i's conversation after the request with earlier turns' final
    messages as ordinary history (no iteration prompt); by default the start's prefix plus the
    final text (single-turn); None takes ``group.histories``. Rollouts whose evaluator failed are
    left out of S and of the buffer.
    """
    histories = histories if histories is not None else group.histories
    scored = [(i, r) for i, r in enumerate(group.rollouts) if r.reward is not None]
    score = group_score([r.reward for _, r in scored if r.reward is not None])
    if not config.uses_buffer:
        return BufferUpdate(score, None, ())
    entry, children = start.entry, []
    for i, rollout in scored:
        final = Message("assistant", rollout.episode.final_text)
        history = histories[i] if histories is not None else (*start.prefix, final)
        for turn, (prefix, iterate) in enumerate(split_turns(history)):
            if turn < start.start_turn:
                continue  # turns before the start are the fixed prefix, already in the buffer
            replay_key = config.variant is Variant.CURRICULUM  # a replay ignores the iterate
            children.append(BufferEntry(
                id=0, key=entry_key(group.task_id, prefix, None if replay_key else iterate), task_id=group.task_id,
                prefix=prefix, iterate=iterate, depth=start.depth if turn == start.start_turn else 0,
                start_turn=turn, parent_id=entry.id if entry else None, version=group.version, score=score,
                reward=rollout.score.total if rollout.score else rollout.reward,
                prev_reward=entry.reward if entry else None, errored=errored(rollout),
                step_kind=group.step_kind, group_id=group.id,
            ))
    return BufferUpdate(score, entry.id if entry else None, tuple(children))


@dataclass(frozen=True)
class UpdateResult:
    score: float
    refreshed: bool
    inserted: tuple[int, ...]
    evicted: tuple[int, ...]
    duplicates: int
    dropped: int


def apply_update(buffer: Buffer, update: BufferUpdate, config: CurriculumConfig) -> UpdateResult:
    """Refresh the sampled entry to S, then insert children (dedup; replace-lowest at capacity)."""
    refreshed = update.refresh is not None and buffer.set_score(update.refresh, update.score)
    inserted, evicted, duplicates, dropped = [], [], 0, 0
    for child in update.children:
        if config.dedup and buffer.has_key(child.key):
            duplicates += 1
            continue
        lowest = buffer.lowest()
        # "while full": a lowered capacity drains over time, never below what the rule allows.
        while buffer.size() >= config.capacity and lowest is not None and child.score >= lowest[1]:
            buffer.evict(lowest[0])
            evicted.append(lowest[0])
            lowest = buffer.lowest()
        if buffer.size() >= config.capacity:
            dropped += 1
            continue
        inserted.append(buffer.insert(child))
    return UpdateResult(update.score, refreshed, tuple(inserted), tuple(evicted), duplicates, dropped)


class Curriculum:
    """The rules bound to a config, a task set and a seeded RNG."""

    def __init__(self, config: CurriculumConfig, tasks: Sequence[Task], rng: random.Random) -> None:
        if not tasks:
            raise ConfigError("curriculum: the task set is empty")
        self.config, self.tasks, self.rng = config, list(tasks), rng
        self._by_id = {t.id: t for t in self.tasks}

    def choose_start(self, buffer: Buffer) -> Start:
        return choose_start(self.config, self.tasks, buffer, self.rng, self._by_id)

    def group(self, start: Start, group_id: str, version: PolicyVersion, rollouts: Sequence[Rollout]) -> Group:
        """The ``Group`` record for rollouts sampled from ``start``, named, tagged with ``version``."""
        return Group(
            id=group_id, task_id=start.task.id, step_kind=start.step_kind, variant=self.config.variant,
            version=version, depth=start.depth, rollouts=tuple(rollouts),
            entry_id=start.entry.id if start.entry else None, start_turn=start.start_turn,
        )

    def record(
        self, store: CurriculumStore, start: Start, group: Group,
        histories: Sequence[Sequence[Message]] | None = None,
    ) -> UpdateResult:
        """Record ``group`` and its buffer update in one store transaction."""
        if not group.id:
            raise ValueError("a group is recorded under its id: name it first (replace(group, id=...))")
        update = plan_update(self.config, start, group, histories)
        result = store.record_group(group, lambda buffer: apply_update(buffer, update, self.config))
        log.info(
            "group_recorded", group_id=group.id, step_kind=group.step_kind.value, depth=group.depth,
            score=round(result.score, 4), inserted=len(result.inserted), evicted=len(result.evicted),
            duplicates=result.duplicates, dropped=result.dropped, refreshed=result.refreshed,
        )
        return result

"""The contract: every value that crosses a boundary between exitagent's parts.

Frozen dataclasses and enums only, standard library only, so any part (the agent loop, the
sandboxes, the evaluators, the curriculum store, the trainer) can depend on this module and nothing
else. Shapes are in names where it helps: ``prompt_ids`` are the tokens the server saw,
``completion_ids`` the tokens it sampled, and ``logprobs`` has one entry per completion id.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

# --- policies ---------------------------------------------------------------------------------


@dataclass(frozen=True, order=True)
class PolicyVersion:
    """Which weights produced something. ``step`` orders versions; 0 is the initial model."""

    step: int
    name: str = field(compare=False, default="")

    @classmethod
    def parse(cls, name: str) -> PolicyVersion:
        """``"step-000012"`` -> step 12; vLLM's initial ``"default"`` (or ``"base"``) -> step 0."""
        match = re.fullmatch(r"step-(\d+)", name)
        if match:
            return cls(int(match.group(1)), name)
        if name in ("default", "base", ""):
            return cls(0, name or "base")
        raise ValueError(f"not a policy version name: {name!r} (expected 'step-N' or 'default')")

    @classmethod
    def at_step(cls, step: int) -> PolicyVersion:
        return cls(step, f"step-{step:06d}")

    def __str__(self) -> str:
        return self.name or f"step-{self.step:06d}"


# --- conversations ----------------------------------------------------------------------------


@dataclass(frozen=True)
class ToolCall:
    """A call the model asked for. ``arguments`` is already parsed; ``raw`` is what the model wrote."""

    name: str
    arguments: Mapping[str, Any]
    id: str = ""
    raw: str = ""


@dataclass(frozen=True)
class Message:
    """One chat message. Tool results are ``role="tool"`` messages naming the call they answer."""

    role: str  # "system" | "user" | "assistant" | "tool"
    content: str
    tool_calls: tuple[ToolCall, ...] = ()
    tool_call_id: str | None = None
    name: str | None = None

APP_TASK_PREFIX = "app-"  # the id of a task an app's request became (iterates.request_id): recorded, not collected


@dataclass(frozen=True)
class Task:
    """A base task instance m: the request, and whatever its evaluator needs to score an answer."""

    id: str
    domain: str  # "math" | "tool_use" | "mle"
    prompt: str
    answer: Any = None
    metadata: Mapping[str, Any] = field(default_factory=dict)


# --- what the policy returned ------------------------------------------------------------------


@dataclass(frozen=True)
class Sample:
    """One sampled completion, exactly as the server produced it."""

    text: str
    prompt_ids: tuple[int, ...]
    completion_ids: tuple[int, ...]
    logprobs: tuple[float, ...]  # behaviour log-probabilities, one per completion id
    finish_reason: str  # "stop" | "length" | "tool_calls" | ...
    version: PolicyVersion
    tool_calls: tuple[ToolCall, ...] = ()  # OpenAI-native tool calls, when the server parsed them


class StopReason(StrEnum):
    """Why an episode ended. Every episode has exactly one."""

    ANSWERED = "answered"  # a final response with no tool call (single-turn domains end here)
    FINISHED = "finished"  # the model wrote <TASK_FINISHED>
    GAVE_UP = "gave_up"  # the model wrote <TASK_ERROR>
    MAX_TURNS = "max_turns"
    MAX_TOKENS = "max_tokens"  # the episode's total completion-token budget is spent
    TRUNCATED = "truncated"  # a completion hit its max_tokens (finish_reason "length")
    CONTEXT_FULL = "context_full"  # the next turn would not fit in the model's context
    WALL_CLOCK = "wall_clock"
    CRASHED = "crashed"  # an unexpected exception (a bug) ended it: its rollout is failed, never trained on


# Stops that cut a response off (its score gets a ``truncated`` component: the trainer's TrainItem.truncated)
CUT_OFF = (StopReason.TRUNCATED, StopReason.MAX_TOKENS, StopReason.CONTEXT_FULL)


@dataclass(frozen=True)
class Turn:
    """One model call in an episode and the environment's answer to it."""

    sample: Sample
    tool_results: tuple[Message, ...] = ()


@dataclass(frozen=True)
class TrainingSequence:
    """A token-faithful training sample: prompt ids then sampled ids, with environment tokens masked.

    ``mask[i]`` is 1 where ``tokens[i]`` was sampled by the policy (trainable), 0 for prompt, tool
    and environment tokens. ``logprobs[i]`` is the behaviour log-probability where ``mask[i]`` is
    1, and 0.0 elsewhere. ``version`` is the oldest policy version among the sampled tokens.
    """

    tokens: tuple[int, ...]
    mask: tuple[int, ...]
    logprobs: tuple[float, ...]
    version: PolicyVersion

    def __post_init__(self) -> None:
        if not len(self.tokens) == len(self.mask) == len(self.logprobs):
            raise ValueError("tokens, mask and logprobs must have the same length")


@dataclass(frozen=True)
class Episode:
    """A finished rollout: the conversation, the model calls, why it stopped, and its metrics."""

    task: Task
    messages: tuple[Message, ...]
    turns: tuple[Turn, ...]
    stop_reason: StopReason
    sequences: tuple[TrainingSequence, ...]
    metrics: Mapping[str, float] = field(default_factory=dict)
    failure: str = ""  # what crashed it (stop_reason CRASHED), for the rollout's record

    @property
    def final_text(self) -> str:
        return self.turns[-1].sample.text if self.turns else ""


# --- scores, groups, the curriculum ------------------------------------------------------------


@dataclass(frozen=True)
class Score:
    """An evaluator's verdict: a total in [0, 1] plus the named parts it was built from."""

    total: float
    components: Mapping[str, float] = field(default_factory=dict)
    detail: str = ""  # e.g. the extracted answer, or why a submission was invalid


class StepKind(StrEnum):
    """The kind of step that produced an iterate (exit-spec.md section 2)."""

    BASE = "base"  # a first attempt at a base task (k = 0)
    REPLAY = "replay"  # "+ curriculum": a stored start replayed with no iteration prompt
    IMPROVE = "improve"
    DIVERGE = "diverge"
    DEBUG = "debug"  # MLE: improve a program that crashed, with its error trace


class Variant(StrEnum):
    """The five variants the paper compares (exit-spec.md section 6), then our control."""

    GRPO = "grpo"
    CURRICULUM = "curriculum"
    IMPROVE = "improve"
    DIVERGE = "diverge"
    EXIT = "exit"
    CHAINS = "chains"  # control, not the paper's: trains on random-depth K-step chains (curriculum/chains.py)


@dataclass(frozen=True)
class Rollout:
    """One response of a group, scored. ``score`` is None when the evaluator failed: such a
    rollout is kept for the record but never trained on (it is not a 0 reward)."""

    episode: Episode
    score: Score | None
    reward: float | None  # the training reward (e.g. MLE improvement reward), None when score is
    diversity: float = 1.0  # advantage multiplier from the diversity bonus (1.0 when off)
    failure: str = ""


@dataclass(frozen=True)
class Group:
    """G rollouts sampled from one prompt: the unit of GRPO and of the curriculum's score.

    The one group type, from the domain that rolls it out (``Domain.roll_out``) through collect's
    metrics to the store. A domain returns it unnamed (``id`` ""; ``Start.group``); the collector
    names it before recording (``Curriculum.name``), as the store numbers a ``BufferEntry``.
    ``histories[i]`` is rollout i's conversation after the request, earlier turns as ordinary
    history (multi-turn domains: every per-turn prefix becomes a buffer entry); None for
    single-turn domains. The store keeps neither the histories nor the figures below, which are
    read off the rollouts' episodes for collect's metrics.
    """

    id: str
    task_id: str
    step_kind: StepKind
    variant: Variant
    version: PolicyVersion  # the OLDEST version that produced any token of the group
    depth: int  # iteration depth of the responses (0 for first attempts)
    rollouts: tuple[Rollout, ...]
    entry_id: int | None = None  # the buffer entry this group started from, if any
    start_turn: int = 0
    histories: tuple[tuple[Message, ...], ...] | None = None

    @property
    def newest(self) -> PolicyVersion:
        """The newest version among the samples: a lower bound on what the server serves now."""
        return max(episode_versions(r.episode for r in self.rollouts), default=self.version)

    @property
    def failures(self) -> int:
        """Failed rollouts (evaluator failed, or the episode crashed): kept out of training."""
        return sum(r.reward is None for r in self.rollouts)

    @property
    def crashed(self) -> int:
        return sum(r.episode.stop_reason is StopReason.CRASHED for r in self.rollouts)

    @property
    def truncated(self) -> int:
        return sum(r.episode.stop_reason in CUT_OFF for r in self.rollouts)

    @property
    def prompt_tokens(self) -> int:
        """The longest prompt any turn sent."""
        return max((len(s.prompt_ids) for s in self._samples()), default=0)

    @property
    def completion_tokens(self) -> int:
        return sum(len(s.completion_ids) for s in self._samples())

    def _samples(self) -> list[Sample]:
        return [t.sample for r in self.rollouts for t in r.episode.turns]


def episode_versions(episodes: Iterable[Episode]) -> list[PolicyVersion]:
    """Every policy version that produced a token of ``episodes`` (their sequences', else their samples')."""
    episodes = list(episodes)
    versions = [s.version for e in episodes for s in e.sequences]
    return versions or [t.sample.version for e in episodes for t in e.turns]


def group_version(episodes: Iterable[Episode]) -> PolicyVersion:
    """The version a group is tagged with: the oldest among its samples (they share one request,
    so they normally agree; if a reload landed in between, the group is as stale as its oldest)."""
    versions = episode_versions(episodes)
    if not versions:
        raise ValueError("a group with no samples has no policy version")
    return min(versions)


# --- the ExIt buffer and what the trainer reads back (curriculum.py, store.py) -----------------


@dataclass(frozen=True)
class BufferEntry:
    """A self-iteration start in the ExIt buffer (exit-spec.md sections 1 and 2).

    The policy later sees the task's request, ``prefix`` (earlier turns' final messages, as
    ordinary history after the request; empty for single-turn domains) and ``iterate`` (the
    latest iterate of turn ``start_turn``), never the chain of revisions. ``id`` is 0 until the
    store assigns one. ``key`` is the dedup key (curriculum.entry_key). ``reward`` is the absolute
    score (Score.total) of ``iterate``: what the next step's improvement is measured against;
    ``prev_reward`` is the parent's reward (None for children of a base task).
    """

    id: int
    key: str
    task_id: str
    prefix: tuple[Message, ...]
    iterate: str
    depth: int  # revision depth k of ``iterate`` (0 for a first attempt at its turn)
    start_turn: int
    parent_id: int | None
    version: PolicyVersion  # the policy that produced ``iterate``
    score: float  # the curriculum score S (group reward variance), refreshed when replayed
    reward: float | None
    prev_reward: float | None
    errored: bool  # the iterate crashed (MLE: the next step is a debug step)
    step_kind: StepKind  # the kind of step that produced ``iterate``
    group_id: str = ""  # the group that produced it


@dataclass(frozen=True)
class StoredRollout:
    """One response of a stored group, as the trainer reads it back (token-faithful)."""

    index: int
    sequences: tuple[TrainingSequence, ...]
    reward: float | None  # None when the evaluator failed: never trained on
    diversity: float
    text: str
    components: Mapping[str, float] = field(default_factory=dict)
    detail: str = ""
    failure: str = ""

    @property
    def failed(self) -> bool:
        return self.reward is None


@dataclass(frozen=True)
class StoredGroup:
    """A group as recorded in the store. ``rollouts`` is empty when only the header was asked for.

    ``sampled_from`` is the policy step that produced the buffer entry the group started from
    (None for base tasks): the "sampled from iteration" curriculum plot.
    """

    id: str
    task_id: str
    step_kind: StepKind
    variant: Variant
    version: PolicyVersion
    depth: int
    start_turn: int
    entry_id: int | None
    created: float
    consumed_by_step: int | None = None
    sampled_from: int | None = None
    rollouts: tuple[StoredRollout, ...] = ()

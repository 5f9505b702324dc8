"""The domain seam: what collect and evaluate need from a task domain (math, tool use, MLE).

A domain owns everything that differs between the paper's three domains: where its tasks come
from, how an answer is judged, what one group of rollouts looks like (single-turn text, a
multi-turn tool-use episode, a program run in a sandbox), and what one evaluation trajectory is
(K improve steps, or a greedy search). The ExIt loop itself (choosing starts, the buffer, the
staleness gate, the diversity bonus, recording) stays in ``collect`` and ``curriculum``, the
metrics in ``evaluate``. ``exitagent.domains.DOMAINS`` maps names to instances.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from typing import Protocol

from evaluators.base import Evaluator
from exitagent.curriculum import Start
from exitagent.policy import Policy, SamplingParams
from exitagent.trajectories import TaskResult
from exitagent.types import Group, Task

# The task flags of collect and evaluate, spelled alike (a field's ``metadata["flags"]``). The second
# name of each is the other command's old spelling, still accepted so recipes and scripts keep working.
SOURCE_FLAGS = ("--source", "--task-source")
SPLIT_FLAGS = ("--split", "--task-split")
N_TASKS_FLAGS = ("--n-tasks", "--num-tasks")
SOURCE_HELP = ("task source (default: the domain's: math arithmetic, tool_use bfcl, mle offline; "
               "math: arithmetic, a benchmark name or a .jsonl path)")


@dataclass(frozen=True)
class TaskSpec:
    """Which tasks: the command line's ``--source``/``--split``/``--n-tasks``/``--seed``/``--levels``.

    ``n`` None means the domain's default for the split (math's generated arithmetic: 5000 to
    train on, 100 held out; files and benchmarks: all of them).
    """

    source: str
    split: str
    n: int | None = None
    seed: int = 0
    levels: tuple[str, ...] | None = None


@dataclass(frozen=True)
class DomainSettings:
    """Knobs shared by collect and evaluate; a domain reads the ones it has a use for."""

    eval_workers: int = 2  # evaluator worker processes (math) or concurrent sandbox runs (MLE)
    eval_timeout_s: float = 5.0  # deadline to judge one answer (MLE: one program run)
    sandbox: str = "local"  # where model-written code runs: local (bubblewrap), process, e2b, fake
    memory_mb: int = 2048  # memory limit of one sandbox run
    max_turns: int | None = None  # None: the domain's budget (tool use: 10 in training, 60 in evaluation)
    max_context: int = 2048  # the served model's context length, in tokens


@dataclass(frozen=True, kw_only=True)
class DomainFlags:
    """``DomainSettings`` as the flags of collect and evaluate (both configs inherit them)."""

    eval_workers: int = field(default=2, metadata={"help": "evaluator worker processes"})
    eval_timeout_s: float = field(default=5.0, metadata={"help": "evaluator deadline per response (s)"})
    sandbox: str = field(default="local", metadata={"help": "where model code runs: local, process, e2b"})
    memory_mb: int = field(default=2048, metadata={"help": "memory limit of one sandbox run (MiB)"})
    max_turns: int | None = field(default=None, metadata={"help": "turn budget per episode (domain default)"})
    max_context: int = field(default=2048, metadata={"help": "the served model's context length"})

    def settings(self) -> DomainSettings:
        return DomainSettings(eval_workers=self.eval_workers, eval_timeout_s=self.eval_timeout_s, sandbox=self.sandbox,
                              memory_mb=self.memory_mb, max_turns=self.max_turns, max_context=self.max_context)


class Domain(Protocol):
    """One task domain. Implementations: ``math.MathDomain`` (more beside it)."""

    name: str

    def load_tasks(self, spec: TaskSpec) -> list[Task]:
        """The tasks ``spec`` names; ``ConfigError`` for a source or split this domain lacks."""
        ...

    def open_evaluator(self, settings: DomainSettings) -> AbstractAsyncContextManager[Evaluator]:
        """The evaluator that scores this domain's answers, as an async context manager."""
        ...

    async def roll_out(self, start: Start, policy: Policy, evaluator: Evaluator, *, group_size: int,
                       params: SamplingParams, settings: DomainSettings) -> Group:
        """G rollouts from a curriculum start (one request for the first turn), scored: ``start.group(...)``
        of the start actually rolled out (``start.base()`` when a buffer start no longer fits the context),
        with each rollout's history for a multi-turn domain. Unnamed: collect names and records it.

        ``rollout.reward`` is what training uses; ``rollout.score.total`` what a buffer child keeps
        as its reward (the raw score). Collect adds the diversity bonus and records the group.
        """
        ...

    async def evaluate_task(self, policy: Policy, evaluator: Evaluator, task: Task, *, steps: int, samples: int,
                            params: SamplingParams, settings: DomainSettings,
                            tick: Callable[[int], object]) -> TaskResult:
        """``samples`` trajectories of ``steps + 1`` scored iterates; ``tick(k)`` as k more are scored."""
        ...

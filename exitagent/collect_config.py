"""collect's flags (``python -m exitagent.collect --help``): which tasks, how groups are sampled,
the curriculum's values and where the run lives; checked when built, before anything runs."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from exitagent import routing
from exitagent.curriculum import CurriculumConfig, chains
from exitagent.curriculum.store_url import STORE_HELP
from exitagent.diversity import NORMS
from exitagent.domains import DOMAINS, TaskSpec, curriculum_preset, default_source, get_domain
from exitagent.domains.base import N_TASKS_FLAGS, SOURCE_FLAGS, SOURCE_HELP, SPLIT_FLAGS, DomainFlags
from exitagent.errors import ConfigError
from exitagent.log import TrackFlags
from exitagent.policy import TRAINING_TEMPERATURE, SamplingParams
from exitagent.types import StepKind, Variant


@dataclass(frozen=True)
class CollectConfig(TrackFlags, DomainFlags):
    run_dir: Path = field(metadata={"help": "run directory (the store, metrics and config live here)"})
    store: str = field(default="", metadata={"help": STORE_HELP})
    base_url: tuple[str, ...] = field(default=("http://127.0.0.1:8000/v1",), metadata={
        "help": "OpenAI-compatible policy server; several: each group goes to the least busy (exitagent.routing)"})
    model: str = field(default="policy", metadata={"help": "model name to ask the server for"})
    domain: str = field(default="math", metadata={
        "help": f"task domain: {', '.join(DOMAINS)}, or your own as package.module:NAME (docs/environments.md)"})
    variant: Variant = field(default=Variant.EXIT, metadata={
        "help": "which of the paper's five variants, or 'chains' (the naive control, exitagent/curriculum/chains.py)"})
    chain_max_depth: int = field(default=chains.DEFAULT_MAX_DEPTH, metadata={
        "help": "variant chains: K is drawn uniformly from 0..this (default: the main job's evaluation depth)"})
    groups: int = field(default=0, metadata={"help": "stop once the run's store holds this many groups (0: never)"})
    task_source: str = field(default="", metadata={"help": SOURCE_HELP, "flags": SOURCE_FLAGS})
    task_split: str = field(default="train", metadata={"help": "split of the task source", "flags": SPLIT_FLAGS})
    num_tasks: int | None = field(default=None, metadata={"help": "tasks to draw (domain default; files: all)",
                                                          "flags": N_TASKS_FLAGS})
    levels: str = field(default="", metadata={"help": "arithmetic levels, comma-separated (empty: all)"})
    group_size: int = field(default=8, metadata={"help": "G: responses per prompt (one request)"})
    concurrency: int = field(default=8, metadata={"help": "groups in flight"})
    temperature: float = field(default=TRAINING_TEMPERATURE, metadata={"help": "sampling temperature"})
    top_p: float = field(default=1.0, metadata={"help": "nucleus sampling"})
    max_tokens: int = field(default=1024, metadata={"help": "completion tokens per response"})
    improve_max_tokens: int = field(default=0, metadata={
        "help": "completion tokens of improve and debug steps (0: --max-tokens)"})
    diverge_max_tokens: int = field(default=0, metadata={
        "help": "completion tokens of divergence steps, whose format (summary, new approach, new answer) is "
                "longer than a plain answer (0: --max-tokens)"})
    max_staleness: int = field(default=2, metadata={"help": "pause while unconsumed groups are older than this"})
    seed: int = field(default=0, metadata={"help": "seeds the task draw and the curriculum"})
    collector_index: int = field(default=0, metadata={
        "help": "with several collectors on one run: a different index each (same --seed: the same task set, "
                "which the shared buffer's entries refer to; the index gives each its own draws)"})
    capacity: int | None = field(default=None, metadata={"help": "buffer capacity N (domain default)"})
    min_buffer: int | None = field(default=None, metadata={"help": "B_min (domain default)"})
    p_buffer: float | None = field(default=None, metadata={"help": "p: chance to start from the buffer"})
    p_diverge: float | None = field(default=None, metadata={"help": "p_div: chance of a divergence step"})
    kappa: float | None = field(default=None, metadata={"help": "softmax temperature over buffer scores"})
    diversity_norm: str = field(default="range", metadata={"choices": NORMS, "help": (
        "full ExIt's diversity multiplier: distance to the centroid over the group's range (Eq. 6, the paper) "
        "or over its mean (multipliers average 1 in every group; exitagent/diversity.py)")})
    server_deadline_s: float = field(default=300.0, metadata={"help": "how long to retry a failing server (s)"})
    failover_s: float = field(default=30.0, metadata={
        "help": "with several servers: how long one may fail before its group moves to another (s)"})
    max_unconsumed: int = field(default=0, metadata={"help": "pause while this many groups wait for the trainer"})
    poll_s: float = field(default=2.0, metadata={"help": "staleness gate: seconds between store checks"})
    progress: bool = field(default=True, metadata={"help": "progress bar on stderr"})
    log_level: str = field(default="info", metadata={"help": "debug, info, warning or error"})

    def __post_init__(self) -> None:
        # the saved config names the source that ran, also when it was the domain's default
        object.__setattr__(self, "task_source", self.task_source or default_source(get_domain(self.domain)))
        object.__setattr__(self, "base_url", routing.urls(self.base_url))
        if min(self.group_size, self.concurrency, self.max_tokens) < 1 or self.groups < 0 or self.max_staleness < 0 \
                or min(self.improve_max_tokens, self.diverge_max_tokens) < 0:
            raise ConfigError("group-size, concurrency and max-tokens must be >= 1; groups, max-staleness and "
                              "the per-step max-tokens >= 0")
        self.curriculum()  # its own checks, now rather than mid-run
        if self.variant is Variant.CHAINS:
            chains.check(self.domain, self.chain_max_depth)
        self.check_tracking()

    def curriculum(self) -> CurriculumConfig:
        names = ("capacity", "min_buffer", "p_buffer", "p_diverge", "kappa")
        overrides = {n: getattr(self, n) for n in names if getattr(self, n) is not None}
        preset = curriculum_preset(get_domain(self.domain))  # a user environment names the one it uses
        return CurriculumConfig.for_domain(preset, self.variant, group_size=self.group_size, **overrides)

    def sampling(self, kind: StepKind = StepKind.BASE) -> SamplingParams:
        """Sampling for a step of ``kind``: iterate steps may get their own token limit."""
        per_kind = {StepKind.IMPROVE: self.improve_max_tokens, StepKind.DEBUG: self.improve_max_tokens,
                    StepKind.DIVERGE: self.diverge_max_tokens}.get(kind, 0)
        return SamplingParams(max_tokens=per_kind or self.max_tokens, temperature=self.temperature, top_p=self.top_p)

    def task_spec(self) -> TaskSpec:
        levels = tuple(level.strip() for level in self.levels.split(",") if level.strip()) or None
        return TaskSpec(self.task_source, self.task_split, self.num_tasks, self.seed, levels)

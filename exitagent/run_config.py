"""The main job's flags (``python -m exitagent.run --help``): what a run trains and how it is
measured. ``exitagent.run`` parses them; ``run_eval`` and ``variants`` read them."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from exitagent.curriculum.paper import DOMAINS as PAPER_DOMAINS
from exitagent.curriculum.paper import paper_values
from exitagent.diversity import NORMS
from exitagent.policy import TRAINING_TEMPERATURE
from exitagent.precision import CHOICES as PRECISIONS
from exitagent.precision import normalise as normalise_precision
from exitagent.types import Variant

# The server alone has the machine while evaluating. vLLM's CPU throughput grows with the batch
# (runtime notes: 195 tok/s at 8 concurrent, 458 at 32), so evaluating 8 at a time (evaluate's
# default) left most of it unused: the two evaluations took 14 of the 34 minutes.
EVAL_CONCURRENCY = 64
MATH_LEVELS = "add1,add2,sub1,sub2,mul1,word"  # the levels a 135M model learns within the run's budget


@dataclass(frozen=True)
class RunConfig:
    run_dir: Path = field(default=Path("runs/demo"), metadata={"help": "where everything of this run goes"})
    variant: Variant = field(default=Variant.EXIT, metadata={
        "help": "which of the paper's five variants, or chains (the naive control)"})
    domain: str = field(default="math", metadata={
        "help": "task domain: math, or your own as package.module:NAME (docs/environments.md)"})
    train_minutes: float = field(default=18.0, metadata={
        "help": "wall-clock budget of collect + update (with --train-updates: a cap)"})
    train_updates: int = field(default=0, metadata={
        "help": "budget in trainer updates, the same for every variant (0: wall clock only)"})
    seed: int = field(default=0, metadata={"help": "seed of tasks, curriculum and trainer"})
    levels: str | None = field(default=None, metadata={
        "help": f"arithmetic levels (default: {MATH_LEVELS}); other domains: their own (MLE: competition ids; "
                "default none)"})
    group_size: int = field(default=8, metadata={"help": "G: samples per prompt"})
    groups_per_step: int = field(default=8, metadata={"help": "prompts per update"})
    lr: float = field(default=2e-5, metadata={"help": "learning rate (135M model on a CPU; see runtime notes)"})
    max_tokens: int = field(default=64, metadata={"help": "new tokens per response (first attempts, improve steps)"})
    diverge_max_tokens: int = field(default=192, metadata={
        "help": "new tokens of a divergence step: its format (summary, new approach, new answer) does not fit "
                "--max-tokens, and a cut answer loses its \\boxed{} (0: --max-tokens)"})
    diversity_norm: str = field(default="range", metadata={
        "choices": NORMS, "help": "full ExIt's diversity multiplier: range (Eq. 6, the paper) or mean (diversity.py)"})
    # Deviations from the paper's math row (curriculum/paper.py), so the buffer fills within minutes:
    capacity: int = field(default=256, metadata={
        "help": f"buffer capacity N (paper, math: {paper_values('math').capacity})"})
    min_buffer: int = field(default=16, metadata={
        "help": f"B_min, the buffer is sampled once this full (paper, math: {paper_values('math').min_buffer})"})
    temperature: float = field(default=TRAINING_TEMPERATURE, metadata={
        "help": "sampling temperature of training rollouts"})
    # None: the paper's value for --domain (curriculum/paper.py), resolved when the config is built.
    epochs: int | None = field(default=None, metadata={
        "help": f"passes over each batch (training.update --epochs; default: the paper's for the domain: "
                f"math {paper_values('math').epochs}, tool use {paper_values('tool_use').epochs})"})
    drop_unparseable: bool | None = field(default=None, metadata={
        "help": "leave responses with no valid action out of the loss (training.update --drop-unparseable; "
                "default: the paper's for the domain: on in tool use, its overlong filtering; off in math)"})
    eval_tasks: int = field(default=100, metadata={"help": "held-out tasks per evaluation"})
    eval_steps: int = field(default=4, metadata={"help": "K: self-improvement steps evaluated"})
    eval_samples: int = field(default=1, metadata={"help": "n: samples per task (avg@n)"})
    eval_temperature: float = field(default=0.0, metadata={"help": "0: greedy evaluation (n=1 is enough)"})
    eval_cache: str = field(default="", metadata={
        "help": "base evaluations shared by runs: one of the same served base weights and evaluation flags is "
                "reused ('': $EXITAGENT_EVAL_CACHE, else ~/.cache/exitagent/evaluations; off: always measure)"})
    eval_wordproblems: bool = field(default=False, metadata={
        "help": "also evaluate base and trained on the second held-out set, word problems the training generator "
                "never produces (--source wordproblems, up to 300 tasks, at least 256 new tokens per answer)"})
    eval_concurrency: int = field(default=EVAL_CONCURRENCY, metadata={
        "help": "answers generated at once while evaluating (more: higher server throughput, same measurement)"})
    port: int = field(default=0, metadata={"help": "port of the server (0: any free)"})
    serve_flags: str = field(default="", metadata={"help": "extra flags for exitagent.serve, e.g. --enforce-eager"})
    precision: str = field(default="auto", metadata={
        "choices": PRECISIONS, "help": "serving and training dtype (auto: bf16 where the hardware runs it natively)"})
    store: str = field(default="", metadata={
        "help": "postgresql:// URL of the curriculum store, kept as RUN/store.url (default: RUN/store.sqlite)"})
    servers: int = field(default=1, metadata={
        "help": "vLLM servers on one weights directory, each hot-reloading every checkpoint (a one-machine "
                "rehearsal of a cluster; docs/scaling.md)"})
    collectors: int = field(default=1, metadata={
        "help": "collect processes, each routing its groups over every server (collector index 0, 1, ...)"})

    def __post_init__(self) -> None:
        if self.levels is None:
            object.__setattr__(self, "levels", MATH_LEVELS if self.domain == "math" else "")
        if self.eval_wordproblems and self.domain != "math":
            raise ValueError("--eval-wordproblems is a held-out set of math (arithmetic word problems)")
        # A domain of your own (package.module:NAME) has no paper row: one epoch, no filter.
        row = paper_values(self.domain) if self.domain in PAPER_DOMAINS else None
        if self.epochs is None:
            object.__setattr__(self, "epochs", row.epochs if row else 1)
        if self.drop_unparseable is None:
            object.__setattr__(self, "drop_unparseable", row.drop_unparseable if row else False)
        if self.epochs is not None and self.epochs < 1:
            raise ValueError("--epochs must be at least 1")
        normalise_precision(self.precision)
        if self.eval_concurrency < 1:
            raise ValueError("--eval-concurrency must be at least 1")
        if self.servers < 1 or self.collectors < 1:
            raise ValueError("--servers and --collectors must be at least 1")

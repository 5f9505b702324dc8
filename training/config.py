"""``training.update``'s configuration: one frozen dataclass, flags generated from it.

Defaults are the paper's (exit-spec.md section 5) for its 3B-7B models; the embedded default run
(``exitagent.run``) overrides what a 135M model on a CPU needs (a larger learning rate, smaller
batches), as recorded in the runtime notes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from exitagent.models import DEFAULT_MODEL
from exitagent.precision import CHOICES as PRECISIONS
from exitagent.precision import normalise as normalise_precision


@dataclass(frozen=True)
class UpdateConfig:
    run_dir: Path = field(metadata={"help": "run directory (store.sqlite, weights/, trainer/)"})
    model: str = field(default=DEFAULT_MODEL, metadata={"help": "initial model: name, directory or hub id"})
    steps: int = field(default=0, metadata={"help": "stop once the run has made this many updates in all (0: follow)"})
    groups_per_step: int = field(default=128, metadata={"help": "groups (prompts) per update; paper: math 128"})
    partial_batches: bool = field(default=False, metadata={"help": "train on fewer groups when no more are ready"})
    lr: float = field(default=1e-6, metadata={"help": "AdamW learning rate (paper 1e-6; 135M model: ~1e-5)"})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay"})
    grad_clip: float = field(default=1.0, metadata={"help": "gradient norm clip"})
    epsilon: float = field(default=0.2, metadata={"help": "PPO clip range"})
    is_cap: float = field(default=2.0, metadata={"help": "truncated importance weight cap C"})
    beta: float = field(default=0.001, metadata={"help": "KL coefficient (paper, math: 0.001)"})
    ref_every: int = field(default=100, metadata={"help": "refresh the reference every M updates"})
    ref_alpha: float = field(default=1.0, metadata={"help": "reference refresh factor (MLE: 0.5)"})
    dr_grpo: bool = field(default=False, metadata={"help": "no std division of advantages (Dr. GRPO)"})
    diversity: bool = field(default=True, metadata={"help": "apply stored diversity multipliers (full ExIt)"})
    temperature: float = field(default=1.0, metadata={"help": "sampling temperature collect used (same value)"})
    aggregation: str = field(default="token", metadata={"help": "loss averaging: token or sequence"})
    drop_truncated: bool = field(default=False, metadata={"help": "leave truncated responses out of the loss"})
    drop_unparseable: bool = field(default=False, metadata={"help": "leave unparseable responses out"})
    max_staleness: int = field(default=4, metadata={"help": "drop groups more than this many versions old"})
    publish_every: int = field(default=1, metadata={"help": "save and publish a checkpoint every K updates"})
    keep: int = field(default=3, metadata={"help": "published checkpoints to keep"})
    token_budget: int = field(default=4096, metadata={"help": "tokens (rows x padded length) per micro-batch"})
    logprob_chunk: int = field(default=256, metadata={"help": "positions per chunk of the log-softmax"})
    activation_checkpointing: bool = field(default=True, metadata={
        "help": "recompute activations in backward (off: less time, and a group's prompt runs once)"})
    precision: str = field(default="auto", metadata={
        "choices": PRECISIONS, "help": "compute dtype (bfloat16: autocast; fp32 master weights either way); auto: "
                                      "bf16 where the hardware runs it natively, else float32"})
    device: str = field(default="auto", metadata={"help": "auto, cpu or cuda"})
    fsdp_cpu_offload: bool = field(default=False, metadata={
        "help": "torchrun on GPUs: parameters, gradients and AdamW state live in host memory (FSDP2 "
                "CPUOffloadPolicy). Frees ~16 bytes/parameter/world size of GPU memory (all but activations and "
                "the layer being computed); costs as much host RAM, a host<->GPU copy of every weight and "
                "gradient per step, and AdamW on the CPU: slower steps (not measured here: no GPU)"})
    dist_timeout_s: float = field(default=600.0, metadata={
        "help": "under torchrun: a collective that waits longer (a rank died or hangs) stops every rank with an error"})
    max_bad_steps: int = field(default=3, metadata={"help": "stop after this many non-finite losses in a row"})
    idle_timeout_s: float = field(default=0.0, metadata={"help": "exit if no groups arrive for this long (0: wait)"})
    poll_s: float = field(default=2.0, metadata={"help": "how often to look for new groups"})
    seed: int = field(default=0, metadata={"help": "random seed"})
    quiet: bool = field(default=False, metadata={"help": "no progress bar"})
    log_json: bool = field(default=False, metadata={"help": "log JSON lines"})

    def __post_init__(self) -> None:
        if self.groups_per_step < 1 or self.publish_every < 1 or self.keep < 1:
            raise ValueError("groups_per_step, publish_every and keep must be positive")
        if self.aggregation not in ("token", "sequence"):
            raise ValueError(f"aggregation must be token or sequence, not {self.aggregation!r}")
        if self.dist_timeout_s <= 0:
            raise ValueError("dist_timeout_s must be positive")
        normalise_precision(self.precision)  # an unknown value fails here, before the model loads

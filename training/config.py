"""``training.update``'s configuration: one frozen dataclass, flags generated from it.

Defaults are the paper's (exit-spec.md section 5) for its 3B-7B models; the embedded default run
(``exitagent.run``) overrides what a 135M model on a CPU needs (a larger learning rate, smaller
batches), as recorded in the runtime notes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from exitagent.curriculum.store_url import STORE_HELP
from exitagent.log import TrackFlags
from exitagent.models import DEFAULT_MODEL
from exitagent.policy import TRAINING_TEMPERATURE
from exitagent.precision import CHOICES as PRECISIONS
from exitagent.precision import normalise as normalise_precision


@dataclass(frozen=True)
class UpdateConfig(TrackFlags):
    run_dir: Path = field(metadata={"help": "run directory (store.sqlite, weights/, trainer/)"})
    store: str = field(default="", metadata={"help": STORE_HELP})
    model: str = field(default=DEFAULT_MODEL, metadata={"help": "initial model: name, directory or hub id"})
    steps: int = field(default=0, metadata={"help": "stop once the run has made this many updates in all (0: follow)"})
    groups_per_step: int = field(default=128, metadata={"help": "groups (prompts) per update; paper: math 128"})
    partial_batches: bool = field(default=False, metadata={"help": "train on fewer groups when no more are ready"})
    lr: float = field(default=1e-6, metadata={"help": "AdamW learning rate (paper 1e-6; 135M model: ~1e-5)"})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay"})
    epochs: int = field(default=1, metadata={"help": (
        "optimizer steps per batch, each against the first epoch's log-probabilities as PPO's old policy "
        "(paper: 2 in tool use, curriculum/paper.py); single-process only")})
    grad_clip: float = field(default=1.0, metadata={"help": "gradient norm clip"})
    epsilon: float = field(default=0.2, metadata={"help": "PPO clip range"})
    is_cap: float = field(default=2.0, metadata={"help": "truncated importance weight cap C"})
    beta: float = field(default=0.001, metadata={"help": "KL coefficient (paper, math: 0.001)"})
    ref_every: int = field(default=100, metadata={"help": "refresh the reference every M updates"})
    ref_alpha: float = field(default=1.0, metadata={"help": "reference refresh factor (MLE: 0.5)"})
    dr_grpo: bool = field(default=False, metadata={"help": "no std division of advantages (Dr. GRPO)"})
    diversity: bool = field(default=True, metadata={"help": "apply stored diversity multipliers (full ExIt)"})
    temperature: float = field(default=TRAINING_TEMPERATURE, metadata={
        "help": "sampling temperature collect used (same value)"})
    aggregation: str = field(default="token", metadata={"help": "loss averaging: token or sequence"})
    drop_truncated: bool = field(default=False, metadata={"help": "leave truncated responses out of the loss"})
    drop_unparseable: bool = field(default=False, metadata={"help": (
        "leave responses with no valid answer or action out of the loss (tool use: the paper's overlong "
        "filtering; the evaluator's 'unparseable' component)")})
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
    # Memory options (bytes per parameter: training/memory.py). Each trades something for memory.
    reference_dtype: str = field(default="float32", metadata={"choices": ("float32", "bfloat16"), "help": (
        "dtype of the KL reference model: bfloat16 halves its memory (4 -> 2 bytes/param); costs bf16 rounding "
        "in its logprobs (~0.04 nats/token on the 135M model) and, on CPUs without native bf16, time; "
        "ignored with LoRA")})
    optimizer: str = field(default="adamw", metadata={"choices": ("adamw", "adamw8bit"), "help": (
        "adamw8bit: torchao's block-quantised moments, 2 instead of 8 bytes/param; costs quantisation noise in "
        "the moments and step time (benchmarks/memory_options.py)")})
    weights_dtype: str = field(default="float32", metadata={"choices": ("float32", "bfloat16"), "help": (
        "bfloat16: trained weights and gradients in bf16 (8 -> 4 bytes/param), stepped with stochastic rounding "
        "(torchao) so updates below bf16's spacing still count on average; costs noise in every weight. The "
        "canary is then computed in bf16: serve in bf16 (its tolerance allows that)")})
    lora_rank: int = field(default=0, metadata={"help": (
        "train and publish a LoRA adapter of this rank instead of the whole model (0: full fine-tuning): no "
        "gradients or AdamW state for the base, no reference copy (the adapter disabled), checkpoints of MBs. "
        "Costs capacity (a rank-r update); serve needs --lora-rank >= it")})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA scale numerator (update = alpha / rank * B A)"})
    lora_targets: str = field(default="q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj", metadata={
        "help": "comma-separated module names LoRA adapts (the model's linear layers)"})
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
        if self.groups_per_step < 1 or self.publish_every < 1 or self.keep < 1 or self.epochs < 1:
            raise ValueError("groups_per_step, publish_every, keep and epochs must be positive")
        if self.aggregation not in ("token", "sequence"):
            raise ValueError(f"aggregation must be token or sequence, not {self.aggregation!r}")
        if self.lora_rank < 0 or (self.lora_rank and (self.lora_alpha < 1 or not self.lora_targets.strip())):
            raise ValueError("--lora-rank must be >= 0, and with it --lora-alpha positive and --lora-targets set")
        if self.dist_timeout_s <= 0:
            raise ValueError("dist_timeout_s must be positive")
        normalise_precision(self.precision)  # an unknown value fails here, before the model loads
        self.check_tracking()  # likewise a tracker whose package is missing

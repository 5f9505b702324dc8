"""Peak memory per trainer rank, computed: ``python -m training.memory_table`` writes docs/memory.md.

    python -m training.memory_table [--out docs/memory.md] [--check]

Parameter counts are exact: each model is built from its config on the meta device (transformers,
no weights, no download). Everything else is arithmetic from the formulas below, printed with the
table; ``benchmarks/gpu_memory.py`` measures the same configurations on a GPU (and the 135M model on
a CPU) to check them. GB = 1e9 bytes.

Per rank, for P parameters, T trainable (P, or the LoRA adapter's), world size N:

- state = (weights + grads + optimizer + reference) bytes per parameter, sharded over N by FSDP
  (on the host instead with FSDP CPU offload);
- transient: one process (N = 1) with bf16 autocast over fp32 weights keeps a bf16 copy of every
  weight it used until backward (2 B x P); under FSDP (N > 1), bf16 all-gathers of the root unit
  (embeddings, head) for the whole step plus two decoder layers in flight, and their fp32 gradients
  before the reduce-scatter;
- activations of one micro-batch of ``tokens`` tokens, bf16 (an estimate for Llama-style blocks:
  per token and layer 2 x (6h + 2kv + 4i) bytes kept for backward, plus the fp32 residual 4h);
  with activation checkpointing only each layer's fp32 input (4h) is kept, plus one layer
  recomputed; plus the chunked head's fp32 log-softmax over ``chunk`` positions;
- the optimizer step, after the activations are freed: torch's AdamW (foreach, as the trainer
  builds it) takes the square root of every second moment at once (4 B x T / N); torchao's 8-bit
  AdamW dequantises one parameter at a time (about 12 B x the largest, the embeddings, / N).
  The peak is state + max(transient + activations, optimizer step).

Not included: the CUDA context and allocator slack (about 1-3 GB), vLLM's own memory.

What runs today: FSDP (N > 1, ``torchrun``) with the first row's options only (fp32 master
weights, fp32 AdamW, fp32 reference). The bf16 reference, 8-bit AdamW, bf16 weights and LoRA run
in one process (the N = 1 column); under torchrun they are refused with a clear error
(``training/sharded.py``). Their N > 1 cells say what sharding them would give.
"""

from __future__ import annotations

import argparse
import functools
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

GB = 1e9
TOKENS = 4096  # training.update's --token-budget default: tokens per micro-batch
CHUNK = 256  # --logprob-chunk
LORA_RANK = 64
WORLDS = (1, 2, 4, 8, 16)

# Shapes from the models' config.json (no weights needed). R1-Distill-Qwen-7B has Qwen2.5-7B's shapes.
SHAPES: dict[str, tuple[str, dict[str, Any]]] = {
    "llama-3.2-3b": ("LlamaConfig", dict(
        hidden_size=3072, intermediate_size=8192, num_hidden_layers=28, num_attention_heads=24,
        num_key_value_heads=8, head_dim=128, vocab_size=128256, tie_word_embeddings=True)),
    "qwen2.5-7b": ("Qwen2Config", dict(
        hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
        num_key_value_heads=4, vocab_size=152064, tie_word_embeddings=False)),
    "smollm2-135m": ("LlamaConfig", dict(
        hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
        num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True)),
}
TITLES = {"llama-3.2-3b": "Llama-3.2-3B (math)", "qwen2.5-7b": "Qwen2.5-7B / R1-Distill-Qwen-7B (tool use, MLE)"}


def model_config(shape: str) -> Any:
    import transformers

    kind, values = SHAPES[shape]
    return getattr(transformers, kind)(**values)


@dataclass(frozen=True)
class Counts:
    params: int
    layers: int
    hidden: int
    kv_dim: int
    intermediate: int
    block: int  # parameters of one decoder layer
    root: int  # embeddings, final norm and (untied) head: FSDP's root unit
    lora_per_rank: int  # LoRA parameters per unit of rank, on every linear layer of the blocks


@functools.cache
def counts(shape: str) -> Counts:
    """Exact counts, from the model built on the meta device."""
    import torch
    from transformers import AutoModelForCausalLM

    cfg = model_config(shape)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)
    params = sum(p.numel() for p in model.parameters())
    block = sum(p.numel() for p in model.model.layers[0].parameters())
    lora = sum(m.in_features + m.out_features for m in model.model.layers.modules() if isinstance(m, torch.nn.Linear))
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    return Counts(params, cfg.num_hidden_layers, cfg.hidden_size, cfg.num_key_value_heads * head_dim,
                  cfg.intermediate_size, block, params - block * cfg.num_hidden_layers, lora)


@dataclass(frozen=True)
class Option:
    key: str
    label: str
    weights: float  # bytes per parameter
    grads: float  # bytes per trainable parameter
    optimizer: float  # bytes per trainable parameter
    reference: float  # bytes per parameter (per trainable one for LoRA: a frozen copy of the adapter)
    lora: bool = False


ADAM8 = 2 * (1 + 4 / 256)  # torchao AdamW8bit: two int8 states plus an fp32 scale per 256-block
OPTIONS = (
    Option("fp32", "fp32 master + fp32 AdamW, fp32 reference (today)", 4, 4, 8, 4),
    Option("bf16-ref", "fp32 master + fp32 AdamW, bf16 reference", 4, 4, 8, 2),
    Option("adam8", "fp32 master + 8-bit AdamW, bf16 reference", 4, 4, ADAM8, 2),
    Option("bf16-sr", "bf16 weights + grads (stochastic rounding) + 8-bit AdamW, bf16 reference", 2, 2, ADAM8, 2),
    Option("lora", f"LoRA r={LORA_RANK}: bf16 base, fp32 adapter + AdamW, reference = adapter off + frozen copy",
           2, 4, 8, 4, lora=True),
)
BY_KEY = {o.key: o for o in OPTIONS}


@dataclass(frozen=True)
class Estimate:
    state: float  # bytes on the GPU (or the host with offload): weights, grads, optimizer, reference
    transient: float
    activations: float
    step: float  # scratch of the optimizer step (on the host with CPU offload)
    host: float = 0.0  # bytes on the host with CPU offload

    @property
    def gpu(self) -> float:
        return self.state + max(self.transient + self.activations, self.step)


def activation_bytes(c: Counts, tokens: int = TOKENS, checkpointing: bool = True, vocab: int = 0) -> float:
    kept = 2 * (6 * c.hidden + 2 * c.kv_dim + 4 * c.intermediate)  # one layer's saved bf16 tensors per token
    residual = 4 * c.hidden
    layers = residual * c.layers + kept if checkpointing else (residual + kept) * c.layers
    return tokens * layers + 3 * CHUNK * vocab * 4  # + the head's fp32 logits, log-softmax and grad for a chunk


def estimate(shape: str, key: str, world: int = 1, *, offload: bool = False, checkpointing: bool = True,
             tokens: int = TOKENS, lora_rank: int = LORA_RANK) -> Estimate:
    c, o = counts(shape), BY_KEY[key]
    trainable = c.lora_per_rank * lora_rank if o.lora else c.params
    state = (o.weights * c.params + (o.grads + o.optimizer) * trainable
             + o.reference * (trainable if o.lora else c.params)) / world
    if world == 1:
        transient = 2.0 * c.params if o.weights == 4 else 0.0  # autocast's bf16 weight copies
    else:  # gathered bf16 units, their fp32 gradients (trainable ones only) before the reduce-scatter
        units = c.root + 2 * c.block
        transient = 2.0 * units + (0.0 if o.lora else 4.0 * (c.root + c.block))
    vocab = SHAPES[shape][1]["vocab_size"]
    acts = activation_bytes(c, tokens, checkpointing, vocab)
    step = (4.0 * trainable if o.optimizer == 8 else 12.0 * vocab * c.hidden) / world
    if offload:
        return Estimate(0.0, transient, acts, 0.0, host=state + step)
    return Estimate(state, transient, acts, step)


# --- the document ----------------------------------------------------------------------------------

def _gb(value: float) -> str:
    return f"{value / GB:.1f}"


def per_option_table(shape: str) -> list[str]:
    c = counts(shape)
    lines = [f"### {TITLES[shape]}: {c.params:,} parameters ({c.params / GB:.2f} B)", "",
             "Peak GB per rank, activation checkpointing on, FSDP over N ranks (N = 1: no FSDP). "
             f"A micro-batch of {TOKENS} tokens.", "",
             "| option | " + " | ".join(f"N={n}" for n in WORLDS) + " | N=8, CPU offload (GPU / host per rank) |",
             "|---|" + "---:|" * (len(WORLDS) + 1)]
    for o in OPTIONS:
        cells = [_gb(estimate(shape, o.key, n).gpu) for n in WORLDS]
        off = estimate(shape, o.key, 8, offload=True)
        lines.append(f"| {o.label} | " + " | ".join(cells) + f" | {_gb(off.gpu)} / {_gb(off.host)} |")
    lines.append("")
    on, off_ = activation_bytes(c, TOKENS, True), activation_bytes(c, TOKENS, False)
    lines.append(f"Activations of one {TOKENS}-token micro-batch: {_gb(on)} GB with activation checkpointing, "
                 f"{_gb(off_)} GB without (add the difference to any cell above to turn it off). "
                 f"LoRA r={LORA_RANK} trains {c.lora_per_rank * LORA_RANK:,} parameters.")
    return [*lines, ""]


def _fits(shape: str, key: str, world: int, budget_gb: float) -> bool:
    return estimate(shape, key, world).gpu / GB <= budget_gb


def layouts() -> list[str]:
    """A layout per machine: vLLM's share and the trainer's, for the cheapest exact-enough option that fits."""
    lines = ["| machine | model | vLLM | trainer | trainer GB per rank |", "|---|---|---|---|---:|"]
    for shape in TITLES:
        c = counts(shape)
        serve_gb = 2 * c.params / GB + 12  # bf16 weights + ~12 GB of KV cache and graphs (ours)
        for gpu_gb in (80, 141):  # one GPU: vLLM and the trainer share it
            utilisation = min(0.9, round(serve_gb / gpu_gb + 0.05, 2))
            budget = (1 - utilisation) * gpu_gb * 0.95 - 2
            pick = next((o for o in OPTIONS if _fits(shape, o.key, 1, budget)), None)
            trainer = "does not fit" if pick is None else f"1 process, {pick.label}"
            peak = "-" if pick is None else _gb(estimate(shape, pick.key, 1).gpu)
            lines.append(f"| 1 x {gpu_gb} GB | {shape} | same GPU, --gpu-memory-utilization {utilisation} | "
                         f"{trainer} | {peak} |")
        budget = 80 * 0.9 - 2
        ranks = next(n for n in (1, 2, 4, 8) if _fits(shape, "fp32", n, budget))
        lines.append(f"| 1 x 8 x 80 GB | {shape} | data parallel {8 - ranks} | FSDP {ranks} ranks, "
                     f"{OPTIONS[0].label} | {_gb(estimate(shape, 'fp32', ranks).gpu)} |")
        lines.append(f"| M x 8 x 80 GB | {shape} | data parallel 8 on each of M-1 nodes, plus {8 - ranks} on "
                     f"the trainer's node | FSDP {ranks} ranks (8 if updates lag) | "
                     f"{_gb(estimate(shape, 'fp32', ranks).gpu)} ({_gb(estimate(shape, 'fp32', 8).gpu)} at 8) |")
    return lines


def render() -> str:
    head = (__doc__ or "").split("\n\n", 2)[2].strip()
    parts = ["# Trainer memory per GPU rank (computed)", "",
             "<!-- generated by `python -m training.memory_table`; edit training/memory_table.py, not this file -->",
             "",
             "Every figure here is **computed**, not measured: exact parameter counts (models built from their "
             "configs on the meta device) times bytes per parameter, plus estimates of the transient buffers "
             "and activations. `bash scripts/gpu_check.sh` measures the same configurations on a GPU "
             "(`benchmarks/gpu_memory.py`); measured rows go below the computed ones, marked as such.", "",
             "## How it is computed", "", head, ""]
    for shape in TITLES:
        parts += per_option_table(shape)
    parts += ["## Picking a layout (computed)", "",
              "vLLM needs the bf16 weights plus its KV cache (12 GB assumed here); the trainer gets the "
              "rest of a shared GPU, or GPUs of its own. Rollouts dominate ExIt's wall clock (math: 128 "
              "prompts x 8 answers per update), so GPUs not needed by the trainer go to vLLM data parallel "
              "ranks. Options are tried in the table's order (most exact first); 90% of a GPU, less 2 GB of "
              "CUDA context, is usable.", "", *layouts(), "",
              "Launch: vLLM on its GPUs (`CUDA_VISIBLE_DEVICES=...`, one `exitagent.serve` per node), the "
              "trainer on the rest (`torchrun --nproc-per-node N -m training.update`, `--nnodes` and a c10d "
              "rendezvous across nodes). The recipes in `recipes/` name the layout for each paper setup.", ""]
    return "\n".join(parts)


def main(argv: list[str] | None = None) -> int:
    from exitagent import config

    parser = argparse.ArgumentParser(prog="python -m training.memory_table", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "docs" / "memory.md")
    parser.add_argument("--check", action="store_true", help="exit 1 if --out's computed part is out of date")
    args = config.parse_args(parser, argv, "memory")
    text = render()
    if args.check:
        current = args.out.read_text() if args.out.exists() else ""
        if not current.startswith(text):
            print(f"{args.out} is out of date: run python -m training.memory_table", file=sys.stderr)
            return 1
        return 0
    kept = ""  # measured sections below the generated part stay
    if args.out.exists() and (mark := args.out.read_text().find("\n## Measured")) >= 0:
        kept = args.out.read_text()[mark:]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text + kept)
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

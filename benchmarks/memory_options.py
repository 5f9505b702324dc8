"""Benchmark the trainer's memory options side by side: fp32 AdamW vs 8-bit AdamW vs LoRA (and bf16 + SR).

Run:  .venv/bin/python benchmarks/memory_options.py [--model DIR] [--batch 8] [--seq 256] [--steps 2]
        [--variants adamw,adamw8bit,lora] [--lora-rank 16]

Each variant runs in a fresh subprocess on the same random batch with the trainer's own pieces
(``training.memory.build_optimizer``, ``training.lora.attach``, ``training.loss.micro_batch_loss``,
activation checkpointing on as by default), so its peak memory is its own:

- ``adamw``: fp32 weights, torch's AdamW (8 bytes of state per parameter);
- ``adamw8bit``: fp32 weights, torchao's AdamW8bit (~2 bytes of state per parameter);
- ``lora``: the base frozen, a rank ``--lora-rank`` adapter on every linear layer, fp32 AdamW on it;
- ``bf16-sr`` (not run by default): bf16 weights stepped with stochastic rounding. On a CPU without
  native bf16 every matmul is then emulated (18x slower here, runtime notes), so it only makes sense
  where the hardware has bf16.

Peak memory: the child's RSS high-water mark (``ru_maxrss``, model loading included), and the RSS
growth over the steps (sampled every 2 ms). Tokens/s counts every token (B * T) of the timed steps.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import _machine
from trainer import DEFAULT_MODEL, _batches, timed_steps

VARIANTS = ("adamw", "adamw8bit", "lora", "bf16-sr")


def run_variant(args: argparse.Namespace) -> dict[str, float]:
    import torch
    from transformers import AutoModelForCausalLM

    from training import lora, memory
    from training.loss import LossConfig, micro_batch_loss

    torch.manual_seed(0)
    dtype = torch.bfloat16 if args.variant == "bf16-sr" else torch.float32
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    if args.variant == "lora":
        model = lora.attach(model, rank=args.lora_rank, alpha=2 * args.lora_rank, saved=None,
                            targets="q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj").get_base_model()
    model.train()
    optimizer = memory.build_optimizer(model.parameters(), kind="adamw8bit" if args.variant == "adamw8bit" else "adamw",
                                       weights_dtype="bfloat16" if dtype == torch.bfloat16 else "float32",
                                       lr=1e-6, weight_decay=0.0)
    args.prompt, args.group_size = args.seq // 4, args.batch
    batches = _batches(args, model.config.vocab_size)
    config = LossConfig()

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        for batch in batches:
            loss, _ = micro_batch_loss(model, batch, config)
            loss.backward()
        optimizer.step()

    return {
        **timed_steps(step, args.steps, batches),
        "trainable_m": sum(p.numel() for p in model.parameters() if p.requires_grad) / 1e6,
        "optimizer_state_mib": memory.state_bytes(optimizer) / 2**20,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--steps", type=int, default=2, help="timed steps after one warm-up")
    parser.add_argument("--lora-rank", type=int, default=16)
    parser.add_argument("--variant", choices=VARIANTS, help="run one variant here and print JSON")
    parser.add_argument("--variants", default="adamw,adamw8bit,lora")
    args = parser.parse_args(argv)
    if args.variant:
        print(json.dumps(run_variant(args)))
        return
    _machine.print_machine()
    common = [f"--model={args.model}", f"--batch={args.batch}", f"--seq={args.seq}", f"--steps={args.steps}",
              f"--lora-rank={args.lora_rank}"]
    print(f"{args.batch} x {args.seq} tokens per step, activation checkpointing on, {args.steps} timed steps, "
          f"model {args.model.name}, LoRA rank {args.lora_rank} on every linear layer")
    print(f"{'variant':<11}{'trainable M':>12}{'step s':>8}{'tokens/s':>10}{'peak RSS MiB':>14}"
          f"{'step growth MiB':>17}{'optimizer state MiB':>21}", flush=True)
    for variant in args.variants.split(","):  # each row as soon as it is measured
        out = subprocess.run([sys.executable, __file__, f"--variant={variant}", *common],
                             cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True)
        if out.returncode != 0:
            raise SystemExit(f"{variant} failed:\n{out.stderr[-2000:]}")
        r = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"{variant:<11}{r['trainable_m']:>12.1f}{r['step_s']:>8.2f}{r['tokens_per_s']:>10.0f}"
              f"{r['peak_rss_mib']:>14.0f}{r['step_growth_mib']:>17.0f}{r['optimizer_state_mib']:>21.1f}", flush=True)
    print(f"load average after the run: {os.getloadavg()[0]:.1f} (other processes on the machine skew tokens/s)")


if __name__ == "__main__":
    main()

"""Benchmark one GRPO update step: our chunked loss against a plain Hugging Face forward/backward.

Run:  .venv/bin/python benchmarks/trainer.py [--model DIR] [--batch 8] [--seq 256] [--prompt 64]
        [--precision auto|bfloat16|float32]
      .venv/bin/python benchmarks/trainer.py --ranks 1,2 --batch 16 --group-size 4 [--cpu-offload]
        (one process against torchrun ranks with FSDP2: benchmarks/_ranks.py)

Each variant runs in a fresh subprocess (so the peak memory of one cannot hide in another's), on
the same random batch, with the same AdamW step:

- ``hf``: ``model(input_ids, attention_mask, labels)``, the full (B, T, V) logits and their
  float32 cross-entropy, as a plain fine-tuning step would do;
- ``chunked``: ``training.loss.micro_batch_loss`` (GRPO loss with the truncated IS weight),
  log-probabilities projected through ``lm_head`` in chunks and only on trainable tokens;
- ``chunked+ckpt``: the same with the model's activation checkpointing on;
- ``chunked+shared``: ``chunked`` with each group's prompt run once for its ``--group-size``
  responses (``MicroBatch.prefix_len``), as the trainer does when checkpointing is off.

Rows come in groups of ``--group-size`` that share their prompt, as a GRPO group's responses do;
every variant runs the same micro-batches (one per group), only ``chunked+shared`` shares prompts.

Peak memory is the child's RSS high-water mark (``ru_maxrss``, which includes loading the model)
and, sampled every 2 ms by a psutil thread, the growth of RSS over the steps above the RSS just
before the first step. Tokens/s counts every token of the batch (B * T), over the timed steps.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import _machine
import _ranks

from exitagent import precision

DEFAULT_MODEL = Path.home() / ".cache/exitagent/models/SmolLM2-135M-Instruct"
VARIANTS = ("hf", "chunked", "chunked+ckpt", "chunked+shared")


class PeakRss:
    """Samples this process's RSS in a thread; ``peak`` is the highest value seen."""

    def __init__(self, interval: float = 0.002) -> None:
        import psutil

        self.process, self.interval, self.peak = psutil.Process(), interval, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.process.memory_info().rss)
            time.sleep(self.interval)

    def __enter__(self) -> PeakRss:
        self.peak = self.process.memory_info().rss
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def timed_steps(step: Any, steps: int, batches: list[Any]) -> dict[str, float]:
    """Run ``step`` once to warm up, then ``steps`` times: median time, tokens/s and memory."""
    times = []
    with PeakRss() as rss:
        before = rss.peak
        for _ in range(steps + 1):  # the first is a warm-up (allocations, torchao compiles its step there)
            start = time.perf_counter()
            step()
            times.append(time.perf_counter() - start)
    step_s = statistics.median(times[1:])
    return {
        "step_s": step_s,
        "tokens_per_s": sum(b.tokens_BT.numel() for b in batches) / step_s,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "step_growth_mib": (rss.peak - before) / 2**20,
    }


def _batches(args: argparse.Namespace, vocab_size: int):  # -> list[MicroBatch]
    import dataclasses
    import random

    from exitagent.types import PolicyVersion, TrainingSequence
    from training.data import make_micro_batches

    rng = random.Random(0)
    completion = args.seq - args.prompt
    items = []
    for i in range(args.batch):
        if i % args.group_size == 0:
            prompt = tuple(rng.randrange(vocab_size) for _ in range(args.prompt))
        tokens = prompt + tuple(rng.randrange(vocab_size) for _ in range(completion))
        mask = (0,) * args.prompt + (1,) * completion
        logprobs = (0.0,) * args.prompt + tuple(-rng.uniform(0.5, 4.0) for _ in range(completion))
        items.append((TrainingSequence(tokens, mask, logprobs, PolicyVersion.at_step(0)), 1.0 if i % 2 else -1.0))
    batches = make_micro_batches(items, vocab_size=vocab_size, token_budget=args.group_size * args.seq)
    if args.variant == "chunked+shared":
        return batches
    return [dataclasses.replace(b, prefix_len=0) for b in batches]  # every row run whole


def run_variant(args: argparse.Namespace) -> dict[str, float]:
    """One variant, in this process: load, one warm-up step, then ``args.steps`` timed steps."""
    import torch
    from transformers import AutoModelForCausalLM

    from training.loss import LossConfig, micro_batch_loss

    torch.manual_seed(0)
    # The model in the chosen dtype itself (not autocast): what is compared is the loss implementation
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=getattr(torch, args.precision))
    model.train()
    if args.variant == "chunked+ckpt":
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    optimiser = torch.optim.AdamW(model.parameters(), lr=1e-6)
    batches = _batches(args, model.config.vocab_size)
    config = LossConfig()

    def step() -> None:
        optimiser.zero_grad(set_to_none=True)
        for batch in batches:
            if args.variant == "hf":
                labels_BT = batch.tokens_BT.masked_fill(batch.mask_BT == 0, -100)
                loss = model(input_ids=batch.tokens_BT, attention_mask=batch.attention_BT, labels=labels_BT).loss
            else:
                loss, _ = micro_batch_loss(model, batch, config, chunk=args.chunk)
            loss.backward()
        optimiser.step()

    return timed_steps(step, args.steps, batches)


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--prompt", type=int, default=64, help="untrained prompt tokens per sequence")
    parser.add_argument("--group-size", type=int, default=8, help="rows that share a prompt (G)")
    parser.add_argument("--steps", type=int, default=3, help="timed steps after one warm-up")
    parser.add_argument("--chunk", type=int, default=256, help="positions per lm_head chunk")
    parser.add_argument("--variant", choices=VARIANTS, help="run one variant here and print JSON")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--precision", default="auto", help="auto (what the hardware runs natively), bfloat16, float32")
    parser.add_argument("--ranks", help="compare these rank counts instead of the variants, e.g. 1,2")
    parser.add_argument("--ranked", action="store_true", help="run one rank count here (under torchrun or alone)")
    parser.add_argument("--cpu-offload", action="store_true", help="with --ranks: FSDP CPU offload")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = _parse(argv)
    if args.variant or args.ranked:
        result = _ranks.run_ranked(args, _batches) if args.ranked else run_variant(args)
        if result is not None:
            print(json.dumps(result), flush=True)
        return
    root = Path(__file__).resolve().parents[1]
    _machine.print_machine()
    args.precision = precision.choose(args.precision, precision.detect()).dtype
    common = [f"--precision={args.precision}", f"--model={args.model}", f"--batch={args.batch}", f"--seq={args.seq}",
              f"--prompt={args.prompt}",
              f"--steps={args.steps}", f"--chunk={args.chunk}", f"--group-size={args.group_size}"]
    if args.ranks:
        _ranks.compare(args, Path(__file__).resolve(), common)
        return
    results = {}
    for variant in args.variants.split(","):
        out = subprocess.run([sys.executable, __file__, f"--variant={variant}", *common], cwd=root,
                             capture_output=True, text=True, check=True)
        results[variant] = json.loads(out.stdout.strip().splitlines()[-1])
    base = results.get("hf")
    print(f"{args.batch} x {args.seq} tokens ({args.prompt} prompt, groups of {args.group_size}), {args.precision}, "
          f"{args.steps} timed steps, "
          f"model {args.model.name}")
    print(f"{'variant':<16}{'step s':>9}{'tokens/s':>10}{'speed':>8}{'peak RSS MiB':>14}{'x hf':>7}"
          f"{'step growth MiB':>17}{'x hf':>7}")
    for variant, r in results.items():
        speed = r["tokens_per_s"] / base["tokens_per_s"] if base else float("nan")
        peak = r["peak_rss_mib"] / base["peak_rss_mib"] if base else float("nan")
        growth = r["step_growth_mib"] / base["step_growth_mib"] if base else float("nan")
        print(f"{variant:<16}{r['step_s']:>9.2f}{r['tokens_per_s']:>10.0f}{speed:>7.2f}x{r['peak_rss_mib']:>14.0f}"
              f"{peak:>6.2f}x{r['step_growth_mib']:>17.0f}{growth:>6.2f}x")


if __name__ == "__main__":
    main()

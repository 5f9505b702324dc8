"""benchmarks/trainer.py --ranks: one trainer step in one process against N torchrun ranks (FSDP2).

Each rank count runs in fresh processes on the same random batch: 1 is the single-process trainer
(plain model, AdamW, ``micro_batch_loss``), N > 1 is what ``training.sharded`` does under
``torchrun --nproc-per-node N`` (FSDP2 over gloo, micro-batches balanced by token cost, zero-loss
dummies, full-norm clipping). fp32 master weights in both, autocast to bf16 when the precision is
bf16, as the trainer. Peak memory is each process's RSS high-water mark (``ru_maxrss``), shown per
rank (the largest) and summed over the ranks; tokens/s counts every token of the batch.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any


def run_ranked(args: argparse.Namespace, batches_of: Any) -> dict[str, float] | None:
    """In this process (one of ``torchrun``'s ranks, or alone): load, warm up, time ``args.steps`` steps."""
    import torch

    from training import distributed
    from training.loss import LossConfig, loss_normaliser, micro_batch_loss
    from training.trainer import _load

    world = distributed.from_env()
    if world is None:
        model: Any = _load(args.model, torch.float32, torch.device("cpu"))
        size, rank = 1, 0
    else:
        device = distributed.start(world, "cpu", 600)
        model = distributed.load(args.model, world, device, args.cpu_offload)
        size, rank = world.size, world.rank
    model.train()
    optimiser = torch.optim.AdamW(model.parameters(), lr=1e-6)
    config = LossConfig()
    batches = batches_of(args, model.config.vocab_size)
    normaliser = loss_normaliser(batches, config)
    shares = distributed.balance(batches, size)
    count = max(len(s) for s in shares)
    mine = shares[rank] + [distributed.dummy_batch(0)] * (count - len(shares[rank]))
    autocast = (torch.autocast("cpu", dtype=torch.bfloat16) if args.precision == "bfloat16"
                else contextlib.nullcontext())

    def step() -> None:
        optimiser.zero_grad(set_to_none=True)
        for index, batch in enumerate(mine):
            with autocast:
                loss, _ = micro_batch_loss(model, batch, config, normaliser=normaliser, chunk=args.chunk)
            (loss * (size if index < len(shares[rank]) else 0.0)).backward()
        if world is None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        else:
            distributed.clip_grad_norm(model, 1.0)
        optimiser.step()

    times = []
    for _ in range(args.steps + 1):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    step_s = statistics.median(times[1:])
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    result = {"step_s": step_s, "tokens_per_s": sum(b.tokens_BT.numel() for b in batches) / step_s,
              "peak_rank_mib": peak, "peak_sum_mib": peak}
    if world is not None:
        import torch.distributed as dist

        peaks = [0.0] * size
        dist.all_gather_object(peaks, peak)
        result.update(peak_rank_mib=max(peaks), peak_sum_mib=sum(peaks))
        distributed.stop()
        if rank:
            return None
    return result


def compare(args: argparse.Namespace, script: Path, common: list[str]) -> None:
    """Run each rank count of ``--ranks`` and print them side by side."""
    results = {}
    for ranks in [int(r) for r in args.ranks.split(",")]:
        launcher = ([sys.executable] if ranks == 1 else
                    [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}"])
        env = {**os.environ, "OMP_NUM_THREADS": str(max(1, len(os.sched_getaffinity(0)) // ranks))}
        out = subprocess.run([*launcher, str(script), "--ranked", *common,
                              *(["--cpu-offload"] if args.cpu_offload else [])],
                             cwd=script.parents[1], capture_output=True, text=True, env=env)
        if out.returncode:
            raise SystemExit(f"{ranks} rank(s) failed:\n{out.stderr[-3000:]}")
        results[ranks] = json.loads(out.stdout.strip().splitlines()[-1])
    print(f"{args.batch} x {args.seq} tokens ({args.prompt} prompt, groups of {args.group_size}), {args.precision} "
          f"autocast over fp32 weights, {args.steps} timed steps, model {args.model.name}"
          f"{', FSDP CPU offload' if args.cpu_offload else ''}")
    print(f"{'ranks':<22}{'step s':>9}{'tokens/s':>10}{'speed':>8}{'peak MiB/rank':>15}{'peak MiB total':>16}")
    base = results.get(1)
    for ranks, r in results.items():
        label = "1 (one process)" if ranks == 1 else f"{ranks} (torchrun, FSDP2)"
        speed = r["tokens_per_s"] / base["tokens_per_s"] if base else float("nan")
        print(f"{label:<22}{r['step_s']:>9.2f}{r['tokens_per_s']:>10.0f}{speed:>7.2f}x"
              f"{r['peak_rank_mib']:>15.0f}{r['peak_sum_mib']:>16.0f}")

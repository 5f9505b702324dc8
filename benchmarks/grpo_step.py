"""One GRPO iteration, exitagent against TRL's GRPOTrainer, on the same machine in one invocation.

    .venv/bin/python benchmarks/grpo_step.py [--steps 2] [--warmup 1] [--prompts 8] [--samples 8]
        [--max-tokens 128] [--temperature 0.7] [--lr 1e-5] [--sides exitagent,trl]

An iteration is what one GRPO step costs end to end: P prompts x G samples generated (at most
``--max-tokens`` new tokens each), scored by the math evaluator, then one optimizer step on them.
Both sides get the same P arithmetic prompts per iteration (``math_tasks("arithmetic", "train")``,
same seed, same order), the same temperature, learning rate 1e-5, beta 0, fp32 weights with bf16
autocast where the hardware runs bf16 natively, fp32 otherwise (``--precision``, default auto).
Each side trains as it does by default in a run: TRL with its GRPOConfig defaults (activation
checkpointing on), exitagent as ``exitagent.run`` starts ``training.update``
(activation checkpointing off, so each group's prompt runs once for its G samples). Each side
runs in a subprocess of its own, one after the other, so neither shares memory or cores with the
other; each runs ``--warmup`` untimed iterations first (a process's first torch generate on this
CPU was seen to take over a minute).

- exitagent (``--side exitagent`` here): starts ``exitagent.serve`` (vLLM on the CPU; its start-up
  is reported, not counted), then per iteration: *generation* = P groups at once through
  ``exitagent.rollouts.roll_out`` (the agent loop, ``n=G`` per request, scoring) against the real
  server, each recorded in a SQLite store, as ``exitagent.collect`` does; *update* = fetch the
  groups, ``items_from``, ``Trainer.train_step``, as ``training.update`` does. *publish+reload*
  (save the trainer state, publish the checkpoint, wait until the server serves it) is a third,
  separate figure: TRL's step has no equivalent, as its generation uses the trained model in place.
  The server stays up throughout (it is part of our system), idle during the update.
- trl (``benchmarks/_trl_side.py``): TRL's ``GRPOTrainer`` with its default generation
  (transformers ``generate``, no vLLM, no server); *generation* = its ``_generate_and_score_
  completions`` (generate, reward, advantages), *update* = the rest of the optimizer step.

Peak RSS: each process's own high-water mark (``ru_maxrss``); for exitagent also the server's
process tree (gateway + vLLM), sampled every 0.1 s, and the peak of the sum (an upper bound:
shared pages count twice). "trained seqs" is how many of the P x G sequences the update ran on:
ours leaves out groups whose rewards are all equal (no signal), TRL trains them at advantage 0.
The machine may be shared: the load average is printed around each side.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import _machine

from exitagent import precision

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script: import the repo's packages
TARGET = 4.0  # the issue: an exitagent iteration takes at most a quarter of TRL's


class TreeSampler:
    """Peak RSS and CPU seconds of a process tree, sampled in a thread (vLLM forks its workers)."""

    def __init__(self, pid: int, interval: float = 0.1) -> None:
        import psutil

        self.root, self.interval, self.peak_rss = psutil.Process(pid), interval, 0
        self.peak_with_self = 0
        self._me = psutil.Process()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _procs(self) -> list[Any]:
        return [self.root, *self.root.children(recursive=True)]

    def _sum(self, what: str) -> float:
        import psutil

        total = 0.0
        for proc in self._procs():
            try:
                if what == "rss":
                    total += proc.memory_info().rss
                else:
                    times = proc.cpu_times()
                    total += times.user + times.system
            except psutil.Error:  # a worker that just exited
                pass
        return total

    def cpu_s(self) -> float:
        return self._sum("cpu")

    def _run(self) -> None:
        while not self._stop.is_set():
            rss = int(self._sum("rss"))
            self.peak_rss = max(self.peak_rss, rss)
            self.peak_with_self = max(self.peak_with_self, rss + self._me.memory_info().rss)
            time.sleep(self.interval)

    def __enter__(self) -> TreeSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


async def _generate(policy: Any, evaluator: Any, store: Any, tasks: list[Any], args: argparse.Namespace,
                    iteration: int) -> tuple[int, list[float]]:
    """P groups at once, each recorded once scored, as collect's workers do: (tokens, rewards)."""
    import anyio

    from exitagent.policy import SamplingParams
    from exitagent.rollouts import roll_out
    from exitagent.types import Group, Message, StepKind, Variant, group_version

    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature)
    tokens, rewards = 0, list[float]()

    async def one(k: int) -> None:
        nonlocal tokens
        task = tasks[k]
        rollouts = await roll_out(task, [Message("user", task.prompt)], policy, evaluator, group_size=args.samples,
                                  params=params)
        group = Group(f"it{iteration}-{k}", task.id, StepKind.BASE, Variant.GRPO,
                      group_version(r.episode for r in rollouts), 0, rollouts)
        store.record_group(group, lambda buffer: None)
        tokens += group.completion_tokens
        rewards.extend(r.reward for r in group.rollouts if r.reward is not None)

    async with anyio.create_task_group() as group:
        for k in range(len(tasks)):
            group.start_soon(one, k)
    return tokens, rewards


async def _iterate(args: argparse.Namespace, server: Any, run_dir: Path, sampler: TreeSampler) -> list[dict[str, Any]]:
    import anyio

    from evaluators.math import MathEvaluator
    from evaluators.worlds.math_tasks import math_tasks
    from exitagent.client import OpenAIPolicy
    from exitagent.curriculum.store import SQLiteStore
    from training.config import UpdateConfig
    from training.trainer import Trainer
    from training.update import items_from

    tasks = math_tasks("arithmetic", "train", n=args.prompts * (args.warmup + args.steps), seed=args.seed)
    cfg = UpdateConfig(run_dir=run_dir, lr=args.lr, beta=0.0, groups_per_step=args.prompts, seed=args.seed,
                       activation_checkpointing=False, quiet=True, precision=args.precision)
    trainer = await anyio.to_thread.run_sync(Trainer.restore_or_start, cfg)
    rows = []
    async with OpenAIPolicy(server.base_url) as policy, MathEvaluator() as evaluator:
        with SQLiteStore.in_run(run_dir) as store:
            for i in range(args.warmup + args.steps):
                batch = tasks[i * args.prompts:(i + 1) * args.prompts]
                t0 = time.perf_counter()
                tokens, rewards = await _generate(policy, evaluator, store, batch, args, i)
                t1, server_cpu = time.perf_counter(), sampler.cpu_s()
                groups = store.fetch_groups(limit=args.prompts)
                items, _ = items_from(groups, cfg)
                store.mark_consumed([g.id for g in groups], trainer.step + 1)  # as training.update does
                result = await anyio.to_thread.run_sync(trainer.train_step, items, groups)
                t2, server_cpu = time.perf_counter(), sampler.cpu_s() - server_cpu
                if result is not None:  # no group had a signal: nothing new to publish
                    await anyio.to_thread.run_sync(trainer.save_and_publish)
                    await anyio.to_thread.run_sync(server.wait_for_version, f"step-{trainer.step:06d}")
                t3 = time.perf_counter()
                rows.append({"generate_s": t1 - t0, "update_s": t2 - t1, "publish_reload_s": t3 - t2,
                             "tokens": tokens, "reward_mean": statistics.fmean(rewards) if rewards else 0.0,
                             "sequences": len(items), "server_cpu_during_update_s": server_cpu})
                print(f"iteration {i}: {rows[-1]}", file=sys.stderr, flush=True)
    return rows


def run_exitagent(args: argparse.Namespace) -> dict[str, Any]:
    """The exitagent side, in this process plus the server it starts (and stops)."""
    import anyio

    from exitagent.serving import launch

    with tempfile.TemporaryDirectory(prefix="grpo-step-") as tmp:
        run_dir = Path(tmp)
        t0 = time.perf_counter()
        # poll 0.2 s: the reload figure should show the reload, not the default 1 s polling interval
        server = launch.start_serve(run_dir, "--kv-cache-gib", "2", "--poll-s", "0.2", "--dtype", args.precision)
        serve_s = time.perf_counter() - t0
        try:
            with TreeSampler(server.process.pid) as sampler:
                rows = anyio.run(_iterate, args, server, run_dir, sampler)
        finally:
            server.stop()
    timed = rows[args.warmup:]
    out: dict[str, Any] = {key: [row[key] for row in timed] for key in timed[0]}
    out["total_s"] = [row["generate_s"] + row["update_s"] for row in timed]
    out["warmup_total_s"] = [row["generate_s"] + row["update_s"] for row in rows[:args.warmup]]
    out.update(setup_s=serve_s, peak_rss_mib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
               server_peak_rss_mib=sampler.peak_rss / 2**20, combined_peak_rss_mib=sampler.peak_with_self / 2**20)
    return out


def _run_side(side: str, args: argparse.Namespace, log_dir: Path) -> dict[str, Any]:
    common = [f"--prompts={args.prompts}", f"--samples={args.samples}", f"--max-tokens={args.max_tokens}",
              f"--temperature={args.temperature}", f"--lr={args.lr}", f"--steps={args.steps}",
              f"--warmup={args.warmup}", f"--seed={args.seed}", f"--precision={args.precision}"]
    command = [sys.executable, str(ROOT / "benchmarks" / "_trl_side.py"), *common] if side == "trl" else \
        [sys.executable, __file__, "--side=exitagent", *common]
    log_path = log_dir / f"{side}.log"
    print(f"running {side} ({args.warmup} warm-up + {args.steps} timed iterations; log {log_path}) ...", flush=True)
    with log_path.open("w") as log_file:
        done = subprocess.run(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=log_file, text=True)
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        tail = log_path.read_text()[-3000:]
        raise SystemExit(f"{side} failed (exit {done.returncode}):\n{tail}")
    return dict(json.loads(lines[-1]))


def _median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def report(args: argparse.Namespace, results: dict[str, dict[str, Any]], loads: list[str]) -> None:
    print(f"\nGRPO iteration: {args.prompts} prompts x {args.samples} samples, <= {args.max_tokens} new tokens, "
          f"temperature {args.temperature}, lr {args.lr}, beta 0, {args.precision}; "
          f"median of {args.steps} timed iterations after {args.warmup} warm-up")
    print(f"{'side':<11}{'generate s':>11}{'update s':>10}{'total s':>9}{'tokens':>8}{'trained seqs':>13}"
          f"{'reward':>8}{'peak RSS MiB':>14}{'warm-up s':>10}")
    for side, r in results.items():
        print(f"{side:<11}{_median(r['generate_s']):>11.1f}{_median(r['update_s']):>10.1f}{_median(r['total_s']):>9.1f}"
              f"{_median(r['tokens']):>8.0f}{_median(r['sequences']):>13.0f}{_median(r['reward_mean']):>8.2f}"
              f"{r['peak_rss_mib']:>14.0f}{_median(r['warmup_total_s']):>10.1f}")
    if "exitagent" in results:
        e = results["exitagent"]
        print(f"exitagent extras: serve start-up {e['setup_s']:.0f} s (once); publish+reload "
              f"{_median(e['publish_reload_s']):.1f} s per iteration (not in total); server CPU while idle "
              f"during the update {_median(e['server_cpu_during_update_s']):.1f} s; server tree peak RSS "
              f"{e['server_peak_rss_mib']:.0f} MiB, benchmark + server {e['combined_peak_rss_mib']:.0f} MiB")
    if "trl" in results:
        t = results["trl"]
        print(f"trl extras: generate only (without reward/advantages) {_median(t['generate_only_s']):.1f} s; "
              f"set-up {t['setup_s']:.0f} s (once)")
    if len(results) == 2:
        e, t = results["exitagent"], results["trl"]
        ratio = _median(t["total_s"]) / _median(e["total_s"])
        with_reload = _median(t["total_s"]) / _median([a + b for a, b in zip(e["total_s"], e["publish_reload_s"],
                                                                                 strict=True)])
        gen = _median(t["generate_s"]) / _median(e["generate_s"])
        upd = _median(t["update_s"]) / _median(e["update_s"])
        verdict = "meets" if ratio >= TARGET else "misses"
        print(f"ratio TRL/exitagent per iteration: {ratio:.2f}x (target >= {TARGET:.0f}x: {verdict}); "
              f"with publish+reload {with_reload:.2f}x; generation {gen:.2f}x, update {upd:.2f}x")
    print("load average (1, 5, 15 min): " + " | ".join(loads))


def _load(label: str) -> str:
    one, five, fifteen = os.getloadavg()
    return f"{label} {one:.2f} {five:.2f} {fifteen:.2f}"


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompts", type=int, default=8, help="prompts (groups) per iteration")
    parser.add_argument("--samples", type=int, default=8, help="samples per prompt (group size)")
    parser.add_argument("--max-tokens", type=int, default=128, help="new tokens per sample at most")
    parser.add_argument("--temperature", type=float, default=0.7, help="the runtime notes' TRL peer used 0.7")
    parser.add_argument("--lr", type=float, default=1e-5)
    parser.add_argument("--steps", type=int, default=2, help="timed iterations per side")
    parser.add_argument("--warmup", type=int, default=1, help="untimed iterations per side first")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--sides", default="exitagent,trl", help="which sides to run, in this order")
    parser.add_argument("--precision", default="auto", help="auto, bfloat16 or float32 (both sides)")
    parser.add_argument("--side", choices=("exitagent",), help=argparse.SUPPRESS)  # the subprocess entry
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = _parse(argv)
    if args.side:
        from exitagent import log as logging_setup

        logging_setup.configure(stream=sys.stderr)  # stdout carries only the JSON result
        print(json.dumps(run_exitagent(args)), flush=True)
        os._exit(0)  # the evaluator's worker processes need not be waited for
    args.precision = precision.choose(args.precision, precision.detect()).dtype  # one choice for both sides
    _machine.print_machine()
    loads, results = [_load("start")], {}
    with tempfile.TemporaryDirectory(prefix="grpo-step-logs-") as logs:
        for side in args.sides.split(","):
            results[side] = _run_side(side, args, Path(logs))
            loads.append(_load(f"after {side}"))
    report(args, results, loads)


if __name__ == "__main__":
    main()

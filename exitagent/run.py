"""The main job: a short, real ExIt training run on the embedded default, measured and reported.

    python -m exitagent.run [--run-dir runs/demo] [--train-minutes 18] [--variant exit]

What happens (each part is also a command of its own, started here as a child process):

1. ``exitagent.serve`` serves the packaged 135M model on the CPU;
2. ``exitagent.evaluate`` measures the base policy on the domain's held-out tasks (math, the
   default: arithmetic): accuracy at every self-improvement step k = 0..K;
3. ``exitagent.collect`` (ExIt curriculum, rollouts, rewards, the store) and ``training.update``
   (GRPO, checkpoints) run side by side for ``--train-minutes``; the server hot-reloads every
   checkpoint, and a progress line shows the trainer's step, the served version and the reward;
4. the trained policy is evaluated the same way, and ``RUN/report.md`` (with PNG plots) compares
   the two, every figure with its 95% interval.

The run's own evaluations are smaller than the paper's protocol (``exitagent.evaluate``'s
defaults) so that the whole job fits its 30 minutes on two cores: greedy, one sample, K = 4, 100
tasks by default. Their intervals say how little that can resolve; the report and the last lines
printed give the commands that measure the base and the trained checkpoint at full size.

Ctrl-C stops every child cleanly; running the same command again continues the run: the store,
the trainer state and finished evaluations are kept, and training gets what is left of its minutes
(``RUN/train_time.json``). An evaluation is reused only if it measured the policy now served with
the same flags. The base policy's evaluation is also shared between runs: a run whose server serves
the same base weights, evaluated with the same flags, reuses it from a cache (``exitagent.run_eval``,
``--eval-cache``). ``--eval-wordproblems`` also measures both policies on a second held-out set.

``--domain`` takes any domain collect and evaluate take (tool_use, mle, or your own environment
as ``package.module:NAME``, docs/environments.md): its children then get that domain's tasks and
sources, and math's arithmetic levels only reach math.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx

from exitagent import config
from exitagent import log as logging_setup
from exitagent.budget import describe, spent, trained_seconds
from exitagent.curriculum import store_url
from exitagent.errors import ConfigError, ExitAgentError, ExitCode, child_exit_code, fail
from exitagent.precision import Precision, detect
from exitagent.precision import choose as choose_precision
from exitagent.report import write_report
from exitagent.run_config import RunConfig
from exitagent.run_dir import TRAIN_CLOCK, RunDir
from exitagent.run_eval import ORPHAN_SIGNAL, base_url_flags, evaluate, full_size_note
from exitagent.serving import checkpoints, engine, launch
from exitagent.types import Variant

# collect and update share the CPU with vLLM. OpenMP's default lets idle worker threads spin, which
# on an oversubscribed machine burns the cores the other processes need: one trainer step measured
# 3-5x slower (benchmarks/trainer.py beside a busy vLLM). Passive waiting yields the core instead.
SHARED_CPU_ENV = {"OMP_WAIT_POLICY": "PASSIVE"}


def _child(cfg: RunConfig, name: str, *args: str) -> subprocess.Popen[bytes]:
    log_path = RunDir(cfg.run_dir).log(name)
    env = {**SHARED_CPU_ENV, **os.environ}  # a value the user set wins
    with log_path.open("ab") as out:
        return subprocess.Popen([sys.executable, "-m", *args], stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, env=env, preexec_fn=engine.die_with_parent(ORPHAN_SIGNAL))


def _signal(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGINT)


def _wait_or_kill(process: subprocess.Popen[bytes], grace_s: float) -> None:
    if process.poll() is None:
        try:
            process.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


# Training time already spent by earlier invocations of this run (up to their Ctrl-C), so that the
# same command continues the budget instead of starting it again.


def _record_training(run_dir: Path, seconds: float) -> None:
    tmp = run_dir / f".{TRAIN_CLOCK}.tmp"
    tmp.write_text(json.dumps({"seconds": round(seconds, 1)}) + "\n")
    os.replace(tmp, RunDir(run_dir).train_clock)


def train(cfg: RunConfig, servers: list[launch.ServeProcess], stop_requested: list[bool]) -> None:
    """collect + update for what is left of ``train_minutes``, with a progress line every 15 s."""
    already = trained_seconds(cfg.run_dir)
    budget = cfg.train_minutes * 60 - already
    if budget <= 0:
        print(f"[run] the {cfg.train_minutes:g}-minute training budget is spent", flush=True)
        return
    if already:
        print(f"[run] continuing: {already / 60:.1f} of {cfg.train_minutes:g} training minutes done", flush=True)
    run = str(cfg.run_dir)
    # One seed (the buffer's entries name tasks of that seed's task set), one index each: collectors
    # with equal draws would collect twin groups.
    names = ["collect" if i == 0 else f"collect-{i}" for i in range(cfg.collectors)]  # their log files
    collectors = [_child(cfg, names[i], *collect_command(cfg, base_url_flags(servers), i))
                  for i in range(cfg.collectors)]
    update = _child(cfg, "update", *update_command(cfg))
    started, next_report = time.monotonic(), 15.0
    try:
        while not stop_requested[0] and (elapsed := time.monotonic() - started) < budget:
            if cfg.train_updates and update.poll() == 0:
                break  # the trainer made its --steps updates: the budget is spent, not the minutes
            for process, name in zip((*collectors, update), (*names, "update"), strict=True):
                code = process.poll()
                if code is not None and not (process is update and cfg.train_updates and code == 0):
                    raise ExitAgentError(f"{name} exited with {process.returncode}; see {run}/logs/{name}.log")
            left = budget - elapsed
            if elapsed >= next_report:
                next_report += 15.0
                _record_training(cfg.run_dir, already + elapsed)
                # a server busy generating can be slow to answer: the progress line must not
                # overrun the budget (a 10 s wait once ended a 30 s budget at 37 s)
                line = progress(cfg.run_dir, servers, timeout_s=min(5.0, max(0.2, left)))
                print(f"[run] {(already + elapsed) / 60:5.1f} min | {line}", flush=True)
            time.sleep(max(0.0, min(1.0, left)))  # a Ctrl-C is seen within a second
    finally:
        _record_training(cfg.run_dir, already + time.monotonic() - started)
        # Both at once: stopping collect first (it finishes its groups in flight, ~20 s) let the
        # trainer start another step meanwhile, which then had to finish too. At the end of the
        # budget the groups in flight can no longer be trained on: a second signal discards them,
        # so their generation does not slow the trainer's last step. After a Ctrl-C run sends one
        # signal only: a resumed run can still train on them.
        for process in (*collectors, update):
            _signal(process)
        if not stop_requested[0]:
            for process in collectors:
                _signal(process)
        for process in collectors:
            _wait_or_kill(process, grace_s=60)
        _wait_or_kill(update, grace_s=300)  # lets the current step finish and publish
        print(f"[run] spent: {describe(spent(cfg.run_dir))}", flush=True)


def collect_command(cfg: RunConfig, base_urls: list[str], index: int) -> list[str]:
    """Collector ``index``'s module and flags (``base_urls``: its ``--base-url`` flags)."""
    return ["exitagent.collect", "--run-dir", str(cfg.run_dir), *base_urls, "--domain", cfg.domain,
            "--variant", cfg.variant.value, *(("--levels", cfg.levels) if cfg.levels else ()),
            # the naive control's chains reach the depth the run evaluates at
            *(("--chain-max-depth", str(cfg.eval_steps)) if cfg.variant is Variant.CHAINS else ()),
            "--group-size", str(cfg.group_size), "--max-tokens", str(cfg.max_tokens),
            "--diverge-max-tokens", str(cfg.diverge_max_tokens),
            "--temperature", str(cfg.temperature), "--concurrency", "4", "--min-buffer", str(cfg.min_buffer),
            # two batches ahead of the trainer at most (all collectors together: the staleness gate
            # counts the store's unconsumed groups): the CPU is shared with it
            "--max-unconsumed", str(2 * cfg.groups_per_step),
            "--capacity", str(cfg.capacity), "--diversity-norm", cfg.diversity_norm,
            "--seed", str(cfg.seed), "--collector-index", str(index), "--no-progress"]


def update_command(cfg: RunConfig) -> list[str]:
    """The trainer child's module and flags."""
    return ["training.update", "--run-dir", str(cfg.run_dir), "--groups-per-step", str(cfg.groups_per_step),
            "--lr", str(cfg.lr), "--beta", "0", "--max-staleness", "2", "--seed", str(cfg.seed),
            "--temperature", str(cfg.temperature), "--precision", cfg.precision,
            "--epochs", str(cfg.epochs), "--drop-unparseable" if cfg.drop_unparseable else "--no-drop-unparseable",
            # no activation checkpointing: a 135M model fits, and without it each group's
            # prompt runs once for its G responses (training/loss.py, prefix sharing)
            "--no-activation-checkpointing", "--quiet", "--log-json",
            *(("--steps", str(cfg.train_updates)) if cfg.train_updates else ())]


def progress(run_dir: Path, servers: list[launch.ServeProcess], timeout_s: float = 10.0) -> str:
    rewards = [row["reward_mean"] for row in logging_setup.read_metrics(run_dir, "collect", "group")
               if row.get("reward_mean") is not None]  # None: every rollout of the group failed evaluation
    updates = [row for row in _rows(RunDir(run_dir).metrics_file("update")) if row.get("kind") == "update"]
    recent = rewards[-20:]
    served = " / ".join(_served(server, timeout_s) for server in servers)  # one per server: they reload seconds apart
    return (f"groups {len(rewards):4d} | reward (last 20 groups) {sum(recent) / max(1, len(recent)):.2f} | "
            f"updates {len(updates):3d} | served {served}")


def _served(server: launch.ServeProcess, timeout_s: float) -> str:
    try:
        policy = server.policy(timeout_s)
    except httpx.HTTPError:  # the server went away (Ctrl-C reaches it too); the next check says why
        return "(server down)"
    served = str(policy["version"])
    if policy["rejected"]:  # a refused checkpoint stalls training (its groups turn stale): say so
        served += f" ({policy['rejected']} checkpoints refused, last: {policy['last_error'][:120]})"
    return served


def _rows(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except ValueError:
            continue  # a line being written right now
    return rows


def parse_config(argv: list[str] | None = None) -> RunConfig:
    parser = argparse.ArgumentParser(prog="python -m exitagent.run", description=__doc__.split("\n\n")[0])
    config.add_arguments(parser, RunConfig)
    try:
        return config.from_args(RunConfig, config.parse_args(parser, argv, "run"))
    except ConfigError as bad:
        parser.error(str(bad))


def start_server(cfg: RunConfig, index: int) -> launch.ServeProcess:
    """Server ``index`` of ``cfg.servers``. On the CPU build several servers on one machine each get
    their own cores: vLLM binds its threads to cores itself, and two engines bound to the same core
    both run at half speed (docs/scaling.md: 50 vs 60 groups/min on two cores)."""
    env = {"OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}
    cores = sorted(os.sched_getaffinity(0))
    if 1 < cfg.servers <= len(cores) and "VLLM_CPU_OMP_THREADS_BIND" not in os.environ:
        share = cores[index * len(cores) // cfg.servers:(index + 1) * len(cores) // cfg.servers]
        env = {"OMP_NUM_THREADS": str(len(share)), "VLLM_CPU_OMP_THREADS_BIND": ",".join(map(str, share))}
    port = ["--port", str(cfg.port + index)] if cfg.port else []
    return launch.start_serve(cfg.run_dir, "--kv-cache-gib", "3", "--dtype", cfg.precision, *port,
                              *cfg.serve_flags.split(), env=env, name="serve" if index == 0 else f"serve-{index}")


def resolve_precision(cfg: RunConfig) -> tuple[RunConfig, Precision]:
    """One dtype for serve and update (the canary tolerance assumes they agree), decided here from
    this machine, so the saved config and the evaluations' keys carry what actually ran."""
    chosen = choose_precision(cfg.precision, detect())
    print(f"[run] precision {chosen.dtype}: {chosen.reason}; {chosen.hardware.describe()}", flush=True)
    return dataclasses.replace(cfg, precision=chosen.dtype), chosen


def main(argv: list[str] | None = None) -> int:
    started, cfg = time.monotonic(), parse_config(argv)
    logging_setup.configure()
    cfg, chosen = resolve_precision(cfg)
    RunDir(cfg.run_dir).logs.mkdir(parents=True, exist_ok=True)
    try:  # collect, update and the report find the store by RUN/store.url: no URL on a child's command line
        store_url.pin_run_store(cfg.run_dir, cfg.store)
    except ConfigError as error:
        return fail(error)
    cfg = dataclasses.replace(cfg, store=store_url.redact(cfg.store))
    config.save(cfg, cfg.run_dir, "run")
    stop_requested = [False]
    signal.signal(signal.SIGINT, lambda *_: stop_requested.__setitem__(0, True))
    print(f"[run] run directory {cfg.run_dir}; starting {cfg.servers} server(s) (about two minutes on a CPU) ...",
          flush=True)
    servers: list[launch.ServeProcess] = []
    try:
        for index in range(cfg.servers):  # one after the other: vLLM's start-up takes every core it sees
            servers.append(start_server(cfg, index))
    except ExitAgentError as error:  # Ctrl-C reaches serve too, which then exits before it is ready
        if stop_requested[0]:
            print(f"[run] stopped while the server was starting; run the same command again to continue "
                  f"{cfg.run_dir}", flush=True)
            return ExitCode.INTERRUPTED
        return fail(error)
    finally:
        if len(servers) < cfg.servers:
            for server in servers:
                server.stop()
    try:
        base = evaluate(cfg, servers, "base")
        words = [evaluate(cfg, servers, "base", "wordproblems")] if cfg.eval_wordproblems else []
        if not stop_requested[0]:
            train(cfg, servers, stop_requested)
        if stop_requested[0]:
            print(f"[run] stopped; run the same command again to continue {cfg.run_dir}", flush=True)
            return ExitCode.INTERRUPTED
        published = checkpoints.ready_checkpoints(RunDir(cfg.run_dir).weights)
        if published:
            latest = published[-1][0]
            for server in servers:
                server.wait_for_version(f"step-{latest:06d}", timeout_s=300)
        trained = evaluate(cfg, servers, "trained")
        words += [evaluate(cfg, servers, "trained", "wordproblems")] if cfg.eval_wordproblems else []
        machine = f"{chosen.hardware.describe()}; precision {chosen.dtype} ({chosen.reason})"
        full_size = full_size_note(cfg, published[-1][1] if published else None)
        report = write_report(cfg.run_dir, base, trained, machine=machine, wall_s=time.monotonic() - started,
                              full_size=full_size, word_problems=(words[0], words[1]) if words else None)
        print(f"[run] report: {report}", flush=True)
        print(report.read_text().split("\n## ")[1], flush=True)
    except (ExitAgentError, subprocess.CalledProcessError, httpx.HTTPError) as error:
        if stop_requested[0]:  # Ctrl-C reached the server or evaluate too, mid-call
            print(f"[run] stopped; run the same command again to continue {cfg.run_dir}", flush=True)
            return ExitCode.INTERRUPTED
        if isinstance(error, ExitAgentError):
            return fail(error)
        print(f"error: {error}", file=sys.stderr)  # a child that failed, or a server that stopped answering
        return child_exit_code(error.returncode) if isinstance(error, subprocess.CalledProcessError) \
            else ExitCode.UNAVAILABLE
    finally:
        for server in servers:
            server.stop()
    return ExitCode.OK


if __name__ == "__main__":
    sys.exit(main())

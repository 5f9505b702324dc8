"""Collector throughput against the curriculum store: SQLite vs PostgreSQL, 1 and 4 collector processes.

    .venv/bin/python benchmarks/store.py [--seconds 15] [--group-size 8] [--tokens 400]

Each collector is a real process running the collector's store traffic with no model: choose a
start from a buffer view, build a group of G rollouts of ``--tokens`` tokens each, record it with
its buffer update (the curriculum's own rules, capacity 256), and a trainer-like process fetches
and consumes groups meanwhile. So groups/min here is the most the store lets collectors record,
and "store ms/group" is what the store adds to every real group (view + record, measured in the
collector). PostgreSQL is a throw-away local cluster (tests/postgres.py) with fsync on, reached
over its unix socket: a network adds its round trips. On two cores, four collectors plus the
trainer and the server oversubscribe the machine: the 4-collector figures include that contention.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script: import the repo's packages

import _machine  # noqa: E402

from exitagent.curriculum import Curriculum, CurriculumConfig, apply_update, plan_update  # noqa: E402
from exitagent.curriculum.store_url import open_store  # noqa: E402
from exitagent.log import configure  # noqa: E402
from exitagent.types import Task  # noqa: E402
from tests.store_workers import synthetic_rollouts  # noqa: E402

SCHEMA = "bench"


def collector(target: str, name: str, seconds: float, group_size: int, tokens: int) -> None:
    tasks = [Task(f"t{i}", "math", f"q{i}") for i in range(64)]
    cfg = CurriculumConfig(capacity=256, min_buffer=16, group_size=group_size)
    curriculum = Curriculum(cfg, tasks, random.Random(name))
    times: list[float] = []
    with open_store(target, schema=SCHEMA) as store:
        print("ready", flush=True)
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            began = time.perf_counter()
            with store.view() as buffer:
                start = curriculum.choose_start(buffer)
            spent = time.perf_counter() - began
            rollouts = synthetic_rollouts(start.task, name, len(times), group_size, tokens)
            group = curriculum.group(start, f"{name}-{len(times)}", rollouts[0].episode.sequences[0].version, rollouts)
            update = plan_update(cfg, start, group)
            began = time.perf_counter()
            store.record_group(group, lambda buffer, update=update: apply_update(buffer, update, cfg))
            times.append(spent + time.perf_counter() - began)
    print(json.dumps({"groups": len(times), "store_s": times}), flush=True)


def trainer(target: str, seconds: float) -> None:
    step = 0
    with open_store(target, schema=SCHEMA) as store:
        print("ready", flush=True)
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            batch = store.fetch_groups(limit=8)
            if batch:
                step += 1
                store.mark_consumed([g.id for g in batch], step)
            else:
                time.sleep(0.05)


def measure(target: str, n: int, args: argparse.Namespace) -> dict[str, float]:
    me = [sys.executable, __file__]
    common = [str(args.seconds), str(args.group_size), str(args.tokens)]
    procs = [subprocess.Popen([*me, "--worker", "collector", target, f"c{i}", *common], stdout=subprocess.PIPE,
                              text=True) for i in range(n)]
    procs.append(subprocess.Popen([*me, "--worker", "trainer", target, str(args.seconds + 2)],
                                  stdout=subprocess.PIPE, text=True))
    for p in procs:
        assert p.stdout is not None and p.stdout.readline().strip() == "ready"
    results = [json.loads(p.communicate(timeout=args.seconds + 120)[0]) for p in procs[:n]]
    procs[-1].wait(timeout=60)
    times = [t for r in results for t in r["store_s"]]
    groups = sum(r["groups"] for r in results)
    return {"groups_per_min": 60 * groups / args.seconds, "store_ms_mean": 1000 * statistics.fmean(times),
            "store_ms_p95": 1000 * statistics.quantiles(times, n=20)[-1], "groups": groups}


def main() -> int:
    if len(sys.argv) > 2 and sys.argv[1] == "--worker":
        configure(level="error")
        kind, target, *rest = sys.argv[2:]
        if kind == "collector":
            collector(target, rest[0], float(rest[1]), int(rest[2]), int(rest[3]))
        else:
            trainer(target, float(rest[0]))
        return 0
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=15.0, help="collection time per configuration")
    parser.add_argument("--group-size", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=400, help="tokens per rollout")
    args = parser.parse_args()
    configure(level="error")
    _machine.print_machine()
    from tests.postgres import Cluster

    print(f"{args.seconds:.0f} s per configuration, G={args.group_size}, {args.tokens} tokens per rollout, "
          "one trainer process consuming", flush=True)
    print(f"{'store':<11} {'collectors':>10} {'groups/min':>11} {'store ms/group':>15} {'p95 ms':>8}", flush=True)
    with tempfile.TemporaryDirectory() as tmp, Cluster.start(fsync=True) as cluster:
        for n in (1, 4):
            for name, target in (("sqlite", f"{tmp}/s{n}.sqlite"), ("postgresql", cluster.url(schema=f"bench{n}"))):
                row = measure(target, n, args)
                print(f"{name:<11} {n:>10} {row['groups_per_min']:>11.0f} {row['store_ms_mean']:>15.1f} "
                      f"{row['store_ms_p95']:>8.1f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

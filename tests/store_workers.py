"""Real processes on a curriculum store, for the concurrency and crash tests (no model: synthetic groups).

    python -m tests.store_workers collect TARGET NAME COUNT [--tokens N] [--slow | --pause-once S] [--go FILE]
    python -m tests.store_workers consume TARGET LOG [--batch B] [--until N]
    python -m tests.store_workers race TARGET NAME GO_FILE

``collect`` records COUNT groups (-1: until killed) through the real curriculum (choose a start,
plan and apply the update), ``--slow`` holds its first write transaction open after the buffer
update (a test kills it there), ``--pause-once S`` does so for S seconds once (a test cuts its
connection there). ``consume`` is the trainer's protocol without the model: fetch,
``mark_consumed`` by step N, then append "N id id ..." to LOG and fsync; on start it rolls back
consumption by steps after the last logged one (``unconsume``), as ``training.update`` does after
its last saved state. ``race`` inserts one child into a nearly full buffer, pausing between
reading the size and writing: two of them race for the last slot. Each prints ``ready`` once its
store is open, then one line per group.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import time
from pathlib import Path

from exitagent.curriculum import Curriculum, CurriculumConfig, apply_update, plan_update
from exitagent.curriculum.store import Buffer, CurriculumStore
from exitagent.curriculum.store_url import open_store
from exitagent.log import configure
from exitagent.types import (
    Episode,
    PolicyVersion,
    Rollout,
    Sample,
    Score,
    StopReason,
    Task,
    TrainingSequence,
    Turn,
)

SCHEMA = "workers"  # when TARGET is a URL without ?schema=
CAPACITY = 16


def synthetic_rollouts(task: Task, name: str, n: int, group_size: int, n_tokens: int) -> list[Rollout]:
    """Group ``n`` of collector ``name``: alternating rewards 0 and 1, distinct texts, version n // 4."""
    rollouts = []
    for i in range(group_size):
        v = PolicyVersion.at_step(n // 4)
        seq = TrainingSequence(tuple(range(n_tokens)), (1,) * n_tokens, (-0.5,) * n_tokens, v)
        sample = Sample(f"{name} {n} {i}", (), seq.tokens, seq.logprobs, "stop", v)
        episode = Episode(task, (), (Turn(sample),), StopReason.ANSWERED, (seq,))
        rollouts.append(Rollout(episode, Score(float(i % 2)), float(i % 2)))
    return rollouts


def collect(store: CurriculumStore, args: argparse.Namespace) -> None:
    tasks = [Task(f"t{i}", "math", f"q{i}") for i in range(5)]
    cfg = CurriculumConfig(capacity=CAPACITY, min_buffer=4, group_size=args.group_size)
    curriculum = Curriculum(cfg, tasks, random.Random(args.name))
    n, paused = 0, False
    while args.count < 0 or n < args.count:
        with store.view() as buffer:
            start = curriculum.choose_start(buffer)
        g = curriculum.group(start, f"{args.name}-{n}", PolicyVersion.at_step(n // 4),
                             synthetic_rollouts(start.task, args.name, n, args.group_size, args.tokens))
        update = plan_update(cfg, start, g)

        def apply(buffer: Buffer, update=update):  # type: ignore[no-untyped-def]
            nonlocal paused
            result = apply_update(buffer, update, cfg)
            if args.slow or (args.pause_once and not paused):  # children written, group not yet
                paused = True
                print("inside", flush=True)
                time.sleep(60 if args.slow else args.pause_once)
            return result

        store.record_group(g, apply)
        print("recorded", n, flush=True)
        n += 1


def consume(store: CurriculumStore, args: argparse.Namespace) -> None:
    log = Path(args.log)
    lines = log.read_text().splitlines() if log.exists() else []
    step = int(lines[-1].split()[0]) if lines else 0
    store.unconsume(step + 1)  # what a killed consumer marked but never logged is consumed again
    idle_since = time.monotonic()
    with log.open("a") as out:
        while time.monotonic() - idle_since < args.idle_s:
            batch = store.fetch_groups(limit=args.batch)
            if not batch:
                time.sleep(0.02)
                continue
            idle_since = time.monotonic()
            assert all(len(g.rollouts) == args.group_size for g in batch), [len(g.rollouts) for g in batch]
            step += 1
            store.mark_consumed([g.id for g in batch], step)
            out.write(" ".join([str(step), *(g.id for g in batch)]) + "\n")
            out.flush()
            os.fsync(out.fileno())
            print("step", step, flush=True)


def race(store: CurriculumStore, args: argparse.Namespace) -> None:
    """One group whose update inserts one low-scored child, if there is room, reading the size first."""
    from tests.test_store import _entry, group  # the contract suite's builders

    def update(buffer: Buffer) -> bool:
        room = buffer.size() < CAPACITY
        time.sleep(0.5)  # both racers have read the size before either writes, unless the store serialises
        if room:
            buffer.insert(_entry(f"race-{args.name}", score=-1.0))
        return room

    while not os.path.exists(args.go):
        time.sleep(0.002)
    print("won" if store.record_group(group(f"race-{args.name}"), update) else "lost", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    commands = parser.add_subparsers(dest="command", required=True)
    c = commands.add_parser("collect")
    c.add_argument("target")
    c.add_argument("name")
    c.add_argument("count", type=int)
    c.add_argument("--tokens", type=int, default=50)
    c.add_argument("--group-size", type=int, default=4)
    c.add_argument("--slow", action="store_true")
    c.add_argument("--pause-once", type=float, default=0.0)
    c.add_argument("--go", default="")
    k = commands.add_parser("consume")
    k.add_argument("target")
    k.add_argument("log")
    k.add_argument("--batch", type=int, default=8)
    k.add_argument("--group-size", type=int, default=4)
    k.add_argument("--idle-s", type=float, default=3.0)
    r = commands.add_parser("race")
    r.add_argument("target")
    r.add_argument("name")
    r.add_argument("go")
    args = parser.parse_args()
    configure(json_lines=True, level="warning")  # stdout is the test's channel
    store = open_store(args.target, schema=SCHEMA)
    print("ready", flush=True)
    if getattr(args, "go", ""):
        while args.command == "collect" and not os.path.exists(args.go):  # a start line, so writers overlap
            time.sleep(0.005)
    {"collect": collect, "consume": consume, "race": race}[args.command](store, args)
    store.close()


if __name__ == "__main__":
    sys.exit(main())

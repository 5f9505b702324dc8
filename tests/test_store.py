"""The SQLite curriculum store: round trips, atomicity under SIGKILL, several processes, schema checks."""

from __future__ import annotations

import os
import random
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from exitagent.curriculum import CurriculumConfig, Start, UpdateResult, apply_update, entry_key, plan_update
from exitagent.errors import StoreError
from exitagent.store import Buffer, MemoryBuffer, SQLiteStore
from exitagent.types import (
    BufferEntry,
    Episode,
    Group,
    Message,
    PolicyVersion,
    Rollout,
    Sample,
    Score,
    StepKind,
    StopReason,
    Task,
    TrainingSequence,
    Turn,
    Variant,
)

REPO = Path(__file__).resolve().parents[1]
TASK = Task("t0", "math", "What is 2 + 2?", answer=4)


def rollout(text: str, reward: float | None, n_tokens: int = 3, step: int = 1) -> Rollout:
    version = PolicyVersion.at_step(step)
    ids = tuple(range(100, 100 + n_tokens))
    logprobs = tuple(-0.001 * i - 0.125 for i in range(n_tokens))
    seqs = (
        TrainingSequence((1, 2, *ids), (0, 0, *[1] * n_tokens), (0.0, 0.0, *logprobs), version),
        TrainingSequence((9, 8), (0, 1), (0.0, -2.5), PolicyVersion.at_step(step - 1)),
    )
    sample = Sample(text, (1, 2), ids, logprobs, "stop", version)
    episode = Episode(TASK, (Message("assistant", text),), (Turn(sample),), StopReason.ANSWERED, seqs)
    score = None if reward is None else Score(reward, {"correct": reward, "format": 1.0}, detail=f"extracted {text}")
    return Rollout(episode, score, reward, diversity=0.75, failure="" if score else "evaluator crashed")


def group(group_id: str, step: int = 1, rollouts: tuple[Rollout, ...] | None = None) -> Group:
    rollouts = rollouts or (rollout("4", 1.0, step=step), rollout("5", 0.0, step=step), rollout("?", None, step=step))
    return Group(group_id, TASK.id, StepKind.BASE, Variant.EXIT, PolicyVersion.at_step(step), 0, rollouts)


def add_children(cfg: CurriculumConfig, g: Group, start: Start | None = None) -> Callable[[Buffer], UpdateResult]:
    update = plan_update(cfg, start or Start(TASK, StepKind.BASE), g)
    return lambda buffer: apply_update(buffer, update, cfg)


def test_group_round_trip(tmp_path: Path) -> None:
    g = group("g1", step=3)
    with SQLiteStore(tmp_path / "s.sqlite") as store:
        store.record_group(g, add_children(CurriculumConfig(), g))
        [got] = store.fetch_groups()
        entries = store.entries()
    assert (got.id, got.task_id, got.step_kind, got.variant, got.version) == ("g1", "t0", StepKind.BASE, Variant.EXIT,
                                                                             PolicyVersion.at_step(3))
    assert got.consumed_by_step is None and got.sampled_from is None and got.entry_id is None
    for stored, original in zip(got.rollouts, g.rollouts, strict=True):
        assert stored.sequences == original.episode.sequences  # tokens, masks, logprobs, versions exact
        assert (stored.reward, stored.text, stored.diversity, stored.failure) == (
            original.reward, original.episode.final_text, 0.75, original.failure)
    assert got.rollouts[0].components == {"correct": 1.0, "format": 1.0} and got.rollouts[0].detail == "extracted 4"
    assert got.rollouts[2].failed and not got.rollouts[0].failed
    assert sorted(e.iterate for e in entries) == ["4", "5"]  # the failed evaluation makes no entry
    assert all(e.group_id == "g1" and e.version.step == 3 for e in entries)


def test_failed_update_records_nothing(tmp_path: Path) -> None:
    g = group("g1")
    children = add_children(CurriculumConfig(), g)

    def update_then_fail(buffer: Buffer) -> None:
        children(buffer)
        raise RuntimeError("collector crashed mid-update")

    with SQLiteStore(tmp_path / "s.sqlite") as store:
        with pytest.raises(RuntimeError):
            store.record_group(g, update_then_fail)
        assert store.groups() == [] and store.entries(live=False) == []
        store.record_group(g, children)
        with pytest.raises(StoreError):  # the same group twice: refused whole, no extra entries
            store.record_group(g, lambda buffer: buffer.insert(_entry("other")))
        assert len(store.groups()) == 1 and len(store.entries()) == 2


def _entry(iterate: str, score: float = 0.1) -> BufferEntry:
    return BufferEntry(0, entry_key("t0", (), iterate), "t0", (Message("user", "hi"),), iterate, 1, 0, None,
                       PolicyVersion.at_step(0), score, 0.5, None, False, StepKind.IMPROVE)


def test_sql_buffer_behaves_like_the_memory_buffer(tmp_path: Path) -> None:
    cfg = CurriculumConfig(capacity=5, min_buffer=0)
    memory = MemoryBuffer()
    rng = random.Random(4)
    with SQLiteStore(tmp_path / "s.sqlite") as store:
        for n in range(12):
            rewards = [rng.choice([0.0, 0.5, 1.0]) for _ in range(3)]
            g = group(f"g{n}", rollouts=tuple(rollout(f"{n}-{i}-{r}", r) for i, r in enumerate(rewards)))
            store.record_group(g, add_children(cfg, g))
            add_children(cfg, g)(memory)
        with store.view() as view:
            assert view.size() == memory.size() == 5
            assert view.scores() == memory.scores()
            assert view.lowest() == memory.lowest()
            assert view.get(1) is None and memory.get(1) is None  # evicted
            with pytest.raises(StoreError):  # a view is read-only
                view.insert(_entry("x"))
        assert [e.iterate for e in store.entries()] == [memory.get(i).iterate for i, _ in memory.scores()]  # type: ignore[union-attr]
        assert len(store.entries(live=False)) > 5  # evicted entries are kept for lineage


def test_consume_staleness_and_unconsume(tmp_path: Path) -> None:
    with SQLiteStore(tmp_path / "s.sqlite") as store:
        for step in (1, 2, 3):
            store.record_group(group(f"g{step}", step=step), lambda buffer: None)
        assert [g.id for g in store.fetch_groups(min_version=2)] == ["g2", "g3"]
        assert [g.id for g in store.fetch_groups(limit=1)] == ["g1"]  # oldest first
        store.mark_consumed(["g1", "g2"], step=5)
        assert [g.id for g in store.fetch_groups()] == ["g3"]
        with pytest.raises(StoreError, match="already consumed"):
            store.mark_consumed(["g2", "g3"], step=6)
        assert [g.id for g in store.fetch_groups()] == ["g3"]  # all or nothing
        assert store.drop_stale(min_version=4, step=6) == 1 and store.fetch_groups() == []
        assert store.unconsume(6) == 1 and [g.id for g in store.fetch_groups()] == ["g3"]
        assert store.unconsume(5) == 2 and [g.id for g in store.fetch_groups()] == ["g1", "g2", "g3"]
        store.set_meta("run", '{"seed": 1}')
        assert store.get_meta("run") == '{"seed": 1}' and store.get_meta("nope") is None


def test_schema_version_checks(tmp_path: Path) -> None:
    path = tmp_path / "s.sqlite"
    SQLiteStore(path).close()
    with sqlite3.connect(path) as conn:
        conn.execute("UPDATE schema_version SET version = 99")
    with pytest.raises(StoreError, match="schema version 99, newer"):
        SQLiteStore(path)
    with sqlite3.connect(path) as conn:
        conn.execute("UPDATE schema_version SET version = 0")
    with pytest.raises(StoreError, match="no migration"):
        SQLiteStore(path)
    other = tmp_path / "other.sqlite"
    with sqlite3.connect(other) as conn:
        conn.execute("CREATE TABLE photos (id INTEGER)")
    with pytest.raises(StoreError, match="not an exitagent curriculum store"):
        SQLiteStore(other)
    garbage = tmp_path / "garbage.sqlite"
    garbage.write_bytes(b"this is not a database file" * 100)
    with pytest.raises(StoreError):
        SQLiteStore(garbage)


# --- several processes ----------------------------------------------------------------------------

WRITER = r"""
import os, random, sys, time
from exitagent.curriculum import Curriculum, CurriculumConfig, apply_update, plan_update
from exitagent.log import configure
from exitagent.store import SQLiteStore
from exitagent.types import *

configure(json_lines=True, level="warning")  # stdout is the test's channel

path, name, count, n_tokens, slow = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5] == "slow"
tasks = [Task(f"t{i}", "math", f"q{i}") for i in range(5)]
cfg = CurriculumConfig(capacity=16, min_buffer=4, group_size=4)
curriculum, store = Curriculum(cfg, tasks, random.Random(name)), SQLiteStore(path)
print("ready", flush=True)
while not os.path.exists(path + ".go"):  # a start line, so concurrent writers really overlap
    time.sleep(0.005)
n = 0
while count < 0 or n < count:
    with store.view() as buffer:
        start = curriculum.choose_start(buffer)
    rollouts = []
    for i in range(4):
        v = PolicyVersion.at_step(n // 4)
        seq = TrainingSequence(tuple(range(n_tokens)), (1,) * n_tokens, (-0.5,) * n_tokens, v)
        sample = Sample(f"{name} {n} {i}", (), seq.tokens, seq.logprobs, "stop", v)
        episode = Episode(start.task, (), (Turn(sample),), StopReason.ANSWERED, (seq,))
        rollouts.append(Rollout(episode, Score(float(i % 2)), float(i % 2)))
    g = curriculum.group(start, f"{name}-{n}", PolicyVersion.at_step(n // 4), rollouts)
    update = plan_update(cfg, start, g)

    def apply(buffer):
        result = apply_update(buffer, update, cfg)
        if slow:  # hold the transaction open, children written, group not yet: the test kills us here
            print("inside", flush=True)
            time.sleep(30)
        return result

    store.record_group(g, apply)
    print("recorded", n, flush=True)
    n += 1
"""


def writer(path: Path, name: str, count: int, n_tokens: int = 50, slow: bool = False) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.Popen(
        [sys.executable, "-c", WRITER, str(path), name, str(count), str(n_tokens), "slow" if slow else "fast"],
        stdout=subprocess.PIPE, text=True, env=env, cwd=REPO,
    )


def assert_consistent(path: Path, group_size: int = 4) -> None:
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone() == ("ok",)
        partial = conn.execute(
            "SELECT g.id FROM groups g LEFT JOIN rollouts r ON r.group_id = g.id "
            "GROUP BY g.id HAVING count(r.idx) != ?",
            (group_size,),
        ).fetchall()
        orphans = conn.execute("SELECT count(*) FROM entries WHERE group_id NOT IN (SELECT id FROM groups)").fetchone()
        live = conn.execute("SELECT count(*) FROM entries WHERE evicted IS NULL").fetchone()
    assert partial == [] and orphans == (0,) and live[0] <= 16


def test_sigkill_mid_transaction_leaves_no_partial_group(tmp_path: Path) -> None:
    path = tmp_path / "s.sqlite"
    Path(f"{path}.go").touch()
    fast = writer(path, "a", 6)
    assert fast.wait(timeout=30) == 0
    slow = writer(path, "b", -1, slow=True)
    assert slow.stdout is not None and slow.stdout.readline().strip() == "ready"
    assert slow.stdout.readline().strip() == "inside"
    os.kill(slow.pid, signal.SIGKILL)  # children inserted, group row not yet: all must vanish
    slow.wait(timeout=10)
    assert_consistent(path)
    with SQLiteStore(path) as store:
        assert [g.id for g in store.groups()] == [f"a-{n}" for n in range(6)]
        assert {e.group_id for e in store.entries(live=False)} <= {f"a-{n}" for n in range(6)}
    # Kills at arbitrary moments, with large rollouts so a kill often lands inside a write.
    for delay in (0.15, 0.4):
        big = writer(path, f"c{delay}", -1, n_tokens=20000)
        assert big.stdout is not None and big.stdout.readline().strip() == "ready"
        assert big.stdout.readline().startswith("recorded")
        time.sleep(delay)
        os.kill(big.pid, signal.SIGKILL)
        big.wait(timeout=10)
        assert_consistent(path)
    with SQLiteStore(path) as store:  # and the store still takes writes
        store.record_group(group("after"), lambda buffer: None)


def test_concurrent_writers_trainer_and_viewer(tmp_path: Path) -> None:
    path = tmp_path / "s.sqlite"
    SQLiteStore(path).close()
    writers = [writer(path, name, 40) for name in ("w1", "w2")]
    assert all(w.stdout is not None and w.stdout.readline().strip() == "ready" for w in writers)
    Path(f"{path}.go").touch()
    consumed: list[str] = []
    step = 0
    with SQLiteStore(path) as store:
        while True:
            done = all(w.poll() is not None for w in writers)
            batch = store.fetch_groups(limit=8)
            if batch:
                step += 1
                store.mark_consumed([g.id for g in batch], step)
                consumed += [g.id for g in batch]
                assert all(len(g.rollouts) == 4 for g in batch)
            assert len(store.entries()) <= 16  # the viewer's read sees a consistent buffer
            if done and not batch:
                break
            time.sleep(0.01)
        groups = store.groups()
    assert [w.returncode for w in writers] == [0, 0]
    assert sorted(consumed) == sorted(f"{w}-{n}" for w in ("w1", "w2") for n in range(40))
    assert all(g.consumed_by_step is not None for g in groups) and len(groups) == 80
    # (How the two writers' transactions interleave depends on the machine's load, so it is not
    # asserted; that both finished with every group whole and consumed once is.)
    assert step > 1
    assert_consistent(path)

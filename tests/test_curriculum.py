"""The ExIt curriculum rules (exit-spec.md sections 2, 3, 6), one test per rule, over real buffers."""

from __future__ import annotations

import json
import math
import random
from dataclasses import replace
from pathlib import Path

import pytest

from exitagent import curriculum as cur
from exitagent.curriculum import Curriculum, CurriculumConfig, Start
from exitagent.curriculum.__main__ import main as show_main
from exitagent.curriculum.store import MemoryBuffer, SQLiteStore
from exitagent.curriculum.view import summarize
from exitagent.errors import ConfigError
from exitagent.log import read_metrics
from exitagent.types import (
    BufferEntry,
    Episode,
    Message,
    PolicyVersion,
    Rollout,
    Sample,
    Score,
    StepKind,
    StopReason,
    Task,
    ToolCall,
    TrainingSequence,
    Turn,
    Variant,
)

TASKS = [Task(f"t{i}", "math", f"What is {i} + {i}?", answer=2 * i) for i in range(4)]
V1 = PolicyVersion.at_step(1)


def rollout(text: str, reward: float | None, *, errored: bool = False) -> Rollout:
    sample = Sample(text, (5, 6), (7, 8), (-0.1, -0.2), "stop", V1)
    seq = TrainingSequence((5, 6, 7, 8), (0, 0, 1, 1), (0.0, 0.0, -0.1, -0.2), V1)
    episode = Episode(TASKS[0], (Message("assistant", text),), (Turn(sample),), StopReason.ANSWERED, (seq,))
    score = None if reward is None else Score(reward, {"errored": 1.0} if errored else {})
    return Rollout(episode, score, reward, failure="" if score else "evaluator timed out")


def entry(task_id: str = "t0", iterate: str = "x", score: float = 0.1, **fields: object) -> BufferEntry:
    base = BufferEntry(
        id=0, key=cur.entry_key(task_id, (), iterate), task_id=task_id, prefix=(), iterate=iterate, depth=0,
        start_turn=0, parent_id=None, version=PolicyVersion.at_step(0), score=score, reward=0.0, prev_reward=None,
        errored=False, step_kind=StepKind.BASE,
    )
    return replace(base, **fields)  # type: ignore[arg-type]


def filled(n: int, scores: list[float] | None = None) -> MemoryBuffer:
    buffer = MemoryBuffer()
    for i in range(n):
        buffer.insert(entry(iterate=f"answer {i}", score=scores[i] if scores else 0.1))
    return buffer


def config(variant: Variant = Variant.EXIT, **overrides: object) -> CurriculumConfig:
    values: dict[str, object] = {"capacity": 8, "min_buffer": 2, "p_buffer": 1.0, "p_diverge": 0.5}
    return CurriculumConfig(variant=variant, **{**values, **overrides})  # type: ignore[arg-type]


def starts(cfg: CurriculumConfig, buffer: MemoryBuffer, n: int, seed: int = 0) -> list[Start]:
    curriculum = Curriculum(cfg, TASKS, random.Random(seed))
    return [curriculum.choose_start(buffer) for _ in range(n)]


def within(observed: int, n: int, p: float, sigmas: float = 4.0) -> bool:
    return abs(observed - n * p) <= sigmas * math.sqrt(n * p * (1 - p)) + 1


# --- choosing a start -----------------------------------------------------------------------------


def test_sampling_follows_softmax_of_kappa_times_score() -> None:
    scores = [0.0, 0.05, 0.15, 0.25]
    buffer, rng, n = filled(4, scores), random.Random(1), 20000
    counts = [0] * 4
    for _ in range(n):
        sampled = cur.sample_entry(buffer, 10.0, rng)
        assert sampled is not None
        counts[sampled.id - 1] += 1
    expected = cur.softmax(scores, 10.0)
    assert expected[3] / expected[0] == pytest.approx(math.exp(2.5))
    assert all(within(c, n, p) for c, p in zip(counts, expected, strict=True)), (counts, expected)
    assert buffer.size() == 4  # sampled entries stay


def test_buffer_is_gated_by_b_min() -> None:
    below = starts(config(min_buffer=3), filled(2), 200)
    assert all(s.step_kind is StepKind.BASE and s.entry is None for s in below)
    at = starts(config(min_buffer=3), filled(3), 200)
    assert all(s.entry is not None for s in at)  # p_buffer = 1


def test_base_tasks_are_uniform() -> None:
    picked = [s.task.id for s in starts(config(), MemoryBuffer(), 4000)]
    assert all(within(picked.count(t.id), 4000, 0.25) for t in TASKS)


def test_p_buffer_frequency() -> None:
    chosen = starts(config(p_buffer=0.3), filled(4), 4000)
    assert within(sum(s.entry is not None for s in chosen), 4000, 0.3)


def test_p_diverge_frequency_and_one_kind_per_group() -> None:
    chosen = starts(config(p_diverge=0.2), filled(4), 4000)
    assert {s.step_kind for s in chosen} == {StepKind.IMPROVE, StepKind.DIVERGE}
    assert within(sum(s.step_kind is StepKind.DIVERGE for s in chosen), 4000, 0.2)


def test_variant_switch() -> None:
    buffer = filled(4)
    kinds = {v: {s.step_kind for s in starts(config(v), buffer, 300)} for v in Variant}
    assert kinds[Variant.GRPO] == {StepKind.BASE}
    assert kinds[Variant.CURRICULUM] == {StepKind.REPLAY}
    assert kinds[Variant.IMPROVE] == {StepKind.IMPROVE}
    assert kinds[Variant.DIVERGE] == kinds[Variant.EXIT] == {StepKind.IMPROVE, StepKind.DIVERGE}
    assert [v for v in Variant if config(v).diversity_bonus] == [Variant.EXIT]


def test_errored_iterate_gets_a_debug_step() -> None:
    buffer = MemoryBuffer()
    buffer.insert(entry(errored=True))
    buffer.insert(entry(iterate="y", errored=True))
    kinds = {s.step_kind for s in starts(config(p_diverge=0.5), buffer, 200)}
    assert kinds == {StepKind.DEBUG, StepKind.DIVERGE}


def test_start_depth_and_prompts() -> None:
    deep = entry(iterate="I think it is 5.", depth=2, start_turn=0)
    improve, diverge = Start(TASKS[1], StepKind.IMPROVE, deep), Start(TASKS[1], StepKind.DIVERGE, deep)
    replay = Start(TASKS[1], StepKind.REPLAY, deep)
    assert (improve.depth, diverge.depth, replay.depth, Start(TASKS[1], StepKind.BASE).depth) == (3, 3, 0, 0)
    text = improve.messages()[-1].content
    assert text.index("## Request:\nWhat is 1 + 1?") < text.index("## Current response:\nI think it is 5.")
    assert "SIGNIFICANTLY DIFFERS" not in text
    text = diverge.messages()[-1].content
    assert "SIGNIFICANTLY DIFFERS" in text and "## Current response:" in text
    assert text.index("(1)") < text.index("(2)") < text.index("(3)")
    assert replay.messages() == (Message("user", "What is 1 + 1?"),)  # no iteration prompt


def test_config_presets() -> None:
    math_cfg = CurriculumConfig.for_domain("math")
    assert (math_cfg.capacity, math_cfg.min_buffer, math_cfg.p_buffer, math_cfg.p_diverge) == (512, 128, 0.5, 0.2)
    assert math_cfg.kappa == 10.0 and math_cfg.group_size == 8
    tool = CurriculumConfig.for_domain("tool_use", Variant.DIVERGE)
    assert (tool.capacity, tool.min_buffer, tool.p_buffer, tool.p_diverge) == (640, 320, 0.5, 0.5)
    assert CurriculumConfig.for_domain("tool_use", Variant.CURRICULUM).p_buffer == 0.2
    assert CurriculumConfig.for_domain("math", Variant.CURRICULUM).p_buffer == 0.5
    mle = CurriculumConfig.for_domain("mle", kappa=3.0)
    assert (mle.capacity, mle.min_buffer, mle.kappa) == (24, 3, 3.0)
    with pytest.raises(ConfigError):
        CurriculumConfig.for_domain("chess")
    with pytest.raises(ConfigError):
        CurriculumConfig(p_buffer=1.5)


# --- updating the buffer --------------------------------------------------------------------------


def record(cfg: CurriculumConfig, buffer: MemoryBuffer, start: Start, rollouts: list[Rollout]) -> cur.UpdateResult:
    group = Curriculum(cfg, TASKS, random.Random(0)).group(start, "g", V1, rollouts)
    return cur.apply_update(buffer, cur.plan_update(cfg, start, group), cfg)


def test_group_score_is_population_variance_of_scored_rewards() -> None:
    assert cur.group_score([1, 0, 1, 0]) == pytest.approx(0.25)
    assert cur.group_score([1, 1, 1]) == 0.0 and cur.group_score([0.7]) == 0.0
    result = record(config(), MemoryBuffer(), Start(TASKS[0], StepKind.BASE), [
        rollout("a", 1.0), rollout("b", 0.0), rollout("c", None),  # the failed evaluation is left out
    ])
    assert result.score == pytest.approx(0.25) and len(result.inserted) == 2


def test_children_inherit_score_and_lineage() -> None:
    buffer = MemoryBuffer()
    parent_id = buffer.insert(entry(iterate="4", depth=1, reward=0.0, score=0.0))
    start = Start(TASKS[0], StepKind.IMPROVE, buffer.get(parent_id))
    result = record(config(), buffer, start, [rollout("2", 1.0), rollout("3", 0.0, errored=True)])
    assert result.refreshed and buffer.get(parent_id).score == pytest.approx(0.25)  # type: ignore[union-attr]
    children = [buffer.get(i) for i in result.inserted]
    assert [c.iterate for c in children if c] == ["2", "3"]
    for child, reward, errored in zip(children, [1.0, 0.0], [False, True], strict=True):
        assert child is not None
        assert (child.score, child.depth, child.parent_id, child.prev_reward) == (0.25, 2, parent_id, 0.0)
        assert (child.reward, child.errored, child.version, child.step_kind) == (reward, errored, V1, StepKind.IMPROVE)


def test_dedup_by_exact_text() -> None:
    buffer = MemoryBuffer()
    buffer.insert(entry(iterate="42"))
    start = Start(TASKS[0], StepKind.BASE)
    result = record(config(), buffer, start, [rollout("42", 1.0), rollout("41", 0.0), rollout("41", 0.0)])
    assert (len(result.inserted), result.duplicates) == (1, 2)
    result = record(config(dedup=False), buffer, start, [rollout("41", 1.0), rollout("41", 0.0)])
    assert len(result.inserted) == 2


def test_capacity_replaces_lowest_only_when_not_lower() -> None:
    cfg, base = config(capacity=3), Start(TASKS[0], StepKind.BASE)
    buffer = filled(3, [0.1, 0.2, 0.3])
    low = record(cfg, buffer, base, [rollout("a", 0.9), rollout("b", 0.5)])  # S = 0.04 < 0.1
    assert (low.dropped, low.inserted, low.evicted, buffer.size()) == (2, (), (), 3)
    high = record(cfg, buffer, base, [rollout("c", 0.0), rollout("d", 1.0)])  # S = 0.25
    assert high.evicted == (1, 2) and len(high.inserted) == 2
    assert sorted(s for _, s in buffer.scores()) == [0.25, 0.25, 0.3]
    tie_score = cur.group_score([0.0, 0.3])
    buffer = filled(3, [tie_score, 0.2, 0.3])
    tie = record(cfg, buffer, base, [rollout("e", 0.0), rollout("f", 0.3)])
    assert tie.evicted[0] == 1 and len(tie.inserted) == 2 and tie.dropped == 0  # ">=": a tie replaces


def test_replay_refreshes_the_start_and_keys_it_without_the_iterate() -> None:
    buffer = MemoryBuffer()
    cfg = config(Variant.CURRICULUM)
    base = record(cfg, buffer, Start(TASKS[0], StepKind.BASE), [rollout("1", 1.0), rollout("0", 0.0)])
    assert len(base.inserted) == 1 and base.duplicates == 1  # one start per (task, prefix)
    start_entry = buffer.get(base.inserted[0])
    replay = record(cfg, buffer, Start(TASKS[0], StepKind.REPLAY, start_entry), [rollout("1", 1.0), rollout("2", 1.0)])
    assert replay.refreshed and replay.inserted == () and buffer.get(base.inserted[0]).score == 0.0  # type: ignore[union-attr]


def test_grpo_leaves_the_buffer_alone() -> None:
    buffer = MemoryBuffer()
    start = Start(TASKS[0], StepKind.BASE)
    result = record(config(Variant.GRPO), buffer, start, [rollout("1", 1.0), rollout("0", 0.0)])
    assert result.score == pytest.approx(0.25) and buffer.size() == 0


def test_multi_turn_every_turn_prefix_becomes_an_entry() -> None:
    call = ToolCall("ls", {"path": "/"}, "c1", raw='{"name": "ls"}')
    turn0 = (Message("assistant", "", tool_calls=(call,)), Message("tool", "a b", tool_call_id="c1"))
    parent = entry(iterate="cd /tmp", prefix=turn0, start_turn=1, depth=0)
    buffer = MemoryBuffer()
    start = Start(TASKS[0], StepKind.IMPROVE, buffer.get(buffer.insert(parent)))
    assert start.messages()[1:3] == turn0 and "## Current response:\ncd /tmp" in start.messages()[-1].content
    history = (*turn0, Message("assistant", "cd /home"), Message("tool", "ok"), Message("assistant", "done"))
    cfg = config()
    group = Curriculum(cfg, TASKS, random.Random(0)).group(start, "g", V1, [rollout("done", 1.0), rollout("x", 0.0)])
    update = cur.plan_update(cfg, start, group, histories=[history, (*turn0, Message("assistant", "x"))])
    got = [(c.start_turn, c.depth, c.iterate, len(c.prefix)) for c in update.children]
    assert got == [(1, 1, "cd /home", 2), (2, 0, "done", 4), (1, 1, "x", 2)]
    assert cur.split_turns(turn0)[0][1] == '{"name": "ls"}'  # a tool call is part of the iterate text


def test_record_through_sqlite_store(tmp_path: Path) -> None:
    cfg = config(min_buffer=1)
    curriculum = Curriculum(cfg, TASKS, random.Random(3))
    with SQLiteStore.in_run(tmp_path) as store:
        for n in range(6):
            with store.view() as buffer:
                start = curriculum.choose_start(buffer)
            rollouts = [rollout(f"{n}-{i}", float(i % 2)) for i in range(4)]
            curriculum.record(store, start, curriculum.group(start, f"g{n}", V1, rollouts))
        groups, entries = store.groups(), store.entries()
    assert len(groups) == 6 and groups[0].step_kind is StepKind.BASE and groups[0].entry_id is None
    assert any(g.entry_id is not None for g in groups) and len(entries) == cfg.capacity
    summary = summarize(entries, groups)
    assert summary.size == cfg.capacity and sum(n for *_, n in summary.score_histogram) == cfg.capacity
    assert summary.groups_from_buffer == sum(summary.sampled_from.values()) > 0


def test_show_prints_and_plots(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert show_main(["show", str(tmp_path)]) == 2  # no store: says so, creates nothing
    assert not (tmp_path / "store.sqlite").exists()
    test_record_through_sqlite_store(tmp_path)
    capsys.readouterr()
    assert show_main(["show", str(tmp_path), "--plot", str(tmp_path / "c.png")]) == 0
    out = capsys.readouterr().out
    assert "buffer size: 8" in out and "sampled from iteration: 1:" in out and "step kinds:" in out
    assert (tmp_path / "c.png").stat().st_size > 1000


def test_show_merges_the_metrics_of_every_collector(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    test_record_through_sqlite_store(tmp_path)
    folder = tmp_path / "metrics"
    folder.mkdir(exist_ok=True)

    def rows(name: str, *values: tuple[float, str, int]) -> None:
        lines = [json.dumps({"time": t, "kind": "group", "server": s, "version_skew": k}) for t, s, k in values]
        (folder / name).write_text("\n".join(lines) + "\n")

    rows("collect.jsonl", (1.0, "http://a/v1", 0))  # an earlier version's single file
    rows("collect-node1-11.jsonl", (2.0, "http://a/v1", 0), (5.0, "http://b/v1", 2))
    rows("collect-node2-12.jsonl", (3.0, "http://b/v1", 1))
    with (folder / "collect-node2-12.jsonl").open("a") as torn:
        torn.write('{"time": 4.0, "kind": "gr')  # a collector killed mid-line
    merged = read_metrics(tmp_path, "collect", "group")
    assert [r["time"] for r in merged] == [1.0, 2.0, 3.0, 5.0]
    capsys.readouterr()
    assert show_main(["show", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "collectors: 3 (collect: 1  collect-node1-11: 2  collect-node2-12: 1)" in out
    assert "servers: 2 (http://a/v1: 2  http://b/v1: 2)" in out
    assert "version skew between servers: max 2, mean 0.75, last 2" in out

"""The variants table: mean and spread over seeds; one base measurement per seed, reused by later
variants of that seed only when it measured the same thing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from exitagent.run import BASE_POLICY, evaluation_key, parse_config, resolve_precision
from exitagent.types import Variant
from exitagent.variants import reuse_base_evaluation, summarise, write_table


def fake_run(root: Path, variant: Variant, seed: int, base: list[float], trained: list[float],
             *flags: str) -> Path:
    """A finished run's evaluations, as ``exitagent.run`` with ``flags`` leaves them."""
    directory = root / f"{variant.value}-s{seed}"
    cfg, _ = resolve_precision(  # as run does: its evaluations record the dtype "auto" resolved to
        parse_config(["--run-dir", str(directory), "--variant", variant.value, "--seed", str(seed), *flags]))
    (directory / "eval").mkdir(parents=True)
    for name, curve, policy in (("base", base, BASE_POLICY), ("trained", trained, "step-000003")):
        result = {"accuracy_by_step": curve, "delta_k": curve[-1] - curve[0], "measured": evaluation_key(cfg, policy)}
        (directory / "eval" / f"{name}.json").write_text(json.dumps(result))
    return directory


def test_mean_and_spread_over_seeds_and_one_base_per_seed(tmp_path: Path) -> None:
    runs = {
        Variant.GRPO: [fake_run(tmp_path, Variant.GRPO, 0, [0.3, 0.2], [0.4, 0.4]),
                       fake_run(tmp_path, Variant.GRPO, 1, [0.5, 0.4], [0.6, 0.5])],
        Variant.EXIT: [fake_run(tmp_path, Variant.EXIT, 0, [0.3, 0.2], [0.4, 0.6]),
                       fake_run(tmp_path, Variant.EXIT, 1, [0.5, 0.4], [0.5, 0.7])],
    }
    table = summarise(runs)
    assert table["base"]["seeds"] == 2 and table["base"]["curve"] == pytest.approx([0.4, 0.3])
    grpo, exit_ = table["variants"]["grpo"], table["variants"]["exit"]
    assert grpo["accuracy_after_k"] == pytest.approx((0.45, 0.05))
    assert grpo["delta_k"] == pytest.approx((-0.05, 0.05))
    assert exit_["delta_k"] == pytest.approx((0.2, 0.0))
    text = write_table(tmp_path, table).read_text()
    assert "| full ExIt | 2 | 65.0 ± 5.0 | +20.0 ± 0.0 |" in text
    assert (tmp_path / "curves.png").stat().st_size > 0


def test_a_later_variant_reuses_the_base_evaluation_of_its_seed_only_when_it_is_the_same(tmp_path: Path) -> None:
    fake_run(tmp_path, Variant.GRPO, 0, [0.3, 0.2], [0.4, 0.4])

    def reused(variant: str, *flags: str) -> bool:
        cfg = parse_config(["--run-dir", str(tmp_path / f"{variant}-s0"), "--variant", variant, "--seed", "0", *flags])
        return reuse_base_evaluation(tmp_path, cfg) is not None

    # the variant and the training budget do not change what the base evaluation measures
    assert reused("exit", "--train-minutes", "3")
    copied = json.loads((tmp_path / "exit-s0" / "eval" / "base.json").read_text())
    assert copied["accuracy_by_step"] == [0.3, 0.2]
    assert not reused("exit")  # it has one now: kept, not copied again
    # other evaluation flags, or another seed, measure something else: evaluated afresh
    assert not reused("improve", "--eval-tasks", "50")
    assert not reused("diverge", "--max-tokens", "32")
    other_seed = parse_config(["--run-dir", str(tmp_path / "exit-s1"), "--variant", "exit", "--seed", "1"])
    assert reuse_base_evaluation(tmp_path, other_seed) is None
    assert not (tmp_path / "improve-s0" / "eval" / "base.json").exists()
    assert not (tmp_path / "exit-s1" / "eval").exists()


def test_an_evaluation_without_its_key_is_not_reused(tmp_path: Path) -> None:
    old = fake_run(tmp_path, Variant.GRPO, 0, [0.3, 0.2], [0.4, 0.4])
    saved = json.loads((old / "eval" / "base.json").read_text())
    del saved["measured"]  # written before evaluations carried what they measured
    (old / "eval" / "base.json").write_text(json.dumps(saved))
    cfg = parse_config(["--run-dir", str(tmp_path / "exit-s0"), "--variant", "exit", "--seed", "0"])
    assert reuse_base_evaluation(tmp_path, cfg) is None


def test_intervals_over_seeds_and_tasks_in_the_table(tmp_path: Path) -> None:
    """From the per-task scores each evaluation keeps: seeds resampled, then tasks (exitagent.stats)."""
    runs = {Variant.EXIT: [fake_run(tmp_path, Variant.EXIT, s, [0.5, 0.5], [0.5, 0.75]) for s in (0, 1)]}
    for directory in runs[Variant.EXIT]:
        for name, last in (("base", 0.0), ("trained", 1.0)):
            path = directory / "eval" / f"{name}.json"
            saved = json.loads(path.read_text())
            saved["per_task"] = [{"scores": [[0.0, last], [1.0, 1.0]]}, {"scores": [[1.0, 1.0], [0.0, 0.0]]}] * 2
            path.write_text(json.dumps(saved))
    table = summarise(runs)
    bands = table["variants"]["exit"]["intervals"]
    assert bands["seeds"] == 2 and bands["tasks"] == 8
    assert bands["delta_k"]["estimate"] == pytest.approx(0.25) and bands["delta_k"]["low"] <= 0.25
    text = write_table(tmp_path, table).read_text()
    assert "| full ExIt | 2 | 75.0 ± 0.0 | +25.0 ± 0.0 | 75.0 [" in text  # the spread, then the intervals
    assert "seeds resampled, then tasks" in text


def test_variants_evaluate_with_the_papers_protocol_unless_told_otherwise() -> None:
    from exitagent.evaluate import FULL_SIZE_TASKS
    from exitagent.variants import protocol_flags

    flags = protocol_flags(["--temperature", "1.0"])
    assert flags == ["--eval-samples", "8", "--eval-steps", "16", "--eval-temperature", "1.0",
                     "--eval-tasks", str(FULL_SIZE_TASKS)]  # sampled at the runs' own training temperature
    # the user's flags come after, so they win
    cfg = parse_config(["--run-dir", "r", *flags, "--eval-tasks", "3"])
    assert (cfg.eval_tasks, cfg.eval_samples, cfg.eval_temperature) == (3, 8, 1.0)

"""The variants table: mean and spread over seeds; one base measurement per seed, reused by later
variants of that seed only when it measured the same thing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from exitagent.log import MetricsFile
from exitagent.run import parse_config, resolve_precision
from exitagent.run_dir import RunDir
from exitagent.run_eval import BASE_POLICY, evaluation_key
from exitagent.types import Variant
from exitagent.variants import ORDER, reuse_base_evaluation, run_args, summarise, write_table


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
    assert row(text, "full ExIt").startswith("| full ExIt | 2 | 65.0 ± 5.0 | +20.0 ± 0.0 |")
    assert row(text, "full ExIt").endswith("| 0 | 0 | 0 | 0.0 |")  # its intervals in between
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


def row(table: str, name: str) -> str:
    """The table's line for ``name``."""
    return next(line for line in table.splitlines() if line.startswith(f"| {name} |"))


def spend(directory: Path, updates: int, *, groups_per_update: int = 8, tokens_per_group: int = 100,
          minutes: float = 10.0, truncated: int = 1) -> None:
    """The metrics a run's collect and update leave: ``updates`` updates over full batches."""
    collect, update = (MetricsFile(RunDir(directory).metrics_file(name)) for name in ("collect-host-1", "update"))
    for i in range(updates * groups_per_update):
        collect.write("group", group_id=f"g{i}", step_kind="improve" if i % 2 else "base",
                      completion_tokens=tokens_per_group, rollouts=8, truncated=truncated if i % 2 else 0)
    for step in range(1, updates + 1):
        update.write("update", step=step, groups=float(groups_per_update))
    update.write("no_signal", step=updates, groups=float(groups_per_update))
    collect.close()
    update.close()
    RunDir(directory).train_clock.write_text(json.dumps({"seconds": 60 * minutes}))


def test_every_variant_gets_the_same_seed_and_update_budget() -> None:
    """What variants hands each run differs only in the variant and the run dir."""
    passthrough = ["--train-updates", "40", "--train-minutes", "60", "--lr", "1e-5"]
    configs = [parse_config(run_args(Path(f"out/{v.value}-s3"), v, 3, passthrough)) for v in ORDER]
    assert {(c.seed, c.train_updates, c.train_minutes, c.lr) for c in configs} == {(3, 40, 60.0, 1e-5)}
    assert [c.variant for c in configs] == ORDER


def test_the_table_states_each_variants_budget_and_flags_unequal_updates(tmp_path: Path) -> None:
    grpo = fake_run(tmp_path, Variant.GRPO, 0, [0.3, 0.2], [0.4, 0.4])
    exit_ = fake_run(tmp_path, Variant.EXIT, 0, [0.3, 0.2], [0.4, 0.6])
    spend(grpo, 5, minutes=10.0)
    spend(exit_, 5, tokens_per_group=150, minutes=14.0)
    table = summarise({Variant.GRPO: [grpo], Variant.EXIT: [exit_]})
    assert table["equal_updates"]
    # 5 updates + one batch with no signal, 8 groups each; 40 groups collected
    assert table["variants"]["exit"]["budget"] == {"updates": 5, "groups_collected": 40, "groups_trained": 48,
                                                   "tokens_generated": 6000, "minutes": 14.0}
    text = write_table(tmp_path, table).read_text()
    assert row(text, "GRPO").startswith("| GRPO | 1 | 40.0 ± 0.0 | +0.0 ± 0.0 |")
    assert row(text, "GRPO").endswith("| 5 | 48 | 4000 | 10.0 |")
    assert "the same number of trainer updates" in text and "Unequal" not in text
    spend(exit_, 2)  # the wall-clock cap stopped a run early: its metrics now hold 7 updates
    table = summarise({Variant.GRPO: [grpo], Variant.EXIT: [exit_]})
    assert not table["equal_updates"]
    assert "Unequal budgets" in write_table(tmp_path, table).read_text()


def test_truncation_is_reported_per_step_kind(tmp_path: Path) -> None:
    from exitagent.budget import spent

    spend(tmp_path, 2, truncated=4)  # 8 improve groups of 8 responses, 4 cut each; base groups never cut
    assert spent(tmp_path)["truncation_by_step_kind"] == {"base": 0.0, "improve": 0.5}


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

"""exitagent.run's defaults per domain: the trainer's come from the paper's table (curriculum/paper.py):
tool use trains 2 epochs per batch with the overlong filter, math 1 epoch without it; flags win.
Math's levels and arithmetic reach math's children only: another domain trains and is evaluated on
its own tasks. Checked on the children's command lines, parsed by their own parsers."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from exitagent import config, run, run_config, run_eval, variants
from exitagent.collect import CollectConfig
from exitagent.curriculum.paper import paper_values
from exitagent.evaluate import EvalConfig
from exitagent.types import Variant
from tests.user_env import write_module
from training.config import UpdateConfig


def trainer(flags: list[str], tmp_path: Path) -> UpdateConfig:
    """The UpdateConfig the main job's trainer child would build from its command line."""
    command = run.update_command(run.parse_config(["--run-dir", str(tmp_path), *flags]))
    assert command[0] == "training.update"
    parser = argparse.ArgumentParser()
    config.add_arguments(parser, UpdateConfig)
    return config.from_args(UpdateConfig, parser.parse_args(command[1:]))


def test_tool_use_trains_two_epochs_with_the_overlong_filter(tmp_path: Path) -> None:
    update = trainer(["--domain", "tool_use"], tmp_path)
    row = paper_values("tool_use")
    assert (update.epochs, update.drop_unparseable) == (row.epochs, row.drop_unparseable) == (2, True)


def test_math_defaults_are_unchanged(tmp_path: Path) -> None:
    assert (trainer([], tmp_path).epochs, trainer([], tmp_path).drop_unparseable) == (1, False)
    assert (trainer(["--domain", "math"], tmp_path).epochs, paper_values("math").epochs) == (1, 1)


@pytest.mark.parametrize("flags, expected", [
    (["--domain", "tool_use", "--epochs", "1", "--no-drop-unparseable"], (1, False)),
    (["--domain", "tool_use", "--epochs", "3"], (3, True)),
    (["--epochs", "2", "--drop-unparseable"], (2, True)),
])
def test_explicit_flags_win(flags: list[str], expected: tuple[int, bool], tmp_path: Path) -> None:
    update = trainer(flags, tmp_path)
    assert (update.epochs, update.drop_unparseable) == expected


def test_a_variants_run_gets_them_and_the_saved_config_shows_what_ran(tmp_path: Path) -> None:
    args = variants.run_args(tmp_path, Variant.GRPO, 1, ["--domain", "tool_use"])
    cfg = run.parse_config(args)
    assert (cfg.epochs, cfg.drop_unparseable) == (2, True)
    saved = json.loads(config.to_json(cfg))
    assert (saved["epochs"], saved["drop_unparseable"]) == (2, True)  # resolved, not null


def test_a_domain_of_your_own_gets_one_epoch_and_no_filter(tmp_path: Path) -> None:
    cfg = run.parse_config(["--run-dir", str(tmp_path), "--domain", "mypackage.envs:NOTES"])
    assert (cfg.epochs, cfg.drop_unparseable) == (1, False)


def test_zero_epochs_is_a_usage_error(tmp_path: Path) -> None:
    with pytest.raises(SystemExit) as exit_info:
        run.parse_config(["--run-dir", str(tmp_path), "--epochs", "0"])
    assert exit_info.value.code == 2


def collector(flags: list[str], tmp_path: Path) -> CollectConfig:
    """The CollectConfig the main job's first collector would build from its command line."""
    command = run.collect_command(run.parse_config(["--run-dir", str(tmp_path), *flags]),
                                  ["--base-url", "http://127.0.0.1:9/v1"], 0)
    assert command[0] == "exitagent.collect"
    parser = argparse.ArgumentParser()
    config.add_arguments(parser, CollectConfig)
    return config.from_args(CollectConfig, parser.parse_args(command[1:]))


def test_the_chains_control_reaches_the_depth_the_run_evaluates_at(tmp_path: Path) -> None:
    chains = collector(["--variant", "chains", "--eval-steps", "3"], tmp_path)
    assert (chains.variant, chains.chain_max_depth) == (Variant.CHAINS, 3)
    full = collector(["--eval-steps", "3", "--seed", "5"], tmp_path)
    assert full.variant is Variant.EXIT and full.seed == 5 and full.chain_max_depth != 3  # collect's own default


def evaluation(flags: list[str], tmp_path: Path, source: str | None = None) -> EvalConfig:
    """The EvalConfig the main job's evaluation child would build for held-out ``source``."""
    args = run_eval.evaluate_args(run.parse_config(["--run-dir", str(tmp_path), *flags]), source)
    parser = argparse.ArgumentParser()
    config.add_arguments(parser, EvalConfig)
    return config.from_args(EvalConfig, parser.parse_args([*args, "--out", "-"]))


def test_math_keeps_its_levels_and_arithmetic(tmp_path: Path) -> None:
    assert collector([], tmp_path).task_source == evaluation([], tmp_path).source == "arithmetic"
    assert collector([], tmp_path).levels == evaluation([], tmp_path).levels == run_config.MATH_LEVELS
    words = evaluation(["--eval-wordproblems"], tmp_path, "wordproblems")
    assert (words.source, words.levels) == ("wordproblems", "")


@pytest.mark.parametrize("domain, source", [("tool_use", "bfcl"), ("mle", "offline"), ("user", "")])
def test_another_domain_trains_and_is_evaluated_on_its_own_tasks(domain: str, source: str, tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """No arithmetic levels or source reach another domain's children: each gets its domain's default
    (an environment's tasks have one source)."""
    if domain == "user":  # an environment in a module outside the package
        monkeypatch.syspath_prepend(str(tmp_path))
        domain = write_module(tmp_path)
    for child in (collector(["--domain", domain], tmp_path), evaluation(["--domain", domain], tmp_path)):
        assert child.domain == domain and child.levels == ""
        assert getattr(child, "task_source", getattr(child, "source", None)) == source


def test_word_problems_are_math_only(tmp_path: Path) -> None:
    with pytest.raises(SystemExit) as exit_info:
        run.parse_config(["--run-dir", str(tmp_path), "--domain", "tool_use", "--eval-wordproblems"])
    assert exit_info.value.code == 2

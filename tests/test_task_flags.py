"""collect and evaluate spell the task flags alike (--source, --split, --n-tasks) and still accept
each other's old spelling (--task-source, --task-split, --num-tasks), on the command line and in
the help, with the config fields (and so the saved JSON and recipe keys) unchanged."""

from __future__ import annotations

import argparse

import pytest

from exitagent.collect import CollectConfig
from exitagent.config import add_arguments, from_args
from exitagent.evaluate import EvalConfig

CASES = [(CollectConfig, ("task_source", "task_split", "num_tasks")), (EvalConfig, ("source", "split", "n_tasks"))]
REQUIRED = {CollectConfig: ["--run-dir", "runs/x"], EvalConfig: ["--out", "eval/x.json"]}


def _parse(config_type: type, argv: list[str]) -> object:
    parser = argparse.ArgumentParser(exit_on_error=False)
    add_arguments(parser, config_type)
    return from_args(config_type, parser.parse_args([*REQUIRED[config_type], *argv]))


SPELLINGS = [("--source", "--split", "--n-tasks"), ("--task-source", "--task-split", "--num-tasks")]


@pytest.mark.parametrize(("config_type", "fields"), CASES)
@pytest.mark.parametrize("spelling", SPELLINGS)
def test_both_spellings_set_the_same_fields(config_type: type, fields: tuple[str, str, str],
                                            spelling: tuple[str, str, str]) -> None:
    source, split, n_tasks = spelling
    cfg = _parse(config_type, [source, "gsm8k", split, "test", n_tasks, "7"])
    assert [getattr(cfg, name) for name in fields] == ["gsm8k", "test", 7]


@pytest.mark.parametrize(("config_type", "fields"), CASES)
def test_the_help_shows_the_shared_spelling_first(config_type: type, fields: tuple[str, str, str]) -> None:
    parser = argparse.ArgumentParser()
    add_arguments(parser, config_type)
    usage = parser.format_usage()
    assert "[--source SOURCE]" in usage and "[--split SPLIT]" in usage and "[--n-tasks N_TASKS]" in usage


def test_a_bad_count_is_still_refused() -> None:
    with pytest.raises(argparse.ArgumentError):
        _parse(EvalConfig, ["--num-tasks", "many"])

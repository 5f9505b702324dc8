"""BFCL entries, API instances per rollout, snapshots, and the fixed split."""

from __future__ import annotations

import copy
import importlib
import json
from collections import Counter
from importlib.resources import files

import pytest

from evaluators.worlds.bfcl.calls import public_methods
from evaluators.worlds.bfcl.env import (
    CATEGORIES,
    SPLIT_FILE,
    BfclEnv,
    api_class,
    entry_docs,
    function_docs,
    get_entry,
    load_entries,
    make_split,
    split_entries,
)

API_CLASSES = ("GorillaFileSystem", "MathAPI", "MessageAPI", "TwitterAPI", "TicketAPI", "TradingBot", "TravelAPI",
               "VehicleControlAPI")


@pytest.mark.parametrize("name", API_CLASSES)
def test_the_eight_api_classes_import_and_match_their_docs(name: str) -> None:
    """bfcl-eval is installed with --no-deps: its classes need only the standard library and mpmath."""
    instance = api_class(name)()
    documented = {doc["name"] for doc in function_docs(name)}
    assert documented and documented <= set(public_methods(instance))


@pytest.mark.parametrize("category", CATEGORIES)
def test_entries_load_with_their_ground_truth(category: str) -> None:
    entries = load_entries(category)
    assert len(entries) == 200 and len({e.id for e in entries}) == 200
    for entry in entries:
        assert entry.id == f"multi_turn_{category}_{entry.index}"
        assert len(entry.requests) == len(entry.ground_truth) >= 1
        assert set(entry.involved_classes) <= set(API_CLASSES)
        assert entry.category == category
    assert sum(not calls for e in entries for calls in e.ground_truth) > 0  # irrelevance requests exist


def test_miss_func_withholds_functions_until_their_request() -> None:
    entry = get_entry("multi_turn_miss_func_0")
    [(at, names)] = entry.missed.items()
    assert entry.requests[at] == "" and not entry.ground_truth[at - 1]  # the request before cannot be done
    shown_before = {d["name"] for d in entry_docs(entry, at - 1)}
    shown_at = {d["name"] for d in entry_docs(entry, at)}
    assert set(names).isdisjoint(shown_before) and set(names) <= shown_at


def test_each_env_has_its_own_instances_and_leaves_bfcls_global_cache_alone() -> None:
    utils = importlib.import_module("bfcl_eval.eval_checker.multi_turn_eval.multi_turn_utils")
    cached = set(vars(utils))
    entry = get_entry("multi_turn_base_0")
    first, second = BfclEnv.fresh(entry), BfclEnv.fresh(entry)
    first.run("cd(folder='document')")
    first.run("mkdir(dir_name='only_in_first')")
    assert first.run("pwd()").output != second.run("pwd()").output  # the working directory is private state
    assert first.state() != second.state()
    assert BfclEnv.fresh(entry).state() == second.state()
    assert set(vars(utils)) == cached


def test_long_context_scenarios_load_the_long_variant() -> None:
    base, long = BfclEnv.fresh(get_entry("multi_turn_base_3")), BfclEnv.fresh(get_entry("multi_turn_long_context_3"))
    assert len(json.dumps(long.state(), default=str)) > len(json.dumps(base.state(), default=str))


@pytest.mark.parametrize("entry_id", ["multi_turn_base_0", "multi_turn_base_60", "multi_turn_base_120",
                                      "multi_turn_base_170", "multi_turn_long_context_100"])
def test_snapshots_restore_exactly_and_branches_replay_the_same_state(entry_id: str) -> None:
    entry = get_entry(entry_id)
    env = BfclEnv.fresh(entry)
    env.run_all(entry.ground_truth[0])
    snapshot = env.copy()
    at_snapshot = copy.deepcopy(snapshot.state())
    later = [call for calls in entry.ground_truth[1:] for call in calls]
    results = env.run_all(later)
    assert snapshot.state() == at_snapshot  # untouched by later calls
    branch = snapshot.copy()
    assert branch.run_all(later) == results and branch.state() == env.state()  # resuming gives the same run
    assert snapshot.state() == at_snapshot  # and can be resumed again


def test_the_shipped_split_is_the_documented_stratified_split() -> None:
    shipped = json.loads((files("exitagent") / "data" / "bfcl" / SPLIT_FILE).read_text())
    entries = load_entries("base")
    made = make_split(entries)
    assert shipped["train"] == made["train"] and shipped["test"] == made["test"]
    assert len(made["train"]) == len(made["test"]) == 100 and not set(made["train"]) & set(made["test"])
    by_id = {e.id: e for e in entries}

    def stratum(i: str) -> tuple[int, tuple[str, ...]]:
        return len(by_id[i].requests), tuple(sorted(by_id[i].involved_classes))

    train, test = Counter(map(stratum, made["train"])), Counter(map(stratum, made["test"]))
    assert all(abs(train[key] - test[key]) <= 1 for key in train | test)


def test_other_categories_follow_the_base_split_by_index() -> None:
    base = {e.index for e in split_entries("base", "test")}
    assert {e.index for e in split_entries("miss_func", "test")} == base
    assert len(split_entries("long_context", "all")) == 200

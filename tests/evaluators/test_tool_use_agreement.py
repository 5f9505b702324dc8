"""Our BFCL checker against the package's own, on ground truth and on perturbed call sequences.

The package's verdict is ``multi_turn_irrelevance_checker`` and ``multi_turn_checker`` together
(the issue's definition; bfcl-eval 2026.3.23's eval runner imports the first but only calls the
second). Its harness caches instances in module globals keyed by model name and entry, so every
call here gets a model name of its own.
"""

from __future__ import annotations

import ast
import itertools
import random
from collections import Counter
from collections.abc import Callable

import pytest

from evaluators.tool_use import check
from evaluators.worlds.bfcl.calls import parse_call
from evaluators.worlds.bfcl.env import CATEGORIES, Entry, load_entries

multi_turn_checker = pytest.importorskip("bfcl_eval.eval_checker.multi_turn_eval.multi_turn_checker")
_names = itertools.count()

Calls = list[list[str]]


def package_verdict(entry: Entry, calls: Calls) -> bool:
    decoded = [[[call] for call in turn] for turn in calls]  # one step per call, as our episodes make them
    truth = [list(turn) for turn in entry.ground_truth]
    row = {"id": entry.id, "initial_config": entry.initial_config, "involved_classes": list(entry.involved_classes)}
    if not multi_turn_checker.multi_turn_irrelevance_checker(decoded, truth)["valid"]:
        return False
    name = f"exitagent_test_{next(_names)}"
    result = multi_turn_checker.multi_turn_checker(decoded, truth, row, entry.category, name)
    return bool(result["valid"])


def our_verdict(entry: Entry, calls: Calls) -> bool:
    return all(v.passed for v in check(entry, calls))


def ground_truth(entry: Entry) -> Calls:
    return [list(turn) for turn in entry.ground_truth]


def _render(name: str, args: list[object], kwargs: dict[str, object]) -> str:
    return f"{name}({', '.join([*map(repr, args), *(f'{k}={v!r}' for k, v in kwargs.items())])})"


def _changed(value: object, rng: random.Random) -> object:
    if isinstance(value, bool):
        return not value
    if isinstance(value, int):
        return value + rng.choice([-1, 1])
    if isinstance(value, float):
        return value * 2 + 1
    if isinstance(value, str):
        return value + "_x" if rng.random() < 0.5 else value.upper() if value != value.upper() else value + "1"
    if isinstance(value, list):
        return value[1:] if value else ["x"]
    return None


def _calls_at(calls: Calls) -> list[tuple[int, int]]:
    return [(t, i) for t, turn in enumerate(calls) for i in range(len(turn))]


def drop_call(calls: Calls, rng: random.Random) -> Calls | None:
    spots = _calls_at(calls)
    if not spots:
        return None
    t, i = rng.choice(spots)
    del calls[t][i]
    return calls


def change_argument(calls: Calls, rng: random.Random) -> Calls | None:
    spots = [(t, i) for t, i in _calls_at(calls) if ast.parse(calls[t][i], mode="eval").body.keywords
             or ast.parse(calls[t][i], mode="eval").body.args]  # type: ignore[attr-defined]
    if not spots:
        return None
    t, i = rng.choice(spots)
    call = parse_call(calls[t][i])
    args, kwargs = list(call.args), dict(call.kwargs)
    keys = [("arg", n) for n in range(len(args))] + [("kw", k) for k in kwargs]
    kind, key = rng.choice(keys)
    if kind == "arg":
        args[key] = _changed(args[key], rng)  # type: ignore[index]
    else:
        kwargs[key] = _changed(kwargs[key], rng)  # type: ignore[index]
    calls[t][i] = _render(call.name, args, kwargs)
    return calls


def extra_call(calls: Calls, rng: random.Random) -> Calls | None:
    spots = _calls_at(calls)
    if not spots:
        return None
    t, i = rng.choice(spots)
    target = rng.randrange(len(calls))
    calls[target].insert(rng.randint(0, len(calls[target])), calls[t][i])  # a ground-truth call, repeated elsewhere
    return calls


def reorder(calls: Calls, rng: random.Random) -> Calls | None:
    turns = [t for t, turn in enumerate(calls) if len(set(turn)) > 1]
    if not turns:
        return None
    turn = calls[rng.choice(turns)]
    i, j = rng.sample(range(len(turn)), 2)
    while turn[i] == turn[j]:
        i, j = rng.sample(range(len(turn)), 2)
    turn[i], turn[j] = turn[j], turn[i]
    return calls


PERTURBATIONS: dict[str, Callable[[Calls, random.Random], Calls | None]] = {
    "drop": drop_call, "change": change_argument, "extra": extra_call, "reorder": reorder,
}


@pytest.mark.parametrize("category", CATEGORIES)
def test_ground_truth_of_every_entry_passes_both_checkers(category: str) -> None:
    entries = load_entries(category)
    assert len(entries) == 200
    ours = [our_verdict(e, ground_truth(e)) for e in entries]
    theirs = [package_verdict(e, ground_truth(e)) for e in entries]
    print(f"\n{category} ground truth: ours {sum(ours)}/200 pass, package {sum(theirs)}/200 pass")
    assert all(ours) and all(theirs)


def test_perturbed_sequences_get_the_package_verdict() -> None:
    rng = random.Random(6)
    counts: Counter[tuple[str, bool]] = Counter()
    disagreements = []
    for entry in load_entries("base"):
        for kind, perturb in PERTURBATIONS.items():
            calls = perturb(ground_truth(entry), rng)
            if calls is None:
                continue
            ours, theirs = our_verdict(entry, calls), package_verdict(entry, calls)
            counts[(kind, theirs)] += 1
            if ours != theirs:
                disagreements.append((entry.id, kind, calls, ours, theirs))
    total = sum(counts.values())
    table = ", ".join(f"{kind}: {counts[(kind, True)]} pass / {counts[(kind, False)]} fail" for kind in PERTURBATIONS)
    print(f"\nperturbed sequences: {total} ({table}); disagreements: {len(disagreements)}")
    assert total >= 300
    assert all(counts[(kind, False)] > 0 for kind in PERTURBATIONS)  # each kind can break an entry
    assert counts[("reorder", True)] > 0 and counts[("extra", True)] > 0  # and some survive: both verdicts occur
    assert disagreements == []

"""BFCL v3 multi-turn: entries, ground truth, function docs and per-rollout API instances.

Everything comes from the installed ``bfcl-eval`` package, used as it is (installed with
``--no-deps`` plus ``mpmath``: the eight v3 classes and the checker need nothing else). Four
categories of 200 entries each: ``base``, ``miss_func``, ``miss_param``, ``long_context``.
Entry ``multi_turn_<category>_<i>`` shares its API classes (and almost always its scenario) with
``multi_turn_base_<i>``, so the base split (``split_ids``) carries over to every category by index.

``BfclEnv`` holds one rollout's instances of the entry's classes in its own dictionary. BFCL's
harness caches instances in its module's ``globals()`` under a name built from the model and the
entry, which would make repeated rollouts and branches share state; nothing here touches that
cache. ``copy()`` deep-copies the instances: a snapshot that a branch resumes from. The classes
seed their randomness from the scenario, so replaying the same calls gives the same state.

Words: BFCL calls each user message a "turn"; here it is a *request*, and a *turn* is one
assistant action (exit-spec.md section 1).
"""

from __future__ import annotations

import copy
import functools
import importlib
import json
import random
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from importlib.resources import files
from typing import Any

from evaluators.worlds.bfcl.calls import CallResult, execute, public_methods
from exitagent.errors import ConfigError

CATEGORIES = ("base", "miss_func", "miss_param", "long_context")
SPLITS = ("train", "test", "all")
SPLIT_FILE = "multi_turn_base_split.json"
SPLIT_SEED = "exitagent-bfcl-split-v1"


def _package() -> Any:
    try:
        import bfcl_eval.constants.executable_backend_config as backend
    except ImportError as error:  # an install without the package: say how to get it
        raise ConfigError("the tool-use domain needs bfcl-eval: pip install --no-deps bfcl-eval==2026.3.23 "
                          "mpmath (see requirements/no-deps.txt)") from error
    return backend


def _jsonl(relative: str) -> list[dict[str, Any]]:
    text = (files("bfcl_eval") / "data" / relative).read_text(encoding="utf-8")
    return [json.loads(line) for line in text.splitlines() if line.strip()]


@dataclass(frozen=True)
class Entry:
    """One multi-turn conversation: its requests, scenario, classes and ground-truth calls.

    ``requests[i]`` is the i-th user message ("" for a ``miss_func`` turn whose only news is that
    the withheld functions ``missed[i]`` are now available). ``ground_truth[i]`` are the calls
    that request needs; an empty tuple marks an irrelevance request (the model must make no call).
    """

    id: str
    category: str
    requests: tuple[str, ...]
    initial_config: Mapping[str, Any]
    involved_classes: tuple[str, ...]
    ground_truth: tuple[tuple[str, ...], ...]
    missed: Mapping[int, tuple[str, ...]]

    @property
    def index(self) -> int:
        return int(self.id.rsplit("_", 1)[1])

    @property
    def long_context(self) -> bool:
        return self.category == "long_context"

    def withheld(self, request: int) -> set[str]:
        """Functions not yet shown to the model when ``request`` is asked."""
        return {name for at, names in self.missed.items() if at > request for name in names}


def _request_text(messages: Sequence[Mapping[str, str]]) -> str:
    if any(m["role"] != "user" for m in messages):
        raise ConfigError("a BFCL multi-turn request should hold user messages only")
    return "\n\n".join(m["content"] for m in messages)


@functools.cache
def load_entries(category: str) -> tuple[Entry, ...]:
    """All 200 entries of a category, in file order."""
    if category not in CATEGORIES:
        raise ConfigError(f"unknown BFCL multi-turn category {category!r}: choose from {', '.join(CATEGORIES)}")
    _package()
    name = f"BFCL_v4_multi_turn_{category}.json"
    answers = {row["id"]: row["ground_truth"] for row in _jsonl(f"possible_answer/{name}")}
    return tuple(
        Entry(
            id=row["id"], category=category, requests=tuple(_request_text(turn) for turn in row["question"]),
            initial_config=row["initial_config"], involved_classes=tuple(row["involved_classes"]),
            ground_truth=tuple(tuple(calls) for calls in answers[row["id"]]),
            missed={int(k): tuple(v) for k, v in row.get("missed_function", {}).items()},
        )
        for row in _jsonl(name)
    )


def category_of(entry_id: str) -> str:
    category = entry_id.removeprefix("multi_turn_").rsplit("_", 1)[0]
    if not entry_id.startswith("multi_turn_") or category not in CATEGORIES:
        raise ConfigError(f"not a BFCL multi-turn entry id: {entry_id!r}")
    return category


def get_entry(entry_id: str) -> Entry:
    for entry in load_entries(category_of(entry_id)):
        if entry.id == entry_id:
            return entry
    raise ConfigError(f"no BFCL entry {entry_id!r}")


@functools.cache
def function_docs(class_name: str) -> tuple[Mapping[str, Any], ...]:
    """The function schemas of one API class (name, description, parameters, response)."""
    mapping = _package().MULTI_TURN_FUNC_DOC_FILE_MAPPING
    return tuple(_jsonl(f"multi_turn_func_doc/{mapping[class_name]}"))


def entry_docs(entry: Entry, request: int = 0) -> list[Mapping[str, Any]]:
    """The schemas shown to the model at ``request``: every involved class's, less the withheld ones."""
    hidden = entry.withheld(request)
    return [doc for name in entry.involved_classes for doc in function_docs(name) if doc["name"] not in hidden]


def api_class(class_name: str) -> type:
    backend = _package()
    module = importlib.import_module(backend.CLASS_FILE_PATH_MAPPING[class_name])
    return getattr(module, class_name)


class BfclEnv:
    """One rollout's API instances. ``run`` executes a call string; ``copy`` branches the state."""

    def __init__(self, entry: Entry, instances: dict[str, object]) -> None:
        self.entry, self.instances = entry, instances
        # A later class wins a name clash, as in BFCL's harness (the eight v3 classes have none).
        self.methods = {name: cls for cls, instance in instances.items() for name in public_methods(instance)}

    @classmethod
    def fresh(cls, entry: Entry) -> BfclEnv:
        """New instances, each scenario loaded from a deep copy of the entry's initial config."""
        stateless = set(_package().STATELESS_CLASSES)
        instances: dict[str, object] = {}
        for name in entry.involved_classes:
            instance = api_class(name)()
            if name not in stateless:
                config = copy.deepcopy(dict(entry.initial_config.get(name, {})))
                instance._load_scenario(config, long_context=entry.long_context)
            instances[name] = instance
        return cls(entry, instances)

    def run(self, call: str) -> CallResult:
        return execute(call, self.instances, self.methods)

    def run_all(self, calls: Iterable[str]) -> list[str]:
        return [self.run(call).output for call in calls]

    def copy(self) -> BfclEnv:
        """A deep copy: later calls on either side never reach the other."""
        return BfclEnv(self.entry, copy.deepcopy(self.instances))

    def state(self) -> dict[str, dict[str, Any]]:
        """Every public attribute of every instance: what BFCL's state check compares."""
        return {name: {k: v for k, v in vars(instance).items() if not k.startswith("_")}
                for name, instance in self.instances.items()}


# --- the fixed train/test split of multi_turn_base ---------------------------------------------


def make_split(entries: Sequence[Entry]) -> dict[str, list[str]]:
    """Stratified half/half: strata are (number of requests, set of API classes).

    Each stratum (in sorted order) is shuffled by one ``random.Random(SPLIT_SEED)`` and cut in
    half; an odd stratum's extra entry goes to train and test in turn, so 200 entries split 100/100.
    """
    strata: dict[tuple[int, tuple[str, ...]], list[Entry]] = defaultdict(list)
    for entry in entries:
        strata[(len(entry.requests), tuple(sorted(entry.involved_classes)))].append(entry)
    rng, extra_to_train = random.Random(SPLIT_SEED), True
    train: list[Entry] = []
    test: list[Entry] = []
    for key in sorted(strata):
        members = sorted(strata[key], key=lambda e: e.index)
        rng.shuffle(members)
        take = len(members) // 2
        if len(members) % 2:
            take, extra_to_train = take + extra_to_train, not extra_to_train
        train += members[:take]
        test += members[take:]
    return {name: [e.id for e in sorted(part, key=lambda e: e.index)] for name, part in (("train", train),
                                                                                         ("test", test))}


@functools.cache
def _split_file() -> Mapping[str, list[str]]:
    data: Mapping[str, list[str]] = json.loads((files("exitagent") / "data" / "bfcl" / SPLIT_FILE).read_text())
    return data


def split_entries(category: str, split: str) -> list[Entry]:
    """The entries of ``split`` (train, test, all) of a category, by the base split's indices."""
    entries = load_entries(category)
    if split == "all":
        return list(entries)
    if split not in SPLITS:
        raise ConfigError(f"unknown split {split!r} for BFCL: choose from {', '.join(SPLITS)}")
    indices = {int(i.rsplit("_", 1)[1]) for i in _split_file()[split]}
    return [e for e in entries if e.index in indices]

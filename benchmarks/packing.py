"""Padding in the trainer's micro-batches, on a real run's groups: the old greedy cut against the
least-compute cut of ``training.data``.

    .venv/bin/python benchmarks/packing.py RUN_DIR [--groups-per-step 8] [--token-budget 4096]

Takes the groups of ``RUN/store.sqlite`` in the order they were recorded, ``--groups-per-step`` at
a time as the trainer does, builds the training items (``training.update.items_from``: groups
without signal contribute none) and counts the tokens each packing runs through the model, a
micro-batch costing ``prefix + rows * (longest - prefix)``. "needed" is the least any packing
with prompt sharing runs: each prompt once plus every response, no padding. No model is loaded:
the counts are the compute, which the trainer's step time follows (benchmarks/trainer.py).
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path
from unittest import mock

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script: import the repo's packages

import _machine  # noqa: E402

from exitagent.curriculum.store import STORE_FILENAME, SQLiteStore  # noqa: E402
from exitagent.log import configure  # noqa: E402
from training import data  # noqa: E402
from training.config import UpdateConfig  # noqa: E402
from training.data import MicroBatch, TrainItem, make_micro_batches, untrained_prefix  # noqa: E402
from training.update import items_from  # noqa: E402


def greedy_cut(items: list[TrainItem], prompt_len: int, token_budget: int) -> list[list[TrainItem]]:
    """The earlier ``training.data._cut``: sorted by length, cut only when the budget would pass."""
    batches: list[list[TrainItem]] = []
    current: list[TrainItem] = []
    for item in sorted(items, key=lambda i: len(i.sequence.tokens)):
        length = len(item.sequence.tokens)
        if current and prompt_len + (len(current) + 1) * (length - prompt_len) > token_budget:
            batches.append(current)
            current = []
        current.append(item)
    return [*batches, current] if current else batches


def compute(batches: list[MicroBatch]) -> int:
    """Tokens run through the model: the shared prefix once, every row padded to the longest."""
    return sum(b.prefix_len + b.tokens_BT.shape[0] * (b.tokens_BT.shape[1] - b.prefix_len) for b in batches)


def needed(items: list[TrainItem]) -> int:
    prompts = {untrained_prefix(item.sequence) for item in items}
    return sum(len(p) for p in prompts) + sum(len(i.sequence.tokens) - len(untrained_prefix(i.sequence)) for i in items)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--groups-per-step", type=int, default=8)
    parser.add_argument("--token-budget", type=int, default=4096)
    args = parser.parse_args()
    _machine.print_machine()
    configure(level="warning")
    cfg = UpdateConfig(run_dir=args.run_dir)
    with tempfile.TemporaryDirectory() as tmp:  # a copy: every group unconsumed, the run's store untouched
        shutil.copyfile(args.run_dir / STORE_FILENAME, Path(tmp) / STORE_FILENAME)
        with SQLiteStore(Path(tmp) / STORE_FILENAME) as store:
            store.unconsume(0)
            groups = store.fetch_groups()
    totals = {"needed": 0, "greedy": 0, "least": 0, "steps": 0, "micro_batches": 0}
    for lo in range(0, len(groups), args.groups_per_step):
        items, _ = items_from(groups[lo:lo + args.groups_per_step], cfg)
        if not items:
            continue
        batches = make_micro_batches(items, vocab_size=10**9, token_budget=args.token_budget)
        with mock.patch.object(data, "_cut", greedy_cut):  # the same packing, with the earlier cut
            greedy = make_micro_batches(items, vocab_size=10**9, token_budget=args.token_budget)
        totals["steps"] += 1
        totals["micro_batches"] += len(batches)
        totals["needed"] += needed(items)
        totals["greedy"] += compute(greedy)
        totals["least"] += compute(batches)
    print(f"{args.run_dir}: {len(groups)} groups, {totals['steps']} steps with signal, "
          f"{totals['micro_batches']} micro-batches")
    for name in ("needed", "greedy", "least"):
        print(f"  {name:<7} {totals[name]:>9} tokens  {totals[name] / max(1, totals['needed']):.2f}x needed")
    print(f"  least-compute cut runs {totals['greedy'] / max(1, totals['least']):.2f}x fewer tokens than greedy")
    return 0


if __name__ == "__main__":
    sys.exit(main())

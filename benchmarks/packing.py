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

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script: import the repo's packages

from exitagent.log import configure  # noqa: E402
from exitagent.store import STORE_FILENAME, SQLiteStore  # noqa: E402
from training.config import UpdateConfig  # noqa: E402
from training.data import TrainItem, make_micro_batches, untrained_prefix  # noqa: E402
from training.update import items_from  # noqa: E402


def greedy_cost(items: list[TrainItem], token_budget: int) -> int:
    """The earlier rule: a prompt's items sorted by length, cut only when the budget would pass."""
    by_prompt: dict[tuple[int, ...], list[int]] = {}
    for item in items:
        by_prompt.setdefault(untrained_prefix(item.sequence), []).append(len(item.sequence.tokens))
    total = 0
    for prompt, lengths in by_prompt.items():
        shared = len(prompt) if len(lengths) > 1 else 0
        rows, longest = 0, 0
        for length in sorted(lengths):
            if rows and shared + (rows + 1) * (length - shared) > token_budget:
                total += shared + rows * (longest - shared)
                rows = 0
            rows, longest = rows + 1, length
        total += shared + rows * (longest - shared)
    return total


def needed(items: list[TrainItem]) -> int:
    prompts = {untrained_prefix(item.sequence) for item in items}
    return sum(len(p) for p in prompts) + sum(len(i.sequence.tokens) - len(untrained_prefix(i.sequence)) for i in items)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--groups-per-step", type=int, default=8)
    parser.add_argument("--token-budget", type=int, default=4096)
    args = parser.parse_args()
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
        totals["steps"] += 1
        totals["micro_batches"] += len(batches)
        totals["needed"] += needed(items)
        totals["greedy"] += greedy_cost(items, args.token_budget)
        totals["least"] += sum(b.prefix_len + b.tokens_BT.shape[0] * (b.tokens_BT.shape[1] - b.prefix_len)
                               for b in batches)
    print(f"{args.run_dir}: {len(groups)} groups, {totals['steps']} steps with signal, "
          f"{totals['micro_batches']} micro-batches")
    for name in ("needed", "greedy", "least"):
        print(f"  {name:<7} {totals[name]:>9} tokens  {totals[name] / max(1, totals['needed']):.2f}x needed")
    print(f"  least-compute cut runs {totals['greedy'] / max(1, totals['least']):.2f}x fewer tokens than greedy")
    return 0


if __name__ == "__main__":
    sys.exit(main())

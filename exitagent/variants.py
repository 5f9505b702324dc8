"""The paper's five variants side by side: same budget, same seeds, one Table-1-style comparison.

    python -m exitagent.variants --out-dir runs/variants --seeds 0,1,2 --updates 40 [--max-minutes 60]

The budget is trainer updates, the same for every variant and seed (exit-spec.md section 6: only
the prompts differ, so the comparison is compute-equivalent); ``--max-minutes`` only caps a run's
wall clock. A run the cap stopped short has fewer updates, and the table says so rather than
compare it. The table states each variant's updates, groups trained, tokens generated and minutes
(``exitagent.budget``). Each (variant, seed) is one ``exitagent.run`` in ``OUT/<variant>-s<seed>`` (its own server,
store, trainer and report), so a finished pair is skipped when the command is run again. The base
policy is evaluated once per seed: later variants of that seed reuse the first one's measurement
(its ``measured`` key must be this run's), about two minutes saved per run. The
comparison goes to ``OUT/table.md`` and ``OUT/table.json``: accuracy after K self-improvement
steps and Delta_K, mean and spread (population standard deviation) over seeds, each with a 95%
interval (``exitagent.stats``: seeds resampled, then tasks within each), plus the base policy's
row, and ``OUT/curves.png`` with every variant's mean accuracy-by-step curve and its band. Each
run's curriculum plots (sample depth, "sampled from iteration", start turn) are in its own report.

Every run evaluates with the paper's protocol (``exitagent.evaluate``'s defaults: avg@8 at the
training temperature, K = 16, ``FULL_SIZE_TASKS`` tasks; README "What the evaluation protocol
costs"), not with the main job's smaller evaluation; ``--eval-*`` flags given here still win, and
``--run-size-evaluation`` keeps the main job's (minutes instead of hours on a CPU).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from exitagent import config, curves, stats
from exitagent.budget import BUDGET_KEYS, spent
from exitagent.curriculum import paper
from exitagent.errors import ExitCode, child_exit_code
from exitagent.evaluate import FULL_SIZE_TASKS, PAPER_SAMPLES
from exitagent.precision import choose as choose_precision
from exitagent.precision import detect
from exitagent.report import held_out, score_name
from exitagent.run import parse_config
from exitagent.run_config import RunConfig
from exitagent.run_dir import RunDir
from exitagent.run_eval import BASE_POLICY, evaluation_key
from exitagent.types import Variant

ORDER = [Variant.GRPO, Variant.CURRICULUM, Variant.IMPROVE, Variant.DIVERGE, Variant.EXIT]
# Not the paper's five: run only when asked (--variants grpo,exit,chains), shown after them.
CONTROLS = [Variant.CHAINS]
LABELS = {Variant.GRPO: "GRPO", Variant.CURRICULUM: "+ curriculum", Variant.IMPROVE: "+ improve",
          Variant.DIVERGE: "+ diverge", Variant.EXIT: "full ExIt", Variant.CHAINS: "naive K-step chains (control)"}


def run_args(run_dir: Path, variant: Variant, seed: int, passthrough: list[str]) -> list[str]:
    """``exitagent.run``'s flags for one (variant, seed): only the variant and the run dir differ."""
    return ["--run-dir", str(run_dir), "--variant", variant.value, "--seed", str(seed), *passthrough]


def run_one(out_dir: Path, variant: Variant, seed: int, passthrough: list[str],
            run_size_evaluation: bool = False) -> Path:
    run_dir = out_dir / f"{variant.value}-s{seed}"
    if RunDir(run_dir).evaluation("trained").exists():
        return run_dir
    print(f"[variants] {LABELS[variant]}, seed {seed} -> {run_dir}", flush=True)
    evaluation = [] if run_size_evaluation else protocol_flags(passthrough)
    args = run_args(run_dir, variant, seed, [*evaluation, *passthrough])
    reuse_base_evaluation(out_dir, parse_config(args))
    subprocess.run([sys.executable, "-m", "exitagent.run", *args], check=True, stdin=subprocess.DEVNULL)
    return run_dir


def protocol_flags(passthrough: list[str]) -> list[str]:
    """The paper's evaluation protocol as ``exitagent.run`` flags, sampled at the temperature the runs
    train at, with the paper's K for the domain; put before ``passthrough`` so that the user's own
    ``--eval-*`` flags win."""
    cfg = parse_config(["--run-dir", ".", *passthrough])
    return ["--eval-samples", str(PAPER_SAMPLES), "--eval-steps", str(paper.eval_steps(cfg.domain)),
            "--eval-temperature", str(cfg.temperature), "--eval-tasks", str(FULL_SIZE_TASKS)]


def reuse_base_evaluation(out_dir: Path, cfg: RunConfig) -> Path | None:
    """Copy a sibling run's base evaluation into ``cfg.run_dir`` when it measured the same thing."""
    target = RunDir(cfg.run_dir).eval
    if (target / "base.json").exists():
        return None
    # run measures with the precision it resolved ("auto" -> this machine's dtype): compare with that
    resolved = dataclasses.replace(cfg, precision=choose_precision(cfg.precision, detect()).dtype)
    wanted = evaluation_key(resolved, BASE_POLICY)
    for sibling in sorted(out_dir.glob(f"*-s{cfg.seed}")):
        source = RunDir(sibling).eval
        if sibling == cfg.run_dir or not (source / "base.json").exists():
            continue
        if json.loads((source / "base.json").read_text()).get("measured") == wanted:
            target.mkdir(parents=True, exist_ok=True)
            for name in ("base.png", "base.json"):  # the JSON last: it is what marks the evaluation done
                if (source / name).exists():
                    shutil.copyfile(source / name, target / name)
            print(f"[variants] reusing the base evaluation of {sibling.name}", flush=True)
            return sibling
    return None


def _spread(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.pstdev(values) if len(values) > 1 else 0.0


def summarise(runs: dict[Variant, list[Path]]) -> dict[str, Any]:
    """Per variant: mean and spread over seeds of accuracy after K steps and of Delta_K."""
    table: dict[str, Any] = {"variants": {}, "base": {}}
    bases: dict[str, dict[str, Any]] = {}  # one base evaluation per seed: every variant measured the same policy
    for variant, directories in runs.items():
        results = [json.loads(RunDir(d).evaluation("trained").read_text()) for d in directories]
        for directory in directories:
            seed = directory.name.rsplit("-s", 1)[1]
            bases.setdefault(seed, json.loads(RunDir(directory).evaluation("base").read_text()))
        table["variants"][variant.value] = {**_row(results), **_budget([spent(d) for d in directories])}
    table["base"] = _row(list(bases.values()))
    first = next(iter(bases.values()), {})  # what was measured, named as evaluate names it
    table["score"] = score_name(first)
    table["held_out"] = held_out(first)
    updates = {v: row["updates_by_seed"] for v, row in table["variants"].items()}
    table["equal_updates"] = len({tuple(u) for u in updates.values()}) <= 1
    return table


def _budget(spent_by_seed: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean over seeds of what each run spent, and the update count of every seed (to compare)."""
    return {"updates_by_seed": [b["updates"] for b in spent_by_seed],
            "budget": {key: statistics.fmean(b[key] for b in spent_by_seed) for key in BUDGET_KEYS}}


def _row(results: list[dict[str, Any]]) -> dict[str, Any]:
    final = [r["accuracy_by_step"][-1] for r in results]
    delta = [r["delta_k"] for r in results]
    curves = [r["accuracy_by_step"] for r in results]
    return {"seeds": len(results), "accuracy_after_k": _spread(final), "delta_k": _spread(delta),
            "curve": [statistics.fmean(step) for step in zip(*curves, strict=True)],
            "intervals": seed_intervals(results)}


def seed_intervals(results: list[dict[str, Any]]) -> dict[str, Any] | None:
    """95% intervals over seeds and tasks from each evaluation's per-task scores; None when an
    evaluation lacks them or has under two tasks (the table then shows the spread alone)."""
    try:
        return stats.bootstrap([[row["scores"] for row in r["per_task"]] for r in results]).to_json()
    except (KeyError, TypeError, ValueError):  # StatsError is a ValueError; a hand-edited file, the others
        return None


def write_table(out_dir: Path, table: dict[str, Any]) -> Path:
    k, score = len(table["base"]["curve"]) - 1, table.get("score", "accuracy")
    lines = [f"| policy | seeds | {score} after K={k} steps (%) | Δ_{k} (points) | 95% intervals: {score} after "
             f"K, Δ_{k}, {score} at k=0 | updates | groups trained | tokens generated | training minutes |",
             "|---|---|---|---|---|---|---|---|---|"]

    def line(name: str, row: dict[str, Any]) -> str:
        (acc, acc_sd), (delta, delta_sd) = row["accuracy_after_k"], row["delta_k"]
        bands = row.get("intervals")
        intervals = "–" if not bands else ", ".join(
            stats.Interval(**i).points(sign=signed) if i else "n/a"
            for i, signed in ((bands["accuracy_by_step"][-1], False), (bands["delta_k"], True),
                              (bands["accuracy_by_step"][0], False)))
        spent = row.get("budget")
        cost = (f"{spent['updates']:.0f} | {spent['groups_trained']:.0f} | {spent['tokens_generated']:.0f} | "
                f"{spent['minutes']:.1f}") if spent else "- | - | - | -"
        return (f"| {name} | {row['seeds']} | {100 * acc:.1f} ± {100 * acc_sd:.1f} | "
                f"{100 * delta:+.1f} ± {100 * delta_sd:.1f} | {intervals} | {cost} |")

    lines.append(line("base model", table["base"]))
    for variant in (*ORDER, *CONTROLS):
        if variant.value in table["variants"]:
            lines.append(line(LABELS[variant], table["variants"][variant.value]))
    held_out = table.get("held_out", "arithmetic")
    text = f"# Variants (exit-spec.md section 6), held-out {held_out}\n\n" + "\n".join(lines) + \
        "\n\nMean ± population standard deviation over seeds; intervals: paired percentile bootstrap, seeds " \
        "resampled, then tasks within each (exitagent.stats); updates, groups, tokens and minutes: mean over " \
        "seeds.\n\n" + _equal_note(table) + "![curves](curves.png)\n"
    (out_dir / "table.md").write_text(text)
    (out_dir / "table.json").write_text(json.dumps(table, indent=2))
    figure, axis = plt.subplots(figsize=(6, 4))

    def curve(row: dict[str, Any]) -> dict[str, Any]:
        return {"accuracy_by_step": row["curve"], "intervals": row.get("intervals")}

    curves.draw_curve(axis, curve(table["base"]), "base model", color="black", linestyle="--")
    for variant in (*ORDER, *CONTROLS):
        if variant.value in table["variants"]:
            curves.draw_curve(axis, curve(table["variants"][variant.value]), LABELS[variant])
    curves.axes(axis)
    curves.save(figure, out_dir / "curves.png")
    return out_dir / "table.md"


def _equal_note(table: dict[str, Any]) -> str:
    if table.get("equal_updates", True):
        return "Every variant made the same number of trainer updates at every seed.\n\n"
    counts = "; ".join(f"{LABELS[Variant(v)]}: {row['updates_by_seed']}" for v, row in table["variants"].items())
    return (f"**Unequal budgets: the variants made different numbers of updates ({counts}); the wall-clock cap "
            "stopped some early. Do not compare these rows as compute-equivalent.**\n\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m exitagent.variants", description=__doc__.split("\n\n")[0],
                                     epilog="Other flags are passed to every `python -m exitagent.run`.")
    parser.add_argument("--out-dir", type=Path, default=Path("runs/variants"))
    parser.add_argument("--seeds", default="0,1", help="comma-separated seeds")
    parser.add_argument("--variants", default=",".join(v.value for v in ORDER),
                        help="comma-separated variants; add 'chains' for the naive control (random-depth K-step "
                             "chains, exitagent/curriculum/chains.py)")
    parser.add_argument("--updates", type=int, default=40, help="trainer updates per run, every variant alike")
    parser.add_argument("--max-minutes", type=float, default=60.0, help="wall-clock cap of a run's training")
    parser.add_argument("--run-size-evaluation", action="store_true",
                        help="evaluate as exitagent.run does by default (greedy, n=1, K=4), not the paper's protocol")
    args, passthrough = config.parse_known_args(parser, argv, "variants")  # --config goes on to run
    # ours first: a --train-updates or --train-minutes the user passes on to run comes later and wins
    passthrough = ["--train-updates", str(args.updates), "--train-minutes", str(args.max_minutes), *passthrough]
    try:
        variants = [Variant(v) for v in args.variants.split(",") if v]
        seeds = [int(s) for s in args.seeds.split(",") if s]
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return ExitCode.USAGE
    args.out_dir.mkdir(parents=True, exist_ok=True)
    runs: dict[Variant, list[Path]] = {}
    try:
        for seed in seeds:  # seeds outermost: an interrupted sweep has every variant at the first seed
            for variant in variants:
                runs.setdefault(variant, []).append(run_one(args.out_dir, variant, seed, passthrough,
                                                            args.run_size_evaluation))
    except subprocess.CalledProcessError as error:
        print(f"error: a run failed ({error}); finished runs are kept, run the command again to continue",
              file=sys.stderr)
        return child_exit_code(error.returncode)
    table = write_table(args.out_dir, summarise(runs))
    print(table.read_text())
    return ExitCode.OK


if __name__ == "__main__":
    sys.exit(main())

"""The run report: base vs trained self-improvement curves, the training curves, the curriculum.

``write_report(run_dir, base, trained)`` writes ``RUN/report.md`` and the PNG plots it shows
(``RUN/report/*.png``) from the two evaluation results and the run's metrics files and store.
Every accuracy, Delta_K and net correction is shown with its 95% interval (``exitagent.stats``,
carried in each evaluation's ``intervals``), the curve to K step by step, the greedy pass as a
secondary column, and the depths training sampled, since K is meant to go beyond them.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from exitagent import curves
from exitagent.budget import describe, spent
from exitagent.curriculum import view as curriculum_view
from exitagent.curriculum.store_url import open_run_store
from exitagent.log import read_metrics
from exitagent.run_dir import RunDir


def _rows(path: Path, kind: str | None = None) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in rows if kind is None or r.get("kind") == kind]


def _accuracy_plot(base: dict[str, Any], trained: dict[str, Any], out: Path) -> None:
    figure, axis = plt.subplots(figsize=(6, 4))
    for name, result in (("base", base), ("trained", trained)):
        curves.draw_curve(axis, result, name)
        if result.get("greedy"):
            curves.draw_curve(axis, result["greedy"], f"{name}, greedy", linestyle="--")
    axis.set_title("Inference-time self-improvement (held-out)")
    curves.axes(axis)
    curves.save(figure, out)


def _training_plot(run_dir: Path, out: Path) -> None:
    collect = read_metrics(run_dir, "collect", "group")  # every collector's file, in time order
    updates = _rows(RunDir(run_dir).metrics_file("update"), "update")
    figure, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    rewards = [r["reward_mean"] for r in collect if r.get("reward_mean") is not None]
    window = 16
    smooth = [sum(rewards[max(0, i - window + 1): i + 1]) / len(rewards[max(0, i - window + 1): i + 1])
              for i in range(len(rewards))]
    left.plot(rewards, alpha=0.3, label="per group")
    left.plot(smooth, label=f"mean of last {window}")
    left.set_xlabel("group")
    left.set_ylabel("training reward")
    left.legend()
    right.plot([u["step"] for u in updates], [u.get("loss", 0.0) for u in updates], label="loss")
    right.set_xlabel("update")
    right.set_ylabel("GRPO loss")
    for axis in (left, right):
        axis.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(out, dpi=120)
    plt.close(figure)


def _line(name: str, result: dict[str, Any]) -> str:
    def ends(r: dict[str, Any]) -> tuple[str, str]:
        accuracy, bands = r["accuracy_by_step"], curves.bands(r)
        return curves.with_interval(accuracy[0], bands[0]), curves.with_interval(accuracy[-1], bands[-1])

    greedy = result.get("greedy")
    secondary = f"{ends(greedy)[0]} | {curves.delta_with_interval(greedy)}" if greedy else "– | –"
    first, last = ends(result)
    return (f"| {name} | {first} | {last} | {curves.delta_with_interval(result)} | "
            f"{curves.net_with_interval(result)} | {secondary} |")


def _word_problems(results: tuple[dict[str, Any], dict[str, Any]] | None) -> str:
    if results is None:
        return ""
    return f"""
Second held-out set, word problems the training generator never produces ({_protocol(results[1])}):

{_header(results[1])}
{_line("base", results[0])}
{_line("trained", results[1])}
"""


def _header(result: dict[str, Any]) -> str:
    """The result table's head, named after what the evaluation scored (tool use: first-request accuracy)."""
    k = len(result["accuracy_by_step"]) - 1
    return (f"| policy | {score_name(result)} at k=0 (%) | at k={k} (%) | Δ_{k} (points) | net corrections "
            f"| greedy k=0 (%) | greedy Δ_{k} |\n|---|---|---|---|---|---|---|")


def score_name(result: dict[str, Any]) -> str:
    return str(result.get("score", "accuracy")).replace("_", " ")


def held_out(result: dict[str, Any]) -> str:
    """Which held-out set: the evaluation's source (math: arithmetic), else its domain (an environment's
    own tasks); arithmetic for a result without its config (they were all math)."""
    cfg = result.get("config", {})
    return str(cfg.get("source") or cfg.get("domain") or "arithmetic")


def _curve_table(base: dict[str, Any], trained: dict[str, Any]) -> str:
    """Accuracy at every k (the whole curve to K), each with its interval."""
    rows = ["| k | base (%) | trained (%) |", "|---|---|---|"]
    columns = [(r["accuracy_by_step"], curves.bands(r)) for r in (base, trained)]
    for k in range(len(base["accuracy_by_step"])):
        cells = [curves.with_interval(acc[k], band[k]) if k < len(acc) else "–" for acc, band in columns]
        rows.append(f"| {k} | {' | '.join(cells)} |")
    return "\n".join(rows)


def _protocol(result: dict[str, Any]) -> str:
    cfg, bands = result.get("config", {}), result.get("intervals") or {}
    temperature = cfg.get("temperature")
    how = "greedy" if temperature == 0 else f"sampled at temperature {temperature}"
    intervals = (f"95% intervals: {bands['method']} ({bands['draws']} draws)" if bands
                 else "no intervals (fewer than two tasks, or an evaluation from before they existed)")
    return (f"{result.get('num_tasks', cfg.get('n_tasks', '?'))} tasks, avg@{cfg.get('samples', 'n')} "
            f"{how}, K = {len(result['accuracy_by_step']) - 1}; {intervals}")


def training_depths(groups: list[Any]) -> str:
    """How deep the groups training learned from were (depth k: the k-th revision of an answer)."""
    if not groups:
        return "no groups"
    counts = Counter(g.depth for g in groups)
    shares = ", ".join(f"{depth}: {100 * n / len(groups):.0f}%" for depth, n in sorted(counts.items()))
    mean = sum(g.depth for g in groups) / len(groups)
    return f"{shares} (mean {mean:.2f}, deepest {max(counts)}) over {len(groups)} groups"


def _timing(run_dir: Path, base: dict[str, Any], trained: dict[str, Any], wall_s: float | None) -> str:
    """Where this run's time went: machines differ by an order of magnitude, so the report says."""
    clock = RunDir(run_dir).train_clock
    training = json.loads(clock.read_text())["seconds"] if clock.exists() else 0.0
    measured = f"base evaluation {base.get('elapsed_s', 0) / 60:.1f} min"
    if base.get("reused_from"):  # measured by an earlier run, not in this one's time
        measured = (f"base evaluation reused from {base['reused_from']} "
                    f"(it took {base.get('elapsed_s', 0) / 60:.1f} min)")
    parts = [measured, f"training {training / 60:.1f} min",
             f"trained evaluation {trained.get('elapsed_s', 0) / 60:.1f} min"]
    total = f"{wall_s / 60:.1f} min in this invocation: " if wall_s is not None else ""
    return total + ", ".join(parts)


def write_report(run_dir: Path, base: dict[str, Any], trained: dict[str, Any], *, machine: str = "",
                 wall_s: float | None = None, full_size: str = "",
                 word_problems: tuple[dict[str, Any], dict[str, Any]] | None = None) -> Path:
    """``machine``: the hardware and precision the run used (``exitagent.run`` passes it);
    ``full_size``: what measures this run's checkpoint with the paper's protocol at full size, when
    the run's own evaluation was smaller; ``word_problems``: base and trained on the second held-out set."""
    figures = RunDir(run_dir).report
    figures.mkdir(parents=True, exist_ok=True)
    _accuracy_plot(base, trained, figures / "accuracy.png")
    _training_plot(run_dir, figures / "training.png")
    with open_run_store(run_dir) as store:  # RUN/store.url, else RUN/store.sqlite
        groups, entries = store.groups(), store.entries()
    curriculum_view.plot(groups, figures / "curriculum.png")
    summary = curriculum_view.format_summary(curriculum_view.summarize(entries, groups))
    summary += "\n" + curriculum_view.format_collectors(read_metrics(run_dir, "collect", "group"))
    updates = _rows(RunDir(run_dir).metrics_file("update"), "update")
    score = score_name(trained).capitalize()
    gain = 100 * (trained["accuracy_by_step"][0] - base["accuracy_by_step"][0])
    text = f"""# exitagent run: {run_dir.name}

## Result

{_header(trained)}
{_line("base", base)}
{_line("trained", trained)}

Held-out {held_out(trained)}: {_protocol(trained)}. Base and trained were measured with the same flags.
{score} at k=0 changed by {gain:+.1f} points after {len(updates)} updates on {len(groups)} groups.
Depths trained on: {training_depths(groups)}.
{full_size}{_word_problems(word_problems)}
{_curve_table(base, trained)}

![accuracy](report/accuracy.png)

Machine: {machine or "not recorded"}.
Time: {_timing(run_dir, base, trained, wall_s)}.
Budget: {describe(spent(run_dir))}.

## Training

![training](report/training.png)

## Curriculum

```
{summary}
```

![curriculum](report/curriculum.png)
"""
    path = RunDir(run_dir).report_md
    path.write_text(text)
    return path

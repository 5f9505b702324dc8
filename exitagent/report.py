"""The run report: base vs trained self-improvement curves, the training curves, the curriculum.

``write_report(run_dir, base, trained)`` writes ``RUN/report.md`` and the PNG plots it shows
(``RUN/report/*.png``) from the two evaluation results and the run's metrics files and store.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from matplotlib.ticker import MaxNLocator

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
        curve = [100 * a for a in result["accuracy_by_step"]]
        axis.plot(range(len(curve)), curve, marker="o", label=name)
    axis.set_xlabel("self-improvement step k")
    axis.xaxis.set_major_locator(MaxNLocator(integer=True))  # steps are whole numbers
    axis.set_ylabel("held-out accuracy (%)")
    axis.set_title("Inference-time self-improvement")
    axis.grid(alpha=0.3)
    axis.legend()
    figure.tight_layout()
    figure.savefig(out, dpi=120)
    plt.close(figure)


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
    curve = " → ".join(f"{100 * a:.1f}" for a in result["accuracy_by_step"])
    return f"| {name} | {100 * result['accuracy_by_step'][0]:.1f} | {100 * result['delta_k']:+.1f} | " \
           f"{result['net_corrections']:+d} | {curve} |"


def _timing(run_dir: Path, base: dict[str, Any], trained: dict[str, Any], wall_s: float | None) -> str:
    """Where this run's time went: machines differ by an order of magnitude, so the report says."""
    clock = RunDir(run_dir).train_clock
    training = json.loads(clock.read_text())["seconds"] if clock.exists() else 0.0
    parts = [f"base evaluation {base.get('elapsed_s', 0) / 60:.1f} min", f"training {training / 60:.1f} min",
             f"trained evaluation {trained.get('elapsed_s', 0) / 60:.1f} min"]
    total = f"{wall_s / 60:.1f} min in this invocation: " if wall_s is not None else ""
    return total + ", ".join(parts)


def write_report(run_dir: Path, base: dict[str, Any], trained: dict[str, Any], *, machine: str = "",
                 wall_s: float | None = None) -> Path:
    """``machine``: the hardware and precision the run used (``exitagent.run`` passes it)."""
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
    k = len(base["accuracy_by_step"]) - 1
    gain = 100 * (trained["accuracy_by_step"][0] - base["accuracy_by_step"][0])
    text = f"""# exitagent run: {run_dir.name}

## Result

| policy | accuracy at k=0 (%) | Δ_{k} (points) | net corrections | accuracy by step k = 0..{k} (%) |
|---|---|---|---|---|
{_line("base", base)}
{_line("trained", trained)}

Held-out arithmetic, avg@{base.get("config", {}).get("samples", "n")}; accuracy at k=0 changed by
{gain:+.1f} points after {len(updates)} updates on {len(groups)} groups.

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

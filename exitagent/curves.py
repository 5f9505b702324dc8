"""Self-improvement curves with their 95% intervals: accuracy at every step k, as plots and text.

Shared by ``exitagent.evaluate`` (one evaluation's PNG), ``exitagent.report`` (base vs trained)
and ``exitagent.variants`` (every variant). Each takes an evaluation as its JSON (``evaluate``'s
``--out``), whose ``intervals`` come from ``exitagent.stats``; an evaluation without them (fewer
than two tasks, or written before intervals existed) is drawn without a band.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # no display needed
import matplotlib.pyplot as plt
from matplotlib.ticker import MaxNLocator


def bands(result: dict[str, Any], key: str = "accuracy_by_step") -> list[dict[str, float] | None]:
    """The intervals of ``key`` (one per step; None where it has none)."""
    found = (result.get("intervals") or {}).get(key)
    return list(found) if found else [None] * len(result[key])


def draw_curve(ax: Any, result: dict[str, Any], label: str, **style: Any) -> None:
    """One evaluation's accuracy by step (in %) on ``ax``, its 95% intervals as a shaded band."""
    points = [(k, 100 * a) for k, a in enumerate(result["accuracy_by_step"]) if a is not None]
    line, = ax.plot([k for k, _ in points], [a for _, a in points], marker="o", label=label, **style)
    shaded = [(k, 100 * i["low"], 100 * i["high"]) for k, i in enumerate(bands(result)) if i]
    if shaded:
        ax.fill_between([b[0] for b in shaded], [b[1] for b in shaded], [b[2] for b in shaded],
                        color=line.get_color(), alpha=0.2, linewidth=0)


def with_interval(value: float | None, interval: dict[str, float] | None, sign: bool = False) -> str:
    """A fraction in points with its interval: ``+2.0 [-0.5, +4.4]``; ``n/a`` when not measured."""
    if value is None:
        return "n/a"
    spec = "+.1f" if sign else ".1f"
    text = f"{100 * value:{spec}}"
    return text + (f" [{100 * interval['low']:{spec}}, {100 * interval['high']:{spec}}]" if interval else "")


def delta_with_interval(result: dict[str, Any]) -> str:
    """Delta_K in points with its interval: ``+2.0 [-0.5, +4.4]``."""
    return with_interval(result["delta_k"], (result.get("intervals") or {}).get("delta_k"), sign=True)


def net_with_interval(result: dict[str, Any]) -> str:
    """Net corrections (a count) with its interval: ``+3 [-2, +8]``."""
    interval = (result.get("intervals") or {}).get("net_corrections")
    text = f"{result['net_corrections']:+d}"
    return text + (f" [{interval['low']:+.0f}, {interval['high']:+.0f}]" if interval else "")


def score_label(name: str) -> str:
    """An evaluation's ``score`` (or a secondary score's name) as words: ``first_request_accuracy``
    -> ``first-request accuracy``."""
    return name.removesuffix("_accuracy").replace("_", "-") + " accuracy" if name.endswith("_accuracy") \
        else name.replace("_", " ")


def axes(ax: Any, score: str = "accuracy") -> None:
    ax.set_xlabel("self-improvement step k")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # steps are whole numbers
    ax.set_ylabel(f"{score_label(score)} (%), 95% interval shaded")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)


def save(figure: Any, path: Path) -> None:
    """Written completely, then renamed into place."""
    figure.tight_layout()
    tmp = path.with_name(path.name + ".tmp.png")
    figure.savefig(tmp, dpi=120)
    plt.close(figure)
    os.replace(tmp, path)


def plot_evaluation(result: dict[str, Any], path: Path, title: str) -> None:
    """One evaluation (and its greedy pass, dashed, when it has one) as a PNG: the headline score,
    then each secondary score (dotted; tool use: all-requests beside first-request accuracy)."""
    figure, ax = plt.subplots(figsize=(6, 4))
    score = result.get("score", "accuracy")
    draw_curve(ax, result, f"avg@{result['samples']}")
    if result.get("greedy"):
        draw_curve(ax, result["greedy"], "greedy", linestyle="--")
    for name, secondary in (result.get("secondary") or {}).items():
        draw_curve(ax, secondary, f"{score_label(name)}, avg@{result['samples']}", linestyle=":")
    ax.set_title(f"{title}\n{score_label(score)}: Delta_{result['steps']} = {delta_with_interval(result)} points, "
                 f"net corrections {net_with_interval(result)}", fontsize=9)
    axes(ax, score)
    save(figure, path)

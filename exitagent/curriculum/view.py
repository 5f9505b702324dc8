"""What the buffer looks like: its contents and where recorded groups started, as text and plots."""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from exitagent.types import BufferEntry, StoredGroup

MAX_SCORE = 0.25  # the largest population variance of rewards in [0, 1]


@dataclass(frozen=True)
class BufferSummary:
    """The curriculum at a glance: buffer contents, and where recorded groups started from."""

    size: int
    score_histogram: tuple[tuple[float, float, int], ...]  # (low, high, entries)
    depths: Mapping[int, int]
    start_turns: Mapping[int, int]
    step_kinds: Mapping[str, int]
    groups: int
    groups_from_buffer: int
    sampled_from: Mapping[int, int]  # policy step that produced a sampled entry -> groups


def summarize(entries: Sequence[BufferEntry], groups: Sequence[StoredGroup], bins: int = 10) -> BufferSummary:
    width = MAX_SCORE / bins
    counts = Counter(min(int(e.score / width), bins - 1) for e in entries)
    return BufferSummary(
        size=len(entries),
        score_histogram=tuple((b * width, (b + 1) * width, counts[b]) for b in range(bins)),
        depths=dict(sorted(Counter(e.depth for e in entries).items())),
        start_turns=dict(sorted(Counter(e.start_turn for e in entries).items())),
        step_kinds=dict(sorted(Counter(e.step_kind.value for e in entries).items())),
        groups=len(groups),
        groups_from_buffer=sum(g.entry_id is not None for g in groups),
        sampled_from=dict(sorted(Counter(g.sampled_from for g in groups if g.sampled_from is not None).items())),
    )


def format_summary(summary: BufferSummary) -> str:
    def counts(values: Mapping[Any, int]) -> str:
        return "  ".join(f"{k}: {v}" for k, v in values.items()) or "-"

    lines = [f"buffer size: {summary.size}", "score histogram (S = reward variance):"]
    top = max((n for _, _, n in summary.score_histogram), default=0) or 1
    lines += [f"  [{lo:.3f}, {hi:.3f})  {n:5d}  {'#' * round(30 * n / top)}" for lo, hi, n in summary.score_histogram]
    lines += [
        f"depth: {counts(summary.depths)}",
        f"start turn: {counts(summary.start_turns)}",
        f"step kinds: {counts(summary.step_kinds)}",
        f"groups: {summary.groups} ({summary.groups_from_buffer} started from the buffer)",
        f"sampled from iteration: {counts(summary.sampled_from)}",
    ]
    return "\n".join(lines)


def format_collectors(rows: Sequence[Mapping[str, Any]]) -> str:
    """Collect metrics merged from every collector (``log.read_metrics``): groups per collector and
    per server, and how far apart the servers' policy versions were."""
    if not rows:
        return "collectors: no collect metrics yet"
    collectors = Counter(str(r.get("source", "?")) for r in rows)
    servers = Counter(str(r["server"]) for r in rows if r.get("server"))
    skews = [int(r["version_skew"]) for r in rows if isinstance(r.get("version_skew"), int)]
    lines = [f"collectors: {len(collectors)} ({'  '.join(f'{k}: {v}' for k, v in sorted(collectors.items()))})"]
    if servers:
        lines.append(f"servers: {len(servers)} ({'  '.join(f'{k}: {v}' for k, v in sorted(servers.items()))})")
    if skews:
        lines.append(f"version skew between servers: max {max(skews)}, mean {sum(skews) / len(skews):.2f}, "
                     f"last {skews[-1]}")
    return "\n".join(lines)


def plot(groups: Sequence[StoredGroup], out: Path) -> None:
    """Sample depth, "sampled from iteration" and start turn over training, as one PNG."""
    import matplotlib

    matplotlib.use("Agg")  # no display on training machines
    import matplotlib.pyplot as plt

    fig, (depth_ax, source_ax, turn_ax) = plt.subplots(1, 3, figsize=(15, 4))
    steps = [g.version.step for g in groups]
    depth_ax.scatter(steps, [g.depth for g in groups], s=8, alpha=0.4)
    depth_ax.set(title="sample depth", xlabel="policy step", ylabel="depth k")
    sampled = [g for g in groups if g.sampled_from is not None]
    source_ax.scatter([g.version.step for g in sampled], [g.sampled_from for g in sampled], s=8, alpha=0.4)
    source_ax.set(title="sampled from iteration", xlabel="policy step", ylabel="step that produced the start")
    turn_ax.scatter(steps, [g.start_turn for g in groups], s=8, alpha=0.4)
    turn_ax.set(title="start turn", xlabel="policy step", ylabel="turn")
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)

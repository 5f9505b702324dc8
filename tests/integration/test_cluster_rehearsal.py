"""A one-machine rehearsal of a cluster (issue 16): ``python -m exitagent.run --servers 2
--collectors 2 --store postgresql://...``: two real CPU vLLM servers on one weights directory, two
collectors routing over both, the trainer, and a real PostgreSQL store, to the same report.

docs/scaling.md maps the same processes onto several machines."""

from __future__ import annotations

import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from exitagent.curriculum.store_url import open_run_store
from exitagent.log import read_metrics
from tests.postgres import Cluster

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

SMALL = ["--eval-tasks", "4", "--eval-steps", "1", "--group-size", "4", "--groups-per-step", "2",
         "--max-tokens", "24", "--serve-flags=--enforce-eager"]


def test_two_servers_two_collectors_and_postgresql_reach_the_report(tmp_path: Path, postgres: Cluster) -> None:
    run_dir = tmp_path / "cluster"
    command = [sys.executable, "-m", "exitagent.run", "--run-dir", str(run_dir), *SMALL, "--train-minutes", "2",
               "--servers", "2", "--collectors", "2", "--store", postgres.url(schema="rehearsal")]
    done = subprocess.run(command, capture_output=True, text=True, timeout=2400)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-3000:]
    assert (run_dir / "report.md").exists()
    # run waits until EVERY server serves the last checkpoint before the trained evaluation
    updates = [row for row in read_metrics(run_dir, "update") if row.get("kind") == "update"]
    assert updates, "the trainer made no update"
    assert re.search(r"served \S+ / \S+", done.stdout), done.stdout[-3000:]  # each server's version

    groups = read_metrics(run_dir, "collect", "group")
    assert len({row["source"] for row in groups}) == 2, "one metrics file per collector, both collected"
    assert len(Counter(row["server"] for row in groups)) == 2, "groups went to both servers"

    with open_run_store(run_dir) as store:  # by RUN/store.url, as collect and update found it
        stored = {group.id: group for group in store.groups()}
        pending = store.fetch_groups(limit=10_000)  # with their rollouts
    assert {row["group_id"] for row in groups} <= set(stored), "every group a collector reported is stored"
    assert all(len(group.rollouts) == 4 for group in pending), "no group half-written"
    assert sum(group.consumed_by_step is not None for group in stored.values()) >= 2  # one update's batch
    assert (run_dir / "store.url").stat().st_mode & 0o077 == 0  # where the children found the store

"""The staleness gate of ``exitagent.collect``: collection waits while the trainer is behind.

A group is stale when it is more than ``--max-staleness`` policy versions older
than the current policy, where "current" is the newest of: the version the server serves now, the
version the trainer held when it last consumed a group (its step minus one), the newest version
seen in a sample. That is the trainer's own rule (``training.update`` trains versions >= its step
minus its ``--max-staleness``), so with equal limits neither waits for the other. Collection starts
no new group while the store holds an unconsumed group that is already stale: the trainer is
behind, and more groups would only wait longer and age further. It resumes once the trainer has
consumed those groups (or dropped them, ``drop_stale``, which counts as consumed). With no trainer
the version never moves, so standalone collection never pauses. With ``--max-unconsumed N`` it
also pauses while N recorded groups are waiting for the trainer: on a shared machine (two CPU
cores running vLLM and the trainer) running far ahead only takes CPU from the trainer and makes
groups that will be stale. The gate checks the store at most every ``--poll-s`` seconds, with one
aggregate query (``CurriculumStore.progress``), however many collectors and groups there are.
"""

from __future__ import annotations

import math
import time

import anyio
import structlog

from exitagent.curriculum.store import CurriculumStore
from exitagent.policy import Policy

log = structlog.get_logger(__name__)


class StalenessGate:
    """The rule above. ``current`` is the newest policy version known."""

    def __init__(self, store: CurriculumStore, policy: Policy, max_staleness: int, poll_s: float,
                 max_unconsumed: int = 0) -> None:
        self.store, self.policy, self.max_staleness, self.poll_s = store, policy, max_staleness, poll_s
        self.max_unconsumed = max_unconsumed
        self.current = 0
        self.waiting = 0
        self.oldest_waiting: int | None = None
        self.paused_s = 0.0
        self._paused_since: float | None = None
        self._checked_at = -math.inf

    def observe(self, step: int) -> None:
        self.current = max(self.current, step)

    @property
    def is_open(self) -> bool:
        if self.max_unconsumed and self.waiting >= self.max_unconsumed:
            return False
        return self.oldest_waiting is None or self.current - self.oldest_waiting <= self.max_staleness

    async def refresh(self) -> None:
        probe = getattr(self.policy, "policy_version", None)  # exitagent.serve's /policy, when there is one
        if probe is not None:
            served = await probe()
            self.observe(served.step if served.name != "unknown" else 0)
        # One aggregate query (the database counts), not every group header each poll.
        progress = self.store.progress()
        # A group consumed by step N was trained (or dropped as stale) by the trainer while it held
        # version N - 1: that is the trainer's current version, and the one its own staleness rule
        # counts from. Counting from N paused collect for groups the trainer still wanted: it waited
        # for them, collect waited for it (seen in a run after a stale drop).
        self.observe(max((progress.last_consumed_by or 1) - 1, 0))
        self.waiting, self.oldest_waiting = progress.waiting, progress.oldest_waiting
        self._checked_at = time.monotonic()
        if not self.is_open and self._paused_since is None:
            self._paused_since = time.monotonic()
            log.info("collect_paused", current=self.current, oldest_waiting=self.oldest_waiting,
                     max_staleness=self.max_staleness)
        elif self.is_open and self._paused_since is not None:
            self.paused_s += time.monotonic() - self._paused_since
            self._paused_since = None
            log.info("collect_resumed", current=self.current, oldest_waiting=self.oldest_waiting)

    def paused_total(self) -> float:
        ongoing = time.monotonic() - self._paused_since if self._paused_since is not None else 0.0
        return self.paused_s + ongoing

    async def wait(self, stop: anyio.Event) -> None:
        """Return once a new group may start, or ``stop`` is set."""
        while not stop.is_set():
            if time.monotonic() - self._checked_at >= self.poll_s:  # workers share one check per poll
                await self.refresh()
            if self.is_open:
                return
            with anyio.move_on_after(self.poll_s):
                await stop.wait()

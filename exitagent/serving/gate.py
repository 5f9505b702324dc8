"""The reload gate: many client requests at once, or one writer (a reload, an engine restart) alone.

A readers-writer lock that favours the writer, built so that no cancellation can leave it stuck:

- ``acquire`` counts a request only once it is let through, and ``release`` is synchronous, so a
  request cancelled while waiting, or while being served, is never left counted;
- writers queue on a lock, so the reloader and the engine supervisor never interleave;
- a writer cancelled while it waits clears its flag on the way out;
- a writer waits at most ``drain_timeout_s`` for in-flight requests, then cancels them (each holds
  its own cancel scope, handed to ``acquire``), so a stalled engine or a client that has stopped
  reading cannot hold a reload back for ever.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import anyio
import structlog

log = structlog.get_logger(__name__)


class Gate:
    def __init__(self, drain_timeout_s: float = 300.0) -> None:
        self.drain_timeout_s = drain_timeout_s
        self._holders: set[anyio.CancelScope] = set()
        self._writer = anyio.Lock()
        self._reloading = False
        self._changed = anyio.Event()

    @property
    def in_flight(self) -> int:
        return len(self._holders)

    @property
    def reloading(self) -> bool:
        return self._reloading

    def _notify(self) -> None:
        self._changed.set()
        self._changed = anyio.Event()

    async def acquire(self, holder: anyio.CancelScope) -> None:
        """Wait until no writer holds or wants the gate, then count ``holder`` in.

        ``holder`` is the cancel scope around the request: a writer whose drain deadline passes
        cancels it.
        """
        while self._reloading:
            await self._changed.wait()
        self._holders.add(holder)  # no checkpoint between the check and this: atomic in one thread

    def release(self, holder: anyio.CancelScope) -> None:
        self._holders.discard(holder)
        self._notify()

    async def exclusive(self, work: Callable[[], Awaitable[None]]) -> None:
        """Run ``work`` with no request in flight and none let in until it returns (or raises)."""
        async with self._writer:
            self._reloading = True
            try:
                with anyio.move_on_after(self.drain_timeout_s):
                    while self._holders:
                        await self._changed.wait()
                if self._holders:
                    log.warning("gate_drain_timed_out", cancelled_requests=len(self._holders),
                                drain_timeout_s=self.drain_timeout_s)
                    for holder in self._holders:
                        holder.cancel()
                    while self._holders:  # each releases in its own finally, at its next checkpoint
                        await self._changed.wait()
                await work()
            finally:
                self._reloading = False
                self._notify()

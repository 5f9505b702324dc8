"""Several policy servers behind one policy: least-busy choice, stickiness, ejection and recovery.

``collect`` and ``evaluate`` take ``--base-url`` several times. Each group (or evaluated task) is
one unit of work, pinned to one server from its first request to its last::

    routed = RoutedPolicy([OpenAIPolicy(url_a), OpenAIPolicy(url_b)], deadline_s=300)
    await routed.check_same_base()                       # refuse servers of different base models
    result = await routed.run_pinned(lambda policy: domain.roll_out(start, policy, ...))

- **Least busy.** A new unit goes to the admitted server with the fewest units in flight; ties go to
  the one given the fewest units so far, so idle servers take turns.
- **Sticky.** Every request of a unit (the ``n=G`` first turn and each later turn of a multi-turn
  episode) goes to the unit's server: its prefix cache holds the conversation so far.
- **Ejection and recovery.** A server that fails ``eject_after`` units in a row (``ServerUnavailable``:
  it stopped answering within its client's deadline) is ejected; after ``probe_s`` (doubling on each
  failed probe, up to ``max_probe_s``) ``GET /health`` and ``GET /policy`` are asked again, and it is
  admitted once it answers with the same base model.
- **A server that dies mid-unit.** Nothing of a unit is written before it ends (collect records a
  group in one store transaction after it is scored), so the unit runs again from the start on
  another server. This is the one place work moves between servers; retries against one server
  stay in ``client.retrying``. After ``deadline_s`` with no server answering, ``ServerUnavailable``.

Versions stay exact: every answer carries its server's policy version, so a group from a server
that is one reload behind is just one version older (``version_skew`` in the metrics).
``Router`` is the state without I/O (tested on its own); ``RoutedPolicy`` does the calls.
"""

from __future__ import annotations

import math
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import anyio
import structlog

from exitagent.errors import ConfigError, ServerUnavailable
from exitagent.policy import DEFAULT_PARAMS, Policy, SamplingParams
from exitagent.types import Message, PolicyVersion, Sample

log = structlog.get_logger(__name__)

T = TypeVar("T")


@dataclass
class _Server:
    in_flight: int = 0
    given: int = 0  # units started here so far (the tie-break)
    failures: int = 0  # consecutive failed units
    ejected_until: float | None = None  # None: admitted
    probe_s: float = 0.0
    probing: bool = False
    version: int | None = None  # the newest policy version seen from it


@dataclass
class Router:
    """Which server the next unit goes to; no I/O, the clock is the caller's."""

    size: int
    eject_after: int = 2
    probe_s: float = 10.0
    max_probe_s: float = 120.0
    servers: list[_Server] = field(init=False)

    def __post_init__(self) -> None:
        if self.size < 1 or self.eject_after < 1:
            raise ConfigError("a router needs at least one server, and eject_after >= 1")
        self.servers = [_Server() for _ in range(self.size)]

    def choose(self) -> int | None:
        """The least busy admitted server (None: every server is ejected)."""
        admitted = [i for i, s in enumerate(self.servers) if s.ejected_until is None]
        if not admitted:
            return None
        return min(admitted, key=lambda i: (self.servers[i].in_flight, self.servers[i].given, i))

    def acquire(self, index: int) -> None:
        self.servers[index].in_flight += 1
        self.servers[index].given += 1

    def release(self, index: int) -> None:
        self.servers[index].in_flight -= 1

    def succeeded(self, index: int) -> None:
        self.servers[index].failures = 0

    def failed(self, index: int, now: float) -> bool:
        """Count a failed unit; True when that ejects the server."""
        server = self.servers[index]
        server.failures += 1
        if server.ejected_until is None and server.failures >= self.eject_after:
            server.probe_s = self.probe_s
            server.ejected_until = now + server.probe_s
            return True
        return False

    def eject(self, index: int, now: float) -> None:
        """Out until a probe admits it (a server that did not answer at start-up)."""
        self.servers[index].ejected_until, self.servers[index].probe_s = now, self.probe_s

    def due_for_probe(self, now: float) -> list[int]:
        """Ejected servers whose wait is over and that no one is probing; marked as being probed."""
        due = [i for i, s in enumerate(self.servers)
               if s.ejected_until is not None and s.ejected_until <= now and not s.probing]
        for i in due:
            self.servers[i].probing = True
        return due

    def probed(self, index: int, ok: bool, now: float) -> None:
        server = self.servers[index]
        server.probing = False
        if ok:  # admitted again; one more failed unit ejects it at once, with a longer wait
            server.ejected_until, server.failures = None, self.eject_after - 1
        else:
            server.probe_s = min(2 * server.probe_s, self.max_probe_s)
            server.ejected_until = now + server.probe_s

    def next_probe(self) -> float:
        return min((s.ejected_until for s in self.servers if s.ejected_until is not None), default=math.inf)

    def observe(self, index: int, step: int) -> None:
        server = self.servers[index]
        server.version = step if server.version is None else max(server.version, step)

    def skew(self) -> int:
        """Newest minus oldest policy version among the admitted servers (0 with one server)."""
        versions = [s.version for s in self.servers if s.ejected_until is None and s.version is not None]
        return max(versions) - min(versions) if versions else 0


def _lost(error: BaseException) -> ServerUnavailable | None:
    """The ``ServerUnavailable`` a unit failed with, also from inside task groups; None if it failed otherwise."""
    if isinstance(error, ServerUnavailable):
        return error
    if isinstance(error, BaseExceptionGroup):
        found, rest = error.split(ServerUnavailable)
        if found is not None and rest is None:  # only lost-server errors: nothing else went wrong
            leaf: BaseException = found
            while isinstance(leaf, BaseExceptionGroup):
                leaf = leaf.exceptions[0]
            return leaf if isinstance(leaf, ServerUnavailable) else None
    return None


class Pinned:
    """One server, as a ``Policy``, for the requests of one unit; it records the versions it sees."""

    def __init__(self, routed: RoutedPolicy, index: int) -> None:
        self._routed, self.index = routed, index
        self.backend: Any = routed.backends[index]
        self.base_url: str = getattr(self.backend, "base_url", f"server-{index}")

    @property
    def max_context(self) -> int:
        return int(self.backend.max_context)

    def estimate_tokens(self, text: str) -> int:
        return int(self.backend.estimate_tokens(text))

    async def sample(self, messages: Sequence[Message], *, n: int = 1, params: SamplingParams = DEFAULT_PARAMS,
                     tools: Sequence[dict[str, Any]] | None = None) -> list[Sample]:
        samples: list[Sample] = await self.backend.sample(messages, n=n, params=params, tools=tools)
        for sample in samples:
            if sample.version.name != "unknown":
                self._routed.router.observe(self.index, sample.version.step)
        return samples


class RoutedPolicy:
    """A ``Policy`` over several servers (module docstring). One server works too: then it only adds
    the wait for a server that comes back within ``deadline_s``."""

    def __init__(self, backends: Sequence[Policy], *, deadline_s: float = 300.0, eject_after: int = 2,
                 probe_s: float = 10.0, max_probe_s: float = 120.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.backends = list(backends)
        self.router = Router(len(self.backends), eject_after, probe_s, max_probe_s)
        self.deadline_s, self._clock = deadline_s, clock
        self._base: dict[str, Any] | None = None  # the base model every admitted server must serve

    @property
    def urls(self) -> list[str]:
        return [getattr(b, "base_url", f"server-{i}") for i, b in enumerate(self.backends)]

    @property
    def max_context(self) -> int:
        return min(int(b.max_context) for b in self.backends)

    def estimate_tokens(self, text: str) -> int:
        return max(int(b.estimate_tokens(text)) for b in self.backends)

    async def sample(self, messages: Sequence[Message], *, n: int = 1, params: SamplingParams = DEFAULT_PARAMS,
                     tools: Sequence[dict[str, Any]] | None = None) -> list[Sample]:
        """One request as its own unit (callers with several requests per unit use ``run_pinned``)."""
        return await self.run_pinned(lambda policy: policy.sample(messages, n=n, params=params, tools=tools))

    async def aclose(self) -> None:
        for backend in self.backends:
            close = getattr(backend, "aclose", None)
            if close is not None:
                await close()

    async def __aenter__(self) -> RoutedPolicy:
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.aclose()

    async def run_pinned(self, work: Callable[[Pinned], Awaitable[T]]) -> T:
        """``work`` on the least busy server; again on another one if its server stops answering."""
        deadline = self._clock() + self.deadline_s
        while True:
            index = await self._choose(deadline)
            self.router.acquire(index)
            try:
                result = await work(Pinned(self, index))
            except BaseException as error:
                lost = _lost(error)
                if lost is None:
                    raise
                ejected = self.router.failed(index, self._clock())
                log.warning("unit_moved_off_server", server=self.urls[index], ejected=ejected, error=str(lost)[:200])
                if self._clock() >= deadline:
                    raise lost from None
                continue
            finally:
                self.router.release(index)
            self.router.succeeded(index)
            return result

    async def _choose(self, deadline: float) -> int:
        while True:
            now = self._clock()
            for index in self.router.due_for_probe(now):
                ok = await self._admits(index)
                self.router.probed(index, ok, self._clock())
                log.info("server_restored" if ok else "server_probe_failed", server=self.urls[index])
            chosen = self.router.choose()
            if chosen is not None:
                return chosen
            if now >= deadline:
                which = f"policy server {self.urls[0]} did not" if len(self.urls) == 1 else \
                    f"none of the {len(self.urls)} policy servers ({', '.join(self.urls)})"
                raise ServerUnavailable(f"{which} answer within {self.deadline_s:.0f} s (--server-deadline-s)")
            await anyio.sleep(max(0.05, min(self.router.next_probe() - now, deadline - now, 5.0)))

    async def _admits(self, index: int) -> bool:
        """A probe: the server answers ``/health`` and serves the base model the others serve."""
        backend = self.backends[index]
        healthy = getattr(backend, "healthy", None)
        if healthy is not None and not await healthy():
            return False
        try:
            self._match(index, await _identity(backend))
        except ServerUnavailable:
            return False
        return True

    async def check_same_base(self) -> None:
        """Refuse servers that serve different base models (``ConfigError``). A server that does not
        answer yet is ejected, and admitted later by a probe only if its base model matches."""
        for index, backend in enumerate(self.backends):
            try:
                identity = await _identity(backend)
            except ServerUnavailable as error:
                log.warning("server_not_answering_at_start", server=self.urls[index], error=str(error)[:200])
                self.router.eject(index, self._clock())
                continue
            self._match(index, identity)

    def _match(self, index: int, identity: dict[str, Any]) -> None:
        identity = {**identity, "url": self.urls[index]}
        if self._base is None:
            self._base = identity
            return
        if _same(self._base, identity):
            return
        raise ConfigError(f"the policy servers serve different base models: {self._base['url']} serves "
                          f"{_describe(self._base)}, {identity['url']} serves {_describe(identity)}; give "
                          f"--base-url only servers of one model")

    async def policy_version(self) -> PolicyVersion:
        """The newest version any admitted server serves now (the staleness gate's "current")."""
        newest = PolicyVersion(0, "unknown")
        for index, backend in enumerate(self.backends):
            probe = getattr(backend, "policy_version", None)
            if probe is None or self.router.servers[index].ejected_until is not None:
                continue
            version: PolicyVersion = await probe()
            if version.name != "unknown":
                self.router.observe(index, version.step)
                newest = max(newest, version) if newest.name != "unknown" else version
        return newest


async def _identity(backend: Any) -> dict[str, Any]:
    """What names a server's base model: ``/policy``'s ``base`` (exitagent.serve), else the model list."""
    info_of = getattr(backend, "policy_info", None)
    if info_of is None:  # a fake or an in-process policy: nothing to compare
        return {}
    info = await info_of()
    if info and isinstance(info.get("base"), dict) and info["base"].get("fingerprint"):
        return {"fingerprint": str(info["base"]["fingerprint"]), "name": str(info["base"].get("name", "?"))}
    models = await backend.model_names()
    return {"models": models, "name": ", ".join(models) or "no /policy and no model list"}


def _same(a: dict[str, Any], b: dict[str, Any]) -> bool:
    if not a.get("name") and not b.get("name"):
        return True  # nothing to compare (fakes)
    if "fingerprint" in a or "fingerprint" in b:
        return a.get("fingerprint") == b.get("fingerprint")
    return a.get("models") == b.get("models")


def _describe(identity: dict[str, Any]) -> str:
    fingerprint = identity.get("fingerprint")
    return f"{identity.get('name')} (weights {fingerprint})" if fingerprint else str(identity.get("name"))


def urls(value: str | Sequence[str]) -> tuple[str, ...]:
    """``--base-url`` given once or several times (a plain string from code is one URL)."""
    found = (value,) if isinstance(value, str) else tuple(value)
    found = tuple(url.rstrip("/") for url in found)
    if not found or len(set(found)) != len(found):
        raise ConfigError(f"--base-url: give one or more different server URLs, not {list(found)}")
    return found


def open_servers(base_urls: Sequence[str], *, deadline_s: float, failover_s: float, **client: Any) -> RoutedPolicy:
    """One ``OpenAIPolicy`` per URL behind a router. With several servers each client gives up after
    ``failover_s`` (its group then moves on); with one it keeps retrying for ``deadline_s``, as before."""
    from exitagent.client import OpenAIPolicy

    per_server = deadline_s if len(base_urls) == 1 else min(failover_s, deadline_s)
    return RoutedPolicy([OpenAIPolicy(url, deadline_s=per_server, **client) for url in base_urls],
                        deadline_s=deadline_s)

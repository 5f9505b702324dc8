"""Routing over several policy servers (fakes at the server seam): least-busy choice, stickiness,
ejection and recovery, failover of a group whose server dies, and refusal of mixed base models."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import anyio
import anyio.lowlevel
import httpx
import pytest

from evaluators.base import ExactMatchEvaluator
from exitagent.client import OpenAIPolicy
from exitagent.collect import CollectConfig, collect
from exitagent.curriculum.store import SQLiteStore
from exitagent.diversity import HashEmbedder
from exitagent.errors import ConfigError, ServerError, ServerUnavailable
from exitagent.log import read_metrics
from exitagent.policy import DEFAULT_PARAMS, SamplingParams, ScriptedPolicy
from exitagent.routing import Pinned, RoutedPolicy, Router, urls
from exitagent.types import Message, PolicyVersion, Sample, Task, Variant

pytestmark = pytest.mark.anyio

TASKS = [Task(f"t{i}", "math", f"What is {i} + {i}?", answer=str(2 * i)) for i in range(5)]


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@dataclass
class FakeServer:
    """One policy server: answers like ``ScriptedPolicy``, can be taken down, knows its base model."""

    base_url: str
    fingerprint: str = "same-model"
    version: PolicyVersion = field(default_factory=lambda: PolicyVersion(0, "base"))
    down: bool = False
    calls: int = 0
    fail_after: int | None = None  # answer this many requests, then die
    answers: ScriptedPolicy = field(default_factory=lambda: ScriptedPolicy(lambda _: "4", max_context=4096))

    @property
    def max_context(self) -> int:
        return 4096

    def estimate_tokens(self, text: str) -> int:
        return self.answers.estimate_tokens(text)

    async def sample(self, messages: Sequence[Message], *, n: int = 1, params: SamplingParams = DEFAULT_PARAMS,
                     tools: Sequence[dict[str, Any]] | None = None) -> list[Sample]:
        self.calls += 1
        if self.fail_after is not None and self.calls > self.fail_after:
            self.down = True
        if self.down:
            raise ServerUnavailable(f"policy server {self.base_url} unreachable: connection refused")
        await anyio.lowlevel.checkpoint()
        samples = await self.answers.sample(messages, n=n, params=params)
        return [Sample(s.text, s.prompt_ids, s.completion_ids, s.logprobs, s.finish_reason, self.version)
                for s in samples]

    async def healthy(self) -> bool:
        return not self.down

    async def policy_info(self) -> dict[str, Any] | None:
        if self.down:
            raise ServerUnavailable(f"policy server {self.base_url} unreachable")
        return {"version": str(self.version), "base": {"name": "m", "fingerprint": self.fingerprint}}

    async def policy_version(self) -> PolicyVersion:
        return self.version

    async def model_names(self) -> list[str]:
        return []


def test_least_busy_choice_takes_turns_when_idle_and_avoids_the_loaded_server() -> None:
    router = Router(3)
    picks = []
    for _ in range(3):
        index = router.choose()
        assert index is not None
        router.acquire(index)
        picks.append(index)
    assert picks == [0, 1, 2]  # one unit each
    router.release(1)
    assert router.choose() == 1  # the one with nothing in flight
    router.release(0)
    router.release(2)
    router.acquire(1)
    assert router.choose() in (0, 2)  # 1 is busy again


def test_ejection_after_repeated_failures_and_recovery_after_a_probe() -> None:
    router = Router(2, eject_after=2, probe_s=10.0, max_probe_s=40.0)
    assert router.failed(0, now=0.0) is False  # one failure: still admitted
    assert router.choose() == 0
    assert router.failed(0, now=1.0) is True
    assert router.choose() == 1 and router.due_for_probe(5.0) == []
    assert router.due_for_probe(11.0) == [0] and router.due_for_probe(11.0) == []  # one probe at a time
    router.probed(0, ok=False, now=11.0)  # still down: waits twice as long
    assert router.due_for_probe(30.0) == [] and router.due_for_probe(31.0) == [0]
    router.probed(0, ok=True, now=31.0)
    assert router.servers[0].ejected_until is None
    assert router.failed(0, now=32.0) is True  # back on probation: one failure ejects it again


def test_version_skew_counts_admitted_servers_only() -> None:
    router = Router(3)
    assert router.skew() == 0
    router.observe(0, 5)
    router.observe(1, 3)
    router.observe(2, 1)
    assert router.skew() == 4
    router.eject(2, now=0.0)
    assert router.skew() == 2


def test_base_urls_must_be_distinct() -> None:
    assert urls("http://a/v1/") == ("http://a/v1",)
    with pytest.raises(ConfigError, match="different server URLs"):
        urls(["http://a/v1", "http://a/v1/"])
    with pytest.raises(ConfigError):
        urls([])


async def test_a_multi_turn_unit_stays_on_its_server() -> None:
    """Every request of one unit goes to the server it started on, even when another is idler."""
    a, b = FakeServer("http://a/v1"), FakeServer("http://b/v1")
    routed = RoutedPolicy([a, b])
    started, release = anyio.Event(), anyio.Event()

    async def long_episode(server: Pinned) -> str:
        for turn in range(4):
            await server.sample([Message("user", f"turn {turn}")])
            if turn == 0:
                started.set()
                await release.wait()
        return server.base_url

    async def short(server: Pinned) -> str:
        await server.sample([Message("user", "one turn")])
        return server.base_url

    async with anyio.create_task_group() as group:
        first: list[str] = []

        async def run_long() -> None:
            first.append(await routed.run_pinned(long_episode))

        group.start_soon(run_long)
        await started.wait()
        assert await routed.run_pinned(short) == "http://b/v1"  # least busy: b, while a is mid-episode
        assert await routed.run_pinned(short) == "http://b/v1"
        release.set()
    assert first == ["http://a/v1"] and a.calls == 4 and b.calls == 2


async def test_a_unit_whose_server_dies_runs_again_on_another_and_the_server_is_ejected_then_restored() -> None:
    clock = Clock()
    a, b = FakeServer("http://a/v1", fail_after=1), FakeServer("http://b/v1")
    routed = RoutedPolicy([a, b], eject_after=1, probe_s=10.0, clock=clock)
    attempts: list[str] = []

    async def two_turns(server: Pinned) -> str:
        attempts.append(server.base_url)
        await server.sample([Message("user", "first")])
        await server.sample([Message("user", "second")])  # a dies here, mid-unit
        return server.base_url

    assert await routed.run_pinned(two_turns) == "http://b/v1"
    assert attempts == ["http://a/v1", "http://b/v1"]
    assert routed.router.choose() == 1  # a is ejected
    a.down, a.fail_after = False, None
    clock.now = 11.0  # the probe is due: a answers /health and /policy with the same model
    assert await routed.run_pinned(two_turns) == "http://a/v1"


async def test_every_server_down_is_one_error_after_the_deadline() -> None:
    a, b = FakeServer("http://a/v1", down=True), FakeServer("http://b/v1", down=True)
    routed = RoutedPolicy([a, b], deadline_s=0.3, eject_after=1, probe_s=60.0)  # both ejected, no probe due
    with pytest.raises(ServerUnavailable, match="none of the 2 policy servers"):
        await routed.sample([Message("user", "hi")])


async def test_servers_with_different_base_models_are_refused() -> None:
    routed = RoutedPolicy([FakeServer("http://a/v1"), FakeServer("http://b/v1", fingerprint="another")])
    with pytest.raises(ConfigError, match=r"different base models.*http://a/v1.*http://b/v1"):
        await routed.check_same_base()


async def test_a_server_down_at_start_is_admitted_later_only_with_the_same_model() -> None:
    clock = Clock()
    a, b = FakeServer("http://a/v1"), FakeServer("http://b/v1", fingerprint="another", down=True)
    routed = RoutedPolicy([a, b], clock=clock)
    await routed.check_same_base()  # b does not answer: ejected, not refused yet
    assert await routed.sample([Message("user", "hi")]) and b.calls == 0
    b.down, clock.now = False, 100.0
    with pytest.raises(ConfigError, match="different base models"):
        await routed.sample([Message("user", "hi")])  # the next probe: b answers, with another model


async def test_mixed_models_are_refused_over_http_from_policy_or_the_model_list() -> None:
    def server(base: dict[str, str] | None, root: str) -> OpenAIPolicy:
        def handler(request: httpx.Request) -> httpx.Response:
            if request.url.path == "/policy":
                return httpx.Response(200, json={"version": "base", "base": base}) if base else httpx.Response(404)
            if request.url.path == "/v1/models":
                return httpx.Response(200, json={"data": [{"id": "policy", "root": root}]})
            return httpx.Response(200)
        return OpenAIPolicy(f"http://{root}/v1", transport=httpx.MockTransport(handler))

    m, n = {"name": "m", "fingerprint": "f1"}, {"name": "n", "fingerprint": "f2"}
    await RoutedPolicy([server(m, "a"), server(m, "b")]).check_same_base()
    mixed = RoutedPolicy([server(m, "a"), server(n, "b")])
    with pytest.raises(ConfigError, match=r"serves m \(weights f1\).*serves n \(weights f2\)"):
        await mixed.check_same_base()
    plain = RoutedPolicy([server(None, "model-x"), server(None, "model-y")])  # plain vLLM: the model list
    with pytest.raises(ConfigError, match="different base models"):
        await plain.check_same_base()


async def test_an_unreachable_server_is_unavailable_and_a_bad_request_is_not() -> None:
    def refused(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("connection refused", request=request)

    async with OpenAIPolicy("http://gone/v1", transport=httpx.MockTransport(refused), deadline_s=0.1) as gone:
        with pytest.raises(ServerUnavailable):
            await gone.sample([Message("user", "hi")])
    bad = OpenAIPolicy("http://bad/v1", transport=httpx.MockTransport(lambda r: httpx.Response(400, json={})))
    async with bad:
        with pytest.raises(ServerError) as raised:
            await bad.sample([Message("user", "hi")])
    assert not isinstance(raised.value, ServerUnavailable)  # the same request would fail anywhere: not moved


async def test_collect_over_two_servers_one_dying_records_whole_groups_with_their_server(tmp_path: Path) -> None:
    a = FakeServer("http://a/v1", version=PolicyVersion.at_step(3), fail_after=3)
    b = FakeServer("http://b/v1", version=PolicyVersion.at_step(1))
    routed = RoutedPolicy([a, b], eject_after=1, probe_s=3600.0)
    cfg = CollectConfig(run_dir=tmp_path, groups=8, group_size=4, concurrency=2, min_buffer=2, p_buffer=1.0,
                        variant=Variant.EXIT, max_tokens=64, progress=False, poll_s=0.05, max_staleness=10,
                        base_url=(a.base_url, b.base_url))
    with SQLiteStore.in_run(tmp_path) as store:
        summary = await collect(cfg, routed, ExactMatchEvaluator(), store, TASKS, embedder=HashEmbedder())
        groups = store.fetch_groups()
    assert summary.groups == len(groups) == 8 and all(len(g.rollouts) == 4 for g in groups)  # none half-written
    rows = read_metrics(tmp_path, "collect", "group")
    assert {r["server"] for r in rows} == {a.base_url, b.base_url}
    assert any(r["server_attempts"] == 2 for r in rows)  # the group a died under ran again on b
    assert {g.version.step for g in groups} == {1, 3}  # each group tagged with its own server's version
    assert max(r["version_skew"] for r in rows) == 2
    assert len(list((tmp_path / "metrics").glob("collect-*-*.jsonl"))) == 1  # this collector's own file
    assert json.loads((tmp_path / "config" / "collect.json").read_text())["base_url"] == [a.base_url, b.base_url]


@contextmanager
def policy_server(body: dict[str, Any]) -> Iterator[str]:
    """A loopback HTTP server that answers ``GET /policy`` with ``body`` (and 404 to anything else)."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            data = json.dumps(body).encode() if self.path == "/policy" else b"{}"
            self.send_response(200 if self.path in ("/policy", "/health") else 404)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *_: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    finally:
        server.shutdown()
        server.server_close()


def test_the_collect_command_refuses_servers_of_different_base_models(tmp_path: Path) -> None:
    """Over real loopback HTTP: one clear line, exit 2, and not one group recorded."""
    same = {"version": "base", "base": {"name": "smollm2-135m", "fingerprint": "cf1925c958c02923"}}
    other = {"version": "base", "base": {"name": "qwen2.5-7b", "fingerprint": "0123456789abcdef"}}
    with policy_server(same) as first, policy_server(other) as second:
        command = [sys.executable, "-m", "exitagent.collect", "--run-dir", str(tmp_path), "--base-url", first,
                   "--base-url", second, "--groups", "1", "--no-progress", "--log-level", "error"]
        result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("collect: the policy servers serve different base models") and "qwen2.5-7b" in line
    with SQLiteStore.in_run(tmp_path) as store:
        assert store.groups() == []

"""The public gateway against hostile clients: a real gateway and a fake engine on loopback (hypercorn both).

The same attacks are sent to a real vLLM behind ``exitagent.serve`` in
``tests/integration/test_gateway_vllm.py``; here they run in seconds, together with the limits
(body size, head and body deadlines, upstream timeouts, a client that stops reading) and the gate.
"""

from __future__ import annotations

import time

import anyio
import httpx
import pytest

from exitagent.client import API_KEY_ENV, OpenAIPolicy
from exitagent.serving.gateway import ROUTES, Limits, Refused, check_target
from tests.gateway_stack import ATTACKS, SECRET_DIR, gateway_stack, raw_request, request_bytes

pytestmark = pytest.mark.anyio

FAST = Limits(max_body_bytes=1 << 20, head_timeout_s=1.0, body_timeout_s=2.0, connect_timeout_s=2.0,
              upstream_timeout_s=1.0, send_timeout_s=1.0)
CHAT = b'{"model": "policy", "messages": []}'


async def test_every_attack_is_refused_by_the_gateway_and_reaches_nothing() -> None:
    async with gateway_stack(FAST) as stack:
        for method, target, body in ATTACKS:
            response = await raw_request(stack.port, request_bytes(method, target, body))
            assert 400 <= response.status < 500, (method, target, response)
            if method != "HEAD" and target.isascii():  # (hypercorn answers a non-ASCII target with a bare 400)
                assert response.json()["error"]["message"], (method, target)
        assert stack.seen == []  # not one of them reached the engine
        # and the gateway still serves
        ok = await raw_request(stack.port, request_bytes("POST", "/v1/chat/completions", CHAT))
        assert ok.status == 200 and ok.json()["path"] == "/v1/chat/completions"


async def test_allowed_routes_are_forwarded_exactly_with_the_version() -> None:
    async with gateway_stack(FAST) as stack:
        async with httpx.AsyncClient(base_url=stack.url) as client:
            for path, methods in ROUTES.items():
                for method in methods:
                    content = CHAT if method == "POST" else None
                    response = await client.request(method, path, content=content)
                    assert response.status_code == 200, (path, response.text)
                    assert response.headers["x-exitagent-policy-version"] == "step-000003"
        forwarded = {(method, raw) for method, raw, _ in stack.seen}
        assert forwarded == {(m, p.encode()) for p, ms in ROUTES.items() for m in ms if p != "/policy"}


async def test_method_override_and_credentials_are_not_forwarded() -> None:
    async with gateway_stack(FAST, api_key="k3y") as stack:
        headers = {"authorization": "Bearer k3y", "x-http-method-override": "DELETE", "x-method-override": "GET",
                   "x-http-method": "PUT", "x-request-id": "r1"}
        response = await raw_request(stack.port, request_bytes("POST", "/v1/chat/completions", CHAT, headers))
        assert response.status == 200
        method, raw, seen_headers = stack.seen[-1]
        assert (method, raw) == ("POST", b"/v1/chat/completions")
        assert seen_headers.get("x-request-id") == "r1"
        assert not {"authorization", "x-http-method-override", "x-method-override", "x-http-method"} & set(seen_headers)


async def test_api_key_is_required_on_v1_and_compared_safely() -> None:
    async with gateway_stack(FAST, api_key="k3y") as stack:
        for value in (None, "Bearer nope", "Bearer k3y2", "Basic k3y", "k3y", "Bearer \xff\xfe", "Bearer  "):
            headers = {"authorization": value} if value is not None else {}
            response = await raw_request(stack.port, request_bytes("POST", "/v1/completions", CHAT, headers))
            assert response.status == 401, value
            assert response.json()["error"]["type"] == "authentication_error"
        good = await raw_request(stack.port, request_bytes("GET", "/v1/models",
                                                           headers={"authorization": "bearer k3y"}))
        assert good.status == 200
        assert (await raw_request(stack.port, request_bytes("GET", "/health"))).status == 200
        assert all(raw != b"/v1/completions" for _, raw, _ in stack.seen)


async def test_our_client_sends_the_key_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """Collectors, evaluate and the agent reach a keyed gateway with $EXITAGENT_API_KEY and no flag
    (serve reads the same variable), also on their own calls beside the OpenAI SDK's (/v1/models)."""
    async with gateway_stack(FAST, api_key="k3y") as stack:
        monkeypatch.delenv(API_KEY_ENV, raising=False)
        async with OpenAIPolicy(stack.url + "/v1") as keyless:
            await keyless.model_names()
        assert not any(raw == b"/v1/models" for _, raw, _ in stack.seen)  # refused at the gateway
        monkeypatch.setenv(API_KEY_ENV, "k3y")
        async with OpenAIPolicy(stack.url + "/v1") as keyed:
            await keyed.model_names()
        assert any(raw == b"/v1/models" for _, raw, _ in stack.seen)


async def test_policy_reveals_no_host_path() -> None:
    async with gateway_stack(FAST) as stack:
        response = await raw_request(stack.port, request_bytes("GET", "/policy"))
    assert response.status == 200
    assert b"/secret" not in response.body and b"/host/" not in response.body
    info = response.json()
    assert info["version"] == "step-000003" and info["checkpoint"] == SECRET_DIR.name
    assert info["last_error"] == "model.safetensors is truncated"


async def _send_body(stream: anyio.abc.SocketStream, total: int, sent: list[int], chunked: bool) -> None:
    block = b"x" * 65536
    try:
        while sent[0] < total:
            await stream.send(b"10000\r\n" + block + b"\r\n" if chunked else block)
            sent[0] += len(block)
    except (anyio.BrokenResourceError, anyio.ClosedResourceError, ConnectionError, OSError):
        pass


async def _answer_while_sending(port: int, head: bytes, total: int, chunked: bool) -> tuple[int, int, float]:
    """Send ``head`` then a body of ``total`` bytes; (status, bytes sent when it came, seconds)."""
    sent, started, answer = [0], time.monotonic(), b""
    async with await anyio.connect_tcp("127.0.0.1", port) as stream, anyio.create_task_group() as tasks:
        await stream.send(head)
        tasks.start_soon(_send_body, stream, total, sent, chunked)
        with anyio.fail_after(10):
            while b"\r\n\r\n" not in answer:
                answer += await stream.receive()
        at = sent[0]
        tasks.cancel_scope.cancel()
    return int(answer.split(b" ")[1]), at, time.monotonic() - started


async def test_a_64_mib_body_is_refused_without_being_read() -> None:
    total = 64 << 20
    async with gateway_stack(FAST) as stack:
        head = f"POST /health HTTP/1.1\r\nhost: x\r\ncontent-length: {total}\r\n\r\n".encode()
        status, sent, seconds = await _answer_while_sending(stack.port, head, total, chunked=False)
        assert status == 405 and seconds < 2 and sent < total // 4  # the method is wrong before the size is
        head = f"GET /health HTTP/1.1\r\nhost: x\r\ncontent-length: {total}\r\n\r\n".encode()
        status, sent, seconds = await _answer_while_sending(stack.port, head, total, chunked=False)
        assert status == 413 and seconds < 2 and sent < total // 4
        print(f"64 MiB to GET /health: 413 after {seconds:.3f} s, {sent / 2**20:.1f} MiB sent by then")
        # chunked, no length declared: counted while it streams, refused just past the 1 MiB limit
        head = b"POST /v1/completions HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\n"
        status, sent, seconds = await _answer_while_sending(stack.port, head, total, chunked=True)
        assert status == 413 and seconds < 5 and sent < total // 4
        # declared over the limit on a route that takes a body: refused up front
        head = f"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-length: {total}\r\n\r\n".encode()
        status, sent, seconds = await _answer_while_sending(stack.port, head, total, chunked=False)
        assert status == 413 and seconds < 2
        assert stack.seen == []
        assert (await raw_request(stack.port, request_bytes("GET", "/health"))).status == 200


async def test_a_client_trickling_its_head_is_disconnected() -> None:
    async with gateway_stack(FAST) as stack:
        started = time.monotonic()
        closed_after = None
        async with await anyio.connect_tcp("127.0.0.1", stack.port) as stream:
            try:
                await stream.send(b"GET /health HTTP/1.1\r\n")
                for _ in range(100):  # one header byte every 0.1 s: 10 s if nobody stops it
                    await stream.send(b"x")
                    await anyio.sleep(0.1)
                with anyio.fail_after(2):
                    await stream.receive()
            except (anyio.BrokenResourceError, anyio.EndOfStream, ConnectionError, OSError):
                closed_after = time.monotonic() - started
        assert closed_after is not None and closed_after < FAST.head_timeout_s + 1.5, closed_after
        print(f"trickling client disconnected after {closed_after:.2f} s (head timeout {FAST.head_timeout_s} s)")
        assert (await raw_request(stack.port, request_bytes("GET", "/health"))).status == 200


async def test_a_client_trickling_its_body_gets_408() -> None:
    async with gateway_stack(FAST) as stack:
        async with await anyio.connect_tcp("127.0.0.1", stack.port) as stream:
            await stream.send(b"POST /v1/completions HTTP/1.1\r\nhost: x\r\ncontent-length: 1000\r\n\r\n{")
            started, answer = time.monotonic(), b""
            with anyio.fail_after(FAST.body_timeout_s + 3):
                while b"\r\n\r\n" not in answer:
                    answer += await stream.receive()
        assert answer.startswith(b"HTTP/1.1 408") and time.monotonic() - started < FAST.body_timeout_s + 1


async def test_a_stalled_engine_gives_504_and_others_still_work() -> None:
    async with gateway_stack(FAST) as stack, anyio.create_task_group() as tasks:
        stalled: list[int] = []
        answered = anyio.Event()

        async def stall() -> None:
            stalled.append((await raw_request(stack.port, request_bytes("POST", "/v1/completions", b'"stall"'))).status)
            answered.set()

        started = time.monotonic()
        tasks.start_soon(stall)
        await anyio.sleep(0.2)
        assert stack.gate.in_flight == 1
        other = await raw_request(stack.port, request_bytes("POST", "/v1/chat/completions", CHAT))
        assert other.status == 200 and not stalled  # answered while the stalled one waits
        with anyio.fail_after(5):
            await answered.wait()
        assert stalled == [504] and time.monotonic() - started < FAST.upstream_timeout_s + 2
        assert stack.gate.in_flight == 0


async def test_a_reload_cuts_off_a_stalled_request_after_the_drain_deadline() -> None:
    patient = Limits(upstream_timeout_s=60.0, send_timeout_s=60.0)
    async with gateway_stack(patient, drain_timeout_s=1.0) as stack, anyio.create_task_group() as tasks:
        answers: list[int] = []
        answered = anyio.Event()

        async def stall() -> None:
            answers.append((await raw_request(stack.port, request_bytes("POST", "/v1/completions", b'"stall"'))).status)
            answered.set()

        tasks.start_soon(stall)
        await anyio.sleep(0.2)
        reloaded: list[float] = []
        started = time.monotonic()
        with anyio.fail_after(5):
            await stack.gate.exclusive(lambda: _record(reloaded, started))
            await answered.wait()
        assert reloaded and reloaded[0] < 3 and answers == [503]


async def _record(into: list[float], started: float) -> None:
    into.append(time.monotonic() - started)


async def test_a_client_that_stops_reading_a_stream_does_not_hold_a_reload() -> None:
    limits = Limits(send_timeout_s=1.0, upstream_timeout_s=60.0)
    async with gateway_stack(limits, drain_timeout_s=60.0) as stack:
        async with await anyio.connect_tcp("127.0.0.1", stack.port) as stream:
            await stream.send(request_bytes("POST", "/v1/chat/completions", b'"stream"'))
            assert (await stream.receive()).startswith(b"HTTP/1.1 200")  # then never reads again
            with anyio.fail_after(5):
                while stack.gate.in_flight == 0:  # noqa: ASYNC110
                    await anyio.sleep(0.02)
            reloaded: list[float] = []
            started = time.monotonic()
            with anyio.fail_after(10):
                await stack.gate.exclusive(lambda: _record(reloaded, started))
        print(f"reload went through {reloaded[0]:.2f} s after a reader stopped (send timeout 1 s)")
        assert reloaded[0] < 5 and stack.gate.in_flight == 0
        assert (await raw_request(stack.port, request_bytes("GET", "/health"))).status == 200


def test_check_target_refuses_by_kind() -> None:
    cases = {b"/v1/../x": 400, b"/v1/%2e%2e/x": 400, b"/a\\b": 400, b"/v1//models": 400, b"/v1/models;x": 400,
             b"http://h/v1/models": 400, b"*": 400, b"/v1/models/": 404, b"/v1/embeddings": 404, b"/V1/models": 404}
    for target, status in cases.items():
        with pytest.raises(Refused) as refused:
            check_target(target, "GET")
        assert refused.value.status == status, target
    with pytest.raises(Refused) as refused:
        check_target("/v1/models", "GET")  # a decoded str, not the raw bytes
    assert refused.value.status == 400
    assert check_target(b"/v1/models", "GET") == "/v1/models"

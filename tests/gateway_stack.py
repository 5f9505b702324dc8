"""A real gateway in front of a fake engine, both served by hypercorn on loopback, plus a raw HTTP client.

The fake engine is a small ASGI app that records every request it receives and answers according
to the request body: ``stall`` never answers, ``stream`` sends server-sent events until the client
goes away, anything else gets a JSON echo. It also serves the vLLM admin routes, so that a test can
tell whether anything reached them.

``raw_request`` writes bytes to a socket exactly as given (``curl --path-as-is`` and more): no
client library normalises, encodes or re-orders anything.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import anyio.lowlevel

from exitagent.serving.gateway import Gate, GatewayServer, Limits, create_app
from exitagent.serving.reload import ServingState
from exitagent.types import PolicyVersion

SECRET_DIR = Path("/secret/host/path/weights/step-000003")


@dataclass
class Stack:
    port: int
    gate: Gate
    state: ServingState
    seen: list[tuple[str, bytes, dict[str, str]]] = field(default_factory=list)  # what the engine received

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


def fake_engine(seen: list[tuple[str, bytes, dict[str, str]]]) -> Any:
    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
        seen.append((scope["method"], scope["raw_path"], headers))
        if b"stall" in body:
            await anyio.sleep_forever()
        if b"stream" in body:
            await send({"type": "http.response.start", "status": 200,
                        "headers": [(b"content-type", b"text/event-stream")]})
            while True:  # until the gateway goes away (client disconnect, timeout, cancellation)
                await send({"type": "http.response.body", "body": b"data: " + b"x" * 65536 + b"\n\n",
                            "more_body": True})
                await anyio.lowlevel.checkpoint()
        answer = json.dumps({"method": scope["method"], "path": scope["raw_path"].decode(), "headers": headers})
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json")]})
        await send({"type": "http.response.body", "body": answer.encode()})

    return app


async def _started(server: GatewayServer) -> None:
    with anyio.fail_after(10):
        while not server.started:  # noqa: ASYNC110 (a flag, like uvicorn's)
            await anyio.sleep(0.01)


@asynccontextmanager
async def gateway_stack(limits: Limits | None = None, *, drain_timeout_s: float = 30.0,
                        api_key: str | None = None) -> AsyncIterator[Stack]:
    limits = limits or Limits()
    state = ServingState(version=PolicyVersion(3, "step-000003"), directory=SECRET_DIR,
                         last_error=f"{SECRET_DIR.parent}/step-000009/model.safetensors is truncated")
    gate = Gate(drain_timeout_s=drain_timeout_s)
    stack = Stack(0, gate, state)
    async with anyio.create_task_group() as servers:
        engine = GatewayServer(fake_engine(stack.seen), "127.0.0.1", 0, graceful_timeout_s=0.5)
        servers.start_soon(engine.serve)
        await _started(engine)
        app = create_app(f"http://127.0.0.1:{engine.port}", state, gate, api_key=api_key, limits=limits)
        gateway = GatewayServer(app, "127.0.0.1", 0, limits, graceful_timeout_s=0.5)
        servers.start_soon(gateway.serve)
        await _started(gateway)
        stack.port = gateway.port
        try:
            yield stack
        finally:
            gateway.should_exit = engine.should_exit = True


@dataclass
class RawResponse:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


def parse(data: bytes) -> RawResponse:
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return RawResponse(int(lines[0].split(" ")[1]), headers, body)


async def raw_request(port: int, data: bytes, *, timeout_s: float = 10.0) -> RawResponse:
    """Send ``data`` byte for byte and read the answer until the server closes the connection."""
    received = b""
    with anyio.fail_after(timeout_s):
        async with await anyio.connect_tcp("127.0.0.1", port) as stream:
            await stream.send(data)
            try:
                while True:
                    received += await stream.receive()
            except (anyio.EndOfStream, anyio.BrokenResourceError, ConnectionResetError):
                pass
    return parse(received)


def request_bytes(method: str, target: str | bytes, body: bytes = b"", headers: dict[str, str] | None = None) -> bytes:
    target = target.encode("latin-1") if isinstance(target, str) else target
    lines = [method.encode() + b" " + target + b" HTTP/1.1", b"host: 127.0.0.1", b"connection: close"]
    if body or method == "POST":
        lines.append(b"content-type: application/json")
        lines.append(b"content-length: " + str(len(body)).encode())
    lines += [f"{k}: {v}".encode("latin-1") for k, v in (headers or {}).items()]
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


# Requests that must never reach anything but the gateway's own error answers: the path tricks of
# issue 13, their encodings, and method tricks. (method, raw request target, body)
ADMIN_BODY = b'{"new_version": "x"}'
RPC_BODY = b'{"method": "reload_weights", "kwargs": {"weights_path": "/etc"}}'
ATTACKS: list[tuple[str, bytes, bytes]] = [
    # the issue's own
    ("POST", b"/v1/../update_weight_version", ADMIN_BODY),
    ("GET", b"/v1/../weight_info", b""),
    ("GET", b"/v1/%2e%2e/metrics", b""),
    ("GET", b"/v1/..%2Fis_sleeping", b""),
    ("GET", b"/v1/models/../../weight_info", b""),
    # encodings: upper case, double, mixed, backslash, overlong UTF-8, NUL
    ("POST", b"/v1/%2E%2E/update_weight_version", ADMIN_BODY),
    ("POST", b"/v1/%252e%252e/update_weight_version", ADMIN_BODY),
    ("GET", b"/v1/..%252fweight_info", b""),
    ("GET", b"/v1/.%2e/weight_info", b""),
    ("GET", b"/v1/models%2f..%2f..%2fweight_info", b""),
    ("GET", b"/v1/..%5cweight_info", b""),
    ("GET", b"/v1/..%5Cweight_info", b""),
    ("GET", b"/v1/..\\weight_info", b""),
    ("GET", b"/v1\\..\\weight_info", b""),
    ("GET", b"/v1/%c0%ae%c0%ae/weight_info", b""),
    ("GET", b"/v1/\xc0\xae\xc0\xae/weight_info", b""),
    ("GET", b"/v1/models/%00/../weight_info", b""),
    # ';' path parameters, dot and empty segments
    ("GET", b"/v1/models/..;/..;/weight_info", b""),
    ("GET", b"/v1/models;/../../weight_info", b""),
    ("GET", b"/health;/../weight_info", b""),
    ("GET", b"/v1/./../weight_info", b""),
    ("GET", b"/v1/./models", b""),
    ("GET", b"//weight_info", b""),
    ("GET", b"/v1//../weight_info", b""),
    ("GET", b"/v1//models", b""),
    # absolute-form, asterisk-form and authority-form targets
    ("GET", b"http://127.0.0.1/v1/../weight_info", b""),
    ("GET", b"http://127.0.0.1/weight_info", b""),
    ("POST", b"http://127.0.0.1/update_weight_version", ADMIN_BODY),
    ("OPTIONS", b"*", b""),
    ("CONNECT", b"127.0.0.1:80", b""),
    # the admin routes themselves, straight and through ../
    ("POST", b"/update_weight_version", ADMIN_BODY),
    ("POST", b"/collective_rpc", RPC_BODY),
    ("POST", b"/v1/../collective_rpc", RPC_BODY),
    ("POST", b"/v1/%2e%2e/collective_rpc", RPC_BODY),
    ("POST", b"/v1/../pause", b""),
    ("POST", b"/v1/../resume", b""),
    ("POST", b"/v1/../sleep", b""),
    ("POST", b"/v1/../wake_up", b""),
    ("POST", b"/v1/../reset_prefix_cache", b""),
    ("POST", b"/v1/load_lora_adapter", b'{"lora_name": "x", "lora_path": "/etc"}'),
    ("GET", b"/weight_info", b""),
    ("GET", b"/metrics", b""),
    ("GET", b"/server_info", b""),
    # method tricks: HEAD/OPTIONS/TRACE/unknown methods, wrong methods on real routes
    ("HEAD", b"/health", b""),
    ("TRACE", b"/health", b""),
    ("OPTIONS", b"/v1/models", b""),
    ("PUT", b"/v1/models", b""),
    ("DELETE", b"/v1/models", b""),
    ("PATCH", b"/v1/chat/completions", b"{}"),
    ("FOO", b"/v1/chat/completions", b"{}"),
    ("GET", b"/v1/chat/completions", b""),
    ("POST", b"/health", b""),
    ("POST", b"/policy", ADMIN_BODY),
]

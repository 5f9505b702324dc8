"""The gateway's forwarding half: one checked request to the vLLM engine on loopback, and its answer back.

Each forwarded request holds the reload gate (``exitagent.serving.gate``) from before it is sent until its
last byte has gone to the client, which is what makes ``x-exitagent-policy-version`` exact. So every
wait in here has a bound, and every way out releases the gate:

- the engine gets ``connect_timeout_s`` to accept and ``read_timeout_s`` between two bytes of its
  answer; after that the client gets 504 (503 when the engine is not there at all);
- each chunk sent to the client has ``send_timeout_s``: a client that stops reading a stream is
  dropped, not waited for;
- a client that disconnects cancels its request at once (the engine stops generating for it);
- a writer that waited too long for the gate cancels the request (the client gets 503: retry).

The gate is released before any error answer is sent, so a slow client never holds it for that.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

import anyio
import httpx
import structlog

from exitagent.serving import adapters
from exitagent.serving.gate import Gate
from exitagent.serving.reload import ServingState

log = structlog.get_logger(__name__)

VERSION_HEADER = "x-exitagent-policy-version"
_DROPPED_RESPONSE_HEADERS = frozenset({b"connection", b"keep-alive", b"transfer-encoding", b"content-length",
                                       b"server", b"date"})

Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]


class _Reply:
    """The client's side of one exchange: every send under a deadline, and whether it has begun."""

    def __init__(self, send: Send, timeout_s: float) -> None:
        self._send, self._timeout_s = send, timeout_s
        self.started = False

    async def start(self, status: int, headers: list[tuple[bytes, bytes]]) -> None:
        with anyio.fail_after(self._timeout_s):
            await self._send({"type": "http.response.start", "status": status, "headers": headers})
        self.started = True

    async def body(self, chunk: bytes, more: bool) -> None:
        with anyio.fail_after(self._timeout_s):
            await self._send({"type": "http.response.body", "body": chunk, "more_body": more})


class Upstream:
    def __init__(self, engine_url: str, state: ServingState, gate: Gate, *, connect_timeout_s: float,
                 read_timeout_s: float, send_timeout_s: float) -> None:
        self.state, self.gate = state, gate
        self.read_timeout_s, self.send_timeout_s = read_timeout_s, send_timeout_s
        self._client = httpx.AsyncClient(
            base_url=engine_url, trust_env=False,
            timeout=httpx.Timeout(read_timeout_s, connect=connect_timeout_s),
            limits=httpx.Limits(max_connections=512, max_keepalive_connections=64),
        )

    async def aclose(self) -> None:
        await self._client.aclose()

    async def forward(self, method: str, path: str, headers: list[tuple[bytes, bytes]], body: bytes,
                      receive: Receive, send: Send) -> None:
        """Send the checked request to the engine and relay its answer, holding the gate meanwhile."""
        reply = _Reply(send, self.send_timeout_s)
        failure: tuple[int, str, str] | None = None
        with anyio.CancelScope() as holder:
            await self.gate.acquire(holder)
            try:
                failure = await self._exchange(method, path, headers, body, receive, reply)
            finally:
                self.gate.release(holder)
        if holder.cancelled_caught:
            log.warning("request_cut_off_for_reload", path=path, started=reply.started)
            failure = (503, "the engine is reloading or restarting: retry", "server_error")
        if failure is not None and not reply.started:
            status, message, kind = failure
            content = json.dumps({"error": {"message": message, "type": kind, "code": status}}).encode()
            try:
                await reply.start(status, [(b"content-type", b"application/json"),
                                           (b"content-length", str(len(content)).encode())])
                await reply.body(content, more=False)
            except (TimeoutError, OSError):
                pass  # the client is not reading: nothing more to tell it

    async def _exchange(self, method: str, path: str, headers: list[tuple[bytes, bytes]], body: bytes,
                        receive: Receive, reply: _Reply) -> tuple[int, str, str] | None:
        """Relay one exchange; the error to answer with (status, message, type) if it failed."""
        outcome: list[tuple[int, str, str]] = []
        version = str(self.state.version)  # inside the gate: these weights answer this request
        async with anyio.create_task_group() as watch:

            async def relay() -> None:
                try:
                    await self._relay(method, path, headers, body, version, reply)
                except httpx.TimeoutException as error:
                    log.warning("engine_timed_out", path=path, error=type(error).__name__)
                    outcome.append((504, f"the engine did not answer within {self.read_timeout_s:g} s",
                                    "timeout"))
                except httpx.TransportError as error:
                    log.warning("engine_unreachable", path=path, error=str(error)[:200])
                    outcome.append((503, f"engine unavailable: {type(error).__name__}", "server_error"))
                except (TimeoutError, OSError):
                    log.warning("client_stopped_reading", path=path, send_timeout_s=self.send_timeout_s)
                finally:
                    watch.cancel_scope.cancel()

            watch.start_soon(_cancel_on_disconnect, receive, watch.cancel_scope)
            watch.start_soon(relay)
        return outcome[0] if outcome else None

    async def _relay(self, method: str, path: str, headers: list[tuple[bytes, bytes]], body: bytes,
                     version: str, reply: _Reply) -> None:
        # inside the gate: a server of LoRA adapters sends the policy's name to the adapter now verified
        content = adapters.route_body(body, self.state)
        request = self._client.build_request(method, path, headers=headers, content=content)
        response = await self._client.send(request, stream=True)
        try:
            out = [(name.lower(), value) for name, value in response.headers.raw
                   if name.lower() not in _DROPPED_RESPONSE_HEADERS]
            out.append((VERSION_HEADER.encode(), version.encode()))
            if "text/event-stream" not in response.headers.get("content-type", ""):
                content = await response.aread()
                await reply.start(response.status_code, [*out, (b"content-length", str(len(content)).encode())])
                await reply.body(content, more=False)
                return
            await reply.start(response.status_code, out)
            async for chunk in response.aiter_raw():
                await reply.body(chunk, more=True)
            await reply.body(b"", more=False)
        finally:
            with anyio.CancelScope(shield=True):
                await response.aclose()


async def _cancel_on_disconnect(receive: Receive, scope: anyio.CancelScope) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass
    scope.cancel()

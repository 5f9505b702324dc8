"""The public face of ``serve``: OpenAI routes only, an optional API key, and exact policy versions.

vLLM's admin routes (pause, reload, collective_rpc, ...) are unauthenticated, so the engine listens
on loopback only and clients talk to this gateway instead. It forwards ``/v1/*``, ``/health`` and
``/version`` and nothing else, so the admin routes are unreachable from outside the machine even
when the gateway listens on a public address.

Every response carries ``x-exitagent-policy-version``: the weights that produced it. That is exact
because a reload runs inside ``Gate.exclusive``: new requests wait, in-flight ones finish, the
weights change, and only then are requests let through again. ``GET /policy`` returns the current
version and reload status as JSON.
"""

from __future__ import annotations

import hmac
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

import anyio
import httpx
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from exitagent.reload import ServingState

VERSION_HEADER = "x-exitagent-policy-version"
_HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "content-length", "host", "content-encoding"}


class Gate:
    """Many requests at once, or one reload alone (a readers-writer lock that favours the writer)."""

    def __init__(self) -> None:
        self._in_flight = 0
        self._reloading = False
        self._changed = anyio.Condition()

    async def acquire(self) -> None:
        async with self._changed:
            while self._reloading:
                await self._changed.wait()
            self._in_flight += 1

    async def release(self) -> None:
        async with self._changed:
            self._in_flight -= 1
            self._changed.notify_all()

    async def exclusive(self, work: Callable[[], Awaitable[None]]) -> None:
        async with self._changed:
            self._reloading = True
            while self._in_flight:
                await self._changed.wait()
        try:
            await work()
        finally:
            async with self._changed:
                self._reloading = False
                self._changed.notify_all()


def create_app(engine_url: str, state: ServingState, gate: Gate, api_key: str | None = None) -> Starlette:
    client = httpx.AsyncClient(base_url=engine_url, timeout=httpx.Timeout(None, connect=10.0),
                               limits=httpx.Limits(max_connections=512, max_keepalive_connections=64))

    def authorised(request: Request) -> bool:
        if not api_key:
            return True
        given = request.headers.get("authorization", "").removeprefix("Bearer ").strip()
        return hmac.compare_digest(given.encode(), api_key.encode())

    async def forward(request: Request) -> Response:
        if request.url.path.startswith("/v1/") and not authorised(request):
            return JSONResponse({"error": {"message": "invalid API key", "type": "authentication_error"}}, 401)
        headers = {k: v for k, v in request.headers.items() if k.lower() not in _HOP_BY_HOP | {"authorization"}}
        body = await request.body()
        await gate.acquire()
        handed_to_stream = False
        try:
            version = str(state.version)
            upstream = client.build_request(request.method, request.url.path, params=request.query_params,
                                            headers=headers, content=body)
            try:
                response = await client.send(upstream, stream=True)
            except httpx.TransportError as error:
                return JSONResponse({"error": {"message": f"engine unavailable: {error}", "type": "server_error"}}, 503)
            out_headers = {k: v for k, v in response.headers.items() if k.lower() not in _HOP_BY_HOP}
            out_headers[VERSION_HEADER] = version
            if "text/event-stream" not in response.headers.get("content-type", ""):
                content = await response.aread()
                await response.aclose()
                return Response(content, response.status_code, out_headers)

            # A streamed answer keeps its place in the gate until its last chunk (or the client's
            # disconnect closes the generator): no reload mid-stream.
            async def relay() -> AsyncIterator[bytes]:
                try:
                    async for chunk in response.aiter_raw():
                        yield chunk
                finally:
                    await response.aclose()
                    await gate.release()

            handed_to_stream = True
            return StreamingResponse(relay(), response.status_code, out_headers)
        finally:
            if not handed_to_stream:
                await gate.release()

    async def policy(_: Request) -> Response:
        return JSONResponse(state.as_json(), headers={VERSION_HEADER: str(state.version)})

    @asynccontextmanager
    async def lifespan(_: Starlette) -> AsyncIterator[None]:
        yield
        await client.aclose()

    methods = ["GET", "POST", "DELETE"]
    return Starlette(
        routes=[
            Route("/policy", policy, methods=["GET"]),
            Route("/health", forward, methods=["GET"]),
            Route("/version", forward, methods=["GET"]),
            Route("/v1/{path:path}", forward, methods=methods),
        ],
        lifespan=lifespan,
    )

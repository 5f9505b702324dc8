"""The public face of ``serve``: a closed list of OpenAI routes, bounded requests, exact policy versions.

vLLM's admin routes (pause, reload, collective_rpc, update_weight_version, ...) are unauthenticated,
so the engine listens on loopback only and clients talk to this gateway instead. The gateway is a
plain ASGI app that decides on the request target exactly as it arrived (``scope["raw_path"]``),
before anything decodes or normalises it:

- the target must be origin-form, printable ASCII, with no percent-encoding, backslash, ``;``,
  dot segment or empty segment (400), and then one of ``ROUTES`` byte for byte (404) with one of
  its methods (405). What is forwarded is that checked string, never a decoded form;
- only a few request headers pass (no method-override headers, no ``Authorization``);
- bodies are counted while they stream in (``Limits.max_body_bytes``, and none at all on the GET
  routes), and must arrive within ``Limits.body_timeout_s``;
- the engine gets ``connect_timeout_s`` to accept and ``upstream_timeout_s`` between bytes (504
  after that), and a client that stops reading a stream is dropped after ``send_timeout_s``.

Every response carries ``x-exitagent-policy-version``: the weights that produced it. That is exact
because a reload runs inside ``Gate.exclusive``: new requests wait, in-flight ones finish (or are
cut off after the gate's drain deadline), the weights change, and only then are requests let
through again. ``GET /policy`` returns the current version and reload status, without host paths.

The server is hypercorn, not uvicorn: uvicorn (0.54) has no timeout for reading a request head (its
keep-alive timer is reset by every byte, so a client trickling its headers holds a connection for
ever), while hypercorn's idle timer (``keep_alive_timeout``) runs from the moment a connection is
opened or its last response ended until a complete request head arrives, and is not reset by data.
"""

from __future__ import annotations

import hmac
import json
import os
import socket
import sys
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import structlog
from hypercorn.asyncio import serve as hypercorn_serve
from hypercorn.config import Config as HypercornConfig

from exitagent.client import API_KEY_ENV
from exitagent.errors import ConfigError
from exitagent.serving.gate import Gate
from exitagent.serving.reload import ServingState
from exitagent.serving.upstream import VERSION_HEADER, Upstream

__all__ = ["ROUTES", "VERSION_HEADER", "Gate", "GatewayServer", "Limits", "Refused", "check_target", "create_app",
           "resolve_api_key"]

log = structlog.get_logger(__name__)


# Every route the gateway answers, with its methods: what exitagent's own clients use (chat and
# plain completions, the model list, health, version, /policy) and nothing else.
ROUTES: dict[str, frozenset[str]] = {
    "/v1/chat/completions": frozenset({"POST"}),
    "/v1/completions": frozenset({"POST"}),
    "/v1/models": frozenset({"GET"}),
    "/health": frozenset({"GET"}),
    "/version": frozenset({"GET"}),
    "/policy": frozenset({"GET"}),
}
_TAKES_BODY = frozenset({"/v1/chat/completions", "/v1/completions"})
_NEEDS_KEY = frozenset(path for path in ROUTES if path.startswith("/v1/"))
# Request headers the engine may see. Everything else (Authorization, X-HTTP-Method-Override and its
# cousins, hop-by-hop headers, Accept-Encoding: the relay passes bytes through unchanged) stays here.
_FORWARDED_REQUEST_HEADERS = frozenset({b"content-type", b"accept", b"user-agent", b"x-request-id"})

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]


@dataclass(frozen=True)
class Limits:
    max_body_bytes: int = 8 * 1024 * 1024
    head_timeout_s: float = 10.0  # the whole request head (hypercorn's keep_alive_timeout)
    body_timeout_s: float = 60.0  # the whole request body
    connect_timeout_s: float = 5.0
    upstream_timeout_s: float = 600.0  # between two bytes from the engine (a long non-streamed answer)
    send_timeout_s: float = 30.0  # one chunk of a stream to a client that has stopped reading

    def __post_init__(self) -> None:
        for name, value in vars(self).items():
            if not value > 0:  # also catches NaN
                raise ConfigError(f"gateway limit {name} must be positive, not {value}")


class Refused(Exception):
    """A request the gateway answers itself with an error (never forwarded)."""

    def __init__(self, status: int, message: str, *, kind: str = "invalid_request_error",
                 headers: tuple[tuple[bytes, bytes], ...] = ()) -> None:
        super().__init__(message)
        self.status, self.message, self.kind, self.headers = status, message, kind, headers


def check_target(raw_path: object, method: str) -> str:
    """The route a request may reach, decided on its raw target; raises ``Refused`` otherwise."""
    if not isinstance(raw_path, bytes):
        raise Refused(400, "the server gave no raw request target")
    if not raw_path.startswith(b"/"):  # absolute-form (http://host/...), asterisk-form (*), authority-form
        raise Refused(400, "the request target must be a path starting with '/'")
    if any(byte < 0x21 or byte > 0x7E for byte in raw_path):
        raise Refused(400, "the request path must be printable ASCII")
    for bad, why in ((b"%", "percent-encoding"), (b"\\", "a backslash"), (b";", "path parameters (';')")):
        if bad in raw_path:
            raise Refused(400, f"the request path may not contain {why}")
    segments = raw_path.split(b"/")[1:]
    if any(segment in (b".", b"..") for segment in segments):
        raise Refused(400, "the request path may not contain '.' or '..' segments")
    if b"" in segments[:-1]:
        raise Refused(400, "the request path may not contain empty segments ('//')")
    path = raw_path.decode("ascii")
    if path not in ROUTES:
        raise Refused(404, f"no route {path} (this gateway serves {', '.join(sorted(ROUTES))})", kind="not_found")
    if method not in ROUTES[path]:
        allowed = ", ".join(sorted(ROUTES[path]))
        raise Refused(405, f"{path} takes {allowed}, not {method[:20]!r}", headers=((b"allow", allowed.encode()),))
    return path


def resolve_api_key(flag: str | None, file: Path | None) -> str | None:
    """The API key from exactly one of ``--api-key``, ``--api-key-file`` or ``$EXITAGENT_API_KEY``."""
    env = os.environ.get(API_KEY_ENV) or None
    given = [name for name, value in (("--api-key", flag), ("--api-key-file", file), (API_KEY_ENV, env)) if value]
    if len(given) > 1:
        raise ConfigError(f"the API key was given more than once ({', '.join(given)}): give it one way")
    if flag:
        log.warning("api_key_on_command_line", hint=f"other users can read it in the process list; set {API_KEY_ENV}")
        print(f"warning: --api-key is visible to every user of this machine (ps); set {API_KEY_ENV} or use "
              f"--api-key-file instead", file=sys.stderr)
    key = flag or env
    if file is not None:
        try:
            key = file.read_text().strip()
        except (OSError, UnicodeDecodeError) as error:
            raise ConfigError(f"cannot read the API key file {file}: {error}") from error
        if not key:
            raise ConfigError(f"the API key file {file} is empty")
    if key is not None and not all(0x21 <= ord(char) <= 0x7E for char in key):
        raise ConfigError("the API key must be printable ASCII without spaces (it travels in an HTTP header)")
    return key


def _authorised(headers: list[tuple[bytes, bytes]], key: bytes) -> bool:
    given = next((value for name, value in headers if name == b"authorization"), b"")
    scheme, _, token = given.partition(b" ")
    # compare_digest on bytes: constant time, and any header bytes (non-ASCII included) are fine.
    return hmac.compare_digest(token.strip(), key) and scheme.lower() == b"bearer"


def _declared_length(headers: list[tuple[bytes, bytes]]) -> int | None:
    values = [value for name, value in headers if name == b"content-length"]
    if not values:
        return None
    if len(values) > 1 or not values[0].isdigit():
        raise Refused(400, "invalid Content-Length")
    return int(values[0])


async def _read_body(scope: Scope, receive: Receive, path: str, limits: Limits) -> bytes:
    """The request body, counted as it streams in: refused as soon as it passes the limit."""
    headers = scope["headers"]
    limit = limits.max_body_bytes if path in _TAKES_BODY else 0
    declared = _declared_length(headers)
    chunked = any(name == b"transfer-encoding" for name, _ in headers)
    if limit == 0 and (chunked or declared):
        raise Refused(413, f"{path} takes no request body", kind="request_too_large")
    if declared is not None and declared > limit:
        raise Refused(413, f"request body of {declared} bytes is over the limit of {limit}", kind="request_too_large")
    chunks, size = [], 0
    with anyio.move_on_after(limits.body_timeout_s) as deadline:
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise Refused(400, "the client went away")
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                raise Refused(413, f"request body over the limit of {limit} bytes", kind="request_too_large")
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)
    assert deadline.cancelled_caught
    raise Refused(408, f"the request body did not arrive within {limits.body_timeout_s:g} s", kind="timeout")


async def _send_error(send: Send, status: int, message: str, kind: str,
                      headers: tuple[tuple[bytes, bytes], ...] = ()) -> None:
    await _send_json(send, status, {"error": {"message": message, "type": kind, "code": status}}, headers)


async def _send_json(send: Send, status: int, payload: dict[str, Any],
                     headers: tuple[tuple[bytes, bytes], ...] = ()) -> None:
    body = json.dumps(payload).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            *headers]})
    await send({"type": "http.response.body", "body": body})


def create_app(engine_url: str, state: ServingState, gate: Gate, api_key: str | None = None,
               limits: Limits = Limits()) -> Callable[[Scope, Receive, Send], Awaitable[None]]:
    """The gateway as an ASGI app (serve it with ``GatewayServer``)."""
    engine = Upstream(engine_url, state, gate, connect_timeout_s=limits.connect_timeout_s,
                      read_timeout_s=limits.upstream_timeout_s, send_timeout_s=limits.send_timeout_s)
    key = api_key.encode() if api_key else None

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await _lifespan(receive, send, engine.aclose)
            return
        if scope["type"] != "http":  # a websocket upgrade: nothing here speaks it
            await receive()
            await send({"type": "websocket.close", "code": 1008})
            return
        try:
            path = check_target(scope.get("raw_path"), scope["method"])
            if key is not None and path in _NEEDS_KEY and not _authorised(scope["headers"], key):
                raise Refused(401, "invalid API key", kind="authentication_error")
            body = await _read_body(scope, receive, path, limits)
        except Refused as refused:
            log.info("request_refused", status=refused.status, reason=refused.message, method=scope["method"][:20],
                     target=repr(scope.get("raw_path", b""))[:200])
            await _send_error(send, refused.status, refused.message, refused.kind, refused.headers)
            return
        if path == "/policy":
            await _send_json(send, 200, state.public_json(), ((VERSION_HEADER.encode(), str(state.version).encode()),))
            return
        headers = [(name, value) for name, value in scope["headers"] if name in _FORWARDED_REQUEST_HEADERS]
        await engine.forward(scope["method"], path, headers, body, receive, send)

    return app


async def _lifespan(receive: Receive, send: Send, close: Callable[[], Awaitable[None]]) -> None:
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await close()
            await send({"type": "lifespan.shutdown.complete"})
            return


class GatewayServer:
    """hypercorn serving the gateway on HOST:PORT until ``should_exit`` is set (uvicorn.Server's surface)."""

    def __init__(self, app: Callable[[Scope, Receive, Send], Awaitable[None]], host: str, port: int,
                 limits: Limits = Limits(), graceful_timeout_s: float = 5.0) -> None:
        self.app, self.host, self.port, self.limits = app, host, port, limits
        self.graceful_timeout_s = graceful_timeout_s
        self.started = False
        self._stop = anyio.Event()

    @property
    def should_exit(self) -> bool:
        return self._stop.is_set()

    @should_exit.setter
    def should_exit(self, value: bool) -> None:
        if value:
            self._stop.set()

    async def serve(self) -> None:
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((self.host, self.port))
            sock.listen(1024)  # from here connections queue until hypercorn accepts them
            self.port = sock.getsockname()[1]
        except OSError as error:
            sock.close()
            raise ConfigError(f"cannot listen on {self.host}:{self.port}: {error.strerror}") from error
        config = HypercornConfig()
        config.bind = [f"fd://{sock.detach()}"]  # hypercorn owns (and closes) the socket from here
        config.keep_alive_timeout = self.limits.head_timeout_s
        config.graceful_timeout = self.graceful_timeout_s
        config.accesslog = None
        config.loglevel = "WARNING"
        self.started = True
        await hypercorn_serve(self.app, config, shutdown_trigger=self._stop.wait)  # type: ignore[arg-type]

"""Issue 13's gateway attacks against a real ``exitagent.serve`` with CPU vLLM behind it (admin routes on).

Every request is written byte for byte to a socket (``curl --path-as-is`` and more: nothing
normalises the target on the way), and the engine is asked directly, on its loopback port, whether
anything changed. The session's shared server: vLLM takes one to two minutes to start here.
"""

from __future__ import annotations

import json
import socket
from pathlib import Path

import httpx
import pytest

from tests.gateway_stack import ATTACKS, parse, request_bytes

pytestmark = pytest.mark.vllm

CHAT = {"model": "policy", "messages": [{"role": "user", "content": "Say hi."}], "max_tokens": 4, "temperature": 0.0}


@pytest.fixture(scope="module")
def server(served, served_engine_port: int):
    """The session's server (it never reloads): an attack that got through would show in its engine."""
    return served, f"http://127.0.0.1:{served_engine_port}"


def send_raw(port: int, data: bytes, timeout_s: float = 30.0) -> tuple[int, bytes]:
    received = b""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout_s) as sock:
        sock.sendall(data)
        while chunk := sock.recv(65536):
            received += chunk
    response = parse(received)
    return response.status, response.body


def engine_state(server, engine_url: str) -> dict[str, object]:
    """What an attacker would change, asked of the engine itself (its admin routes, on loopback)."""
    weight = httpx.get(f"{engine_url}/weight_info", timeout=10)
    sleeping = httpx.get(f"{engine_url}/is_sleeping", timeout=10)
    assert weight.status_code == 200 and sleeping.status_code == 200  # the targets exist and answer
    return {"weight_info": weight.json(), "is_sleeping": sleeping.json(), "policy": server.policy()["version"]}


def test_no_path_or_method_trick_reaches_an_admin_route(server) -> None:
    server, engine_url = server
    port = int(server.root_url.rsplit(":", 1)[1])
    before = engine_state(server, engine_url)
    results = []
    for method, target, body in ATTACKS:
        status, answer = send_raw(port, request_bytes(method, target, body))
        results.append((status, method, target))
        assert 400 <= status < 500, (method, target, status, answer[:300])
        # the gateway's own error (or an empty body: HEAD, a non-ASCII target), never an engine answer
        assert answer == b"" or set(json.loads(answer)) == {"error"}, (method, target, answer[:300])
    print("\n".join(f"{status} {method} {target!r}" for status, method, target in results))
    assert engine_state(server, engine_url) == before
    assert before["weight_info"] == {"weight_version": "default"} and before["policy"] == "base"


def test_the_issue_tricks_are_refused_for_what_they_are(server) -> None:
    server, _ = server
    port = int(server.root_url.rsplit(":", 1)[1])
    expected = {b"/v1/../update_weight_version": "'..' segments", b"/v1/../weight_info": "'..' segments",
                b"/v1/%2e%2e/metrics": "percent-encoding", b"/v1/..%2Fis_sleeping": "percent-encoding",
                b"/v1/models/../../weight_info": "'..' segments"}
    for target, reason in expected.items():
        method = "POST" if b"update" in target else "GET"
        body = b'{"new_version": "x"}' if method == "POST" else b""
        status, answer = send_raw(port, request_bytes(method, target, body))
        assert status == 400 and reason in json.loads(answer)["error"]["message"], (target, answer)


def test_real_routes_still_work_streamed_and_not(server) -> None:
    server, _ = server
    with httpx.Client(base_url=server.root_url, timeout=120) as client:
        answer = client.post("/v1/chat/completions", json=CHAT)
        assert answer.status_code == 200 and answer.json()["choices"][0]["message"]["content"] is not None
        assert answer.headers["x-exitagent-policy-version"] == "base"
        with client.stream("POST", "/v1/chat/completions", json={**CHAT, "stream": True}) as stream:
            assert stream.status_code == 200 and stream.headers["x-exitagent-policy-version"] == "base"
            events = [line for line in stream.iter_lines() if line.startswith("data: ")]
        assert events[-1] == "data: [DONE]" and len(events) >= 2
        assert client.get("/v1/models").json()["data"][0]["id"] == "policy"
        assert client.get("/health").status_code == 200 and client.get("/version").status_code == 200
        info = client.get("/policy").json()
        assert "/" not in info["checkpoint"] and str(Path.home()) not in json.dumps(info)

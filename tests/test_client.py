"""The policy client against scripted HTTP answers (httpx.MockTransport): retries, versions, features."""

from __future__ import annotations

import json
from collections.abc import Callable

import httpx
import pytest

from exitagent.client import OpenAIPolicy, is_transient
from exitagent.errors import ServerError, ServerUnsupported
from exitagent.policy import SamplingParams
from exitagent.types import Message

pytestmark = pytest.mark.anyio
MESSAGES = [Message("user", "hi")]


def completion(n: int = 2, token_ids: bool = True) -> dict:
    choices = []
    for index in range(n):
        choice = {"index": index, "finish_reason": "stop",
                  "message": {"role": "assistant", "content": f"answer {index}"},
                  "logprobs": {"content": [{"token": "a", "logprob": -0.1, "bytes": [97], "top_logprobs": []},
                                           {"token": "b", "logprob": -0.2, "bytes": [98], "top_logprobs": []}]}}
        if token_ids:
            choice["token_ids"] = [10 + index, 2]
        choices.append(choice)
    body = {"id": "x", "object": "chat.completion", "created": 0, "model": "policy", "choices": choices}
    if token_ids:
        body["prompt_token_ids"] = [1, 2, 3]
    return body


def policy(handler: Callable[[httpx.Request], httpx.Response], **kwargs: object) -> OpenAIPolicy:
    return OpenAIPolicy("http://server/v1", transport=httpx.MockTransport(handler), **kwargs)  # type: ignore[arg-type]


async def test_group_is_one_request_with_exact_tokens_and_version() -> None:
    requests: list[dict] = []

    def handler(request: httpx.Request) -> httpx.Response:
        requests.append(json.loads(request.content))
        return httpx.Response(200, json=completion(), headers={"x-exitagent-policy-version": "step-000007"})

    async with policy(handler) as client:
        samples = await client.sample(MESSAGES, n=2, params=SamplingParams(max_tokens=5, temperature=0.7))
    assert len(requests) == 1 and requests[0]["n"] == 2 and requests[0]["return_token_ids"] is True
    assert [s.completion_ids for s in samples] == [(10, 2), (11, 2)]
    assert samples[0].prompt_ids == (1, 2, 3) and samples[0].logprobs == (-0.1, -0.2)
    assert samples[0].version.step == 7 and str(samples[0].version) == "step-000007"


async def test_transient_failures_are_retried_until_success() -> None:
    answers = iter([httpx.Response(503, json={"error": "restarting"}), httpx.Response(429, json={}),
                    httpx.Response(200, json=completion(1))])
    async with policy(lambda request: next(answers), deadline_s=30) as client:
        (sample,) = await client.sample(MESSAGES)
    assert sample.text == "answer 0" and sample.version.name == "unknown"


async def test_client_errors_are_not_retried() -> None:
    calls = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(request)
        return httpx.Response(400, json={"error": {"message": "bad"}})

    async with policy(handler) as client:
        with pytest.raises(ServerError, match="BadRequestError"):
            await client.sample(MESSAGES)
    assert len(calls) == 1


async def test_a_dead_server_gives_up_at_the_deadline() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("connection refused")

    async with policy(handler, deadline_s=1.0) as client:
        with pytest.raises(ServerError, match="failed"):
            await client.sample(MESSAGES)


async def test_missing_token_ids_are_reported_not_faked() -> None:
    async with policy(lambda r: httpx.Response(200, json=completion(1, token_ids=False))) as client:
        with pytest.raises(ServerUnsupported, match="token ids"):
            await client.sample(MESSAGES)
    lenient = policy(lambda r: httpx.Response(200, json=completion(1, token_ids=False)), require_token_ids=False)
    async with lenient as client:
        (sample,) = await client.sample(MESSAGES)
    assert sample.completion_ids == () and sample.text == "answer 0"


def test_transient_predicate() -> None:
    assert is_transient(httpx.ConnectError("x"))
    assert not is_transient(ValueError("x"))

"""The policy client: the one module that talks to an OpenAI-compatible server (and imports openai).

One ``AsyncOpenAI`` over one shared ``httpx.AsyncClient``; the SDK's own retries are off, and
every call goes through ``retrying``, the single retry policy for the inference server: transient
failures (connection errors, timeouts, 429, 5xx) are retried with jittered backoff until a total
deadline, anything else raises at once.

A group of G samples from one prompt is one request with ``n=G``. Each sample carries the prompt
token ids, the sampled ids and their log-probabilities exactly as the server returned them
(vLLM's ``return_token_ids``), and the policy version that produced them: exact when the server is
``exitagent.serve`` (the ``x-exitagent-policy-version`` header), ``unknown`` otherwise. A server
that does not return token ids is reported (``ServerUnsupported``) when training needs them, never
silently re-tokenized.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from typing import Any

import httpx
import openai
import structlog
from tenacity import AsyncRetrying, retry_if_exception, stop_after_delay, wait_exponential_jitter

from exitagent.errors import ServerError, ServerUnavailable, ServerUnsupported
from exitagent.policy import DEFAULT_PARAMS, SamplingParams
from exitagent.tools import ActionError, load_json
from exitagent.types import Message, PolicyVersion, Sample, ToolCall

log = structlog.get_logger(__name__)

VERSION_HEADER = "x-exitagent-policy-version"
UNKNOWN = PolicyVersion(0, "unknown")


def is_transient(error: BaseException) -> bool:
    """Worth retrying: the server may answer next time (it is starting, restarting, or busy)."""
    if isinstance(error, openai.APIConnectionError | openai.APITimeoutError | httpx.TransportError):
        return True
    if isinstance(error, openai.APIStatusError):
        return error.status_code == 429 or error.status_code >= 500
    return False


def retrying(deadline_s: float) -> AsyncRetrying:
    return AsyncRetrying(
        retry=retry_if_exception(is_transient), stop=stop_after_delay(deadline_s),
        wait=wait_exponential_jitter(multiplier=0.5, max=10.0), reraise=True,
        before_sleep=lambda state: log.warning("policy_call_retried", attempt=state.attempt_number,
                                               error=str(state.outcome.exception() if state.outcome else "")[:200]),
    )


def to_openai(message: Message) -> dict[str, Any]:
    out: dict[str, Any] = {"role": message.role, "content": message.content}
    if message.tool_calls and any(call.id for call in message.tool_calls):
        out["tool_calls"] = [{"id": c.id, "type": "function",
                              "function": {"name": c.name, "arguments": json.dumps(dict(c.arguments))}}
                             for c in message.tool_calls]
    if message.tool_call_id:
        out["tool_call_id"] = message.tool_call_id
    return out


# The bearer token of a gateway started with an API key (serve reads the same variable): collectors,
# evaluate and the embedded agent send it without a flag, so it never shows in a process list.
API_KEY_ENV = "EXITAGENT_API_KEY"


class OpenAIPolicy:
    """A policy served over the OpenAI API (``exitagent.serve``, plain vLLM, or any compatible server).
    ``api_key`` defaults to ``$EXITAGENT_API_KEY``."""

    def __init__(self, base_url: str, *, model: str = "policy", api_key: str | None = None,
                 require_token_ids: bool = True, deadline_s: float = 300.0, request_timeout_s: float = 600.0,
                 max_context: int = 2048, max_connections: int = 256,
                 transport: httpx.AsyncBaseTransport | None = None) -> None:
        self.base_url = base_url.rstrip("/")
        self.model = model
        self.require_token_ids = require_token_ids
        self.deadline_s = deadline_s
        self.max_context = max_context
        # ``transport`` is the test seam (httpx.MockTransport): everything else is the real client.
        api_key = api_key or os.environ.get(API_KEY_ENV) or None
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}  # our own calls (/v1/models) too
        self._http = httpx.AsyncClient(timeout=httpx.Timeout(request_timeout_s, connect=10.0), transport=transport,
                                       headers=headers,
                                       limits=httpx.Limits(max_connections=max_connections,
                                                           max_keepalive_connections=max_connections))
        # openai 3.x is built on httpx2 but accepts an httpx client (openai/_httpx2.py adapts it), so
        # the SDK and our own calls (/policy) share one connection pool.
        self._openai = openai.AsyncOpenAI(base_url=self.base_url, api_key=api_key or "unused",
                                          http_client=self._http, max_retries=0)  # type: ignore[arg-type]

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> OpenAIPolicy:
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.aclose()

    async def sample(self, messages: Sequence[Message], *, n: int = 1, params: SamplingParams = DEFAULT_PARAMS,
                     tools: Sequence[dict[str, Any]] | None = None) -> list[Sample]:
        body: dict[str, Any] = {
            "model": self.model, "messages": [to_openai(m) for m in messages], "n": n,
            "max_tokens": params.max_tokens, "temperature": params.temperature, "top_p": params.top_p,
            "logprobs": True,
        }
        if params.stop:
            body["stop"] = list(params.stop)
        if params.seed is not None:
            body["seed"] = params.seed
        if tools:
            body["tools"] = list(tools)
        extra = {"return_token_ids": True}
        try:
            async for attempt in retrying(self.deadline_s):
                with attempt:
                    raw = await self._openai.chat.completions.with_raw_response.create(**body, extra_body=extra)
        except openai.APIError as error:
            kind = ServerUnavailable if is_transient(error) else ServerError
            raise kind(f"policy server {self.base_url} failed: {type(error).__name__}: {error}") from error
        except httpx.HTTPError as error:
            raise ServerUnavailable(f"policy server {self.base_url} unreachable: {error}") from error
        version_name = raw.headers.get(VERSION_HEADER)
        version = PolicyVersion.parse(version_name) if version_name else UNKNOWN
        return self._samples(raw.parse(), version)

    def _samples(self, completion: Any, version: PolicyVersion) -> list[Sample]:
        prompt_ids = (completion.model_extra or {}).get("prompt_token_ids")
        samples = []
        for choice in completion.choices:
            token_ids = (choice.model_extra or {}).get("token_ids")
            if self.require_token_ids and (prompt_ids is None or token_ids is None):
                raise ServerUnsupported(
                    f"{self.base_url} does not return token ids (vLLM's return_token_ids); training needs the "
                    f"exact sampled tokens. Use exitagent.serve or vLLM >= 0.10, or require_token_ids=False."
                )
            logprobs = [entry.logprob for entry in (choice.logprobs.content or [])] if choice.logprobs else []
            calls = tuple(_tool_call(c) for c in (choice.message.tool_calls or []))
            samples.append(Sample(
                text=choice.message.content or "", prompt_ids=tuple(prompt_ids or ()),
                completion_ids=tuple(token_ids or ()), logprobs=tuple(logprobs),
                finish_reason=choice.finish_reason or "stop", version=version, tool_calls=calls,
            ))
        return samples

    def estimate_tokens(self, text: str) -> int:
        # Three bytes a token over-counts for BPE vocabularies: the safe side when the question is
        # "will the next prompt still fit". Exact counts arrive with each response's token ids.
        return len(text.encode()) // 3 + 8

    async def policy_version(self) -> PolicyVersion:
        """The version the server is serving now (``exitagent.serve``'s ``/policy``), else ``unknown``."""
        try:
            return PolicyVersion.parse((await self.policy_info() or {})["version"])
        except (ServerError, ValueError, KeyError, TypeError):
            return UNKNOWN

    async def policy_info(self) -> dict[str, Any] | None:
        """``exitagent.serve``'s ``GET /policy`` (version, base model), or None from another server.
        Raises ``ServerUnavailable`` when the server does not answer at all."""
        try:
            response = await self._http.get(self.base_url.removesuffix("/v1") + "/policy", timeout=10.0)
        except httpx.HTTPError as error:
            raise ServerUnavailable(f"policy server {self.base_url} unreachable: {error}") from error
        try:
            info = response.json() if response.status_code == 200 else None
        except ValueError:
            return None
        return info if isinstance(info, dict) else None

    async def model_names(self) -> list[str]:
        """What ``GET /v1/models`` lists for servers without ``/policy``: each model's id and root."""
        try:
            response = await self._http.get(self.base_url + "/models", timeout=10.0)
            rows = response.json().get("data", []) if response.status_code == 200 else []
        except (httpx.HTTPError, ValueError, AttributeError):
            return []
        return sorted(f"{row.get('id')}={row.get('root')}" for row in rows if isinstance(row, dict))

    async def healthy(self) -> bool:
        try:
            return (await self._http.get(self.base_url.removesuffix("/v1") + "/health", timeout=5.0)).status_code == 200
        except httpx.HTTPError:
            return False


def _tool_call(call: Any) -> ToolCall:
    try:  # model text: bounded like an in-text action (a 5000-digit number or deep brackets are data)
        arguments = load_json(call.function.arguments or "{}")
    except ActionError:
        arguments = {"__unparsed__": call.function.arguments}
    if not isinstance(arguments, dict):
        arguments = {"__unparsed__": call.function.arguments}
    return ToolCall(name=call.function.name, arguments=arguments, id=call.id or "", raw=call.function.arguments or "")

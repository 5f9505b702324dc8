"""exitagent's exceptions: infrastructure failures only.

Model mistakes (bad tool calls, crashing or timed-out code, wrong answers) are data, never
exceptions. What raises is what a person has to fix: a dead server, a missing sandbox runtime, a
corrupt store or checkpoint, bad configuration. Each message is one line that says what to do.

    ExitAgentError
    ├── ConfigError            bad flags, unknown model name, missing optional package
    ├── ModelError             a model or checkpoint that cannot be prepared or loaded
    │   └── CheckpointError    a published checkpoint that is incomplete, corrupt or incompatible
    ├── ServerError            the inference server: failed to start, died, or unreachable
    │   ├── ServerUnavailable  it did not answer (connection, timeout, 429, 5xx) within its deadline
    │   ├── ServerUnsupported  the server lacks a feature exitagent needs (e.g. token ids)
    │   └── ReloadError        a weight reload that failed or did not verify
    ├── SandboxError           the sandbox infrastructure (not the code run inside it)
    │   ├── SandboxUnavailable the runtime is missing or refused (no bwrap, no E2B key)
    │   └── SandboxCrashed     the runtime died under us
    ├── EvaluatorError         an evaluator that raised or timed out (its rollout is excluded)
    └── StoreError             the curriculum store: corrupt, or from a newer schema
        └── StoreUnavailable   a store server that is unreachable, refuses the login, or stays away

``score_or_failure`` is the one place an evaluator's own failure becomes data: a reason kept with
the rollout or step, which stays unscored (never a 0).
"""

from __future__ import annotations

from collections.abc import Awaitable
from typing import TypeVar

import structlog

log = structlog.get_logger(__name__)
T = TypeVar("T")



class ExitAgentError(Exception):
    """Base of every exception exitagent raises on purpose."""


class ConfigError(ExitAgentError):
    pass


class ModelError(ExitAgentError):
    pass


class CheckpointError(ModelError):
    pass


class ServerError(ExitAgentError):
    pass


class ServerUnavailable(ServerError):
    """A server that stopped answering: a routed collector moves the group to another server."""


class ServerUnsupported(ServerError):
    pass


class ReloadError(ServerError):
    pass


class SandboxError(ExitAgentError):
    pass


class SandboxUnavailable(SandboxError):
    pass


class SandboxCrashed(SandboxError):
    pass


class EvaluatorError(ExitAgentError):
    pass


class StoreError(ExitAgentError):
    pass


class StoreUnavailable(StoreError):
    pass


def unwrap(error: BaseException) -> BaseException:
    """The single error inside (nested) task-group exception groups, else ``error`` itself.

    Entry points use it to print one clear line for an ``ExitAgentError`` raised inside a task group.
    """
    while isinstance(error, BaseExceptionGroup) and len(error.exceptions) == 1:
        error = error.exceptions[0]
    return error


async def score_or_failure(scoring: Awaitable[T], event: str, *, limit: int = 300,
                           **context: object) -> tuple[T | None, str]:
    """``(score, "")``, or ``(None, reason)`` when the evaluator failed (``EvaluatorError``, logged as
    ``event``): the caller keeps the reason and leaves the rollout or step unscored, never 0."""
    try:
        return await scoring, ""
    except EvaluatorError as error:
        log.warning(event, error=str(error)[:200], **context)
        return None, str(error)[:limit] or type(error).__name__

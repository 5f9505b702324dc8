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
            └── StoreRefused   it answered, but refused the login or has no such database

``ExitCode`` is the one exit-code table of every command (docs/exit-codes.md): ``fail`` prints an
error's one line and gives its code, 2 for what the user must fix, 4 for a service that failed.

``score_or_failure`` is the one place an evaluator's own failure becomes data: a reason kept with
the rollout or step, which stays unscored (never a 0).
"""

from __future__ import annotations

import sys
from collections.abc import Awaitable
from enum import IntEnum
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


class StoreRefused(StoreUnavailable):
    """The store server answered and said no: running again fails the same way until the URL is fixed."""


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


class ExitCode(IntEnum):
    """What a command's exit status means: one table for every ``python -m`` entry point."""

    OK = 0
    BUG = 1
    USAGE = 2
    IDLE = 3
    UNAVAILABLE = 4
    INTERRUPTED = 130


EXIT_MEANINGS: dict[ExitCode, str] = {
    ExitCode.OK: "finished what it was asked; serve and training.update also when stopped by a signal, their "
                 "normal end",
    ExitCode.BUG: "an unexpected exception with a Python traceback: a bug in exitagent (Python's own status; "
                  "no command returns 1 on purpose)",
    ExitCode.USAGE: "refused, with one error line saying what to fix: bad flags or config file, an unknown model, "
                    "a corrupt or newer store, a missing sandbox runtime; the same command fails the same way "
                    "until it is fixed",
    ExitCode.IDLE: "training.update found no groups to train on within --idle-timeout-s (is collect running?)",
    ExitCode.UNAVAILABLE: "a service it needs failed or stopped answering (the inference server, the store "
                          "server, a sandbox, an evaluator), with one error line; run it again once that is back "
                          "(runs resume)",
    ExitCode.INTERRUPTED: "stopped by a signal before it finished (128 + SIGINT); the same command continues",
}


def exit_code(error: ExitAgentError) -> ExitCode:
    """UNAVAILABLE for a service that failed under us (running again can succeed), else USAGE."""
    if isinstance(error, ServerUnsupported | StoreRefused):  # it answered, and said no: not a retry
        return ExitCode.USAGE
    if isinstance(error, ServerError | StoreUnavailable | SandboxCrashed | EvaluatorError):
        return ExitCode.UNAVAILABLE
    return ExitCode.USAGE


def child_exit_code(returncode: int) -> ExitCode:
    """A command that ran another one (run, variants): the child's failure is its own code when the
    table has it, else (killed by a signal, or no code of ours) UNAVAILABLE."""
    known = {int(code) for code in ExitCode} - {ExitCode.OK}
    return ExitCode(returncode) if returncode in known else ExitCode.UNAVAILABLE


def fail(error: ExitAgentError, prefix: str = "error") -> ExitCode:
    """Print ``error`` as the command's one error line on stderr; its exit code."""
    print(f"{prefix}: {error}", file=sys.stderr)
    return exit_code(error)

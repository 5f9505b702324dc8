"""Open a sandbox: pick a backend by name (``$EXITAGENT_SANDBOX`` by default) behind the seam.

The contract (``Sandbox``, ``Limits``, ``ExecResult``) is ``sandboxes.base``; the backends import
it, and only this module imports the backends, so the contract file stays free of a cycle.
"""

from __future__ import annotations

import os
from collections.abc import Generator, Mapping
from pathlib import Path
from typing import Any

from exitagent.errors import ConfigError
from sandboxes.base import Limits, Sandbox, SandboxSpec

BACKENDS = ("local", "process", "e2b", "fake")
ENV_VAR = "EXITAGENT_SANDBOX"  # opt-in switch for the backend, e.g. EXITAGENT_SANDBOX=process


def chosen_backend(backend: str | None = None) -> str:
    """The explicit argument, else ``$EXITAGENT_SANDBOX``, else ``local``."""
    name = backend or os.environ.get(ENV_VAR, "").strip() or "local"
    if name not in BACKENDS:
        raise ConfigError(f"unknown sandbox backend {name!r}; choose one of {', '.join(BACKENDS)}")
    return name


async def _create(backend: str, spec: SandboxSpec, options: Mapping[str, Any]) -> Sandbox:
    # Backends are imported here so the base install needs neither bwrap nor the E2B SDK.
    if backend == "local":
        from sandboxes.local import LocalSandbox

        return await LocalSandbox.create(spec, **options)
    if backend == "process":
        from sandboxes.process import ProcessSandbox

        return await ProcessSandbox.create(spec, **options)
    if backend == "e2b":
        from sandboxes.e2b import E2BSandbox

        return await E2BSandbox.create(spec, **options)
    from sandboxes.fake import FakeSandbox

    return FakeSandbox(spec, **options)


class _Opening:
    """``open_sandbox(...)`` works both as ``sbx = await open_sandbox()`` (caller closes it) and as
    ``async with open_sandbox() as sbx`` (closed on exit), like httpx's streaming responses."""

    def __init__(self, backend: str, spec: SandboxSpec, options: Mapping[str, Any]) -> None:
        self._args = (backend, spec, options)
        self._sandbox: Sandbox | None = None

    def __await__(self) -> Generator[Any, None, Sandbox]:
        return _create(*self._args).__await__()

    async def __aenter__(self) -> Sandbox:
        self._sandbox = await _create(*self._args)
        return self._sandbox

    async def __aexit__(self, *exc_info: object) -> None:
        if self._sandbox is not None:
            await self._sandbox.close()


def open_sandbox(
    backend: str | None = None,
    *,
    limits: Limits | None = None,
    inputs: Mapping[str, str | Path] | None = None,
    env: Mapping[str, str] | None = None,
    **options: Any,
) -> _Opening:
    """Open a sandbox on ``backend`` (default ``local``; ``$EXITAGENT_SANDBOX`` overrides it).

    ``inputs`` maps workspace-relative paths to host paths mounted read-only; ``env`` is passed in
    as is and nothing else from the host is. ``options`` go to the backend (e.g. ``template`` for
    e2b, ``script`` for fake).
    """
    name = chosen_backend(backend)
    spec = SandboxSpec(
        limits=limits or Limits(),
        inputs={rel: Path(host) for rel, host in (inputs or {}).items()},
        env=dict(env or {}),
    )
    return _Opening(name, spec, options)

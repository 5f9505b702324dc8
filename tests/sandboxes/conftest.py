"""Fixtures for the sandbox tests: the anyio backend, the two host backends, and leak detectors.

Every sandboxed run in these tests carries a random token in its environment; a process left
behind is one whose ``/proc/<pid>/environ`` still holds it.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from sandboxes.base import Limits, open_sandbox
from sandboxes.cgroups import CONTROLLERS, usable_parent
from tests.sandboxing import bwrap_failure


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def require_bwrap() -> None:
    failure = bwrap_failure()
    if failure is not None:
        pytest.skip(f"bubblewrap cannot run here: {failure}")


@pytest.fixture
def require_cgroup() -> Callable[[str], None]:
    def require(controller: str) -> None:
        if usable_parent(controller) is None:
            pytest.skip(f"no writable cgroup v1 '{controller}' hierarchy on this host")

    return require


@pytest.fixture
def token() -> str:
    return uuid.uuid4().hex


@pytest.fixture
def leftovers(token: str) -> Callable[[], list[int]]:
    """Pids of live processes that carry this test's token (zombies have an empty environ)."""
    marker = f"EXITAGENT_TEST_TOKEN={token}".encode()

    def scan() -> list[int]:
        found = []
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                environ = Path(f"/proc/{entry}/environ").read_bytes()
            except OSError:
                continue
            if marker in environ.split(b"\0"):
                found.append(int(entry))
        return found

    return scan


@pytest.fixture
def cgroup_leaves() -> Callable[[], list[str]]:
    """Per-run cgroup leaves this test process still owns (there should be none between runs)."""

    def scan() -> list[str]:
        names = []
        for controller in CONTROLLERS:
            parent = usable_parent(controller)
            if parent is not None:
                names += [p.name for p in parent.glob(f"exitagent-{os.getpid()}-*")]
        return names

    return scan


def _maker(backend: str, token: str, base_dir: Path) -> Callable[..., Any]:
    def make(limits: Limits | None = None, env: dict[str, str] | None = None, **kwargs: Any) -> Any:
        env = {"EXITAGENT_TEST_TOKEN": token, **(env or {})}
        return open_sandbox(backend, limits=limits or Limits(wall_s=10), env=env, base_dir=base_dir, **kwargs)

    return make


@pytest.fixture(params=["local", "process"])
def backend(request: pytest.FixtureRequest) -> str:
    if request.param == "local":
        request.getfixturevalue("require_bwrap")
    return str(request.param)


@pytest.fixture
def make_sandbox(backend: str, token: str, tmp_path: Path) -> Callable[..., Any]:
    """``async with make_sandbox(limits=...) as sbx``: a sandbox of ``backend`` tagged with the token."""
    return _maker(backend, token, tmp_path)


@pytest.fixture
def local_sandbox(require_bwrap: None, token: str, tmp_path: Path) -> Callable[..., Any]:
    """Like ``make_sandbox`` but always bubblewrap: for the isolation tests."""
    return _maker("local", token, tmp_path)

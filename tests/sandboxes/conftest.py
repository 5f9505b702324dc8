"""Fixtures for the sandbox tests: the anyio backend, the two host backends, the cgroup versions,
and leak detectors.

Every sandboxed run in these tests carries a random token in its environment; a process left
behind is one whose ``/proc/<pid>/environ`` still holds it.

Sandboxes made by ``make_sandbox`` and ``local_sandbox`` run once per cgroup setting: ``v1``,
``v2`` (each skipped, with what blocked it, where this host cannot give it both controllers) and
``none``, the explicit opt-out (``EXITAGENT_SANDBOX_ALLOW_NO_CGROUPS=1`` with a cgroup root that has
nothing in it), which runs on every host.
"""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from sandboxes.base import Limits
from sandboxes.cgroups import ALLOW_ENV, ROOT_ENV, VERSION_ENV, current_hierarchy
from sandboxes.factory import open_sandbox
from tests.sandboxing import bwrap_failure


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def require_bwrap() -> None:
    failure = bwrap_failure()
    if failure is not None:
        pytest.skip(f"bubblewrap cannot run here: {failure}")


@pytest.fixture(params=["v1", "v2", "none"])
def cgroup_version(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> str:
    """The cgroup setting of the sandboxes this test makes (module docstring)."""
    if request.param == "none":
        (tmp_path / "no-cgroups").mkdir()
        monkeypatch.setenv(ROOT_ENV, str(tmp_path / "no-cgroups"))
        monkeypatch.setenv(ALLOW_ENV, "1")
        return "none"
    monkeypatch.setenv(VERSION_ENV, request.param[1])
    missing = current_hierarchy().missing
    if missing:
        reasons = sorted(set(missing.values()))
        pytest.skip(f"cgroup {request.param} cannot be used here ({', '.join(missing)}): {'; '.join(reasons)}")
    return str(request.param)


@pytest.fixture
def require_cgroup() -> Callable[[str], None]:
    def require(controller: str) -> None:
        if controller not in current_hierarchy().parents:
            pytest.skip(f"no usable '{controller}' cgroup in this setting")

    return require


@pytest.fixture
def token() -> str:
    return uuid.uuid4().hex


@pytest.fixture
def leftovers(token: str, cgroup_version: str) -> Callable[[], list[int]]:
    """Pids of live processes that carry this test's token (zombies have an empty environ).

    With cgroups a run returns only once its cgroup is empty. Without them (``none``) the jail's
    processes die just after the run returns, when the kernel tears down its PID namespace, so the
    scan gives them two seconds; a real leftover (a ``sleep 60``) outlives that."""
    marker = f"EXITAGENT_TEST_TOKEN={token}".encode()
    grace_s = 2.0 if cgroup_version == "none" else 0.0

    def scan() -> list[int]:
        deadline = time.monotonic() + grace_s
        while (found := scan_once()) and time.monotonic() < deadline:
            time.sleep(0.02)
        return found

    def scan_once() -> list[int]:
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
        for parent in set(current_hierarchy().parents.values()):
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
def make_sandbox(backend: str, cgroup_version: str, token: str, tmp_path: Path) -> Callable[..., Any]:
    """``async with make_sandbox(limits=...) as sbx``: a sandbox of ``backend`` tagged with the token."""
    return _maker(backend, token, tmp_path)


@pytest.fixture
def local_sandbox(require_bwrap: None, cgroup_version: str, token: str, tmp_path: Path) -> Callable[..., Any]:
    """Like ``make_sandbox`` but always bubblewrap: for the isolation tests."""
    return _maker("local", token, tmp_path)

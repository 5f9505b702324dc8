"""The opt-in backend with NO isolation: model code runs as a plain child process of ours.

It reads and writes whatever this user can, and reaches the network. What it does keep is every
resource bound of ``local`` (rlimits, the pids and memory cgroups where the host allows them, the
wall clock, the output cap) and the cleanup: its own session and process group, killed as a whole,
and a sweep of the run's cgroup for ``setsid`` escapees (without cgroups those can outlive it).

Use it only where bubblewrap cannot run and the code is trusted enough, and only by asking for it
(``open_sandbox("process")`` or ``EXITAGENT_SANDBOX=process``). It says so loudly when opened.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import PurePosixPath

import structlog

from sandboxes.runner import prlimit_path
from sandboxes.workspace import HostWorkspaceSandbox

log = structlog.get_logger(__name__)


class ProcessSandbox(HostWorkspaceSandbox):
    """A host directory and plain subprocesses; inputs are symlinks (writable through, beware)."""

    backend = "process"

    @classmethod
    async def _check_runtime(cls) -> None:
        prlimit_path()
        log.warning(
            "unisolated_sandbox_opened",
            backend=cls.backend,
            risk="model code runs with this user's files, secrets and network; only resources are bounded",
        )

    def _prepare_inputs(self) -> None:
        for rel, host in self.spec.inputs.items():
            link = self.host_workspace / rel
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to(host.resolve())

    def _command(self, argv: Sequence[str], cwd: PurePosixPath, env: Mapping[str, str]) -> list[str]:
        return list(argv)

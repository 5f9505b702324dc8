"""The cloud backend: one E2B microVM per sandbox, through ``e2b_code_interpreter.AsyncSandbox``.

The SDK is imported when a sandbox is made, so the base install works without it (``pip install
exitagent[e2b]``; ``E2B_API_KEY`` is read by the SDK from the host and never passed inside).

How the SDK's behaviour maps onto the seam:

- creation is the one place E2B is retried (tenacity, ``is_transient``: rate limits, a busy service,
  transport errors); the SDK's own hidden retries are turned off with ``retries=0``;
- the VM's lifetime is the caller's deadline (``anyio.current_effective_deadline``) or
  ``lifetime_s``, extended with ``set_timeout`` when a command would outlive it, so a forgotten
  sandbox dies by itself; ``close`` always kills it;
- ``CommandExitException`` (a non-zero exit) becomes a result with its exit code, and
  ``TimeoutException`` a ``timed_out`` result, unless the VM itself is gone (``SandboxCrashed``);
- ``AuthenticationException`` is not a ``SandboxException`` and becomes ``SandboxUnavailable``.
"""

from __future__ import annotations

import math
import shlex
import time
import uuid
from collections.abc import Mapping, Sequence
from pathlib import PurePosixPath
from types import ModuleType, TracebackType
from typing import Any, Self

import anyio
import structlog
from tenacity import AsyncRetrying, retry_if_exception, stop_after_attempt, wait_exponential, wait_random

from exitagent.errors import SandboxCrashed, SandboxError, SandboxUnavailable
from sandboxes.base import ExecResult, SandboxSpec, workspace_path
from sandboxes.runner import capped_text

log = structlog.get_logger(__name__)

WORKDIR = "/home/user"
DEFAULT_LIFETIME_S = 300.0  # E2B's own default; used when the caller set no deadline
_LIFETIME_MARGIN_S = 30.0  # room for uploads and reads around a command
_CREATE_ATTEMPTS = 4


def _sdk() -> ModuleType:
    try:
        import e2b_code_interpreter
    except ImportError as err:
        raise SandboxUnavailable("the e2b backend needs the E2B SDK: pip install 'exitagent[e2b]'") from err
    return e2b_code_interpreter


def is_transient(err: BaseException) -> bool:
    """Worth another try: E2B asked us to slow down, was busy, or the request never made it."""
    import httpx

    sdk = _sdk()
    return isinstance(err, sdk.RateLimitException | sdk.ServiceBusyException | httpx.TransportError)


def _lifetime(wanted_s: float) -> float:
    """``wanted_s`` from now, cut to the caller's deadline when there is one."""
    left = anyio.current_effective_deadline() - anyio.current_time()
    return max(1.0, min(wanted_s, left))


class E2BSandbox:
    """An E2B VM behind the ``Sandbox`` seam. Paths are relative to ``/home/user``."""

    backend = "e2b"
    workdir = WORKDIR
    python = "python3"

    def __init__(self, sdk_sandbox: Any, spec: SandboxSpec, lifetime_s: float) -> None:
        self.spec, self.limits = spec, spec.limits
        self._vm = sdk_sandbox
        self._expires = time.monotonic() + lifetime_s
        self._closed = False

    @classmethod
    async def create(
        cls,
        spec: SandboxSpec,
        *,
        template: str | None = None,
        lifetime_s: float | None = None,
        network: bool = False,
        sandbox_class: Any = None,
        retry_wait_s: float = 1.0,
    ) -> Self:
        """Start a VM. ``sandbox_class`` replaces ``AsyncSandbox`` (tests pass a stand-in)."""
        sdk = _sdk()
        factory = sandbox_class or sdk.AsyncSandbox
        lifetime = _lifetime(lifetime_s or DEFAULT_LIFETIME_S)
        retrying = AsyncRetrying(
            retry=retry_if_exception(is_transient),
            stop=stop_after_attempt(_CREATE_ATTEMPTS),
            wait=wait_exponential(multiplier=retry_wait_s, max=30 * retry_wait_s) + wait_random(0, retry_wait_s),
            reraise=True,
        )
        try:
            async for attempt in retrying:
                with attempt:
                    vm = await factory.create(
                        template=template,
                        timeout=math.ceil(lifetime),
                        envs=dict(spec.env),
                        allow_internet_access=network,
                        metadata={"exitagent": "1"},
                        retries=0,
                    )
        except sdk.AuthenticationException as err:
            raise SandboxUnavailable(f"E2B refused the API key (set E2B_API_KEY): {err}") from err
        except (sdk.SandboxException, sdk.ServiceBusyException) as err:
            raise SandboxUnavailable(f"could not create an E2B sandbox: {err}") from err
        except Exception as err:
            if is_transient(err):
                raise SandboxUnavailable(f"E2B unreachable after {_CREATE_ATTEMPTS} tries: {err}") from err
            raise
        sandbox = cls(vm, spec, lifetime)
        log.info("sandbox_opened", backend=cls.backend, id=getattr(vm, "sandbox_id", None))
        try:
            await sandbox._upload_inputs()
        except BaseException:
            with anyio.CancelScope(shield=True):
                await sandbox.close()
            raise
        return sandbox

    async def _upload_inputs(self) -> None:
        for rel, host in self.spec.inputs.items():
            files = [host] if host.is_file() else sorted(p for p in host.rglob("*") if p.is_file())
            for file in files:
                inside = PurePosixPath(rel) / file.relative_to(host) if file != host else PurePosixPath(rel)
                await self.write_file(str(inside), file.read_bytes())

    # --- running -----------------------------------------------------------------------------

    async def exec(
        self,
        cmd: Sequence[str],
        *,
        wall_s: float | None = None,
        cwd: str = ".",
        env: Mapping[str, str] | None = None,
        stdin: bytes | None = None,
    ) -> ExecResult:
        self._check_open()
        wall = wall_s if wall_s is not None else self.limits.wall_s
        command = shlex.join(cmd)
        if stdin is not None:  # commands.run takes no stdin bytes; feed them from a file
            stdin_path = f"/tmp/exitagent-stdin-{uuid.uuid4().hex}"
            await self._call(self._vm.files.write(stdin_path, stdin))
            command = f"{command} < {stdin_path}"
        await self._extend_lifetime(wall)
        started = time.monotonic()
        sdk = _sdk()
        timed_out, exit_code, stdout, stderr = False, None, "", ""
        try:
            done = await self._vm.commands.run(command, cwd=self._inside(cwd), envs=dict(env or {}), timeout=wall)
            exit_code, stdout, stderr = done.exit_code, done.stdout, done.stderr
        except sdk.CommandExitException as err:
            exit_code, stdout, stderr = err.exit_code, err.stdout or "", err.stderr or ""
        except (sdk.SandboxNotRunningException, sdk.SandboxUnreachableException) as err:
            raise SandboxCrashed(f"the E2B sandbox stopped: {err}") from err
        except sdk.TimeoutException:
            timed_out = True
        except sdk.AuthenticationException as err:
            raise SandboxUnavailable(f"E2B refused the API key: {err}") from err
        except sdk.SandboxException as err:
            raise SandboxCrashed(f"E2B failed to run the command: {err}") from err
        out, cut_out = capped_text(stdout or "", self.limits.max_output_bytes)
        errs, cut_err = capped_text(stderr or "", self.limits.max_output_bytes)
        return ExecResult(
            stdout=out,
            stderr=errs,
            exit_code=exit_code,
            timed_out=timed_out,
            # E2B reports an OOM kill as SIGKILL; without a cgroup counter we cannot say more.
            out_of_memory=False,
            truncated=cut_out or cut_err,
            duration_s=time.monotonic() - started,
        )

    async def run_python(self, code: str, *, wall_s: float | None = None, filename: str = "runfile.py") -> ExecResult:
        await self.write_file(filename, code)
        return await self.exec([self.python, filename], wall_s=wall_s)

    async def _extend_lifetime(self, wall_s: float) -> None:
        needed = wall_s + _LIFETIME_MARGIN_S
        if self._expires - time.monotonic() >= needed:
            return
        lifetime = _lifetime(needed)
        await self._call(self._vm.set_timeout(math.ceil(lifetime)))
        self._expires = time.monotonic() + lifetime

    # --- files -------------------------------------------------------------------------------

    def _inside(self, path: str) -> str:
        return str(PurePosixPath(WORKDIR) / workspace_path(path))

    async def write_file(self, path: str, data: str | bytes) -> None:
        self._check_open()
        await self._call(self._vm.files.write(self._inside(path), data))

    async def read_file(self, path: str, *, binary: bool = False, max_bytes: int = 16 << 20) -> str | bytes:
        self._check_open()
        data = bytes(await self._call(self._vm.files.read(self._inside(path), format="bytes")))
        if len(data) > max_bytes:
            raise OSError(27, f"{path} is larger than {max_bytes} bytes")  # EFBIG
        return data if binary else data.decode(errors="replace")

    async def list_files(self, path: str = ".") -> list[str]:
        self._check_open()
        entries = await self._call(self._vm.files.list(self._inside(path)))
        sdk = _sdk()
        return sorted(e.name + ("/" if e.type == sdk.FileType.DIR else "") for e in entries)

    async def _call(self, pending: Any) -> Any:
        """Await an SDK call, mapping its errors onto ours (missing files stay FileNotFoundError)."""
        sdk = _sdk()
        try:
            return await pending
        except sdk.NotFoundException as err:
            raise FileNotFoundError(str(err)) from err
        except sdk.AuthenticationException as err:
            raise SandboxUnavailable(f"E2B refused the API key: {err}") from err
        except sdk.SandboxException as err:
            raise SandboxCrashed(f"E2B call failed: {err}") from err

    # --- lifetime ----------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise SandboxError("e2b sandbox is closed")

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            await self._vm.kill()
        except Exception as err:  # it dies at its lifetime anyway; closing must not fail
            log.warning("sandbox_kill_failed", backend=self.backend, error=repr(err))
        else:
            log.info("sandbox_closed", backend=self.backend, id=getattr(self._vm, "sandbox_id", None))

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        with anyio.CancelScope(shield=True):
            await self.close()

"""Hot reload: load each newly published checkpoint into the running engine, and prove it loaded.

The sequence (verified against vLLM 0.32 on these machines, ~0.5 s for the default model):
pause (drain in-flight requests) -> ``collective_rpc reload_weights`` -> reset the prefix cache ->
resume -> canary -> set the weight version. Every admin call has a deadline.

Upstream hazards this guards against: a reload that silently keeps the old weights, stale prefix
cache entries, a hang with no error, and (seen here) a failed in-place reload that kills the
engine. So a checkpoint is fully verified on disk before vLLM may read it (``checkpoints.verify``),
and after the reload the served log-probabilities of a fixed canary prompt must match what the
trainer computed for that checkpoint. A reload that fails or does not verify puts the previous
good weights back; if the engine died, ``serve`` restarts it on the last good checkpoint.
"""

from __future__ import annotations

import dataclasses
import re
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import httpx
import structlog

from exitagent import precision
from exitagent.errors import CheckpointError, ReloadError, ServerError
from exitagent.serving import checkpoints
from exitagent.serving.checkpoints import Canary
from exitagent.types import PolicyVersion

log = structlog.get_logger(__name__)

# An absolute path in an error message (not a ratio like 1/2): the public /policy keeps its last part.
_ABSOLUTE_PATH = re.compile(r"(?<![\w.~])/(?:[^\s'\"(),:/]+/)*([^\s'\"(),:/]*)")


@dataclass(frozen=True)
class CanaryCheck:
    """How the server judges a checkpoint's canary: its own configuration, never the checkpoint's.

    A checkpoint could otherwise pass itself with a huge tolerance or an empty token list (a mean
    over nothing is 0). The tolerance follows the serving dtype (``precision.canary_tolerance``).
    """

    tolerance: float
    tokens: int  # how many log-probabilities are compared; a canary with fewer is rejected

    def apply(self, canary: Canary) -> Canary:
        """The first ``tokens`` log-probabilities of ``canary`` and this tolerance (its own is ignored)."""
        if len(canary.logprobs) < self.tokens or len(canary.token_ids) != len(canary.logprobs) + 1:
            raise CheckpointError(f"canary has {len(canary.logprobs)} log-probabilities for {len(canary.token_ids)} "
                                  f"tokens; the server compares {self.tokens} (--canary-tokens)")
        return dataclasses.replace(canary, token_ids=canary.token_ids[: self.tokens + 1],
                                   logprobs=canary.logprobs[: self.tokens], tolerance=self.tolerance)


DEFAULT_CHECK = CanaryCheck(tolerance=precision.canary_tolerance("bfloat16"), tokens=16)  # serve sets its own


class Admin:
    """vLLM's development admin routes, each call under a deadline."""

    def __init__(self, engine_url: str, served_name: str, timeout_s: float = 120.0) -> None:
        self.served_name = served_name
        self._client = httpx.AsyncClient(base_url=engine_url, timeout=timeout_s)

    async def aclose(self) -> None:
        await self._client.aclose()

    async def _post(self, path: str, body: dict[str, Any] | None = None) -> None:
        """A 200 is success; the answer is not parsed (the LoRA routes answer plain text)."""
        try:
            response = await self._client.post(path, json=body)
        except httpx.HTTPError as error:
            raise ServerError(f"vLLM admin call {path} failed: {type(error).__name__}: {error}") from error
        if response.status_code != 200:
            raise ReloadError(f"vLLM admin call {path} answered {response.status_code}: {response.text[:300]}")

    async def healthy(self) -> bool:
        try:
            return (await self._client.get("/health", timeout=5.0)).status_code == 200
        except httpx.HTTPError:
            return False

    async def weight_version(self) -> str:
        response = await self._client.get("/weight_info")
        response.raise_for_status()
        return str(response.json()["weight_version"])

    async def load(self, directory: Path, version: str) -> None:
        """Swap the engine's weights for those in ``directory`` (pause, reload, reset, resume)."""
        await self._post("/pause?mode=wait")
        try:
            rpc = {"method": "reload_weights", "kwargs": {"weights_path": str(directory)}}
            await self._post("/collective_rpc", rpc)
            await self._post("/reset_prefix_cache")
        finally:
            await self._post("/resume")
        await self.set_version(version)

    async def set_version(self, version: str) -> None:
        await self._post("/update_weight_version", {"new_version": version})

    async def after_restart(self, directory: Path, version: str) -> None:
        """Bring a restarted engine (started on ``directory``) back to ``version``."""
        await self.set_version(version)

    @property
    def canary_model(self) -> str:
        """The model name the canary asks for (a server of adapters: the adapter's)."""
        return self.served_name

    async def prompt_logprobs(self, token_ids: tuple[int, ...]) -> list[float]:
        """The served model's log-probability of each prompt token after the first."""
        body = {"model": self.canary_model, "prompt": list(token_ids), "max_tokens": 1, "temperature": 0.0,
                "prompt_logprobs": 0}
        response = await self._client.post("/v1/completions", json=body)
        if response.status_code != 200:
            raise ReloadError(f"canary request answered {response.status_code}: {response.text[:300]}")
        entries = response.json()["choices"][0]["prompt_logprobs"][1:]
        values = []
        for token, entry in zip(token_ids[1:], entries, strict=True):
            values.append(float(entry[str(token)]["logprob"]))
        return values


@dataclass
class ServingState:
    """What the server is serving now; read by the gateway's ``/policy`` route."""

    version: PolicyVersion
    directory: Path
    reloads: int = 0
    rejected: set[Path] = field(default_factory=set)
    last_error: str = ""
    last_reload_s: float = 0.0
    base: dict[str, str] = field(default_factory=dict)  # the base model's name and fingerprint (models.identity)
    adapter: str = ""  # with LoRA: the vLLM name of the adapter served under public_name (exitagent.serving.adapters)
    public_name: str = ""

    def as_json(self) -> dict[str, Any]:
        return {"version": str(self.version), "step": self.version.step, "checkpoint": str(self.directory),
                "reloads": self.reloads, "rejected": len(self.rejected), "last_error": self.last_error,
                "last_reload_s": self.last_reload_s, "base": self.base}

    def public_json(self) -> dict[str, Any]:
        """What the gateway's public ``GET /policy`` shows: ``as_json`` without host paths.

        ``as_json`` (written to ``served/SERVER.json`` for the run's own processes) keeps the checkpoint's full
        path; strangers get only its directory name, and every absolute path quoted in the last error
        is cut to its final component (the server log keeps the full text).
        """
        info = self.as_json()
        info["checkpoint"] = self.directory.name
        info["last_error"] = _ABSOLUTE_PATH.sub(r"\1", self.last_error)
        return info


Exclusive = Callable[[Callable[[], Awaitable[None]]], Awaitable[None]]


class Reloader:
    """Loads the newest good checkpoint of a weights directory into the engine."""

    def __init__(self, admin: Admin, weights_dir: Path, state: ServingState,
                 reference: dict[str, tuple[str, tuple[int, ...]]], exclusive: Exclusive,
                 check: CanaryCheck = DEFAULT_CHECK, verify: Callable[[Path], Canary] | None = None,
                 server: str = "serve") -> None:
        self.admin = admin
        self.server = server  # names this server's record in the weights directory (checkpoints.server_id)
        self.verify = verify or (lambda path: checkpoints.verify(path, reference))  # adapters: serving.adapters
        self.check = check
        self.weights_dir = weights_dir
        self.state = state
        self.reference = reference
        self._exclusive = exclusive  # runs a coroutine while the gateway holds client requests back

    def candidates(self) -> list[tuple[int, Path]]:
        """Checkpoints newer than the served one, newest first (the highest step wins)."""
        newer = [(s, p) for s, p in checkpoints.ready_checkpoints(self.weights_dir)
                 if s > self.state.version.step and p not in self.state.rejected]
        return sorted(newer, reverse=True)

    async def poll(self) -> bool:
        """Try the newest candidates until one loads. Returns True if the served weights changed.

        Nothing is tried while the engine is down (serve is restarting it): a reload would fail
        for a reason that is not the checkpoint's, and rejecting it would strand the run on older
        weights (seen under load: three good checkpoints refused while the engine restarted).
        """
        candidates = self.candidates()
        if candidates and not await self.admin.healthy():
            log.warning("reload_deferred_engine_down", candidates=len(candidates))
            return False
        for step, path in candidates:
            try:
                canary = self.check.apply(await anyio.to_thread.run_sync(self.verify, path))
            except Exception as error:  # whatever is wrong with a checkpoint rejects it, not serve
                self._reject(path, _reason(error))
                continue
            if await self._swap(step, path, canary):
                return True
        return False

    def record_served(self) -> None:
        """Write this server's ``served/SERVER.json``. A failure (a full disk) is logged: serving goes
        on, and the trainer's pruning then merely lacks the newest record (it protects the one before)."""
        try:
            checkpoints.write_served(self.weights_dir, self.state.as_json(), self.server)
        except CheckpointError as error:
            log.error("served_record_failed", error=str(error))

    def _reject(self, path: Path, reason: str) -> None:
        self.state.rejected.add(path)
        self.state.last_error = reason
        log.error("checkpoint_rejected", checkpoint=str(path), reason=reason)

    async def _swap(self, step: int, path: Path, canary: Canary) -> bool:
        version = PolicyVersion.at_step(step)
        previous = self.state.directory, self.state.version
        outcome: dict[str, Any] = {}

        async def reload_and_verify() -> None:
            started = time.perf_counter()
            try:
                await self.admin.load(path, str(version))
                distance = canary.distance(await self.admin.prompt_logprobs(canary.token_ids))
                served = await self.admin.weight_version()
                if served != str(version):
                    raise ReloadError(f"engine reports weight version {served!r}, expected {version}")
                if not distance <= canary.tolerance:  # NaN compares false both ways: it fails too
                    raise ReloadError(f"canary mismatch: mean |dlogp| {distance:.3f} > {canary.tolerance}")
                outcome.update(ok=True, distance=distance, seconds=time.perf_counter() - started)
            except Exception as error:  # cancellation is a BaseException and passes
                outcome.update(ok=False, error=_reason(error))
                await self._restore(*previous)

        await self._exclusive(reload_and_verify)
        if not outcome["ok"]:
            self._reject(path, f"reload failed: {outcome['error']}")
            return False
        self.state.version, self.state.directory = version, path
        self.state.reloads += 1
        self.state.last_reload_s = round(outcome["seconds"], 3)
        self.record_served()
        log.info("checkpoint_loaded", version=str(version), canary_distance=round(outcome["distance"], 4),
                 seconds=self.state.last_reload_s)
        return True

    async def _restore(self, directory: Path, version: PolicyVersion) -> None:
        """Put the previous good weights back. If the engine is dead, serve restarts it."""
        if not await self.admin.healthy():
            log.error("engine_unhealthy_after_reload", restoring=str(directory))
            return
        try:
            await self.admin.load(directory, str(version))
            log.warning("previous_weights_restored", version=str(version))
        except Exception as error:  # serve's supervisor restarts a broken engine
            log.error("restore_failed", error=_reason(error))


def _reason(error: Exception) -> str:
    """An error's message; an exception that is not ours also names its type (a bare KeyError('x')
    says nothing on its own)."""
    if isinstance(error, (CheckpointError, ServerError)):
        return str(error)
    return f"{type(error).__name__}: {error}"

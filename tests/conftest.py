"""Shared fixtures: the prepared default model and real ``exitagent.serve`` processes.

A served model takes one to two minutes to start on two CPU cores, so one server is shared by the
whole session (``served``); tests that change the served weights start their own.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from evaluators.worlds.mle import Competition, prepare_one
from exitagent import models
from exitagent.serving import engine, launch
from exitagent.serving.launch import ServeProcess
from tests.postgres import Cluster, cluster_fixture


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(autouse=True)
def private_evaluation_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test its own cache of base evaluations (exitagent.eval_cache): a run started by one test
    must not reuse another test's measurement, nor the developer's own."""
    monkeypatch.setenv("EXITAGENT_EVAL_CACHE", str(tmp_path / "eval-cache"))


@pytest.fixture(scope="session")
def postgres() -> Iterator[Cluster]:
    """A throw-away PostgreSQL cluster for the session (tests/postgres.py); skipped where not installed."""
    yield from cluster_fixture()


@pytest.fixture(scope="session")
def iris(tmp_path_factory: pytest.TempPathFactory) -> Competition:
    """The iris-species competition, prepared once, alone in its directory."""
    return prepare_one(tmp_path_factory.mktemp("competitions"), "iris-species")


@pytest.fixture(scope="session")
def model_dir() -> Path:
    return models.resolve(models.DEFAULT_MODEL)


def start_serve(tmp: Path, *extra: str, eager: bool = True) -> ServeProcess:
    """A serve process; eager unless asked (vLLM's torch.compile start-up costs ~40 s more for ~4%
    more tokens/s with the 135M model on two cores: measured 84 s vs 44 s to ready, 381 vs 366 tok/s)."""
    flags = ("--enforce-eager",) if eager else ()
    return launch.start_serve(tmp, "--kv-cache-gib", "2", "--poll-s", "0.5", *flags, *extra)


@pytest.fixture(scope="session")
def serve_factory():
    """``start_serve(tmp_dir, *extra_flags)``: start an eager serve process (the caller stops it)."""
    return start_serve


@pytest.fixture(scope="session")
def served_engine_port() -> int:
    """The loopback port of ``served``'s engine, where tests ask vLLM itself what changed."""
    if os.environ.get("EXITAGENT_TEST_SERVE_DIR"):
        pytest.skip("a reused serve's engine port is not known")
    return engine.free_port()


@pytest.fixture(scope="session")
def served(tmp_path_factory: pytest.TempPathFactory, model_dir: Path, request: pytest.FixtureRequest):
    """One real CPU vLLM server on the packaged model, shared by the session.

    For quick local iterations, ``EXITAGENT_TEST_SERVE_DIR=DIR`` reuses a serve already running with
    ``--weights-dir DIR/weights``, whose URL is in ``DIR/url`` (CI always starts its own).
    """
    reuse = os.environ.get("EXITAGENT_TEST_SERVE_DIR")
    if reuse:
        directory = Path(reuse)
        url = (directory / "url").read_text().strip()
        yield ServeProcess(subprocess.Popen(["true"], text=True), url, directory / "weights", directory / "log")
        return
    # compiled, as users run it: the one server of the session that covers vLLM's default path
    port = request.getfixturevalue("served_engine_port")
    server = start_serve(tmp_path_factory.mktemp("served"), "--engine-port", str(port), eager=False)
    yield server
    if server.process.poll() is None:
        server.stop()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked ``gpu`` need CUDA: skipped where torch sees no GPU (torch is imported only if
    such a test was collected). Tests marked ``manual`` run only with EXITAGENT_MANUAL_TESTS=1."""
    if os.environ.get("EXITAGENT_MANUAL_TESTS") != "1":
        for item in items:
            if item.get_closest_marker("manual"):
                item.add_marker(pytest.mark.skip(reason="manual: set EXITAGENT_MANUAL_TESTS=1 (a core per engine)"))
    marked = [item for item in items if item.get_closest_marker("gpu")]
    if not marked:
        return
    import torch

    if not torch.cuda.is_available():
        for item in marked:
            item.add_marker(pytest.mark.skip(reason="needs a CUDA device"))

"""Two real CPU vLLM servers on one weights directory: both reload, pruning keeps what either
serves, and one collector over both records each group's exact version and server.

About 8-10 GiB of memory (two engines with a 1 GiB KV cache each) and 4-6 minutes on two cores.

vLLM's own data parallelism (``serve --data-parallel-size 2``) is not started here: vLLM's CPU
backend binds each engine's OpenMP threads to cores of its own and keeps one core free for the
API process (``VLLM_CPU_OMP_THREADS_BIND=auto``), so two engines need more than the two cores CI
has. That a reload reaches every data-parallel engine is read from vLLM's code (docs/scaling.md).
"""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from exitagent import checkpoints, launch
from exitagent.launch import ServeProcess
from exitagent.log import read_metrics
from exitagent.store import SQLiteStore
from training.publish import publish_model

pytestmark = [pytest.mark.vllm, pytest.mark.slow]


def start_two(run_dir: Path) -> list[ServeProcess]:
    """Two serve processes on ``run_dir/weights``, one after the other: from this (the main) thread,
    because the kernel signals a child when the thread that started it ends (``die_with_parent``)."""
    servers: list[ServeProcess] = []
    try:
        for index in range(2):
            servers.append(launch.start_serve(run_dir, "--kv-cache-gib", "1", "--poll-s", "0.5", "--enforce-eager",
                                              "--log-file", str(run_dir / "logs" / f"vllm-{index}.log")))
    except BaseException:
        for server in servers:
            server.stop()
        raise
    return servers


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory):
    run_dir = tmp_path_factory.mktemp("fleet")
    servers = start_two(run_dir)
    yield run_dir, servers
    for server in servers:
        if server.process.poll() is None:
            server.process.send_signal(signal.SIGCONT)
            server.stop()


def changed_model(model_dir: Path, layer: int):  # type: ignore[no-untyped-def]
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    with torch.no_grad():  # a real change the canary can see: one layer's MLP zeroed
        for parameter in model.model.layers[layer].mlp.parameters():
            parameter.zero_()
    return model, AutoTokenizer.from_pretrained(model_dir)


def test_two_servers_reload_prune_and_collect(fleet, model_dir: Path) -> None:
    run_dir, (a, b) = fleet
    weights = run_dir / "weights"
    assert a.policy()["base"] == b.policy()["base"]  # the same base model, by name and fingerprint
    model, tokenizer = changed_model(model_dir, 3)
    publish_model(model, tokenizer, weights, step=1, keep=1)
    for server in (a, b):
        info = server.wait_for_version("step-000001", timeout_s=180)
        assert info["rejected"] == 0, info["last_error"]  # both canaries passed
    records = checkpoints.served_records(weights)
    assert len(records) == 2 and {Path(r["checkpoint"]).name for r in records.values()} == {"step-000001"}

    # b stops reloading (frozen); a moves on. Pruning to one checkpoint keeps b's old one.
    b.process.send_signal(signal.SIGSTOP)
    try:
        for step in (2, 3):
            publish_model(model, tokenizer, weights, step=step, keep=1)
            a.wait_for_version(f"step-{step:06d}", timeout_s=180)
        publish_model(model, tokenizer, weights, step=4, keep=1)
        kept = {p.name for _, p in checkpoints.ready_checkpoints(weights)}
        assert "step-000001" in kept and "step-000003" in kept and "step-000002" not in kept
    finally:
        b.process.send_signal(signal.SIGCONT)
    for server in (a, b):
        server.wait_for_version("step-000004", timeout_s=180)

    command = [sys.executable, "-m", "exitagent.collect", "--run-dir", str(run_dir),
               "--base-url", a.base_url, "--base-url", b.base_url, "--variant", "grpo", "--groups", "4",
               "--group-size", "2", "--concurrency", "2", "--max-tokens", "24", "--levels", "add1",
               "--num-tasks", "20", "--no-progress", "--log-level", "warning"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    with SQLiteStore.in_run(run_dir) as store:
        groups = store.fetch_groups()
    assert len(groups) == 4 and all(len(g.rollouts) == 2 for g in groups)
    assert {str(g.version) for g in groups} == {"step-000004"}  # exact, from the answers' headers
    rows = read_metrics(run_dir, "collect", "group")
    assert {r["server"] for r in rows} == {a.base_url, b.base_url}  # both servers answered groups
    assert all(r["version"] == "step-000004" and r["version_skew"] == 0 for r in rows)

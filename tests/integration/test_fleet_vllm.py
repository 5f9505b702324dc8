"""Two real CPU vLLM servers on one weights directory: both reload, pruning keeps what either
serves, and one collector over both records each group's exact version and server.

About 8-10 GiB of memory (two engines with a 1 GiB KV cache each) and 4-6 minutes on two cores.

Also vLLM's own data parallelism on the CPU build: ``serve --data-parallel-size 2`` with
``VLLM_CPU_OMP_THREADS_BIND="0|1"`` (one core list per engine) runs two engines behind one API
process, and one reload reaches both (vLLM broadcasts utility calls to every engine; docs/scaling.md).
"""

from __future__ import annotations

import re
import signal
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from exitagent.curriculum.store import SQLiteStore
from exitagent.log import read_metrics
from exitagent.serving import checkpoints, launch
from exitagent.serving.launch import ServeProcess
from training.publish import compute_canary, publish_model

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


# Manual: two engines each bound to one of CI's two cores, beside the test and vLLM's API process,
# starve; in a CI run the engines' 10-second throughput lines never showed the canary requests.
@pytest.mark.manual
def test_one_reload_reaches_both_data_parallel_engines(tmp_path: Path, model_dir: Path) -> None:
    """Two engines behind one serve: after one reload, canary requests answered by either engine all
    show the new weights (one MLP zeroed: the base model would be far off), and the engine log shows
    that both engines took prompt tokens."""
    server = launch.start_serve(tmp_path, "--kv-cache-gib", "1", "--poll-s", "0.5", "--enforce-eager",
                                "--data-parallel-size", "2", env={"VLLM_CPU_OMP_THREADS_BIND": "0|1"})
    try:
        model, tokenizer = changed_model(model_dir, 3)
        canary = compute_canary(model, tokenizer)
        publish_model(model, tokenizer, server.weights_dir, step=1)
        info = server.wait_for_version("step-000001", timeout_s=300)
        assert info["rejected"] == 0, info["last_error"]

        def gap(_: int) -> float:
            body = {"model": "policy", "prompt": list(canary.token_ids), "max_tokens": 1, "temperature": 0.0,
                    "prompt_logprobs": 0}
            answer = httpx.post(f"{server.base_url}/completions", json=body, timeout=120)
            answer.raise_for_status()
            entries = answer.json()["choices"][0]["prompt_logprobs"][1:]
            served = [float(e[str(t)]["logprob"]) for t, e in zip(canary.token_ids[1:], entries, strict=True)]
            return statistics.fmean(abs(a - b) for a, b in zip(served, canary.logprobs, strict=True))

        with ThreadPoolExecutor(4) as pool:  # concurrent, so vLLM's balancer uses both engines
            gaps = list(pool.map(gap, range(16)))
        assert max(gaps) < 0.1, gaps
        time.sleep(11)  # vLLM logs each engine's throughput every 10 s
    finally:
        server.stop()
    log = (tmp_path / "logs" / "vllm.log").read_text()
    prompt_rates = {engine: float(rate) for engine, rate in
                    re.findall(r"Engine (\d+): Avg prompt throughput: ([\d.]+)", log)
                    if float(rate) > 0}
    assert set(prompt_rates) == {"000", "001"}, prompt_rates  # both engines answered canary requests

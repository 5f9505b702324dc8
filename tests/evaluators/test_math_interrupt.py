"""Ctrl-C while the math grader's worker processes are busy prints no traceback and leaves no
worker behind (a terminal sends SIGINT to the whole foreground process group)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import psutil

GRADING = """
import signal, sys, time, anyio
from evaluators.math import MathEvaluator

# as at a terminal: a shell that starts a job in the background (CI's `cmd &`) hands it SIGINT ignored
signal.signal(signal.SIGINT, signal.default_int_handler)

async def main():
    async with MathEvaluator() as evaluator:
        try:
            await evaluator.equivalent("x^2", "x*x")  # starts a worker process
            print("grading", flush=True)
            while True:
                await evaluator.equivalent("x^2 + 2x + 1", "(x+1)^2")
        finally:
            time.sleep(1.0)  # other clean-up before the pool closes (evaluate closes its HTTP client, ...)

try:
    anyio.run(main)
except KeyboardInterrupt:  # what every entry point does (exitagent.evaluate: exit 130)
    sys.exit(130)
"""


def test_ctrl_c_during_grading_prints_no_traceback() -> None:
    process = subprocess.Popen([sys.executable, "-c", GRADING], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, start_new_session=True, env={**os.environ, "PYTHONPATH": os.getcwd()})
    assert process.stdout is not None
    try:
        for line in process.stdout:  # log lines first (structlog writes to stdout)
            if line.strip() == "grading":
                break
        workers = psutil.Process(process.pid).children(recursive=True)
        assert workers, "the grader should run in worker processes"
        time.sleep(1.0)
        os.killpg(process.pid, signal.SIGINT)  # the whole group, as a terminal does
        _, stderr = process.communicate(timeout=30)
    finally:  # a grader left running kept a core busy for the rest of a CI run
        if process.poll() is None:
            for child in psutil.Process(process.pid).children(recursive=True):
                child.kill()
            process.kill()
            process.wait()
    assert process.returncode == 130, stderr
    assert "Traceback" not in stderr, stderr
    psutil.wait_procs(workers, timeout=10)
    assert not [w for w in workers if w.is_running() and w.status() != psutil.STATUS_ZOMBIE]

"""Engine restarts: a failed start is retried with backoff, then serve gets one clear error.

The engine is a stand-in process (a few lines of Python answering ``/health``) that fails its
first starts: the process seam is real (start, health polling, process-group stop), vLLM is not.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest

from exitagent.errors import ServerError
from exitagent.serving import engine

STAND_IN = """
import http.server, sys
from pathlib import Path
counter = Path(sys.argv[2])
starts = int(counter.read_text() or 0) + 1 if counter.exists() else 1
counter.write_text(str(starts))
if starts <= int(sys.argv[3]):
    sys.exit(f"stand-in engine: start {starts} fails")
class Health(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200); self.end_headers()
    def log_message(self, *args):
        pass
http.server.HTTPServer(("127.0.0.1", int(sys.argv[1])), Health).serve_forever()
"""


class StandInEngine(engine.Engine):
    def __init__(self, spec: engine.EngineSpec, counter: Path, failures: int) -> None:
        super().__init__(spec)
        self.counter, self.failures = counter, failures

    def command(self) -> list[str]:
        return [sys.executable, "-c", STAND_IN, str(self.spec.port), str(self.counter), str(self.failures)]


def _spec(tmp_path: Path) -> engine.EngineSpec:
    return engine.EngineSpec(tmp_path, "policy", engine.free_port(), log_file=tmp_path / "engine.log")


@pytest.mark.anyio
async def test_a_failed_restart_is_retried_with_backoff(tmp_path: Path) -> None:
    counter = tmp_path / "starts"
    stand_in = StandInEngine(_spec(tmp_path), counter, failures=2)
    started = time.monotonic()
    try:
        await stand_in.restart(stand_in.spec, timeout_s=30, attempts=3, backoff_s=0.5)
        assert stand_in.running and counter.read_text() == "3"
        ipc_dir = stand_in._ipc_dir
        assert ipc_dir is not None and ipc_dir.is_dir()  # vLLM's sockets go there, not to the shared /tmp
    finally:
        await stand_in.stop()
    assert not ipc_dir.exists()
    assert time.monotonic() - started >= 0.5 + 1.0  # waited between the attempts


@pytest.mark.anyio
async def test_restarts_that_keep_failing_end_in_one_clear_error(tmp_path: Path) -> None:
    stand_in = StandInEngine(_spec(tmp_path), tmp_path / "starts", failures=99)
    with pytest.raises(ServerError, match=r"(?s)could not be restarted \(3 attempts\); giving up.*start 3 fails"):
        await stand_in.restart(stand_in.spec, timeout_s=30, attempts=3, backoff_s=0.1)
    assert not stand_in.running

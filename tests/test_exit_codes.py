"""One exit-code table for every command: docs/exit-codes.md and the README match ``ExitCode``, each
entry point returns only members of it, and real commands exit with the documented codes."""

from __future__ import annotations

import ast
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from exitagent.errors import (
    EXIT_MEANINGS,
    ConfigError,
    EvaluatorError,
    ExitCode,
    ServerUnavailable,
    ServerUnsupported,
    StoreError,
    StoreRefused,
    StoreUnavailable,
    child_exit_code,
    exit_code,
)

ROOT = Path(__file__).resolve().parents[1]
DOC = (ROOT / "docs" / "exit-codes.md").read_text()

# Each documented command, and the modules whose returns become its exit status.
COMMANDS = {
    "python -m exitagent.serve": ["exitagent/serve.py"],
    "python -m exitagent.collect": ["exitagent/collect.py"],
    "python -m exitagent.evaluate": ["exitagent/evaluate.py"],
    "python -m exitagent.run": ["exitagent/run.py"],
    "python -m exitagent.variants": ["exitagent/variants.py"],
    "python -m exitagent.curriculum show": ["exitagent/curriculum/__main__.py"],
    "python -m exitagent.models": ["exitagent/models.py"],
    "python -m exitagent.competitions": ["exitagent/competitions.py"],
    "python -m training.update": ["training/update.py", "training/sharded.py"],
}
# A failure reported through ``fail`` can be either of these; argparse's errors are USAGE.
VIA_FAIL = {ExitCode.USAGE, ExitCode.UNAVAILABLE}
# ``child_exit_code`` passes on what a failed child (run's evaluate, variants' run) returned.
VIA_CHILD = {ExitCode.USAGE, ExitCode.UNAVAILABLE, ExitCode.INTERRUPTED}


def table(heading: str) -> list[list[str]]:
    """The rows of the markdown table under ``## heading`` (header and rule left out)."""
    section = DOC.split(f"## {heading}\n", 1)[1].split("\n## ", 1)[0]
    lines = [line for line in section.splitlines() if line.startswith("|")][2:]
    return [[cell.strip() for cell in line.strip("|").split("|")] for line in lines]


def test_the_documented_table_is_the_code_table() -> None:
    rows = [(int(code), name.strip("`"), meaning) for code, name, meaning in table("The table")]
    assert rows == [(int(code), code.name, EXIT_MEANINGS[code]) for code in ExitCode]
    readme = (ROOT / "README.md").read_text().split("## Exit codes\n", 1)[1].split("\n## ", 1)[0]
    assert "docs/exit-codes.md" in readme
    assert [int(code) for code in re.findall(r"^\|\s*(\d+)\s*\|", readme, re.M)] == [int(c) for c in ExitCode]


def codes_named(path: Path) -> set[ExitCode]:
    """The exit codes a module can return, read from its source: ``ExitCode.NAME``, ``fail`` and
    ``child_exit_code``."""
    tree = ast.parse(path.read_text())
    named = {ExitCode[node.attr] for node in ast.walk(tree)
             if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "ExitCode"}
    calls = {node.func.id for node in ast.walk(tree) if isinstance(node, ast.Call) and isinstance(node.func, ast.Name)}
    return named | (VIA_FAIL if "fail" in calls else set()) | (VIA_CHILD if "child_exit_code" in calls else set())


def bare_numbers(path: Path) -> list[str]:
    """``return 2``, ``sys.exit(2)`` or ``parser.exit(2, ...)``: an exit status that bypasses the table."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        value = node.value if isinstance(node, ast.Return) else None
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "exit":
            value = node.args[0] if node.args else None
        if isinstance(value, ast.Constant) and type(value.value) is int:
            found.append(f"{path.name}:{node.lineno}: {ast.unparse(node)}")
    return found


def test_every_entry_point_returns_the_documented_codes_of_the_table() -> None:
    documented = {command: codes for command, codes, _ in ((c.strip("`"), k, n) for c, k, n in table("By command"))}
    assert set(documented) == set(COMMANDS)
    for command, paths in COMMANDS.items():
        listed = {ExitCode(int(code)) for code in documented[command].split(",")}  # ValueError: not in the table
        used = set().union(*(codes_named(ROOT / p) for p in paths))
        used |= {ExitCode.USAGE}  # argparse: every command has flags
        assert used == listed, (command, sorted(used), sorted(listed))
        assert not [found for p in paths for found in bare_numbers(ROOT / p)]
    assert bare_numbers(ROOT / "exitagent" / "config.py") == []  # a bad --config file


def test_errors_map_to_fix_it_or_try_again() -> None:
    assert exit_code(ConfigError("x")) is ExitCode.USAGE
    assert exit_code(StoreError("newer schema")) is ExitCode.USAGE
    assert exit_code(ServerUnsupported("no token ids")) is ExitCode.USAGE
    assert exit_code(ServerUnavailable("down")) is ExitCode.UNAVAILABLE
    assert exit_code(StoreUnavailable("down")) is ExitCode.UNAVAILABLE
    assert exit_code(StoreRefused("password authentication failed")) is ExitCode.USAGE
    assert exit_code(EvaluatorError("died")) is ExitCode.UNAVAILABLE
    assert [child_exit_code(c) for c in (2, 4, 130, -9, 1, 7)] == [
        ExitCode.USAGE, ExitCode.UNAVAILABLE, ExitCode.INTERRUPTED, ExitCode.UNAVAILABLE, ExitCode.BUG,
        ExitCode.UNAVAILABLE]


def closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])  # closed again once the block ends: nothing listens there


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("args, code, line", [
    (("exitagent.curriculum", "show", "{tmp}/no-run"), ExitCode.USAGE, "no curriculum store at"),
    (("exitagent.evaluate", "--base-url", "http://127.0.0.1:{port}/v1", "--n-tasks", "1", "--server-deadline-s",
      "1", "--out", "{tmp}/eval", "--no-progress"), ExitCode.UNAVAILABLE, "evaluate: policy server"),
])
def test_real_commands_exit_with_the_table_code(tmp_path: Path, args: tuple[str, ...], code: ExitCode,
                                                line: str) -> None:
    done = run(*(a.format(tmp=tmp_path, port=closed_port()) for a in args))
    assert done.returncode == code, done.stderr[-2000:]
    assert done.stderr.strip().splitlines()[-1].startswith(line)
    assert "Traceback" not in done.stderr

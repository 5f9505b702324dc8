"""benchmarks/gpu_memory.py: its arguments, the model built from a config (tiny, on the CPU), and
the measurement itself (slow: real processes, FSDP2 over 2 gloo ranks; gpu: CUDA)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from training import memory_table as memory

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import gpu_memory

SCRIPT = Path(gpu_memory.__file__)


def test_every_computed_option_can_be_measured() -> None:
    args = gpu_memory.parser().parse_args(["--shape", "qwen2.5-7b", "--option", "adam8", "--no-checkpointing"])
    assert (args.shape, args.option, args.checkpointing) == ("qwen2.5-7b", "adam8", False)
    choices = next(a.choices for a in gpu_memory.parser()._actions if a.dest == "option")
    assert list(choices) == [o.key for o in memory.OPTIONS]
    assert gpu_memory.main(["--tokens", "1"]) == 2


def test_model_from_config_full_and_lora() -> None:
    cpu = torch.device("cpu")
    scored, ref, trainable, frozen = gpu_memory.build("tiny", memory.BY_KEY["bf16-ref"], cpu, 1, 4, True)
    assert sum(p.numel() for p in trainable) == sum(p.numel() for p in scored.parameters()) > 0
    assert {p.dtype for p in ref.parameters()} == {torch.bfloat16}
    assert not any(p.requires_grad for p in ref.parameters())
    assert not frozen and scored.lm.is_gradient_checkpointing
    scored, ref, trainable, frozen = gpu_memory.build("tiny", memory.BY_KEY["lora"], cpu, 1, 4, False)
    hidden, inter, kv, layers = 64, 128, 2 * 16, 2
    per_layer = 2 * (2 * hidden) + 2 * (hidden + kv) + 3 * (hidden + inter)  # q, o; k, v; gate, up, down
    assert ref is None and sum(p.numel() for p in trainable) == 4 * layers * per_layer
    assert {p.dtype for p in trainable} == {torch.float32} and len(frozen) == len(trainable)
    logp = scored(torch.randint(0, 512, (1, 40)))
    assert logp.shape == (39,) and bool((logp < 0).all())


@pytest.mark.slow
def test_table_measures_one_process_and_two_fsdp_ranks() -> None:
    done = subprocess.run([sys.executable, str(SCRIPT), "--table", "--shapes", "tiny", "--options", "fp32,lora",
                           "--worlds", "1,2", "--tokens", "64", "--device", "cpu"],
                          capture_output=True, text=True, timeout=600, env={**_env(), "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-2000:]
    rows = [line for line in done.stdout.splitlines() if line.startswith("| tiny")]
    assert len(rows) == 4
    for row in rows:
        measured = row.split("|")[6].strip()
        # On a CPU the figure is the growth of the process's peak RSS: a tiny model's update may not
        # raise the peak its imports already set, so 0.0 is a valid reading here (a GPU reads exactly).
        assert measured.endswith("(cpu)") and float(measured.split()[0]) >= 0, row
        assert float(row.split("|")[7]) > 0, row  # the update ran and was timed


@pytest.mark.gpu
def test_measures_cuda_peak() -> None:
    done = subprocess.run([sys.executable, str(SCRIPT), "--shape", "tiny", "--option", "fp32", "--tokens", "256",
                           "--device", "cuda"], capture_output=True, text=True, timeout=600, env=_env())
    assert done.returncode == 0, done.stderr[-2000:]
    assert '"device": "cuda"' in done.stdout and '"peak_gb": 0.0' not in done.stdout


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(SCRIPT.parents[1])}


@pytest.mark.slow
def test_gpu_check_script_prints_one_table(tmp_path: Path) -> None:
    """scripts/gpu_check.sh's plumbing, on this CPU: a stand-in nvidia-smi, only the memory part,
    on the tiny shape (a real GPU machine runs every part on the 3B and 7B shapes)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    stand_in = "#!/bin/sh\n[ \"$1\" = -L ] && echo 'GPU 0: Stand-in' || echo 'Stand-in, 1 MiB'\n"
    (bin_dir / "nvidia-smi").write_text(stand_in)
    (bin_dir / "nvidia-smi").chmod(0o755)
    env = {**_env(), "PATH": f"{bin_dir}:{os.environ['PATH']}", "EXITAGENT_VENV": sys.prefix,
           "GPU_CHECK_DIR": str(tmp_path / "out"), "GPU_CHECK_SKIP": "setup,tests,main", "OMP_NUM_THREADS": "1",
           "GPU_CHECK_MEMORY_FLAGS": "--shapes tiny --options fp32 --tokens 32 --device cpu"}
    done = subprocess.run(["bash", str(SCRIPT.parents[1] / "scripts" / "gpu_check.sh")], capture_output=True,
                          text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "| GPU | 1 Stand-in, 1 MiB |" in done.stdout
    assert "| tiny | fp32 | 1 | 32 | - |" in done.stdout and "(cpu)" in done.stdout

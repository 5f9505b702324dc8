"""LoRA as a training mode (peft): train and publish a low-rank adapter instead of the whole model.

The trainer keeps working on the plain causal-LM object (``PeftModel.get_base_model()``: the same
modules with the LoRA layers injected), so the loss, the chunked head and the canary need no change;
only the adapter's parameters require gradients. What changes:

- the reference policy is the base model with the adapter disabled (``disable_adapter()``): no copy
  of the weights at all. Once the reference refreshes it is a frozen second adapter, ``reference``,
  in the same model. The first refresh sets it to (A, alpha * B), so its update is exactly
  alpha times the adapter's (the paper's theta_ref <- alpha theta + (1 - alpha) theta_ref with
  theta_ref = the base); later refreshes interpolate A and B separately (LoRA is not linear in
  them, so with alpha < 1 that is an approximation);
- the trainer state holds the adapter (``adapter_model.safetensors``), not the model;
- a published checkpoint is ``adapter_config.json`` + ``adapter_model.safetensors`` with the usual
  manifest, canary and READY marker (``exitagent.serving.adapters`` loads it into vLLM).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import structlog
import torch

from exitagent.errors import ConfigError, ModelError
from exitagent.serving import checkpoints
from exitagent.serving.adapters import ADAPTER_FILES, FORMAT
from exitagent.serving.checkpoints import Canary

log = structlog.get_logger(__name__)

DEFAULT, REFERENCE = "default", "reference"


def attach(model: Any, *, rank: int, alpha: int, targets: str, saved: Path | None) -> Any:
    """``model`` wrapped in a trainable peft LoRA adapter: a new one, or the one saved in ``saved``."""
    from peft import LoraConfig, PeftModel, get_peft_model

    if saved is not None:
        return PeftModel.from_pretrained(model, saved, is_trainable=True)
    modules = [name.strip() for name in targets.split(",") if name.strip()]
    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=modules, lora_dropout=0.0, bias="none")
    try:
        peft_model = get_peft_model(model, config)
    except ValueError as error:  # e.g. target modules the model does not have
        raise ConfigError(f"cannot attach a LoRA adapter: {' '.join(str(error).split())[:300]}") from error
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    log.info("lora_attached", rank=rank, alpha=alpha, targets=modules, trainable_parameters=trainable)
    return peft_model


class AdapterSaver:
    """What ``training.state`` saves in LoRA mode: the trained adapter and the tokenizer's files."""

    def __init__(self, peft_model: Any) -> None:
        self.peft_model = peft_model

    def save_pretrained(self, directory: Path) -> None:
        self.peft_model.save_pretrained(directory, selected_adapters=[DEFAULT])


class _Switched(torch.nn.Module):
    """The backbone, run with the adapter switched to the reference's (what ``token_logprobs`` calls)."""

    def __init__(self, backbone: Any, switch: Any) -> None:
        super().__init__()
        self.inner = backbone
        self._switch = switch

    @property
    def config(self) -> Any:
        return self.inner.config

    @property
    def is_gradient_checkpointing(self) -> bool:
        return bool(getattr(self.inner, "is_gradient_checkpointing", False))

    def forward(self, **kwargs: Any) -> Any:
        with self._switch():
            return self.inner(**kwargs)


class AdapterReference:
    """The reference policy of a LoRA run, shaped like a causal LM for ``training.loss``.

    ``named_parameters``, ``state_dict`` and ``load_state_dict`` use the policy's parameter names
    (``...lora_A.default.weight``), so ``loss.refresh_reference`` and the trainer state work as for
    a full reference model. The frozen adapter is created on the first refresh (or restore).
    """

    def __init__(self, peft_model: Any) -> None:
        self.peft_model = peft_model
        causal_lm = peft_model.get_base_model()
        self.config = causal_lm.config
        self.lm_head = causal_lm.lm_head  # never a LoRA target: the head is shared
        self.model = _Switched(causal_lm.model, self._switch)

    @property
    def refreshed(self) -> bool:
        return REFERENCE in self.peft_model.peft_config

    @contextlib.contextmanager
    def _switch(self) -> Iterator[None]:
        if not self.refreshed:
            with self.peft_model.disable_adapter():
                yield
            return
        # set_adapter flips requires_grad; the policy's graph is already built, and it is flipped
        # back before backward (AccumulateGrad checks requires_grad when it runs, not before).
        self.peft_model.base_model.set_adapter(REFERENCE, inference_mode=True)
        try:
            yield
        finally:
            self.peft_model.base_model.set_adapter(DEFAULT)

    def eval(self) -> AdapterReference:
        return self

    def requires_grad_(self, _: bool) -> AdapterReference:
        return self

    def named_parameters(self) -> Iterator[tuple[str, torch.nn.Parameter]]:
        if not self.refreshed:
            self._create()
        for name, param in self.peft_model.get_base_model().named_parameters():
            if f".{REFERENCE}." in name:
                yield name.replace(f".{REFERENCE}.", f".{DEFAULT}."), param

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {name: param.detach().clone() for name, param in self.named_parameters()}

    @torch.no_grad()
    def load_state_dict(self, saved: dict[str, torch.Tensor]) -> None:
        mine = dict(self.named_parameters())
        if set(mine) != set(saved):
            raise ModelError(f"the saved LoRA reference has {len(saved)} tensors, this adapter {len(mine)}")
        for name, param in mine.items():
            param.copy_(saved[name])

    @torch.no_grad()
    def _create(self) -> None:
        """A frozen copy of the adapter with B = 0: the same update as the disabled adapter (none),
        and A already the policy's, so that the first refresh gives exactly alpha times its update."""
        self.peft_model.add_adapter(REFERENCE, self.peft_model.peft_config[DEFAULT])
        self.peft_model.base_model.set_adapter(DEFAULT)  # add_adapter leaves the new one frozen, default active
        params = dict(self.peft_model.get_base_model().named_parameters())
        for name, param in params.items():
            if f".{REFERENCE}." in name:
                source = params[name.replace(f".{REFERENCE}.", f".{DEFAULT}.")]
                param.copy_(source if ".lora_A." in name else torch.zeros_like(source))
                param.requires_grad_(False)
        log.info("lora_reference_created")


def publish_adapter(source: Path, weights_dir: Path, step: int, canary: Canary, *, base: Any, keep: int) -> Path:
    """Publish the adapter saved in ``source`` as ``weights_dir/step-N`` (hard links, manifest, canary, READY).

    The manifest says it is an adapter and of which base (name and tensor shapes it was trained
    on), so the server can refuse an adapter for another model with one clear error.
    """

    def write(directory: Path) -> Canary:
        for name in ADAPTER_FILES:
            try:
                os.link(source / name, directory / name)
            except OSError:
                shutil.copy2(source / name, directory / name)
        return canary

    config = json.loads((source / "adapter_config.json").read_text())
    published = checkpoints.publish(weights_dir, step, write, format=FORMAT, base_model=base.config._name_or_path,
                                    base_hidden_size=base.config.hidden_size, rank=config["r"])
    checkpoints.prune(weights_dir, keep)
    return published

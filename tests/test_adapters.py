"""A served LoRA adapter is checked against the base before vLLM sees it; the gateway routes the public name."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from exitagent.errors import CheckpointError
from exitagent.serving import adapters, checkpoints
from exitagent.serving.reload import ServingState
from exitagent.types import PolicyVersion
from training.lora import AdapterSaver, publish_adapter
from training.publish import compute_canary


def _tiny(hidden: int, vocab: int) -> LlamaForCausalLM:
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden,
                                        num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1))


@pytest.fixture(scope="module")
def tokenizer(model_dir: Path) -> Any:
    return AutoTokenizer.from_pretrained(model_dir)


@pytest.fixture(scope="module")
def base_shapes(tmp_path_factory: pytest.TempPathFactory, tokenizer: Any) -> dict[str, tuple[str, tuple[int, ...]]]:
    directory = tmp_path_factory.mktemp("base")
    _tiny(32, len(tokenizer)).save_pretrained(directory)
    return checkpoints.tensor_shapes(directory)


def _publish(tmp: Path, tokenizer: Any, *, hidden: int = 32, rank: int = 4, step: int = 1) -> Path:
    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(_tiny(hidden, len(tokenizer)), LoraConfig(r=rank, lora_alpha=8,
                                                                         target_modules=["q_proj", "down_proj"]))
    AdapterSaver(peft_model).save_pretrained(tmp / "source")
    canary = compute_canary(peft_model.get_base_model(), tokenizer)
    return publish_adapter(tmp / "source", tmp / "weights", step, canary, base=peft_model.get_base_model(), keep=3)


def test_a_published_adapter_verifies(tmp_path: Path, tokenizer: Any, base_shapes: dict) -> None:
    published = _publish(tmp_path, tokenizer)
    canary = adapters.verify(published, base_shapes, max_rank=8)
    assert len(canary.logprobs) == len(canary.token_ids) - 1 > 10


def test_an_adapter_for_another_base_model_is_one_clear_error(tmp_path: Path, tokenizer: Any,
                                                              base_shapes: dict) -> None:
    published = _publish(tmp_path, tokenizer, hidden=48)
    with pytest.raises(CheckpointError, match=r"an adapter for another base model: .*down_proj lora_A has shape "
                                              r"\[4, 96\], the served model needs \[4, 64\]"):
        adapters.verify(published, base_shapes, max_rank=8)


def _config(edit: Callable[[dict[str, Any]], None]) -> Callable[[Path], None]:
    def change(path: Path) -> None:
        config = json.loads((path / adapters.CONFIG).read_text())
        edit(config)
        (path / adapters.CONFIG).write_text(json.dumps(config))
    return change


def _rename_tensor(path: Path) -> None:
    """A tensor that is no LoRA matrix (e.g. a full layer smuggled in), header rewritten consistently."""
    raw = (path / adapters.WEIGHTS).read_bytes()
    length = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + length])
    name = next(k for k in header if "lora_A" in k)
    header[name.replace("lora_A.weight", "weight")] = header.pop(name)
    encoded = json.dumps(header, separators=(",", ":")).encode().ljust(length)
    (path / adapters.WEIGHTS).write_bytes(raw[:8] + encoded + raw[8 + length:])


CASES: dict[str, tuple[Callable[[Path], None], str]] = {
    "rank above the server's": (_config(lambda c: c.update(r=64)), "adapter rank 64 is not an integer in 1..8"),
    "not LoRA": (_config(lambda c: c.update(peft_type="IA3")), "is not a peft LoRA config"),
    "config not JSON": (lambda p: (p / adapters.CONFIG).write_text("{"), "unreadable adapter_config.json"),
    "DoRA": (_config(lambda c: c.update(use_dora=True)), "DoRA and modules_to_save are not served"),
    "a full layer inside": (_rename_tensor, "not a LoRA A or B matrix"),
    "full weights, not an adapter": (lambda p: _manifest(p, format="full"), "not a LoRA adapter"),
}


def _manifest(path: Path, **extra: Any) -> None:
    manifest = json.loads((path / checkpoints.MANIFEST).read_text())
    checkpoints.write_manifest(path, **{k: v for k, v in manifest.items() if k != "files"} | extra)


@pytest.mark.parametrize("case", sorted(CASES))
def test_a_malformed_adapter_is_one_checkpoint_error(tmp_path: Path, tokenizer: Any, base_shapes: dict,
                                                     case: str) -> None:
    published = _publish(tmp_path, tokenizer)
    change, message = CASES[case]
    change(published)
    if case != "full weights, not an adapter":
        _manifest(published)  # hashes match the tampered files: the content checks must catch it
    with pytest.raises(CheckpointError, match=message) as raised:
        adapters.verify(published, base_shapes, max_rank=8)
    assert "\n" not in str(raised.value)


def test_the_public_name_is_routed_to_the_verified_adapter() -> None:
    state = ServingState(PolicyVersion.at_step(3), Path("/w/step-000003"), adapter="policy-step-000003",
                         public_name="policy")
    routed = json.loads(adapters.route_body(b'{"model": "policy", "prompt": "hi"}', state))
    assert routed == {"model": "policy-step-000003", "prompt": "hi"}
    for body in (b'{"model": "other"}', b"not json", b"[1]", b""):  # vLLM answers these as before
        assert adapters.route_body(body, state) == body
    state.adapter = ""  # the base model: nothing to route
    assert adapters.route_body(b'{"model": "policy"}', state) == b'{"model": "policy"}'


class FakeLoraEngine:
    """vLLM's LoRA and version routes as a MockTransport: records calls, knows which names are loaded."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, dict[str, Any]]] = []
        self.loaded: set[str] = set()

    def handle(self, request: Any) -> Any:
        import httpx

        body = json.loads(request.content or b"{}")
        self.calls.append((request.url.path, body))
        if request.url.path == "/v1/load_lora_adapter":
            if not (Path(body["lora_path"]) / adapters.WEIGHTS).is_file():
                return httpx.Response(404, json={"error": {"message": "No adapter found"}})
            self.loaded.add(body["lora_name"])
            return httpx.Response(200, text=f"Success: LoRA adapter '{body['lora_name']}' added successfully.")
        if request.url.path == "/v1/unload_lora_adapter":
            self.loaded.discard(body["lora_name"])
            return httpx.Response(200, text="Success")
        return httpx.Response(200, json={})


@pytest.mark.anyio
async def test_adapters_load_under_new_names_and_come_back_after_an_engine_restart(tmp_path: Path) -> None:
    import httpx

    from exitagent.errors import ReloadError

    fake = FakeLoraEngine()
    state = ServingState(PolicyVersion(0, "base"), tmp_path / "base", public_name="policy")
    admin = adapters.AdapterAdmin("http://engine", "policy", state)
    admin._client = httpx.AsyncClient(base_url="http://engine", transport=httpx.MockTransport(fake.handle))
    steps = []
    for step in (1, 2, 3):
        steps.append(tmp_path / f"step-{step:06d}")
        steps[-1].mkdir()
        for name in adapters.ADAPTER_FILES:
            (steps[-1] / name).write_text("{}")
        await admin.load(steps[-1], f"step-{step:06d}")
        assert state.adapter == f"policy-step-{step:06d}" and admin.canary_model == state.adapter
    assert fake.loaded == {"policy-step-000002", "policy-step-000003"}  # the one before stays, for a restore
    refused = tmp_path / "step-000004"  # vLLM refuses it (no weights): the served adapter does not change
    refused.mkdir()
    (refused / adapters.CONFIG).write_text("{}")
    with pytest.raises(ReloadError, match="404"):
        await admin.load(refused, "step-000004")
    assert state.adapter == "policy-step-000003"
    fake.loaded.clear()  # the engine died and was restarted on the base model
    await admin.after_restart(steps[-1], "step-000003")
    assert fake.loaded == {"policy-step-000003"} and state.adapter == "policy-step-000003"
    assert fake.calls[-1] == ("/update_weight_version", {"new_version": "step-000003"})
    await admin.load(tmp_path / "base", "base")  # back to the bare base: nothing routed
    assert state.adapter == "" and admin.canary_model == "policy"
    await admin.aclose()


def test_the_engine_command_enables_lora_only_when_asked(tmp_path: Path) -> None:
    from exitagent.serving import engine

    plain = engine.Engine(engine.EngineSpec(tmp_path, "policy", 1234)).command()
    lora = engine.Engine(engine.EngineSpec(tmp_path, "policy", 1234, lora_rank=16)).command()
    assert "--enable-lora" not in plain
    assert lora[lora.index("--max-lora-rank") + 1] == "16" and "--enable-lora" in lora

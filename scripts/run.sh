#!/usr/bin/env bash
# Set up (scripts/setup.sh) and run the main job on the embedded default. Extra arguments go to
# `python -m exitagent.run`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec "${EXITAGENT_VENV:-.venv}/bin/python" -m exitagent.run "$@"

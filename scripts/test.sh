#!/usr/bin/env bash
# Set up (scripts/setup.sh) and run the whole check: ruff, mypy and the test suite, including the
# integration tests against a real CPU vLLM server. Extra arguments go to pytest.
# Tests marked `slow` (more than a minute each: the variants command, the cluster rehearsal, torchrun
# crash tests, ...) run only with EXITAGENT_SLOW_TESTS=1; `manual` ones only with EXITAGENT_MANUAL_TESTS=1.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
py=${EXITAGENT_VENV:-.venv}/bin/python
"$py" -m ruff check .
"$py" -m mypy
marks=()
if [ "${EXITAGENT_SLOW_TESTS:-}" != 1 ]; then marks=(-m "not slow"); fi
exec "$py" -m pytest --durations=40 "${marks[@]}" "$@"  # the 40 slowest: where CI time goes

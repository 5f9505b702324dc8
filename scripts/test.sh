#!/usr/bin/env bash
# Set up (scripts/setup.sh) and run the whole check: ruff, mypy and the test suite, including the
# integration tests against a real CPU vLLM server. Extra arguments go to pytest.
# Tests marked `slow` (the five-variant sweep, ~10 minutes) run only with EXITAGENT_SLOW_TESTS=1,
# so the default run stays well under half an hour.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
py=${EXITAGENT_VENV:-.venv}/bin/python
"$py" -m ruff check .
"$py" -m mypy
marks=()
if [ "${EXITAGENT_SLOW_TESTS:-}" != 1 ]; then marks=(-m "not slow"); fi
exec "$py" -m pytest --durations=15 "${marks[@]}" "$@"  # the 15 slowest: where CI time goes

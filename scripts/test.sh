#!/usr/bin/env bash
# Set up (scripts/setup.sh) and run the whole check: ruff, mypy and the test suite, including the
# integration tests against a real CPU vLLM server. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
py=${EXITAGENT_VENV:-.venv}/bin/python
"$py" -m ruff check .
"$py" -m mypy
exec "$py" -m pytest "$@"

#!/usr/bin/env bash
# Sets up a virtual environment (if needed) and runs the test suite on CPU.
# Usage: bash scripts/run_tests.sh [pytest args...]
# Test files run in parallel on PYTEST_WORKERS processes (default 2, the
# CI machine's cores; 0 runs them in this process).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install -q --upgrade pip
"$VENV/bin/python" -m pip install -q -r requirements.txt -r requirements-test.txt -e .
# Lint and formatting first (configured in pyproject.toml): a failure stops here.
"$VENV/bin/ruff" check --quiet .
"$VENV/bin/ruff" format --check --quiet .
export JAX_PLATFORMS=cpu
source scripts/cpu_allocator.sh
exec "$VENV/bin/python" -m pytest -q -n "${PYTEST_WORKERS:-2}" --dist=loadfile "$@"

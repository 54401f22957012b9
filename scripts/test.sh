#!/usr/bin/env bash
# The test command: sets up .venv if needed, then runs the whole test suite on the CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
VENV=${FASTMASK_VENV:-.venv}
exec "$VENV/bin/python" -m pytest tests "$@"

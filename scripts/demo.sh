#!/usr/bin/env bash
# The README's first command: sets up .venv if needed, then runs the quick start offline.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
VENV=${FASTMASK_VENV:-.venv}
exec "$VENV/bin/python" examples/quickstart.py "$@"

#!/usr/bin/env bash
# Creates .venv (or $FASTMASK_VENV) with the pinned CPU torch and fastmask installed in editable
# mode. Safe to run again: it only installs what is missing.
#
# torch is pinned through .ci/constraints.txt so that nothing resolves a newer (CUDA) torch;
# set FASTMASK_CONSTRAINTS to another file to pin a different build (e.g. a CUDA torch).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${FASTMASK_VENV:-.venv}
CONSTRAINTS=${FASTMASK_CONSTRAINTS:-.ci/constraints.txt}
PY=${PYTHON:-python3}

if [ ! -x "$VENV/bin/python" ]; then
    "$PY" -m venv "$VENV"
fi
pip() { "$VENV/bin/python" -m pip "$@"; }
pip install -q --disable-pip-version-check -c "$CONSTRAINTS" "setuptools>=77" wheel
torch_pin=$(grep -E '^torch==' "$CONSTRAINTS")
# Pin torch explicitly in every install step; the constraints file pins what depends on it.
pip install -q --disable-pip-version-check -c "$CONSTRAINTS" "$torch_pin"
pip install -q --disable-pip-version-check -c "$CONSTRAINTS" "$torch_pin" \
    --no-build-isolation -e ".[test,clip,triton,build,job,bench]"
"$VENV/bin/python" -c "import torch, fastmask; print(f'fastmask {fastmask.__version__} with torch {torch.__version__} in $VENV')"

#!/usr/bin/env bash
# The main job on its embedded default, offline: sets up .venv (scripts/setup.sh), then runs
# `fastmask continual` (a small CLIP pretrained on digits 0-4, cached, then taught [5,6] and
# [7,8,9] with spu, spu-original, full and frozen). Extra arguments go to the command, e.g.
#   bash scripts/demo.sh --seeds 0,1,2 --lrs 1e-3,1e-4,3e-5
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
VENV=${FASTMASK_VENV:-.venv}
exec "$VENV/bin/fastmask" continual --out outputs/continual "$@"

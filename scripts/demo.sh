#!/usr/bin/env bash
# The main job on its embedded default, offline: sets up .venv (scripts/setup.sh), then runs
# `fastmask continual` (a small CLIP pretrained on digits 0-4, cached, then taught [5,6] and
# [7,8,9] with spu, spu-original, full and frozen; 3 seeds). Extra arguments go to the command
# (later ones win), e.g.
#   bash scripts/demo.sh --lrs 1e-2,3e-3,1e-3,1e-4,3e-5,1e-5,3e-6 --methods spu,spu-original,full,frozen,spu-noproj
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
VENV=${FASTMASK_VENV:-.venv}
exec "$VENV/bin/fastmask" continual --seeds 0,1,2 --out outputs/continual "$@"

#!/usr/bin/env bash
# Builds fastmask's prebuilt wheel for the torch installed in the Python environment that runs it
# (and, with --sdist, the source distribution), into dist/ (or $FASTMASK_DIST).
#
#   PYTHON=/path/to/venv/bin/python bash scripts/build_wheel.sh [--sdist]
#
# The environment needs torch (the one the wheel is for), setuptools, wheel and ninja; for a CUDA
# wheel a CUDA torch and nvcc (CUDA_HOME), with FASTMASK_CUDA_ARCHS choosing the archs. The
# wheel is named after that torch: fastmask-0.1.0+pt213cpu-cp310-abi3-<platform>.whl,
# fastmask-0.1.0+pt213cu130-..., and requires torch>=2.13,<2.14 (FASTMASK_LOCAL_VERSION=auto in
# setup.py). The library does not use the Python C API, so one wheel serves every CPython >= 3.10.
#
# Platform tag: auditwheel (if importable by $PYTHON, with patchelf) retags the wheel manylinux_*
# and grafts nothing: torch's own libraries (libtorch*, libc10*) and the OpenMP runtime torch
# ships (libgomp.so.1, already loaded by `import torch`) are excluded. FASTMASK_AUDITWHEEL=0 skips
# it (the wheel keeps linux_x86_64, which an index such as PyPI refuses), =1 requires it.
#
# Nothing is installed or downloaded: pip runs with --no-build-isolation --no-deps.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
DIST=${FASTMASK_DIST:-dist}
AUDIT=${FASTMASK_AUDITWHEEL:-auto}
SDIST=0
for arg in "$@"; do
    case "$arg" in
        --sdist) SDIST=1 ;;
        *) echo "usage: $0 [--sdist]" >&2; exit 2 ;;
    esac
done
export FASTMASK_LOCAL_VERSION=${FASTMASK_LOCAL_VERSION:-auto}
export MAX_JOBS=${MAX_JOBS:-$(nproc)}
BIN=$("$PY" -c 'import os, sys; print(os.path.dirname(sys.executable))')
export PATH="$BIN:$PATH"   # patchelf, ninja from the same environment

"$PY" -c 'import torch; print(f"build_wheel: torch {torch.__version__} (CUDA {torch.version.cuda})")'
raw=$(mktemp -d)
trap 'rm -rf "$raw"' EXIT
# Keep build/temp.* (compiled objects: ninja rebuilds what changed, including the torch headers
# or flags); drop build/lib.* so nothing stale lands in the wheel.
rm -rf build/lib.* build/bdist.*
"$PY" -m pip wheel --no-build-isolation --no-deps --no-cache-dir -w "$raw" .
whl=$(ls "$raw"/fastmask-*.whl)
mkdir -p "$DIST"

if [ "$AUDIT" != "0" ] && "$PY" -c 'import auditwheel' 2>/dev/null && command -v patchelf >/dev/null; then
    "$PY" -m auditwheel repair --plat "${FASTMASK_PLAT:-auto}" \
        --exclude 'libtorch*.so' --exclude 'libc10*.so' --exclude 'libgomp.so.1' \
        -w "$DIST" "$whl"
elif [ "$AUDIT" = "1" ]; then
    echo "build_wheel: FASTMASK_AUDITWHEEL=1 but auditwheel/patchelf are not installed ($PY -m pip install auditwheel patchelf)" >&2
    exit 1
else
    echo "build_wheel: auditwheel not used: the wheel keeps the linux_x86_64 tag (fine for a local" \
         "--find-links directory, refused by PyPI)" >&2
    cp "$whl" "$DIST/"
fi

if [ "$SDIST" = "1" ]; then
    # The sdist is not tied to a torch: plain version, torch>=2.7; it compiles when installed.
    FASTMASK_LOCAL_VERSION= FASTMASK_SKIP_EXT=1 "$PY" setup.py -q sdist -d "$DIST"
fi
ls -l "$DIST"

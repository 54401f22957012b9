#!/usr/bin/env bash
# Does the extension's CUDA build compile and link? For machines without a GPU (CI): nvcc and a C++
# compiler are enough, no CUDA torch is installed anywhere.
#
#   bash scripts/check_cuda_build.sh
#
# 1. The CUDA toolkit and the -gencode flags are those setup.py would use (its find_cuda_home and
#    FASTMASK_CUDA_ARCHS logic, run from setup.py itself).
# 2. The CUDA torch wheel (FASTMASK_CUDA_TORCH, default torch==2.13.0, PyPI's CUDA 13.0 build) is
#    downloaded once, without dependencies, into FASTMASK_CUDA_TORCH_CACHE (default
#    ~/.cache/fastmask/cuda-torch) and reused; only torch/include, the five libraries an extension
#    links (libc10, libc10_cuda, libtorch, libtorch_cpu, libtorch_cuda), version.py and
#    cpp_extension.py are unpacked next to it (~930 MB, once). Nothing is installed: the
#    virtual environment the tests use is not touched (its python only runs pip download).
# 3. Every translation unit of the CUDA build of fastmask._C is compiled as setup.py's CUDAExtension
#    compiles it (same defines, -std, -O3, -fmad=false, -ffp-contract=off, the archs), with
#    -Wall -Wextra -Werror for our code (torch's and CUDA's headers are system headers): csrc/ops.cpp
#    and csrc/cpu/*.cpp with -DFASTMASK_WITH_CUDA=1, the torch binding csrc/cuda/ops_cuda.cpp against
#    the wheel's headers, csrc/cuda/*.cu with nvcc for every arch (-Werror all-warnings).
# 4. The PTX of the kernels (highest arch) is checked for what would break bit-exactness: no
#    approximate division/sqrt in fp32, no contractible (non-.rn) fp32 products or sums.
# 5. _C.so is linked with -Wl,--no-undefined against the wheel's libraries and the toolkit's cudart:
#    every symbol the extension uses exists in that torch.
#
# Exit status non-zero on any failure. Environment: PYTHON (default .venv/bin/python, else python3),
# MAX_JOBS (parallel compiles, default: CPU count), FASTMASK_CUDA_ARCHS, CUDA_HOME (as for setup.py).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD

TORCH_SPEC=${FASTMASK_CUDA_TORCH:-torch==2.13.0}
CACHE=${FASTMASK_CUDA_TORCH_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/fastmask/cuda-torch}
if [ -z "${PYTHON:-}" ]; then
    if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
JOBS=${MAX_JOBS:-$(nproc 2>/dev/null || echo 2)}

say() { printf 'check_cuda_build: %s\n' "$*"; }
die() { printf 'check_cuda_build: FAILED: %s\n' "$*" >&2; exit 1; }
now() { date +%s.%N; }
since() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }'; }
start=$(now)

# ------------------------------------------------------------------------------------------------
# 1. toolkit and archs, from setup.py
# ------------------------------------------------------------------------------------------------
conf=$("$PYTHON" - "$ROOT/setup.py" <<'PY'
import os, sys
path = sys.argv[1]
src = open(path).read()
ns = {"__file__": path, "__name__": "fastmask_setup_helpers"}
exec(compile(src[:src.index("ext_modules, cmdclass = _extensions()")], path, "exec"), ns)
home, rejected = ns["find_cuda_home"](os.environ.get("FASTMASK_CHECK_TORCH_CUDA"))
if home is None or not os.path.isfile(os.path.join(home, "bin", "nvcc")):
    print("ERROR no CUDA toolkit with include/cuda_runtime.h and bin/nvcc found"
          + "".join(f"; {r}" for r in rejected) + "; set CUDA_HOME to the toolkit root")
    sys.exit(0)
nvcc = os.path.join(home, "bin", "nvcc")
archs = ns["_cuda_archs"](nvcc)
print(home)
print(" ".join(ns["_gencode_flags"](archs)))
print(";".join(archs))
print(ns["_compiler_version"]([nvcc, "--version"]))
PY
) || die "could not run setup.py's helpers with $PYTHON"
if [[ $conf == ERROR* ]]; then die "${conf#ERROR }"; fi
{ read -r CUDA_HOME_FOUND; read -r GENCODE; read -r ARCHS; read -r NVCC_VERSION; } <<<"$conf"
NVCC=$CUDA_HOME_FOUND/bin/nvcc
CXX=${CXX:-g++}
command -v "$CXX" >/dev/null || die "no C++ compiler ($CXX)"
say "toolkit $CUDA_HOME_FOUND ($NVCC_VERSION), archs $ARCHS"

# ------------------------------------------------------------------------------------------------
# 2. the CUDA torch wheel: downloaded once, only what an extension build needs unpacked
# ------------------------------------------------------------------------------------------------
t=$(now)
version=${TORCH_SPEC#torch==}
mkdir -p "$CACHE/wheel"
shopt -s nullglob
wheels=("$CACHE"/wheel/torch-"$version"-*.whl)
downloaded=0
if [ ${#wheels[@]} -eq 0 ]; then
    say "downloading $TORCH_SPEC (no dependencies) into $CACHE/wheel"
    "$PYTHON" -m pip download --isolated --no-deps --only-binary=:all: --no-cache-dir --disable-pip-version-check \
        --progress-bar off -q \
        "$TORCH_SPEC" -d "$CACHE/wheel" || die "pip download $TORCH_SPEC failed"
    wheels=("$CACHE"/wheel/torch-"$version"-*.whl)
    [ ${#wheels[@]} -gt 0 ] || die "pip download left no torch-$version-*.whl in $CACHE/wheel"
    downloaded=1
fi
wheel=${wheels[0]}
t_download=$(since "$t")

t=$(now)
stem=$(basename "$wheel" .whl)
TORCH_DIR=$CACHE/unpacked/$stem/torch
if [ ! -f "$CACHE/unpacked/$stem/.complete" ]; then
    say "unpacking include/ and the libraries of $(basename "$wheel")"
    tmp_unpack=$(mktemp -d "$CACHE/unpack.XXXXXX")
    "$PYTHON" - "$wheel" "$tmp_unpack" <<'PY' || { rm -rf "$tmp_unpack"; die "unpacking $wheel failed"; }
import sys, zipfile
wheel, dest = sys.argv[1], sys.argv[2]
libs = {"libc10.so", "libc10_cuda.so", "libtorch.so", "libtorch_cpu.so", "libtorch_cuda.so"}
keep = ("torch/version.py", "torch/utils/cpp_extension.py")
with zipfile.ZipFile(wheel) as z:
    names = [n for n in z.namelist()
             if n.startswith("torch/include/") or n in keep
             or (n.startswith("torch/lib/") and n.rsplit("/", 1)[-1] in libs)]
    z.extractall(dest, names)
PY
    rm -rf "$CACHE/unpacked/$stem"
    mkdir -p "$CACHE/unpacked"
    mv "$tmp_unpack" "$CACHE/unpacked/$stem"
    touch "$CACHE/unpacked/$stem/.complete"
fi
t_unpack=$(since "$t")
torch_version=$(sed -n "s/^__version__ = '\(.*\)'/\1/p" "$TORCH_DIR/version.py")
torch_cuda=$(sed -n "s/^cuda: Optional\[str\] = '\(.*\)'/\1/p; s/^cuda = '\(.*\)'/\1/p" "$TORCH_DIR/version.py")
[ -n "$torch_cuda" ] || die "$(basename "$wheel") is not a CUDA build of torch (version.py has no CUDA version); \
set FASTMASK_CUDA_TORCH to a CUDA build"
nvcc_major=$(sed -n 's/.*release \([0-9]*\)\..*/\1/p' <<<"$NVCC_VERSION")
if [ -n "$nvcc_major" ] && [ "${torch_cuda%%.*}" != "$nvcc_major" ]; then
    say "note: torch $torch_version was built with CUDA $torch_cuda, nvcc is CUDA $nvcc_major.x" \
        "(setup.py's build would refuse a different major version)"
fi
# the C++ standard torch's cpp_extension compiles extensions with
std=c++17
if grep -q "'-std=c++20'" "$TORCH_DIR/utils/cpp_extension.py"; then std=c++20; fi

# ------------------------------------------------------------------------------------------------
# 3. compile every translation unit (as setup.py's CUDAExtension does), in parallel
# ------------------------------------------------------------------------------------------------
t=$(now)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
defines=(-DNDEBUG -DFASTMASK_WITH_CUDA=1 -DTORCH_API_INCLUDE_EXTENSION_H -DTORCH_EXTENSION_NAME=_C
         -D_GLIBCXX_USE_CXX11_ABI=1)
includes=(-I"$ROOT/csrc" -isystem "$TORCH_DIR/include" -isystem "$TORCH_DIR/include/torch/csrc/api/include"
          -isystem "$CUDA_HOME_FOUND/include")
cxx_flags=(-O3 -fPIC -std="$std" -fopenmp -ffp-contract=off -fno-math-errno -fvisibility=hidden
           -DPy_LIMITED_API=0x030A0000 -Wall -Wextra -Werror "${defines[@]}" "${includes[@]}")
# shellcheck disable=SC2206
nvcc_flags=(-O3 -lineinfo -fmad=false --expt-relaxed-constexpr -std="$std" --compiler-options -fPIC
            -D__CUDA_NO_HALF_OPERATORS__ -D__CUDA_NO_HALF_CONVERSIONS__ -D__CUDA_NO_BFLOAT16_CONVERSIONS__
            -D__CUDA_NO_HALF2_OPERATORS__ "${defines[@]}" "${includes[@]}" $GENCODE
            --threads 2 -Werror all-warnings -Xcompiler=-Wall,-Wextra,-Werror)

units=()
for f in csrc/*.cpp csrc/cpu/*.cpp csrc/cuda/*.cpp csrc/cuda/*.cu; do units+=("$f"); done
[ ${#units[@]} -gt 0 ] || die "no sources under csrc/"
compile() {  # compile SOURCE: object and log in $work
    local src=$1 obj log
    obj=$work/$(tr '/' '_' <<<"$src").o
    log=$obj.log
    if [[ $src == *.cu ]]; then
        "$NVCC" -c "$src" -o "$obj" "${nvcc_flags[@]}" >"$log" 2>&1
    else
        "$CXX" -c "$src" -o "$obj" "${cxx_flags[@]}" >"$log" 2>&1
    fi
}
failed=()
pids=()
names=()
for src in "${units[@]}"; do
    while [ "$(jobs -rp | wc -l)" -ge "$JOBS" ]; do wait -n || true; done
    compile "$src" &
    pids+=($!)
    names+=("$src")
done
for i in "${!pids[@]}"; do
    if ! wait "${pids[$i]}"; then failed+=("${names[$i]}"); fi
done
for src in "${failed[@]}"; do
    printf '\n===== %s =====\n' "$src" >&2
    tail -n 60 "$work/$(tr '/' '_' <<<"$src").o.log" >&2
done
[ ${#failed[@]} -eq 0 ] || die "${#failed[@]} of ${#units[@]} translation units did not compile: ${failed[*]}"
t_compile=$(since "$t")
say "compiled ${#units[@]} translation units (-Wall -Wextra -Werror; nvcc -Werror all-warnings) in ${t_compile} s"

# ------------------------------------------------------------------------------------------------
# 4. the kernels' PTX: IEEE division and sqrt, no contractible fp32 arithmetic (-fmad=false)
# ------------------------------------------------------------------------------------------------
top=$(tr ';' '\n' <<<"$ARCHS" | sed 's/+PTX//' | sort -n | tail -n 1)
for cu in csrc/cuda/*.cu; do
    ptx=$work/$(basename "$cu").ptx
    "$NVCC" -ptx "$cu" -o "$ptx" -arch=compute_"$top" -O3 -fmad=false -std="$std" "${defines[@]}" \
        -I"$ROOT/csrc" || die "nvcc -ptx $cu failed"
    bad=$(grep -oE '\b(div\.(approx|full)\.f32|sqrt\.approx\.f32|rcp\.approx(\.ftz)?\.f32|(mul|add|sub|fma)\.f32)\b' \
          "$ptx" | sort | uniq -c || true)
    [ -z "$bad" ] || die "$cu: PTX with approximate or contractible fp32 arithmetic (bit-exactness needs \
IEEE ops and only the explicit fmas):
$bad"
done
say "PTX (compute_$top): IEEE fp32 division and sqrt only, no contractible fp32 products or sums"

# ------------------------------------------------------------------------------------------------
# 5. link: every symbol the extension needs must be in that torch (and cudart)
# ------------------------------------------------------------------------------------------------
t=$(now)
"$CXX" -shared -o "$work/_C.so" "$work"/*.o -L"$TORCH_DIR/lib" -lc10 -lc10_cuda -ltorch -ltorch_cpu -ltorch_cuda \
    -L"$CUDA_HOME_FOUND/lib64" -lcudart -fopenmp -Wl,--no-undefined >"$work/link.log" 2>&1 \
    || { cat "$work/link.log" >&2; die "linking _C.so against torch $torch_version failed"; }
t_link=$(since "$t")
say "linked _C.so ($(du -k "$work/_C.so" | cut -f1) KiB, -Wl,--no-undefined) against torch $torch_version" \
    "(CUDA $torch_cuda) and $CUDA_HOME_FOUND/lib64/libcudart"
say "ok in $(since "$start") s (download $( [ $downloaded = 1 ] && echo "${t_download} s" || echo cached)," \
    "unpack ${t_unpack} s, compile ${t_compile} s, link ${t_link} s)"

#!/usr/bin/env bash
# The GPU proof in one command, for a machine with a CUDA GPU, a CUDA torch and nvcc:
#
#   bash scripts/gpu_check.sh            # results in $OUT if set, else bench/gpu-check-<gpu>-<date>/
#
# 0. Preflight (nothing runs unless all pass; otherwise one line on stderr, exit 2): torch sees a
#    CUDA GPU, a CUDA toolkit for setup.py is found, pytest is importable. It also notes (without
#    failing) whether pytest-benchmark (stage 4) and transformers + peft (stage 5) are importable.
# 1. Build: the checkout is copied to a temporary directory and the extension built there for the
#    torch found (setup.py build_ext --inplace, archs: this GPU's), so the checkout is untouched.
# 2. Tests: tests/test_ext.py, tests/test_triton.py (and the CUDA cases of test_step_in_backward.py,
#    test_sampled_grads.py) on the GPU (CUDA and Triton kernels against
#    the reference, bit for bit for the state; no host sync around MaskedAdamW steps under
#    torch.cuda.set_sync_debug_mode("error"); CUDA graph capture/replay; side streams; a bf16
#    tensor of 2^31 - 1 entries with FASTMASK_TEST_BIG=1 when memory allows). Tests that need
#    open_clip are not among them.
# 3. compute-sanitizer --tool memcheck on one small case per backend (when compute-sanitizer exists).
# 4. Benchmarks: bench/test_masked_step.py and bench/test_score.py on the ViT-B/16 c_fc set at 1% and
#    10%, fp32 and bf16, random masks, against mask-multiply + torch.optim.AdamW(fused=True) and the
#    other baselines, and bench/test_sampled_grad.py (the weight gradient of the ViT-B/16 c_fc layers,
#    batch 32, at the masked entries: fastmask.ops.sampled_weight_grad per backend against the dense
#    product on tensor cores + gather); JSON (bench-gpu.json), bench.report's markdown and a
#    summary of the ratios.
# 5. LM (optional: SKIPPED, not failed, when transformers or peft is not importable): bench/lm_step.py
#    on the GPU, the 374M-param bf16 Llama-style model, one fresh process per method (LoRA r=16, full
#    fine-tuning, fastmask 1% with the step in backward, with and without sampled weight gradients,
#    fastmask 1%, fastmask 10% with the step in backward; most important first, so that a cut stage
#    still has them): torch.cuda.max_memory_allocated over the steps and the median time per step
#    (5 steps after a warm-up); JSON lines in lm-gpu.jsonl.
#
# The stages share a budget of GPU_CHECK_BUDGET seconds (default 470; a stage is killed at most 5 s
# after its limit, so that the whole run stays within 8 minutes); a stage that would overrun is cut
# and reported as TIMEOUT, and one left with under 15 s is SKIPPED (budget spent), which fails the
# check. SUMMARY.md in the output folder says, with the GPU's name and the date, what passed, with
# tables of the masked step, the sampled weight gradient and the LM step; it also becomes the GPU
# section of bench/RESULTS.md (python -m bench.report --gpu-summary), with a copy in the folder.
# Exit status: 0 if every stage passed or was skipped for want of compute-sanitizer (memcheck) or
# transformers/peft (lm), or lm (optional, last) was cut or skipped for time; 1 otherwise (a
# missing pytest-benchmark fails the check), 2 when the preflight fails. Environment: PYTHON
# (default: .venv/bin/python if it sees a GPU, else python3), OUT, GPU_CHECK_BUDGET, MAX_JOBS,
# CUDA_HOME.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
BUDGET=${GPU_CHECK_BUDGET:-470}
t_start=$(date +%s)

fail_early() { printf 'gpu_check: FAILED before running anything: %s\n' "$*" >&2; exit 2; }

# ------------------------------------------------------------------------------------------------
# 0. preflight
# ------------------------------------------------------------------------------------------------
gpu_status() {  # one word for an interpreter: gpu, or why not
    "$1" -c 'import sys
try:
    import torch
except Exception:
    print("no-torch"); sys.exit()
print("gpu" if torch.cuda.is_available() else f"torch-{torch.__version__}-sees-no-GPU")' 2>/dev/null || echo "not-runnable"
}
if [ -z "${PYTHON:-}" ]; then  # the first interpreter whose torch sees a GPU
    tried=()
    for cand in .venv/bin/python python3 python; do
        command -v "$cand" >/dev/null 2>&1 || continue
        st=$(gpu_status "$cand")
        if [ "$st" = gpu ]; then PYTHON=$cand; break; fi
        tried+=("$cand: ${st//-/ }")
    done
    [ -n "${PYTHON:-}" ] || fail_early "no CUDA GPU visible to torch ($(IFS=';'; echo "${tried[*]}" | sed 's/;/; /g'))"
fi
command -v "$PYTHON" >/dev/null 2>&1 || fail_early "no Python interpreter ($PYTHON)"
if [[ $PYTHON == */* ]]; then  # absolute: the stages run in another directory (never resolve a venv's symlink)
    PYTHON=$(cd "$(dirname "$PYTHON")" && pwd)/$(basename "$PYTHON")
fi
preflight=$("$PYTHON" - "$ROOT/setup.py" 2>/dev/null <<'PY'
import importlib.util, os, sys
try:
    import torch
except Exception as exc:
    print(f"FAIL torch cannot be imported with {sys.executable} ({type(exc).__name__}: {exc})")
    sys.exit()
if torch.version.cuda is None:
    print(f"FAIL torch {torch.__version__} is not a CUDA build (torch.version.cuda is None)")
    sys.exit()
if not torch.cuda.is_available() or torch.cuda.device_count() == 0:
    print(f"FAIL no CUDA GPU visible to torch {torch.__version__} (CUDA {torch.version.cuda}): "
          "torch.cuda.is_available() is False")
    sys.exit()
for mod in ("pytest",):
    if importlib.util.find_spec(mod) is None:
        print(f"FAIL {mod} is not importable with {sys.executable}")
        sys.exit()
path = sys.argv[1]
src = open(path).read()
ns = {"__file__": path, "__name__": "fastmask_setup_helpers"}
exec(compile(src[:src.index("ext_modules, cmdclass = _extensions()")], path, "exec"), ns)
home, rejected = ns["find_cuda_home"](torch.version.cuda)
if home is None or not os.path.isfile(os.path.join(home, "bin", "nvcc")):
    print("FAIL no CUDA toolkit (include/cuda_runtime.h, bin/nvcc) to build the extension with"
          + "".join(f"; {r}" for r in rejected) + "; set CUDA_HOME")
    sys.exit()
major, minor = torch.cuda.get_device_capability(0)
try:
    import triton
    triton_version = triton.__version__
except Exception:
    triton_version = "none"
bench = "yes" if importlib.util.find_spec("pytest_benchmark") else "no"
lm = "yes" if all(importlib.util.find_spec(m) is not None for m in ("transformers", "peft")) else "no"
name = torch.cuda.get_device_name(0).replace("\t", " ")
print("\t".join(["OK", name, f"{major}{minor}", torch.__version__, torch.version.cuda, triton_version, home,
                 ns["_compiler_version"]([os.path.join(home, "bin", "nvcc"), "--version"]), bench, lm]))
PY
) || fail_early "$PYTHON could not run the preflight"
case $preflight in
    OK*) ;;
    FAIL*) fail_early "${preflight#FAIL }" ;;
    *) fail_early "the preflight printed nothing (is $PYTHON a working interpreter with torch?)" ;;
esac
IFS=$'\t' read -r _ GPU_NAME GPU_CC TORCH_VERSION TORCH_CUDA TRITON_VERSION CUDA_HOME_FOUND NVCC_VERSION HAVE_BENCH \
    HAVE_LM <<<"$preflight"
DATE=$(date -u +%Y-%m-%dT%H:%MZ)
slug=$(tr -c 'A-Za-z0-9\n' '-' <<<"$GPU_NAME" | tr -s '-' | sed 's/^-//; s/-$//')
OUT_DIR=${OUT:-$ROOT/bench/gpu-check-$slug-$(date -u +%Y%m%d-%H%M)}
mkdir -p "$OUT_DIR" || fail_early "cannot create the output folder $OUT_DIR"
OUT_DIR=$(cd "$OUT_DIR" && pwd)
echo "gpu_check: $GPU_NAME (sm_$GPU_CC), torch $TORCH_VERSION (CUDA $TORCH_CUDA), triton $TRITON_VERSION," \
     "toolkit $CUDA_HOME_FOUND ($NVCC_VERSION); results in $OUT_DIR"

# ------------------------------------------------------------------------------------------------
# stages: each under the remaining budget
# ------------------------------------------------------------------------------------------------
declare -a STAGES=()
overall=0
remaining() { echo $(( BUDGET - ($(date +%s) - t_start) )); }
run_stage() {  # run_stage NAME CAP LOG COMMAND...: status into STAGES, output into LOG
    local name=$1 cap=$2 log=$3
    shift 3
    local left limit t0 rc status
    left=$(remaining)
    limit=$(( cap < left ? cap : left ))
    if [ "$limit" -lt 15 ]; then
        STAGES+=("$name|SKIPPED (budget spent)|0|$(basename "$log")")
        echo "gpu_check: $name: skipped, the ${BUDGET} s budget is spent"
        overall=1
        return 1
    fi
    echo "gpu_check: $name (at most ${limit} s) ..."
    t0=$(date +%s)
    timeout --kill-after=5 "$limit" "$@" >"$log" 2>&1
    rc=$?
    if [ $rc -eq 0 ]; then status=PASSED
    elif [ $rc -eq 124 ] || [ $rc -eq 137 ]; then status="TIMEOUT after ${limit} s"; overall=1
    else status="FAILED (exit $rc)"; overall=1
    fi
    STAGES+=("$name|$status|$(( $(date +%s) - t0 ))|$(basename "$log")")
    echo "gpu_check: $name: $status in $(( $(date +%s) - t0 )) s"
    [ $rc -eq 0 ] || tail -n 25 "$log" | sed 's/^/    /'
    return $rc
}

# 1. build in a copy of the checkout
WORK=$(mktemp -d "${TMPDIR:-/tmp}/fastmask-gpu-check.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
tar -C "$ROOT" --exclude=./.git --exclude=./.venv --exclude=./.ci-venv --exclude=./build --exclude=./dist \
    --exclude=./outputs --exclude='./bench/gpu-check-*' --exclude='*/__pycache__' --exclude=./fastmask/_C.so \
    --exclude=./fastmask/_C_build.json --exclude=./.pytest_cache -cf - . | tar -C "$WORK" -xf - \
    || { echo "gpu_check: could not copy the checkout to $WORK" >&2; exit 1; }
build() {  # setup.py's build (what pip runs); the JIT build (ninja, no setuptools) if that fails
    cd "$WORK" || return 1
    if CUDA_HOME="$CUDA_HOME_FOUND" FASTMASK_CUDA_ARCHS="$GPU_CC" MAX_JOBS="${MAX_JOBS:-$(nproc)}" \
        "$PYTHON" setup.py build_ext --inplace; then
        echo "gpu_check: built with setup.py build_ext --inplace"
    else
        echo "gpu_check: setup.py build_ext failed (above); trying the JIT build (FASTMASK_EXT_JIT=1)"
        rm -f fastmask/_C.so fastmask/_C_build.json
        touch .use-jit
    fi
    if [ -f .use-jit ]; then
        export FASTMASK_EXT_JIT=1 FASTMASK_CACHE_DIR="$WORK/.jit" CUDA_HOME="$CUDA_HOME_FOUND"
        export TORCH_CUDA_ARCH_LIST="${GPU_CC%?}.${GPU_CC: -1}" MAX_JOBS="${MAX_JOBS:-$(nproc)}"
    fi
    "$PYTHON" -c 'import fastmask._ext as e, json, sys
r = e.why_not("cuda")
print("gpu_check: extension", json.dumps(e.info()))
sys.exit(f"gpu_check: the CUDA kernels are not usable: {r}" if r else 0)'
}
run_stage build 170 "$OUT_DIR/build.log" bash -c "$(declare -f build); $(declare -p WORK CUDA_HOME_FOUND GPU_CC PYTHON); build"
built=$?
if [ -f "$WORK/.use-jit" ]; then  # the later stages load the JIT-built library from its cache
    export FASTMASK_EXT_JIT=1 FASTMASK_CACHE_DIR="$WORK/.jit" CUDA_HOME="$CUDA_HOME_FOUND"
fi

# 2. tests
tests() {
    cd "$WORK" && FASTMASK_TEST_BIG=1 "$PYTHON" -m pytest tests/test_ext.py tests/test_triton.py \
        tests/test_step_in_backward.py tests/test_sampled_grads.py -q -p no:cacheprovider \
        -rfEs --durations=15 --junitxml="$OUT_DIR/tests.xml"
}
if [ $built -eq 0 ]; then
    run_stage tests 210 "$OUT_DIR/tests.log" bash -c "$(declare -f tests); $(declare -p WORK PYTHON OUT_DIR); tests"
else
    STAGES+=("tests|SKIPPED (no build)|0|-"); overall=1
fi

# 3. compute-sanitizer memcheck on one small case per backend
SANITIZER=$(command -v compute-sanitizer || true)
for cand in "$CUDA_HOME_FOUND/bin/compute-sanitizer" "$CUDA_HOME_FOUND/compute-sanitizer/compute-sanitizer"; do
    [ -z "$SANITIZER" ] && [ -x "$cand" ] && SANITIZER=$cand
done
cat >"$WORK/sanitize_case.py" <<'PY'
import torch
from fastmask import backends, ops
from tests.utils import make_problem

ran = []
for backend in ("ext", "triton"):
    if backends.why_not(backend, "cuda") is not None:
        continue
    for dtype in (torch.float32, torch.bfloat16):
        pr = make_problem([(37, 129), (7,), (0,), (5000,), (1,)], dtype=dtype, density=0.3, device="cuda", seed=1)
        scores = [torch.zeros(p.shape, device="cuda") for p in pr.params]
        with backends.use(backend):
            for fused in (True, False):
                ops.masked_adamw_step_(pr.params, pr.grads, pr.idx, pr.exp_avg, pr.exp_avg_sq, pr.offsets, pr.steps,
                                       1e-3, 0.9, 0.999, 1e-8, 0.1, False, max_exp_avg_sq=pr.max_exp_avg_sq,
                                       grad_scale=torch.tensor(2.0, device="cuda"),
                                       found_inf=torch.zeros((), device="cuda"),
                                       scores=scores if fused else None, score_mode="fisher")
            ops.score_accumulate_(scores, pr.grads, "abs")
        ran.append(f"{backend}/{dtype}")
torch.cuda.synchronize()
print("memcheck case ran:", ", ".join(ran))
PY
sanitize() {
    cd "$WORK" && PYTORCH_NO_CUDA_MEMORY_CACHING=1 "$SANITIZER" --tool memcheck --error-exitcode 9 --leak-check no \
        --print-limit 20 "$PYTHON" sanitize_case.py
}
if [ $built -ne 0 ]; then
    STAGES+=("memcheck|SKIPPED (no build)|0|-")
elif [ -z "$SANITIZER" ]; then
    STAGES+=("memcheck|SKIPPED (no compute-sanitizer)|0|-")
    echo "gpu_check: memcheck: skipped, compute-sanitizer not found"
else
    run_stage memcheck 90 "$OUT_DIR/memcheck.log" bash -c "$(declare -f sanitize); $(declare -p WORK PYTHON SANITIZER); sanitize"
fi

# 4. benchmarks
benchmarks() {
    cd "$WORK" && "$PYTHON" -m pytest bench/test_masked_step.py bench/test_score.py bench/test_sampled_grad.py \
        --benchmark-only -q -p no:cacheprovider \
        --shapes vitb16 --densities 0.01,0.1 --masks random --dtypes fp32,bf16 --device cuda --case-time 0.2 \
        --paired-rounds 3 --benchmark-json="$OUT_DIR/bench-gpu.json" \
    && "$PYTHON" -m bench.report "$OUT_DIR/bench-gpu.json" --out "$OUT_DIR" --name RESULTS-gpu
}
if [ $built -ne 0 ]; then
    STAGES+=("benchmarks|SKIPPED (no build)|0|-")
elif [ "$HAVE_BENCH" != yes ]; then
    STAGES+=("benchmarks|SKIPPED (pytest-benchmark not installed)|0|-"); overall=1
else
    run_stage benchmarks 240 "$OUT_DIR/bench.log" bash -c "$(declare -f benchmarks); $(declare -p WORK PYTHON OUT_DIR); benchmarks"
fi

# 5. LM step (optional): one fresh process per method, so that each CUDA peak is its own
lm() {
    cd "$WORK" || return 1
    : >"$OUT_DIR/lm-gpu.jsonl"
    local m rc line failed=0
    for m in lora full fastmask_1_bwd_sampled fastmask_1_bwd fastmask_1 fastmask_10_bwd; do
        echo "gpu_check: lm: $m"
        "$PYTHON" -m bench.lm_step --size 400m --method "$m" --device cuda --steps 5 --json >"$WORK/lm-$m.out"
        rc=$?
        line=$(grep '^{' "$WORK/lm-$m.out" | tail -n 1)
        if [ $rc -eq 0 ] && [ -n "$line" ]; then
            printf '%s\n' "$line" | tee -a "$OUT_DIR/lm-gpu.jsonl"
        elif [ $rc -eq 3 ]; then
            echo "gpu_check: lm: $m skipped (not in this checkout)"
        else
            echo "gpu_check: lm: $m FAILED (exit $rc)"; cat "$WORK/lm-$m.out"; failed=1
        fi
    done
    return $failed
}
if [ $built -ne 0 ]; then
    STAGES+=("lm|SKIPPED (no build)|0|-")
elif [ "$HAVE_LM" != yes ]; then
    STAGES+=("lm|SKIPPED (transformers/peft not importable)|0|-")
    echo "gpu_check: lm: skipped, transformers or peft is not importable with $PYTHON"
elif [ "$(remaining)" -lt 30 ]; then  # optional: never fails the check for want of time
    STAGES+=("lm|SKIPPED (optional; the budget is spent: run bench/lm_step.py by hand)|0|-")
    echo "gpu_check: lm: skipped, the ${BUDGET} s budget is spent"
else
    before=$overall
    run_stage lm 90 "$OUT_DIR/lm.log" bash -c "$(declare -f lm); $(declare -p WORK PYTHON OUT_DIR); lm"
    last=${STAGES[${#STAGES[@]}-1]}
    if [[ $last == "lm|TIMEOUT"* ]]; then  # cut at its time limit: the methods done are in lm-gpu.jsonl
        overall=$before
        STAGES[${#STAGES[@]}-1]="lm|CUT at its time limit (optional; the methods done are in lm-gpu.jsonl)|$(cut -d'|' -f3- <<<"$last")"
    fi
fi

# ------------------------------------------------------------------------------------------------
# summary
# ------------------------------------------------------------------------------------------------
{
    echo "# fastmask GPU check"
    echo
    echo "- GPU: $GPU_NAME (sm_$GPU_CC)"
    echo "- date: $DATE"
    echo "- torch $TORCH_VERSION (CUDA $TORCH_CUDA), triton $TRITON_VERSION, toolkit $CUDA_HOME_FOUND ($NVCC_VERSION)"
    echo "- command: bash scripts/gpu_check.sh (budget ${BUDGET} s; total $(( $(date +%s) - t_start )) s)"
    echo
    echo "| stage | status | seconds | log |"
    echo "| --- | --- | --- | --- |"
    for s in "${STAGES[@]}"; do
        IFS='|' read -r n st sec lg <<<"$s"
        echo "| $n | $st | $sec | $lg |"
    done
    if [ -f "$OUT_DIR/tests.log" ]; then
        echo
        echo "Tests: $(grep -E '^[0-9]+ (passed|failed)|^=+ .*(passed|failed)' "$OUT_DIR/tests.log" | tail -n 1 | tr -d '=')"
    fi
    if [ -f "$OUT_DIR/bench-gpu.json" ]; then
        echo
        "$PYTHON" - "$OUT_DIR/bench-gpu.json" <<'PY'
import json, sys
data = json.load(open(sys.argv[1]))
rows = {}
for b in data["benchmarks"]:
    x = b.get("extra_info", {})
    if x.get("bench") != "masked_step":
        continue
    key = (x["shape_set"], x["mask"], x["dtype"], x["density"])
    rows.setdefault(key, {})[x["impl"]] = b["stats"]["median"]
print("Masked step (one optimizer step over the shape set's c_fc weights): median time, and the speed-up over "
      "mask-multiply + `torch.optim.AdamW(fused=True)` on the same tensors:")
print()
print("| shapes | masks | dtype | density | AdamW(fused) + mask | fastmask ext | fastmask triton |")
print("| --- | --- | --- | --- | --- | --- | --- |")
for key, r in sorted(rows.items()):
    base = r.get("adamw_fused+mask")

    def cell(name):
        t = r.get(name)
        if t is None:
            return "-"
        return f"{t * 1e3:.3f} ms" + (f" ({base / t:.1f}x)" if base and name != "adamw_fused+mask" else "")

    print("| " + " | ".join(map(str, key)) + f" | {cell('adamw_fused+mask')} | {cell('fastmask:ext')} | "
          f"{cell('fastmask:triton')} |")

rows = {}
for b in data["benchmarks"]:
    x = b.get("extra_info", {})
    if x.get("bench") != "sampled_grad":
        continue
    key = (-x["out_features"] * x["in_features"], f"[{x['out_features']}, {x['in_features']}]", x["T"], x["dtype"],
           x["density"])
    rows.setdefault(key, {})[x["impl"]] = b["stats"]["median"]
if rows:
    impls = ["dense+gather"] + sorted({i for r in rows.values() for i in r if i != "dense+gather"})
    print()
    print("Sampled weight gradient (a ViT-B/16 c_fc layer's weight gradient at the masked entries, T tokens): median "
          "time of `fastmask.ops.sampled_weight_grad` per backend, and the speed-up over the dense product "
          "`(grad_out.t() @ input).view(-1)[idx]` (cuBLAS, tensor cores for bf16) on the same tensors; above 1x the "
          "sampled op is faster:")
    print()
    print("| layer | T | dtype | density | " + " | ".join(impls) + " |")
    print("|" + " --- |" * (4 + len(impls)))
    for key, r in sorted(rows.items()):
        base = r.get("dense+gather")
        cells = []
        for name in impls:
            t = r.get(name)
            cells.append("-" if t is None else f"{t * 1e3:.3f} ms"
                         + (f" ({base / t:.2f}x)" if base and name != "dense+gather" else ""))
        print(f"| {key[1]} | {key[2]} | {key[3]} | {key[4]} | " + " | ".join(cells) + " |")
PY
        echo
        echo "Full tables: RESULTS-gpu.md (bench.report), raw: bench-gpu.json."
    fi
    if [ -s "$OUT_DIR/lm-gpu.jsonl" ]; then
        echo
        "$PYTHON" - "$OUT_DIR/lm-gpu.jsonl" <<'PY'
import json, statistics, sys
rows = {}
for line in open(sys.argv[1]):
    if line.strip():
        r = json.loads(line)
        rows[r["method"]] = r
peak = {m: r.get("cuda_max_allocated") for m, r in rows.items()}
first = next(iter(rows.values()))
print(f"LM step ({first['size']}: {first['params'] / 1e6:.0f}M params, bf16, batch {first['batch']} x {first['seq']} "
      f"tokens; `bench/lm_step.py`, one process per method): `torch.cuda.max_memory_allocated` over the steps "
      "(model included) and the median time per step:")
print()
print("| method | CUDA peak MB | x LoRA | x full | ms/step |")
print("| --- | --- | --- | --- | --- |")


def ratio(m, ref):
    return f"{peak[m] / peak[ref]:.2f}x" if peak.get(m) and peak.get(ref) else "-"


for m, r in rows.items():
    mb = f"{peak[m] / 1e6:.0f}" if peak.get(m) else "-"
    print(f"| {m} | {mb} | {ratio(m, 'lora')} | {ratio(m, 'full')} | {1e3 * statistics.median(r['step_s']):.1f} |")
PY
        echo
        echo "Raw: lm-gpu.jsonl (one line per method, bench/lm_step.py's JSON)."
    fi
} >"$OUT_DIR/SUMMARY.md"
cat "$OUT_DIR/SUMMARY.md"
# The same figures as the GPU section of this checkout's bench/RESULTS.md, and a copy of that file
# beside the logs (on a lent machine only the output folder comes back: copy it over bench/RESULTS.md).
if "$PYTHON" -m bench.report --gpu-summary "$OUT_DIR" --out "$ROOT/bench" >/dev/null; then
    cp "$ROOT/bench/RESULTS.md" "$OUT_DIR/RESULTS.md"
    echo "gpu_check: wrote the GPU section of bench/RESULTS.md (a copy: $OUT_DIR/RESULTS.md)"
else
    echo "gpu_check: could not write the GPU section of bench/RESULTS.md" >&2
    overall=1
fi
exit $overall

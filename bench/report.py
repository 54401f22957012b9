"""Report of a benchmark run: markdown tables of ratios against the dense baselines of the same
run, the speed bars, and a plot.

    python -m bench.report bench/results-cpu.json [--out bench/] [--name RESULTS]

writes ``<out>/<name>.md`` and ``<out>/<json stem>.png``. A hand-written block between the lines
``<!-- notes:start -->`` and ``<!-- notes:end -->`` of an existing ``<name>.md`` is kept (placed
after the machine description). Times are the **median** of each case's
rounds (robust on a shared machine; pytest-benchmark's JSON also holds mean, min, max, stddev).
Effective bandwidth of a fastmask case = the device's line-level byte floor / time (64 B lines on
a CPU, 32 B sectors on a GPU); of a dense baseline = its own bytes (N x 40 for fp32) / time.

The language-model step (``bench/test_lm_step.py``) has its own section, between the lines
``<!-- lm:start -->`` and ``<!-- lm:end -->``, and its own plot (``<json stem>.png`` from a JSON
that holds only LM cases, ``<json stem>-lm.png`` otherwise). A JSON with only LM cases
(``python -m bench.report bench/results-lm-cpu.json``) rewrites that section alone and leaves the
rest of ``<name>.md`` as it is; a JSON without LM cases keeps the existing LM section. A
hand-written block between ``<!-- lm-notes:start -->`` and ``<!-- lm-notes:end -->`` inside the
LM section is kept.

The GPU section, between ``<!-- gpu:start -->`` and ``<!-- gpu:end -->``, comes from a
``scripts/gpu_check.sh`` run (``python -m bench.report --gpu-summary <its output folder>``, which
the script calls itself) and is kept by every other report.
"""
from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

BASELINES = ("adamw_fused+mask", "adamw_foreach+mask", "original")

# Speed bars (issue text): masked step, ViT-B/16 set, random masks, fp32, CPU.
BARS = [
    ("density 0.1: best backend vs mask-multiply + fused AdamW", 0.1, "x_fused", 3.0),
    ("density 0.01: best backend vs mask-multiply + fused AdamW", 0.01, "x_fused", 10.0),
    ("density 0.1: effective bandwidth, % of fused AdamW's", 0.1, "bw_pct", 70.0),
    ("density 0.01: effective bandwidth, % of fused AdamW's", 0.01, "bw_pct", 70.0),
    ("density 0.1: best backend vs original style (report; expect ~10x)", 0.1, "x_original", None),
    ("density 0.1: best backend vs its reference backend", 0.1, "x_reference", 3.0),
    ("density 0.1: optimizer state per selected entry (B)", 0.1, "state_per_k", -12.0),
]


def _t(b) -> float:
    return float(b["stats"]["median"])


def _ms(t: float | None) -> str:
    if t is None:
        return "-"
    return f"{t * 1e3:.3g}" if t * 1e3 < 100 else f"{t * 1e3:.0f}"


def _x(a: float | None, b: float | None) -> str:
    return "-" if not a or not b else f"{b / a:.2f}x"


def _mb(n) -> str:
    return "-" if n is None else f"{n / 1e6:.1f}"


def _fmt(v, nd=2) -> str:
    return "-" if v is None else f"{v:.{nd}f}"


def load(path: str | Path) -> dict:
    with open(path) as f:
        return json.load(f)


def _load(v) -> str:
    return "?" if not v else ", ".join(f"{x:.1f}" for x in v)


def _busy(fm: dict) -> bool:
    cores = fm.get("affinity_cpus") or fm.get("cpu_count") or 1
    loads = [v[0] for v in (fm.get("loadavg_start"), fm.get("loadavg_end")) if v]
    return any(x > cores + 0.5 for x in loads)


def _machine(data: dict) -> list[str]:
    mi = data.get("machine_info", {})
    fm = mi.get("fastmask", {})
    lines = [
        f"- date: {data.get('datetime', fm.get('timestamp', '?'))}",
        f"- machine: {fm.get('cpu', mi.get('cpu', {}).get('brand_raw', '?'))}, {fm.get('cpu_count')} logical CPUs "
        f"({fm.get('affinity_cpus')} usable, torch threads {fm.get('torch_threads')}), {fm.get('memory_gib', '?')} GiB; "
        f"{fm.get('platform', '')}",
    ]
    if fm.get("gpu"):
        lines.append(f"- GPU: {fm['gpu']} (CUDA {fm.get('cuda')})")
    lines += [
        f"- torch {fm.get('torch')}, fastmask {fm.get('fastmask')}, python {fm.get('python')}, "
        f"pytest-benchmark {data.get('version', '?')}",
        f"- fastmask backends available: "
        + "; ".join(f"{d}: {', '.join(v) or 'none'}" for d, v in mi.get("fastmask_backends", {}).items()),
        f"- load average (1, 5, 15 min) at start: {_load(fm.get('loadavg_start'))}, at end: {_load(fm.get('loadavg_end'))}"
        + (" -- **other processes were competing for the cores: times are noisy**"
           if _busy(fm) else ""),
        f"- command: `{mi.get('fastmask_command', '?')}`",
        f"- options: `{json.dumps(mi.get('fastmask_bench_options', {}))}`",
    ]
    return lines


# ------------------------------------------------------------------------------------------------
# masked step
# ------------------------------------------------------------------------------------------------
def _ms_groups(benchmarks: list[dict], paired: bool) -> dict[tuple, dict[str, tuple[float, dict]]]:
    """{case key: {impl: (median seconds, extra_info)}} from the separate cases or the paired ones."""
    groups: dict[tuple, dict[str, tuple[float, dict]]] = defaultdict(dict)
    for b in benchmarks:
        e = b["extra_info"]
        key = (e.get("device"), e.get("dtype"), e.get("shape_set"), e.get("mask"), e.get("density"))
        if not paired and e.get("bench") == "masked_step":
            groups[key][e["impl"]] = (_t(b), e)
        elif paired and e.get("bench") == "masked_step_paired" and e.get("paired"):
            for impl, v in e["paired"].items():
                groups[key][impl] = (v["median_s"], {**e, **v})
    return groups


def masked_step_rows(benchmarks: list[dict], paired: bool = False) -> list[dict]:
    groups = _ms_groups(benchmarks, paired)
    rows = []
    for key, impls in groups.items():
        device, dtype, shape_set, mask, density = key
        fm = {k.split(":", 1)[1]: v for k, v in impls.items() if k.startswith("fastmask:")}
        if not fm:
            continue
        best_name = min(fm, key=lambda n: fm[n][0])
        tb, e = fm[best_name]
        floor_key = "floor_bytes_gpu32" if device == "cuda" else "floor_bytes_cpu64"
        base = {n: impls[n][0] if n in impls else None for n in BASELINES}
        tref = fm["reference"][0] if "reference" in fm else None
        fused = impls.get("adamw_fused+mask")
        bw_best = e[floor_key] / tb / 1e9
        bw_fused = fused[1]["dense_bytes"] / fused[0] / 1e9 if fused else None
        rows.append(dict(
            device=device, dtype=dtype, shape_set=shape_set, mask=mask, density=density,
            N=e["N"], K=e["K"], touched=e["touched_frac_32" if device == "cuda" else "touched_frac_64"],
            floor=e[floor_key], dense=e["dense_bytes"], best=best_name, t_best=tb,
            t_fused=base["adamw_fused+mask"], t_foreach=base["adamw_foreach+mask"], t_original=base["original"],
            t_reference=tref,
            x_fused=base["adamw_fused+mask"] / tb if base["adamw_fused+mask"] else None,
            x_foreach=base["adamw_foreach+mask"] / tb if base["adamw_foreach+mask"] else None,
            x_original=base["original"] / tb if base["original"] else None,
            x_reference=tref / tb if tref else None,
            bw_best=bw_best, bw_fused=bw_fused, bw_pct=100 * bw_best / bw_fused if bw_fused else None,
            state_best=e.get("opt_state_bytes"),
            state_per_k=e.get("opt_state_bytes", 0) / e["K"] if e["K"] else None,
            state_fused=fused[1].get("opt_state_bytes") if fused else None,
            mask_fused=fused[1].get("mask_bytes") if fused else None,
            backends={n: v[0] for n, v in fm.items()},
            floor_ratio=e["dense_bytes"] / e[floor_key],
        ))
    order = {"tiny": 0, "vitb16": 1, "vitl14": 2}
    rows.sort(key=lambda r: (r["device"], r["dtype"], order.get(r["shape_set"], 9), r["mask"], r["density"]))
    return rows


def masked_step_table(rows: list[dict]) -> list[str]:
    out = [
        "| device | dtype | shapes | mask | density | K | lines touched | floor MB | dense MB | max gain (dense/floor) "
        "| best backend | best ms | fused+mask ms | foreach+mask ms | original ms | reference ms "
        "| x fused | x foreach | x original | x reference | eff. GB/s (floor) | fused GB/s (own) | % of fused "
        "| state B/K | fused state MB (+mask MB) |",
        "|" + "---|" * 25,
    ]
    for r in rows:
        out.append(
            f"| {r['device']} | {r['dtype']} | {r['shape_set']} | {r['mask']} | {r['density']} | {r['K']:,} "
            f"| {100 * r['touched']:.0f}% | {_mb(r['floor'])} | {_mb(r['dense'])} | {r['floor_ratio']:.1f}x "
            f"| {r['best']} | {_ms(r['t_best'])} | {_ms(r['t_fused'])} | {_ms(r['t_foreach'])} "
            f"| {_ms(r['t_original'])} | {_ms(r['t_reference'])} "
            f"| {_x(r['t_best'], r['t_fused'])} | {_x(r['t_best'], r['t_foreach'])} "
            f"| {_x(r['t_best'], r['t_original'])} | {_x(r['t_best'], r['t_reference'])} "
            f"| {_fmt(r['bw_best'])} | {_fmt(r['bw_fused'])} | {_fmt(r['bw_pct'], 0)}% "
            f"| {_fmt(r['state_per_k'], 1)} | {_mb(r['state_fused'])} (+{_mb(r['mask_fused'])}) |"
        )
    return out


def backends_table(rows: list[dict]) -> list[str]:
    names = sorted({n for r in rows for n in r["backends"]})
    out = ["| device | dtype | shapes | mask | density | " + " | ".join(f"{n} ms" for n in names) + " |",
           "|" + "---|" * (5 + len(names))]
    for r in rows:
        out.append(f"| {r['device']} | {r['dtype']} | {r['shape_set']} | {r['mask']} | {r['density']} | "
                   + " | ".join(_ms(r["backends"].get(n)) for n in names) + " |")
    return out


def bars_section(rows: list[dict]) -> list[str]:
    out = ["| bar (vitb16, random masks, fp32) | device | target | measured | best backend | status |",
           "|---|---|---|---|---|---|"]
    if not rows:
        return ["(no masked-step cases in this run)"]
    found = False
    for r in rows:
        if r["shape_set"] != "vitb16" or r["mask"] != "random" or r["dtype"] != "fp32":
            continue
        for label, density, field, target in BARS:
            if abs(r["density"] - density) > 1e-9:
                continue
            found = True
            v = r[field]
            if target is None:
                tgt, status = "report", "-"
            elif target < 0:
                # 0.1% slack: the per-tensor step counts (4 B per tensor) are not per-entry state.
                tgt, status = f"<= {-target:g}", ("met" if v is not None and v <= -target * 1.001 else "not met")
            else:
                tgt, status = f">= {target:g}", ("met" if v is not None and v >= target else "not met")
            unit = "%" if field == "bw_pct" else ("" if field == "state_per_k" else "x")
            out.append(f"| {label} | {r['device']} | {tgt} | {_fmt(v, 1)}{unit} | {r['best']} | {status} |")
    if not found:
        return ["(no vitb16 random fp32 masked-step cases in this run)"]
    return out


# ------------------------------------------------------------------------------------------------
# score, select, train step
# ------------------------------------------------------------------------------------------------
def score_table(benchmarks: list[dict]) -> list[str]:
    by: dict[tuple, dict] = defaultdict(dict)
    copies = {}
    for b in benchmarks:
        e = b["extra_info"]
        if e.get("bench") != "score":
            continue
        key = (e["device"], e["dtype"], e["shape_set"])
        if e["impl"] == "copy":
            copies[key] = b
        else:
            by[key + (e["mode"],)][e["impl"]] = b
    if not by:
        return []
    impls = sorted({i for v in by.values() for i in v}, key=lambda s: (not s.startswith("fastmask"), s))
    out = ["| device | dtype | shapes | mode | N | " + " | ".join(f"{i} ms" for i in impls)
           + " | best fastmask GB/s | copy ms | copy GB/s | best fastmask % of copy GB/s | best fastmask vs torch_loop |",
           "|" + "---|" * (5 + len(impls) + 5)]
    for key in sorted(by):
        row = by[key]
        c = copies.get(key[:3])
        fm = {i: v for i, v in row.items() if i.startswith("fastmask:")}
        best = min(fm.values(), key=_t) if fm else None
        bw = best["extra_info"]["own_bytes"] / _t(best) / 1e9 if best else None
        cbw = c["extra_info"]["own_bytes"] / _t(c) / 1e9 if c else None
        loop = row.get("torch_loop")
        n = next(iter(row.values()))["extra_info"]["N"]
        out.append(f"| {' | '.join(map(str, key))} | {n:,} | " + " | ".join(_ms(_t(row[i])) if i in row else "-" for i in impls)
                   + f" | {_fmt(bw)} | {_ms(_t(c)) if c else '-'} | {_fmt(cbw)} | "
                   + (f"{100 * bw / cbw:.0f}%" if bw and cbw else "-")
                   + f" | {_x(_t(best), _t(loop)) if best and loop else '-'} |")
    return out


def select_table(benchmarks: list[dict]) -> list[str]:
    rows = [b for b in benchmarks if b["extra_info"].get("bench") == "select"]
    if not rows:
        return []
    out = ["| device | shapes | scores | density | N | K | ms | GB/s (one read of the scores) |", "|" + "---|" * 8]
    order = {"tiny": 0, "vitb16": 1, "vitl14": 2}
    rows.sort(key=lambda b: (b["extra_info"]["device"], order.get(b["extra_info"]["shape_set"], 9),
                             b["extra_info"]["mask"], b["extra_info"]["density"]))
    for b in rows:
        e = b["extra_info"]
        out.append(f"| {e['device']} | {e['shape_set']} | {e['mask']} | {e['density']} | {e['N']:,} | {e['K']:,} "
                   f"| {_ms(_t(b))} | {_fmt(e['own_bytes'] / _t(b) / 1e9)} |")
    return out


def sampled_grad_table(benchmarks: list[dict]) -> list[str]:
    """``bench/test_sampled_grad.py``: per layer and density, each implementation's median and the
    dense product's time over it (higher = the sampled op faster)."""
    by: dict[tuple, dict[str, dict]] = defaultdict(dict)
    for b in benchmarks:
        e = b["extra_info"]
        if e.get("bench") != "sampled_grad":
            continue
        key = (e["device"], e["dtype"], e["shape_set"], e["out_features"], e["in_features"], e["T"], e["density"])
        by[key][e["impl"]] = b
    if not by:
        return []
    impls = sorted({i for v in by.values() for i in v if i.startswith("fastmask:")})
    out = ["| device | dtype | shapes | layer | T | density | K | dense+gather ms | "
           + " | ".join(f"{i} ms (x dense)" for i in impls) + " | best fastmask GFLOP/s |",
           "|" + "---|" * (8 + len(impls) + 1)]
    order = {"tiny": 0, "vitb16": 1, "vitl14": 2}
    for key in sorted(by, key=lambda k: (k[0], k[1], order.get(k[2], 9), -k[3] * k[4], k[6])):
        row = by[key]
        dense = row.get("dense+gather")
        td = _t(dense) if dense else None
        fm = {i: b for i, b in row.items() if i.startswith("fastmask:")}
        best = min(fm.values(), key=_t) if fm else None
        k = next(iter(row.values()))["extra_info"]["K"]
        cells = [f"{_ms(_t(row[i]))} ({_x(_t(row[i]), td)})" if i in row else "-" for i in impls]
        out.append(f"| {key[0]} | {key[1]} | {key[2]} | [{key[3]}, {key[4]}] | {key[5]:,} | {key[6]} | {k:,} "
                   f"| {_ms(td)} | " + " | ".join(cells)
                   + f" | {_fmt(best['extra_info']['flops'] / _t(best) / 1e9, 1) if best else '-'} |")
    return out


def train_table(benchmarks: list[dict]) -> list[str]:
    rows = [b for b in benchmarks if b["extra_info"].get("bench") == "train_step"]
    if not rows:
        return []
    ref = {(b["extra_info"]["device"], b["extra_info"]["model"]): _t(b) for b in rows
           if b["extra_info"]["impl"] == "fastmask"}
    out = ["| device | model | batch | method | params | trainable | ms/step | time / fastmask time | opt state MB "
           "| RSS after set-up MB | peak RSS MB | peak - set-up MB | CUDA peak MB |", "|" + "---|" * 13]
    for b in rows:
        e = b["extra_info"]
        r = ref.get((e["device"], e["model"]))
        out.append(f"| {e['device']} | {e['model']} | {e['batch']} | {e['impl']} | {e['params']:,} | {e['trainable']:,} "
                   f"| {_ms(_t(b))} | {_x(r, _t(b)) if r else '-'} | {_mb(e.get('opt_state_bytes'))} "
                   f"| {_mb(e.get('rss_setup_bytes'))} | {_mb(e.get('peak_rss_bytes'))} | {_mb(e.get('train_rss_bytes'))} "
                   f"| {_mb(e.get('cuda_max_allocated_bytes'))} |")
    return out


# ------------------------------------------------------------------------------------------------
# language-model step (bench/test_lm_step.py)
# ------------------------------------------------------------------------------------------------
LM_ORDER = ("full", "adamw_mlp", "original", "lora", "fastmask_1", "fastmask_10", "fastmask_1_bwd",
            "fastmask_10_bwd", "fastmask_1_bwd_sampled")
LM_WHAT = {
    "full": "AdamW(fused) on every parameter",
    "adamw_mlp": "AdamW(fused) on the MLP weights",
    "original": "SPU-code style: dense bf16 mask (1%) x MLP grads, AdamW(foreach=False) per param",
    "lora": "peft LoRA r=16 on gate/up/down_proj (fp32 adapters), AdamW(fused)",
    "fastmask_1": "MaskedAdamW, 1% of the MLP weights",
    "fastmask_10": "MaskedAdamW, 10% of the MLP weights",
    "fastmask_1_bwd": "MaskedAdamW(step_in_backward=True), 1%",
    "fastmask_10_bwd": "MaskedAdamW(step_in_backward=True), 10%",
    "fastmask_1_bwd_sampled": "fastmask_1_bwd + sampled_weight_grads (MLP weight gradients at the selected entries only)",
}
# Goals (issue text): fastmask with the step in backward at 1% vs LoRA and full fine-tuning.
LM_GOALS = [
    ("peak memory, fastmask_1_bwd / lora", "fastmask_1_bwd", "lora", "peak", 1.1),
    ("peak memory, fastmask_1_bwd / full", "fastmask_1_bwd", "full", "peak", 0.4),
    ("time per step, fastmask_1_bwd / lora", "fastmask_1_bwd", "lora", "time", 1.1),
    ("peak memory, fastmask_1_bwd_sampled / lora", "fastmask_1_bwd_sampled", "lora", "peak", 1.1),
    ("peak memory, fastmask_1_bwd_sampled / full", "fastmask_1_bwd_sampled", "full", "peak", 0.4),
    ("time per step, fastmask_1_bwd_sampled / lora", "fastmask_1_bwd_sampled", "lora", "time", 1.1),
]
LM_START, LM_END = "<!-- lm:start -->", "<!-- lm:end -->"
LM_NOTES_START, LM_NOTES_END = "<!-- lm-notes:start -->", "<!-- lm-notes:end -->"


def is_lm(b: dict) -> bool:
    return str(b["extra_info"].get("bench", "")).startswith("lm_step")


def lm_rows(benchmarks: list[dict]) -> list[dict]:
    """One row per (device, size, method) of ``test_lm_step``, in LM_ORDER."""
    rows = []
    for b in benchmarks:
        e = b["extra_info"]
        if e.get("bench") != "lm_step":
            continue
        peak = e.get("cuda_max_allocated_bytes") if e.get("device") == "cuda" else e.get("peak_rss_bytes")
        rows.append(dict(
            device=e["device"], size=e["size"], method=e["impl"], batch=e.get("batch"), seq=e.get("seq"),
            params=e.get("params"), trainable=e.get("trainable"), N=e.get("N"), K=e.get("K"),
            t=_t(b), t_sub=e.get("subprocess_median_s"), peak=peak, peak_rss=e.get("peak_rss_bytes"),
            setup=e.get("rss_setup_bytes"), imports=e.get("rss_imports_bytes"),
            train=e.get("train_rss_bytes"), cuda_peak=e.get("cuda_max_allocated_bytes"),
            state=e.get("opt_state_bytes", e.get("opt_state_bytes_inproc")), grad=e.get("grad_bytes"),
            check=e.get("check"),
        ))
    order = {m: i for i, m in enumerate(LM_ORDER)}
    sizes = {"tiny": 0, "small": 1, "400m": 2}
    rows.sort(key=lambda r: (r["device"], sizes.get(r["size"], 9), order.get(r["method"], 99)))
    return rows


def lm_paired(benchmarks: list[dict]) -> list[dict]:
    return [b["extra_info"] for b in benchmarks if b["extra_info"].get("bench") == "lm_step_paired"]


def _lm_ref(rows: list[dict], r: dict, method: str) -> dict | None:
    return next((x for x in rows if x["device"] == r["device"] and x["size"] == r["size"]
                 and x["method"] == method), None)


def _ratio(a, b) -> float | None:
    return a / b if a is not None and b else None


def lm_table(rows: list[dict]) -> list[str]:
    out = ["| size | method | what | trainable | peak MB | x lora | x full | set-up MB | training adds MB "
           "| peak - imports MB | grads at step MB | opt. state MB | ms/step | x lora | x full "
           "| ms/step (subprocess) |", "|" + "---|" * 16]
    for r in rows:
        lo, fu = _lm_ref(rows, r, "lora"), _lm_ref(rows, r, "full")
        pim = r["peak_rss"] - r["imports"] if r["peak_rss"] is not None and r["imports"] is not None else None
        ratio = lambda a, ref, k: "-" if ref is None or _ratio(a, ref[k]) is None else f"{_ratio(a, ref[k]):.2f}"
        out.append(
            f"| {r['size']} | {r['method']} | {LM_WHAT.get(r['method'], '')} | {r['trainable']:,} "
            f"| {_mb(r['peak'])} | {ratio(r['peak'], lo, 'peak')} | {ratio(r['peak'], fu, 'peak')} "
            f"| {_mb(r['setup'])} | {_mb(r['train'])} | {_mb(pim)} | {_mb(r['grad'])} | {_mb(r['state'])} "
            f"| {_ms(r['t'])} | {ratio(r['t'], lo, 't')} | {ratio(r['t'], fu, 't')} | {_ms(r['t_sub'])} |")
    return out


def lm_paired_table(paired: list[dict]) -> list[str]:
    out = []
    for e in paired:
        p = e["paired"]
        ref = p["methods"][0]
        out += [f"Size {e['size']}, {e['device']}, {p['rounds']} rounds (load average at the end: "
                f"{_load(p.get('loadavg'))}):", "",
                f"| method | ms/step (median) | time / {ref} (median of per-round ratios) | per-round ratios |",
                "|---|---|---|---|"]
        for m in p["methods"]:
            per = [a / b for a, b in zip(p["step_s"][m], p["step_s"][ref])]
            out.append(f"| {m} | {_ms(p['median_s'][m])} | {p['ratio_vs'][ref][m]:.3f} "
                       f"| {', '.join(f'{x:.2f}' for x in per)} |")
        out.append("")
    return out[:-1] if out else out


def lm_goals(rows: list[dict], paired: list[dict]) -> list[str]:
    out = ["| goal | size | device | target | measured | from | status |", "|---|---|---|---|---|---|---|"]
    found = False
    for key in sorted({(r["device"], r["size"]) for r in rows}):
        by = {r["method"]: r for r in rows if (r["device"], r["size"]) == key}
        for label, a, b, kind, target in LM_GOALS:
            if a not in by or b not in by:
                continue
            src = "separate cases (pytest-benchmark medians)" if kind == "time" else (
                "CUDA max_memory_allocated" if key[0] == "cuda" else "peak RSS over the steps")
            v = _ratio(by[a]["peak" if kind == "peak" else "t"], by[b]["peak" if kind == "peak" else "t"])
            if kind == "time":
                pe = next((e["paired"] for e in paired if (e["device"], e["size"]) == key
                           and a in e["paired"]["methods"] and e["paired"]["methods"][0] == b), None)
                if pe:
                    v, src = pe["ratio_vs"][b][a], f"interleaved, {pe['rounds']} rounds"
            if v is None:
                continue
            found = True
            out.append(f"| {label} | {key[1]} | {key[0]} | <= {target:g} | {v:.3f} | {src} "
                       f"| {'met' if v <= target else 'not met'} |")
            if kind == "peak" and key[0] == "cpu":
                ia, ib = by[a].get("imports"), by[b].get("imports")
                if ia is not None and ib is not None and by[a]["peak_rss"] and by[b]["peak_rss"]:
                    w = (by[a]["peak_rss"] - ia) / (by[b]["peak_rss"] - ib)
                    out.append(f"| {label}, without the libraries (peak - RSS after imports) | {key[1]} | {key[0]} "
                               f"| <= {target:g} | {w:.3f} | peak RSS - RSS after imports | "
                               f"{'met' if w <= target else 'not met'} |")
    return out if found else []


def _pyplot(what: str):
    """matplotlib.pyplot with the Agg backend, or None (and a line on stderr) without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"matplotlib is not installed: no {what}", file=sys.stderr)
        return None
    return plt


def lm_plot(rows: list[dict], path: Path) -> bool:
    plt = _pyplot("LM plot")
    if plt is None:
        return False
    panels = sorted({(r["device"], r["size"]) for r in rows}, key=lambda k: (k[0], {"tiny": 0, "small": 1}.get(k[1], 2)))
    if not panels:
        return False
    fig, axes = plt.subplots(len(panels), 2, figsize=(13, 3.8 * len(panels)), squeeze=False)
    for (dev, size), (ax_m, ax_t) in zip(panels, axes):
        sel = [r for r in rows if (r["device"], r["size"]) == (dev, size)]
        names = [r["method"] for r in sel]
        x = range(len(sel))
        if dev == "cuda":
            ax_m.bar(x, [(r["peak"] or 0) / 1e6 for r in sel], color="C0", label="CUDA max allocated")
        else:
            base = [(r["imports"] or 0) / 1e6 for r in sel]
            setup = [((r["setup"] or 0) - (r["imports"] or 0)) / 1e6 for r in sel]
            train = [max(0, (r["peak"] or 0) - (r["setup"] or 0)) / 1e6 for r in sel]
            ax_m.bar(x, base, color="0.75", label="after imports")
            ax_m.bar(x, setup, bottom=base, color="C0", label="model, masks, optimizer (set-up)")
            ax_m.bar(x, train, bottom=[a + b for a, b in zip(base, setup)], color="C3", label="added by training steps")
        for i, r in enumerate(sel):
            if r["peak"]:
                ax_m.text(i, r["peak"] / 1e6, f"{r['peak'] / 1e6:.0f}", ha="center", va="bottom", fontsize=7)
        ax_m.set_ylim(0, 1.3 * max((r["peak"] or 0) / 1e6 for r in sel))  # room for the legend
        ax_m.set_xticks(list(x), names, rotation=30, ha="right", fontsize=8)
        ax_m.set_ylabel("peak memory, MB")
        ax_m.set_title(f"LM step, {size}, {dev}: peak memory", fontsize=10)
        ax_m.legend(fontsize=7, loc="upper right")
        ax_m.grid(axis="y", alpha=0.3)
        ax_t.bar(x, [r["t"] * 1e3 for r in sel], color=["C2" if n.startswith("fastmask") else "C7" for n in names])
        lora = next((r["t"] for r in sel if r["method"] == "lora"), None)
        if lora:
            ax_t.axhline(lora * 1e3, color="k", lw=0.8, ls="--", label="lora")
            ax_t.axhline(1.1 * lora * 1e3, color="k", lw=0.8, ls=":", label="1.1 x lora (goal)")
            ax_t.legend(fontsize=7, loc="upper right")
            ax_t.set_ylim(0, 1.25 * max(r["t"] * 1e3 for r in sel))
        ax_t.set_xticks(list(x), names, rotation=30, ha="right", fontsize=8)
        ax_t.set_ylabel("ms per step (median)")
        ax_t.set_title(f"LM step, {size}, {dev}: time per step (separate cases)", fontsize=10)
        ax_t.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def _block(text: str | None, start: str, end: str) -> str | None:
    """The part of ``text`` from the marker ``start`` to the marker ``end``, markers included."""
    if not text:
        return None
    a, b = text.find(start), text.find(end)
    return text[a : b + len(end)] if 0 <= a < b else None


def _splice(text: str, start: str, end: str, block: str) -> str:
    """``text`` with its ``start``..``end`` part replaced by ``block`` (appended if it has none)."""
    a, b = text.find(start), text.find(end)
    if 0 <= a < b:
        return text[:a] + block + text[b + len(end):]
    return text.rstrip("\n") + "\n\n" + block + "\n"


def _lm_notes(text: str | None) -> str | None:
    return _block(text, LM_NOTES_START, LM_NOTES_END)


def _lm_block(text: str | None) -> str | None:
    return _block(text, LM_START, LM_END)


GPU_START, GPU_END = "<!-- gpu:start -->", "<!-- gpu:end -->"


def gpu_block(summary: str) -> str:
    """The GPU section of ``RESULTS.md``, markers included, from the ``SUMMARY.md`` that
    ``scripts/gpu_check.sh`` writes (GPU name, date, versions, each stage's status, the tables)."""
    body = summary.strip().splitlines()
    if body and body[0].startswith("# "):
        body = body[1:]
    return "\n".join([GPU_START, "## GPU (`scripts/gpu_check.sh`)", "",
                      "Copied from the `SUMMARY.md` of the run below by `python -m bench.report --gpu-summary "
                      "<its output folder>` (which `gpu_check.sh` calls at its end); that folder also holds the "
                      "logs, `bench-gpu.json`, `RESULTS-gpu.md` and `lm-gpu.jsonl`. A CPU report keeps this section.",
                      *body, GPU_END])


def render_lm(data: dict, json_name: str, png_name: str | None, notes: str | None = None) -> str:
    """The LM section, markers included."""
    bms = data["benchmarks"]
    rows = lm_rows(bms)
    paired = lm_paired(bms)
    lines = [LM_START, "## Language-model training step: fastmask vs LoRA vs dense AdamW", "",
             f"Generated by `python -m bench.report {json_name}` from `bench/test_lm_step.py` "
             "(`bench/lm_step.py` has the set-up). One training step (forward, backward, optimizer step) of a "
             "randomly initialised `transformers.LlamaForCausalLM` built from a config (nothing downloaded), "
             "bf16 parameters, random token ids as their own labels; lr 1e-5, weight decay 0. Target set: "
             "all MLP weights (`gate_proj`, `up_proj`, `down_proj` of every layer: "
             "`find_targets(model, 'hf_llama_mlp')`; the detected preset `hf_llama` leaves `down_proj` out); "
             "everything else frozen except for `full`. fastmask masks: `fastmask.select` per tensor on "
             "uniform random scores (masks are not what is measured). Memory: a fresh subprocess per case; "
             "`peak` is the peak RSS over one warm-up and 3 timed steps (`VmHWM`, reset right after set-up "
             "via `/proc/self/clear_refs`), or `torch.cuda.max_memory_allocated` on a GPU; `set-up` the RSS "
             "with model, data, masks and optimizer built; `peak - imports` leaves out the ~0.5 GB of "
             "Python, torch, transformers and peft that every case has. `grads at step`: bytes of `.grad` "
             "held right after `backward()` (0 with the step in backward). Time: pytest-benchmark's median "
             "in the test process; the subprocess's median is a cross-check; the interleaved table is the "
             "one to trust for ratios on a shared machine.", ""]
    lines += _machine(data)
    lines += ["", "Reproduce (about 8 minutes on 2 cores; one thread, so that other processes on a shared machine "
              "cannot stall OpenMP's barriers): `OMP_NUM_THREADS=1 python -m pytest bench/test_lm_step.py "
              "--benchmark-only --lm-size tiny,400m --paired-rounds 7 --benchmark-json=bench/results-lm-cpu.json && "
              "python -m bench.report bench/results-lm-cpu.json`; one case: `python -m bench.lm_step --size 400m "
              "--method fastmask_1_bwd --steps 3 --json`"]
    if notes:
        lines += ["", notes]
    goals = lm_goals(rows, paired)
    if goals:
        lines += ["", "### Goals", ""] + goals
    if rows:
        lines += ["", "### Memory and time per method", ""] + lm_table(rows)
    if paired:
        lines += ["", "### Time per step, interleaved in one process", ""] + lm_paired_table(paired)
    if png_name:
        lines += ["", f"![LM step: peak memory and time per step]({png_name})"]
    lines.append(LM_END)
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------
# plot
# ------------------------------------------------------------------------------------------------
def plot(benchmarks: list[dict], path: Path) -> bool:
    plt = _pyplot("plot")
    if plt is None:
        return False
    groups = _ms_groups(benchmarks, paired=True)
    source = "interleaved runs"
    if not groups:
        groups, source = _ms_groups(benchmarks, paired=False), "separate cases"
    # {(device, dtype, shape_set, mask): {(density, impl): seconds}}
    data: dict[tuple, dict[tuple, float]] = defaultdict(dict)
    for (device, dtype, shape_set, mask, density), impls in groups.items():
        for impl, (t, _) in impls.items():
            data[(device, dtype, shape_set, mask)][(density, impl)] = t
    order = {"tiny": 0, "vitb16": 1, "vitl14": 2}
    panels = sorted(data, key=lambda k: (k[0], k[1], order.get(k[2], 9), k[3]))
    if not panels:
        return False
    impls = sorted({i for v in data.values() for (_, i) in v}, key=lambda s: (not s.startswith("fastmask"), s))
    ncol = 2
    nrow = -(-len(panels) // ncol)
    fig, axes = plt.subplots(nrow, ncol, figsize=(6.5 * ncol, 3.6 * nrow), squeeze=False)
    width = 0.8 / len(impls)
    for ax, panel in zip(axes.flat, panels):
        sel = data[panel]
        dens = sorted({d for (d, _) in sel})
        for j, impl in enumerate(impls):
            ys = [sel.get((d, impl), float("nan")) * 1e3 for d in dens]
            ax.bar([i + (j - (len(impls) - 1) / 2) * width for i in range(len(dens))], ys, width, label=impl)
        ax.set_xticks(range(len(dens)), [f"density {d:g}" for d in dens])
        ax.set_yscale("log")
        ax.set_ylabel("ms per step (median)")
        ax.set_title(f"masked step ({source}): {panel[2]}, {panel[3]} masks, {panel[1]}, {panel[0]}", fontsize=10)
        ax.grid(axis="y", which="both", alpha=0.3)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 6), fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.5 / (3.6 * nrow), 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


NOTES_START, NOTES_END = "<!-- notes:start -->", "<!-- notes:end -->"


def _notes(path: Path) -> str | None:
    if not path.is_file():
        return None
    text = path.read_text()
    a, b = text.find(NOTES_START), text.find(NOTES_END)
    return text[a : b + len(NOTES_END)] if 0 <= a < b else None


def render(data: dict, json_name: str, png_name: str | None, notes: str | None = None) -> str:
    bms = data["benchmarks"]
    rows = masked_step_rows(bms)
    prows = masked_step_rows(bms, paired=True)
    bar_rows, bar_src = (prows, "the interleaved (paired) runs") if prows else (rows, "the separate cases")
    lines = ["# fastmask benchmark results", "", f"Generated by `python -m bench.report {json_name}` from a "
             "pytest-benchmark JSON. Times are medians of each case's rounds.", "", "## Machine and run", ""]
    lines += _machine(data)
    lines += ["", "Reproduce (from the repository root; about 5 minutes on 2 idle cores):", "", "```",
              "python -m pytest bench/ --benchmark-only --benchmark-json=bench/results-cpu.json && "
              "python -m bench.report bench/results-cpu.json", "```", "",
              "CI smoke (every bench file once, tiny set): `python -m pytest bench/ --benchmark-disable --shapes tiny`"]
    if notes:
        lines += ["", notes]
    lines += ["", "## Speed bars (masked step)", "",
              f"From {bar_src}. Targets are for the best fastmask backend available on the device "
              "(on a CPU, the C++ extension).", ""] + bars_section(bar_rows)
    lines += ["", "## Masked step: best fastmask backend vs the dense baselines of the same run", "",
              "`x fused` = time of mask-multiply + `AdamW(fused=True)` / time of the best fastmask backend (higher "
              "is better); likewise `x foreach` (mask-multiply + `AdamW(foreach=True)`), `x original` (SPU-code "
              "style: Python loop of dense fp32 mask multiplies, one group per parameter, `AdamW(foreach=False)`) "
              "and `x reference` (fastmask's reference backend). `floor MB`: the line-level byte floor of the "
              "masked step on this device (DESIGN.md section 5); `dense MB`: N x 40 B, what the dense baselines "
              "move; `max gain`: dense / floor, the most a bandwidth-bound masked step can gain. `eff. GB/s`: floor "
              "bytes / best time; `fused GB/s`: dense bytes / fused time. `state B/K`: bytes in `opt.state` "
              "(int32 indices + fp32 exp_avg, exp_avg_sq) per selected entry.", ""]
    if prows:
        lines += ["### Interleaved (paired) comparison", "",
                  "`test_masked_step_paired`: every implementation of a case is called in turn, rotating the "
                  "order, for `--paired-rounds` rounds, so all see the same machine conditions; medians of those "
                  "calls. These ratios are the ones to trust on a busy machine.", ""]
        lines += masked_step_table(prows)
        lines += ["", "### Separate cases (pytest-benchmark, one case at a time)", ""]
    lines += masked_step_table(rows)
    if rows and len({n for r in rows for n in r["backends"]}) > 0:
        lines += ["", "### Every fastmask backend (ms, median)", ""] + backends_table(rows)
    if png_name:
        lines += ["", f"![masked step times]({png_name})"]
    st = score_table(bms)
    if st:
        lines += ["", "## Score accumulation (one pass over the target set)", "",
                  "fastmask's `score_accumulate_` vs the PyTorch loop and foreach ops; `copy` "
                  "(`torch._foreach_copy_` of the gradients into the scores) is the bandwidth reference. Bytes: "
                  "N x (8 + elem) for an accumulation, N x (4 + elem) for the copy.", ""] + st
    sg = sampled_grad_table(bms)
    if sg:
        lines += ["", "## Sampled weight gradient (a linear layer's weight gradient at the masked entries)", "",
                  "`bench/test_sampled_grad.py`: `fastmask.ops.sampled_weight_grad(grad_out [T, out], input [T, in], "
                  "idx)` per backend vs `dense+gather`, `(grad_out.t() @ input).view(-1)[idx]` in the input dtype "
                  "(what autograd computes, then the entries a masked step reads). `x dense` = dense time / the "
                  "backend's time (higher = the sampled op faster); GFLOP/s counts 2 K T. Random masks; every "
                  "result checked against the float64 product before timing.", ""] + sg
    sl = select_table(bms)
    if sl:
        lines += ["", "## Selection (`fastmask.select` of all target tensors)", ""] + sl
    tt = train_table(bms)
    if tt:
        lines += ["", "## End-to-end training step", "",
                  "Forward + backward + optimizer step on random images/captions, CLIP contrastive loss. "
                  "Methods: `fastmask` (SPU's trainable set: c_fc weights masked at 10% from `fastmask.score`, "
                  "c_fc biases and `visual.proj` dense; `MaskedAdamW`), `adamw_fused+mask` (same set, dense fp32 "
                  "masks multiplied into the grads, fused AdamW), `original` (same, SPU-code style), `full` (every "
                  "parameter, fused AdamW). Memory is measured in a fresh subprocess per case: RSS after building "
                  "model, data, masks and optimizer, and the peak RSS (`VmHWM`) after a warm-up and timed "
                  "steps; their difference is what training adds. Optimizer state = bytes of the tensors in "
                  "`opt.state`.", ""] + tt
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="Markdown report and plot of a fastmask pytest-benchmark JSON.")
    ap.add_argument("json", nargs="?", help="pytest-benchmark JSON (--benchmark-json=...)")
    ap.add_argument("--gpu-summary", metavar="PATH",
                    help="instead of a JSON: put a scripts/gpu_check.sh run's SUMMARY.md (the file, or its output "
                         "folder) into <out>/<name>.md as its GPU section, replacing the previous one")
    ap.add_argument("--out", default="bench", help="output folder (default bench/)")
    ap.add_argument("--name", default="RESULTS", help="markdown file name without .md (default RESULTS)")
    args = ap.parse_args(argv)
    if (args.json is None) == (args.gpu_summary is None):
        ap.error("give a benchmark JSON or --gpu-summary (one of them)")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    md_path = out / f"{args.name}.md"
    old = md_path.read_text() if md_path.is_file() else None
    if args.gpu_summary is not None:
        summary = Path(args.gpu_summary)
        if summary.is_dir():
            summary = summary / "SUMMARY.md"
        if not summary.is_file():
            ap.error(f"--gpu-summary: {summary} does not exist (run scripts/gpu_check.sh first)")
        block = gpu_block(summary.read_text())
        md_path.write_text(_splice(old, GPU_START, GPU_END, block) if old else block + "\n")
        print(f"wrote the GPU section of {md_path} from {summary}")
        return 0
    data = load(args.json)
    if not data["benchmarks"]:
        ap.error(f"{args.json} holds no benchmark cases")
    bms = data["benchmarks"]
    lm = [b for b in bms if is_lm(b)]
    rest = [b for b in bms if not is_lm(b)]
    stem = Path(args.json).stem
    written = []
    lm_block = _lm_block(old)
    if lm:
        lm_png = out / (stem + ("-lm.png" if rest else ".png"))
        have_lm_png = lm_plot(lm_rows(lm), lm_png)
        written += [str(lm_png)] if have_lm_png else []
        lm_block = render_lm({**data, "benchmarks": lm}, args.json, lm_png.name if have_lm_png else None,
                             _lm_notes(lm_block))
    if rest or old is None:
        png = out / (stem + ".png")
        have_png = plot(rest, png) if rest else False
        written += [str(png)] if have_png else []
        md = render({**data, "benchmarks": rest}, args.json, png.name if have_png else None, _notes(md_path))
        if lm_block:
            md += "\n" + lm_block + "\n"
        gpu = _block(old, GPU_START, GPU_END)
        if gpu:
            md += "\n" + gpu + "\n"
    else:  # LM cases only: replace (or append) the LM section, keep everything else as it is
        md = _splice(old, LM_START, LM_END, lm_block)
    md_path.write_text(md)
    print(f"wrote {md_path}" + (f" and {', '.join(written)}" if written else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The job's outputs: the terminal table, ``results.json`` and the plots.

Numbers over seeds are reported as mean ± standard deviation (sample std; 0 with one seed).
"""
from __future__ import annotations

import json
import math
import os
import statistics

SUMMARY_KEYS = ("new_acc", "new_seen_acc", "final_tasks_acc", "final_seen_acc", "control", "control_drop",
                "forgetting", "step_ms", "opt_state_bytes", "grad_bytes", "peak_mem_delta_mb", "score_batches")
#: Plot style per method: (marker, line style, marker size, hollow marker). Methods whose curves
#: coincide (spu and spu-original often do) stay distinguishable by marker, dash and a small offset.
STYLES = {
    "spu": ("o", "-", 6, False),
    "spu-original": ("s", "--", 9, True),
    "full": ("^", "-.", 7, False),
    "frozen": ("*", ":", 11, False),
    "spu-noproj": ("D", (0, (5, 1, 1, 1)), 7, True),
}
COLORS = {"spu": "C0", "spu-original": "C1", "full": "C2", "frozen": "C7", "spu-noproj": "C4"}


def _stats(values: list) -> dict | None:
    values = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    if not values:
        return None
    return dict(mean=statistics.fmean(values), std=statistics.stdev(values) if len(values) > 1 else 0.0,
                n=len(values), values=values)


def aggregate(runs: list[dict]) -> list[dict]:
    """Per (method, lr): every summary number and every per-task curve, over seeds."""
    groups: dict[tuple, list[dict]] = {}
    for r in runs:
        groups.setdefault((r["method"], r["lr"]), []).append(r)
    out = []
    for (method, lr), rs in groups.items():
        row = dict(method=method, lr=lr, seeds=[r["seed"] for r in rs])
        for k in SUMMARY_KEYS:
            row[k] = _stats([r["summary"][k] for r in rs])
        n_tasks = len(rs[0]["tasks"])
        row["curve_new"] = [_stats([r["tasks"][t]["new_own"] for r in rs]) for t in range(n_tasks)]
        row["curve_control"] = [_stats([r["before"]["control"] for r in rs])] + [
            _stats([r["tasks"][t]["control"] for r in rs]) for t in range(n_tasks)]
        out.append(row)
    return out


def _pm(s: dict | None, scale: float = 100.0, fmt: str = "{:.1f}") -> str:
    if s is None:
        return "-"
    if s["n"] > 1:
        return fmt.format(s["mean"] * scale + 0.0) + " ± " + "{:.1f}".format(s["std"] * abs(scale))
    return fmt.format(s["mean"] * scale + 0.0)  # + 0.0: no "-0.0"


def table(results: dict) -> str:
    """The final table: one row per method (and learning rate), numbers after the last task."""
    head = ["method", "lr", "new", "new|seen", "all tasks", "control", "Δcontrol", "forgetting", "ms/step",
            "grads+opt", "RSS Δ"]
    rows = []
    for s in results["summary"]:
        ob = s["opt_state_bytes"]
        rows.append([
            s["method"], "-" if s["lr"] is None else f"{s['lr']:g}", _pm(s["new_acc"]), _pm(s["new_seen_acc"]),
            _pm(s["final_tasks_acc"]), _pm(s["control"]), _pm(s["control_drop"], -100.0, fmt="{:+.1f}"),
            _pm(s["forgetting"]), _pm(s["step_ms"], 1.0),
            "-" if ob is None else f"{(ob['mean'] + s['grad_bytes']['mean']) / 2**10:.0f} KiB",
            _pm(s["peak_mem_delta_mb"], 1.0) + " MiB" if s["peak_mem_delta_mb"] else "-",
        ])
    widths = [max(len(str(x)) for x in col) for col in zip(head, *rows)]
    line = lambda r: "  ".join(str(x).rjust(w) if i else str(x).ljust(w) for i, (x, w) in enumerate(zip(r, widths)))
    seeds = sorted({sd for s in results["summary"] for sd in s["seeds"]})
    scoring = results.get("scoring") or {}
    scored = []
    for method, sc in scoring.items():
        n = [s["score_batches"]["mean"] for s in results["summary"] if s["method"] == method and s.get("score_batches")]
        per_task = f" ({sum(n) / len(n):.1f} batches per task)" if n else ""
        scored.append(f"{method}: {sc['description']}{per_task}")
    extra = []
    if scored:
        extra.append("scoring: " + "; ".join(scored) + ".")
    base = results.get("base_model")
    if base:
        extra.append(f"base model: control {100 * base['control']:.1f}% (chance {100 * base['chance']:.1f}%).")
    extra += [f"WARNING: {n}" if "near chance" in n else f"note: {n}" for n in results.get("notes", [])]
    notes = (
        f"After the last of {len(results['tasks'])} tasks {results['tasks']}; seeds {seeds} (mean ± std); accuracies in %.\n"
        "new: each task's accuracy right after learning it, its own class prompts, averaged over tasks; "
        "new|seen: the same among all classes seen so far (base classes included, if any);\n"
        "all tasks: mean accuracy over all tasks at the end (own prompts); control: held-out control set "
        f"({len(results['control_classes'])} classes of the base model); Δcontrol: change from the base model;\n"
        "forgetting: mean drop of earlier tasks from their best accuracy; ms/step: forward+backward+step;\n"
        "grads+opt: bytes of the gradients after backward plus the optimizer state; RSS Δ: " + results["memory_measure"] + "."
    )
    return "\n".join([line(head), line(["-" * w for w in widths]), *map(line, rows), "", notes, *extra])


def _finite(obj) -> None:
    """Replace NaN/inf by None so the JSON file is standard JSON."""
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def _style(method: str) -> dict:
    marker, dash, size, hollow = STYLES.get(method, ("o", "-", 6, False))
    color = COLORS.get(method)
    return dict(marker=marker, linestyle=dash, markersize=size, color=color,
                markerfacecolor="none" if hollow else color, markeredgewidth=1.5 if hollow else 1.0)


def _plot_curves(results: dict, lr, path: str, plt) -> None:
    """New-task and control accuracy after each task, one line per method, at learning rate ``lr``.
    Each method has its own marker, dash and a small horizontal offset, so coinciding curves stay
    visible."""
    n_tasks = len(results["tasks"])
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    shown = [s for s in results["summary"] if s["lr"] in (lr, None)]
    for i, s in enumerate(shown):
        label = s["method"] + ("" if s["lr"] is None else f" (lr {s['lr']:g})")
        dx = 0.06 * (i - (len(shown) - 1) / 2)
        for ax, key, first in ((axes[0], "curve_new", 1), (axes[1], "curve_control", 0)):
            xs = [x + dx for x in range(first, n_tasks + 1)]
            ax.errorbar(xs, [c["mean"] * 100 for c in s[key]], yerr=[c["std"] * 100 for c in s[key]],
                        capsize=3, label=label, alpha=0.9, **_style(s["method"]))
    axes[0].set(title="new task (own prompts), right after learning it", xlabel="task", ylabel="accuracy (%)",
                xticks=list(range(1, n_tasks + 1)))
    axes[1].set(title="control set (generic knowledge)", xlabel="after task (0: base model)", ylabel="accuracy (%)",
                xticks=list(range(0, n_tasks + 1)))
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _label_points(ax, items: list[tuple]) -> None:
    """Annotate points ``(x, y, text, color)``; labels of points that (nearly) coincide are stacked
    instead of drawn over each other."""
    (x0, x1), (y0, y1) = ax.get_xlim(), ax.get_ylim()
    tol_x, tol_y = 0.04 * (x1 - x0), 0.04 * (y1 - y0)
    clusters: list[list[tuple]] = []
    for item in items:
        for c in clusters:
            if abs(c[0][0] - item[0]) <= tol_x and abs(c[0][1] - item[1]) <= tol_y:
                c.append(item)
                break
        else:
            clusters.append([item])
    for c in clusters:
        for k, (x, y, text, color) in enumerate(c):
            ax.annotate(text, (x, y), textcoords="offset points", xytext=(6, 4 + 9 * k), fontsize=7, color=color)


def plot(results: dict, out: str) -> list[str]:
    """``accuracy.png``: new-task and control accuracy after each task, one line per method, at the
    first learning rate (``accuracy_lr<lr>.png`` for each other rate); with several learning rates,
    ``tradeoff.png``: control vs new-task accuracy, one curve per method, one point per rate."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    summary = results["summary"]
    lrs = [lr for lr in dict.fromkeys(s["lr"] for s in summary) if lr is not None]
    for i, lr in enumerate(lrs or [None]):
        name = "accuracy.png" if i == 0 else f"accuracy_lr{lr:g}.png"
        paths.append(os.path.join(out, name))
        _plot_curves(results, lr, paths[-1], plt)
    if len(lrs) > 1:
        fig, ax = plt.subplots(figsize=(7, 5.5))
        labels = []
        for method in dict.fromkeys(s["method"] for s in summary):
            pts = sorted((s for s in summary if s["method"] == method), key=lambda s: s["lr"] or 0)
            x = [s["control"]["mean"] * 100 for s in pts]
            y = [s["new_acc"]["mean"] * 100 for s in pts]
            style = _style(method)
            ax.errorbar(x, y, xerr=[s["control"]["std"] * 100 for s in pts], yerr=[s["new_acc"]["std"] * 100 for s in pts],
                        capsize=3, label=method, alpha=0.9, **style)
            labels += [(xi, yi, f"{s['lr']:g}", style["color"]) for s, xi, yi in zip(pts, x, y) if s["lr"] is not None]
        ax.set(title="forgetting / learning trade-off (one point per learning rate)",
               xlabel="control accuracy after the last task (%)", ylabel="new-task accuracy (%, mean over tasks)")
        ax.grid(alpha=0.3)
        ax.legend()
        _label_points(ax, labels)
        fig.tight_layout()
        paths.append(os.path.join(out, "tradeoff.png"))
        fig.savefig(paths[-1], dpi=110)
        plt.close(fig)
    return paths


def write(results: dict, out: str, plots: bool = True, log=print) -> None:
    """Print the table; write ``results.json``, ``table.txt`` and the plots into ``out``."""
    os.makedirs(out, exist_ok=True)
    text = table(results)
    results["table"] = text
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(_finite(results), f, indent=1)
    with open(os.path.join(out, "table.txt"), "w") as f:
        f.write(text + "\n")
    log("\n" + text)
    if plots:
        for p in plot(results, out):
            log(f"wrote {p}")
    log(f"wrote {os.path.join(out, 'results.json')}, {os.path.join(out, 'table.txt')}")

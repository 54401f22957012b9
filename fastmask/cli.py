"""The ``fastmask`` command.

    fastmask continual [options]   continual fine-tuning of an open_clip CLIP (SPU vs baselines)
    fastmask info                  backends available here
"""
from __future__ import annotations

import argparse
import sys

from .continual.job import EMBEDDED_DEFAULTS, REAL_DEFAULTS
from .continual.methods import DEFAULT_METHODS


def _floats(text: str) -> tuple[float, ...]:
    return tuple(float(x) for x in text.split(",") if x.strip())


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in text.split(",") if x.strip())


def _names(text: str) -> tuple[str, ...]:
    return tuple(x.strip() for x in text.split(",") if x.strip())


def _defaults(key: str) -> str:
    return f"default: {EMBEDDED_DEFAULTS[key]:g} embedded, {REAL_DEFAULTS[key]:g} with --data"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fastmask", description=__doc__.split("\n\n")[0].strip(),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    c = sub.add_parser(
        "continual", formatter_class=argparse.RawDescriptionHelpFormatter,
        help="continual fine-tuning of an open_clip CLIP with selective updates vs baselines",
        description=(
            "Teach a CLIP a sequence of class-incremental tasks with each method (spu: fastmask's "
            "selective update; spu-original: the original SPU code's masked gradients + dense AdamW; "
            "full: AdamW on all parameters; frozen: no training) and report new-task accuracy, "
            "control-set accuracy (generic knowledge), forgetting, time per step and memory.\n\n"
            "Without --data it runs the embedded default, offline: a small CLIP pretrained by the job "
            "on digits 0-4 of scikit-learn's handwritten digits (cached), then taught [5, 6] and "
            "[7, 8, 9]. With --model/--pretrained/--data/--control it runs on real data."),
        epilog="example: fastmask continual --seeds 0,1,2 --lrs 1e-3,1e-4,3e-5 --out outputs/continual")
    g = c.add_argument_group("run")
    g.add_argument("--methods", type=_names, default=DEFAULT_METHODS,
                   help="comma-separated, from spu, spu-original, full, frozen, spu-noproj "
                        "(spu with visual.proj frozen); default: spu,spu-original,full,frozen")
    g.add_argument("--seeds", type=_ints, default=(0,), help="comma-separated seeds, e.g. 0,1,2 (default: 0)")
    g.add_argument("--lr", type=float, default=None, help="learning rate of every method (" + _defaults("lr") + ")")
    g.add_argument("--lrs", type=_floats, default=None,
                   help="learning-rate sweep, e.g. 1e-3,1e-4,3e-5: every method at every rate, and the trade-off plot")
    g.add_argument("--weight-decay", type=float, default=None, help="AdamW weight decay (" + _defaults("weight_decay") + ")")
    g.add_argument("--batch-size", type=int, default=None, help="(" + _defaults("batch_size") + ")")
    g.add_argument("--epochs", type=int, default=None, help="epochs per task (" + _defaults("epochs") + ")")
    g.add_argument("--density", type=float, default=0.1, help="fraction of each c_fc weight SPU trains (default: 0.1)")
    g.add_argument("--score-fraction", type=float, default=0.25,
                   help="fraction of an epoch of batches to score on (default: 0.25, as the original work)")
    g.add_argument("--score-batches", type=int, default=None, help="number of batches to score on (overrides --score-fraction)")
    g.add_argument("--replay", type=int, default=0, metavar="N",
                   help="keep N training samples of each earlier task and mix them into every batch (default: 0, off)")
    g.add_argument("--replay-batch", type=int, default=None,
                   help="replayed samples per batch (default: a quarter of the batch size)")
    g.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    g.add_argument("--amp", action="store_true", help="bfloat16 autocast for forward passes")
    g.add_argument("--threads", type=int, default=None,
                   help="torch intra-op threads (default: 1 for the embedded default on CPU, torch's default otherwise)")
    g.add_argument("--workers", type=int, default=0, help="DataLoader workers (default: 0)")
    g.add_argument("--out", default="outputs/continual", help="output directory (default: outputs/continual)")
    g.add_argument("--no-plots", dest="plots", action="store_false", help="skip the PNG plots")
    g.add_argument("--no-save-masks", dest="save_masks", action="store_false", help="do not save the masks of each task")
    g.add_argument("--quiet", dest="progress", action="store_false", help="no progress bars")
    g.add_argument("--max-steps", type=int, default=None, help="at most this many training steps per task (smoke tests)")

    r = c.add_argument_group("real data")
    r.add_argument("--model", default=None, help="an open_clip model name, e.g. ViT-B-16")
    r.add_argument("--pretrained", default=None, help="a local checkpoint file for --model (never downloaded)")
    r.add_argument("--data", default=None, help="ImageFolder-style directory (class names from folder names)")
    r.add_argument("--tasks", type=int, default=2, help="number of class-incremental tasks --data is split into (default: 2)")
    r.add_argument("--control", default=None, help="ImageFolder-style directory of the control set")

    e = c.add_argument_group("embedded default")
    e.add_argument("--pretrain-epochs", type=int, default=100, help="pretraining epochs of the base model (default: 100)")
    e.add_argument("--pretrain-lr", type=float, default=2e-3, help="pretraining learning rate (default: 2e-3)")
    e.add_argument("--pretrain-seed", type=int, default=0, help="seed of the (one, cached) base model (default: 0)")
    e.add_argument("--cache-dir", default=None, help="where the pretrained base model is cached "
                   "(default: $XDG_CACHE_HOME/fastmask/continual or ~/.cache/fastmask/continual)")
    e.add_argument("--limit-per-class", type=int, default=None, help="keep this many digit images per class (smoke tests)")

    i = sub.add_parser("info", help="print the backends available here", description="Print fastmask's backends report.")
    del i
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "info":
        from . import backends

        report = backends.report()
        print(report if isinstance(report, str) else report)
        return 0

    import fastmask.compat

    fastmask.compat.patch_torchvision()
    from .continual.job import JobConfig, run

    if args.data is not None and args.model is None:
        build_parser().error("--data needs --model (an open_clip model name) and usually --pretrained")
    fields = {k: v for k, v in vars(args).items() if k != "command"}
    run(JobConfig(**fields))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The fastmask command.

    fastmask continual [options]   continual fine-tuning of an open_clip CLIP (SPU vs baselines)
    fastmask info                  version and the backends available here
    fastmask delta export|apply|revert|info   sparse deltas of trained weights (fastmask.delta)

Every option of ``fastmask continual`` is checked before any model, data or scoring work: a bad
number or list is refused by argparse (exit code 2), a bad path, device, model name or a flag of
the other mode by the job's pre-flight checks (exit code 2), a missing optional package with the
pip command that installs it (exit code 1). Each error is one line that names the flag.
"""
from __future__ import annotations

import argparse
import sys
import textwrap

from ._version import __version__
from .continual import checks
from .continual.job import EMBEDDED_DEFAULTS, REAL_DEFAULTS, SCORE_FRACTION
from .continual.methods import ACCUMULATE_MODES, DEFAULT_METHODS, METHODS, SCORE_LOSSES, SCORE_STOPS


class _Formatter(argparse.HelpFormatter):
    """Wraps each paragraph of a description on its own (argparse's default joins them)."""

    def _fill_text(self, text, width, indent):
        paragraphs = textwrap.dedent(text).strip().split("\n\n")
        return "\n\n".join(textwrap.fill(" ".join(p.split()), width, initial_indent=indent, subsequent_indent=indent)
                           for p in paragraphs)


class _Parser(argparse.ArgumentParser):
    """argparse with a one-line error: ``prog: error: message (see 'prog --help')``, exit code 2."""

    def error(self, message: str):
        fail(self.prog, message)


def fail(prog: str, message: str, code: int = 2):
    sys.stderr.write(f"{prog}: error: {message} (see '{prog} --help')\n" if code == 2 else f"{prog}: error: {message}\n")
    raise SystemExit(code)


def _typed(parse, metavar_doc: str):
    """An argparse type from a parser that raises ``ValueError`` with the message to show."""

    def convert(text: str):
        try:
            return parse(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    convert.__name__ = metavar_doc  # argparse names the type in some messages
    return convert


def _number(field: str):
    return _typed(lambda text: checks.parse_number(text, field), field)


_methods = _typed(lambda t: checks.parse_list(t, "method names", checks.parse_method), "methods")
_seeds = _typed(lambda t: checks.parse_list(t, "seeds", checks.parse_seed), "seeds")
_lrs = _typed(lambda t: checks.parse_list(t, "learning rates", checks.parse_lr), "learning rates")


def _defaults(key: str) -> str:
    return f"default: {EMBEDDED_DEFAULTS[key]:g} embedded, {REAL_DEFAULTS[key]:g} with --data"


def _version_text() -> str:
    import platform

    import torch

    return f"fastmask {__version__} (torch {torch.__version__}, Python {platform.python_version()})"


DESCRIPTION = """
Teach a CLIP a sequence of class-incremental tasks with each method and report new-task accuracy,
control-set accuracy (generic knowledge), forgetting, time per step and memory. Methods: spu
(fastmask's selective update: compact masks and MaskedAdamW), spu-original (the original SPU
code: dense masks multiplied into the gradients, stock AdamW, and its own scoring), full (AdamW
on all parameters), frozen (no training), spu-noproj (spu with visual.proj frozen, opt-in).

Without --data it runs the embedded default, offline: a small CLIP pretrained by the job on digits
0-4 of scikit-learn's handwritten digits (cached), then taught [5, 6] and [7, 8, 9]. With --model,
--pretrained, --data and --control it runs on real data (ImageFolder directories).

Every option is checked before any work starts. Progress bars are drawn only on a terminal
(--progress); otherwise the job prints one line per task.
"""


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="fastmask", formatter_class=_Formatter,
                     description="fastmask: fast, exact selective parameter updates (SPU) for foundation models. "
                                 "Run 'fastmask COMMAND --help' for a command's options.")
    parser.add_argument("--version", action="version", version=_version_text())
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", title="commands")
    sub.required = True

    c = sub.add_parser(
        "continual", formatter_class=_Formatter, description=DESCRIPTION,
        help="continual fine-tuning of an open_clip CLIP with selective updates vs baselines",
        epilog="example: fastmask continual --seeds 0,1,2 --lrs 1e-3,1e-4,3e-5 --out outputs/continual")
    g = c.add_argument_group("training")
    g.add_argument("--methods", type=_methods, default=DEFAULT_METHODS, metavar="M,M,...",
                   help=f"comma-separated, from {', '.join(METHODS)} (default: {','.join(DEFAULT_METHODS)})")
    g.add_argument("--seeds", type=_seeds, default=(0,), metavar="S,S,...",
                   help="comma-separated seeds, e.g. 0,1,2 (default: 0)")
    lr = g.add_mutually_exclusive_group()
    lr.add_argument("--lr", type=_number("lr"), default=None, help="learning rate of every method (" + _defaults("lr") + ")")
    lr.add_argument("--lrs", type=_lrs, default=None, metavar="LR,LR,...",
                    help="learning-rate sweep, e.g. 1e-3,1e-4,3e-5: every method at every rate, and the trade-off plot")
    g.add_argument("--weight-decay", type=_number("weight_decay"), default=None,
                   help="AdamW weight decay (" + _defaults("weight_decay") + ")")
    g.add_argument("--batch-size", type=_number("batch_size"), default=None, help="(" + _defaults("batch_size") + ")")
    g.add_argument("--epochs", type=_number("epochs"), default=None, help="epochs per task (" + _defaults("epochs") + ")")
    g.add_argument("--density", type=_number("density"), default=0.1,
                   help="fraction of each c_fc weight SPU trains, in (0, 1] (default: 0.1)")
    g.add_argument("--replay", type=_number("replay"), default=0, metavar="N",
                   help="keep N training samples of each earlier task and mix them into every batch (default: 0, off)")
    g.add_argument("--replay-batch", type=_number("replay_batch"), default=None, metavar="N",
                   help="replayed samples per batch, with --replay (default: a quarter of the batch size)")
    g.add_argument("--fused", action="store_true",
                   help="fused=True for every optimizer (default: PyTorch's default AdamW implementation; "
                        "on a CPU the single-tensor loop)")
    g.add_argument("--max-steps", type=_number("max_steps"), default=None,
                   help="at most this many training steps per task (smoke tests)")

    s = c.add_argument_group("scoring (spu, spu-original, spu-noproj)")
    amount = s.add_mutually_exclusive_group()
    amount.add_argument("--score-fraction", type=_number("score_fraction"), default=None,
                        help=f"fraction of an epoch of batches to score on, in (0, 1] (default: {SCORE_FRACTION:g}, "
                             "as the original work)")
    amount.add_argument("--score-batches", type=_number("score_batches"), default=None, metavar="N",
                        help="number of batches to score on, instead of --score-fraction")
    s.add_argument("--score-loss", choices=SCORE_LOSSES, default=None,
                   help="contrastive: the training loss; l2-logits: the original code's squared L2 norm of the "
                        "image-to-text logits, no labels (default: contrastive for spu, l2-logits for spu-original)")
    s.add_argument("--score-accumulate", choices=ACCUMULATE_MODES, default=None,
                   help="batch-sum: each batch's gradient once; running-sum: the original code's never-zeroed "
                        "gradients, early batches weigh more (default: batch-sum for spu, running-sum for spu-original)")
    s.add_argument("--score-stop", choices=SCORE_STOPS, default=None,
                   help="fixed: exactly the scoring batches (ceil of the fraction); original: the original loop's "
                        "floor(fraction x batches) + 2 batches, then on while any score is below 1e-12, to the end "
                        "of the epoch at most (default: fixed for spu, original for spu-original)")

    r = c.add_argument_group("device and output")
    r.add_argument("--device", default="cpu", help="torch device: cpu, cuda, cuda:N, ... (default: cpu)")
    r.add_argument("--amp", action="store_true", help="bfloat16 autocast for forward passes (slow on a CPU, see the note it prints)")
    r.add_argument("--threads", type=_number("threads"), default=None,
                   help="torch intra-op threads (default: 1 for the embedded default on CPU, torch's default otherwise)")
    r.add_argument("--workers", type=_number("workers"), default=0, help="DataLoader workers (default: 0)")
    r.add_argument("--out", default="outputs/continual", help="output directory (default: outputs/continual)")
    r.add_argument("--no-plots", dest="plots", action="store_false", help="skip the PNG plots")
    r.add_argument("--no-save-masks", dest="save_masks", action="store_false", help="do not save the masks of each task")
    bars = r.add_mutually_exclusive_group()
    bars.add_argument("--progress", choices=("auto", "always", "never"), default="auto",
                      help="progress bars: auto draws them only when stderr is a terminal (default: auto)")
    bars.add_argument("--quiet", dest="progress", action="store_const", const="never", help="same as --progress never")

    d = c.add_argument_group("real data")
    d.add_argument("--model", default=None, help="an open_clip ViT CLIP name, e.g. ViT-B-16")
    d.add_argument("--pretrained", default=None, help="a local checkpoint file for --model (never downloaded)")
    d.add_argument("--data", default=None, help="ImageFolder-style directory (class names from folder names)")
    d.add_argument("--tasks", type=_number("tasks"), default=None,
                   help="number of class-incremental tasks --data is split into (default: 2)")
    d.add_argument("--control", default=None, help="ImageFolder-style directory of the control set")

    e = c.add_argument_group("embedded default (without --data)")
    e.add_argument("--pretrain-epochs", type=_number("pretrain_epochs"), default=None,
                   help=f"pretraining epochs of the base model (default: {EMBEDDED_DEFAULTS['pretrain_epochs']})")
    e.add_argument("--pretrain-lr", type=_number("pretrain_lr"), default=None,
                   help=f"pretraining learning rate (default: {EMBEDDED_DEFAULTS['pretrain_lr']:g})")
    e.add_argument("--pretrain-seed", type=_number("pretrain_seed"), default=None,
                   help="seed of the (one, cached) base model (default: 0)")
    e.add_argument("--cache-dir", default=None, help="where the pretrained base model is cached "
                   "(default: $XDG_CACHE_HOME/fastmask/continual or ~/.cache/fastmask/continual)")
    e.add_argument("--limit-per-class", type=_number("limit_per_class"), default=None,
                   help="keep this many digit images per class, at least 2 (smoke tests)")

    _add_delta(sub)
    sub.add_parser("info", formatter_class=_Formatter, help="print the version and the backends available here",
                   description="Print fastmask's version, torch's, and which backend serves which device.")
    return parser


DELTA_DESCRIPTION = """
Sparse deltas: what training changed, against the base weights, as (indices, XOR bits) per masked
tensor plus whole tensors for the dense extras, in one safetensors file with a SHA-256 fingerprint
of every base tensor. apply and revert are bit-exact and refuse weights the delta was not made for.
Checkpoints are state dicts in .safetensors files or torch checkpoints.
"""


def _add_delta(sub) -> None:
    d = sub.add_parser("delta", formatter_class=_Formatter, description=DELTA_DESCRIPTION,
                       help="export, apply, revert or describe a sparse delta of trained weights")
    ds = d.add_subparsers(dest="delta_command", metavar="ACTION", title="actions")
    ds.required = True
    e = ds.add_parser("export", formatter_class=_Formatter, help="write the delta of --trained against --base",
                      description="Write what training changed (--trained against --base) at the entries of --masks, "
                                  "plus the --dense tensors whole, to one delta file.",
                      epilog="example: fastmask delta export --base base.safetensors --trained trained.safetensors "
                             "--masks masks.safetensors --dense 'visual.proj,*.bias' -o delta.safetensors")
    e.add_argument("--base", required=True, help="base checkpoint (.safetensors or torch state dict)")
    e.add_argument("--trained", required=True, help="trained checkpoint (same names, shapes, dtypes)")
    e.add_argument("--masks", required=True, help="MaskSet file (fastmask.MaskSet.save)")
    e.add_argument("--dense", default=None, metavar="NAME,GLOB,...",
                   help="tensors stored whole, comma-separated names or glob patterns, e.g. 'visual.proj,*.bias'")
    e.add_argument("--no-strict", dest="strict", action="store_false",
                   help="keep only what the masks and --dense cover, even if training changed more")
    e.add_argument("-o", "--out", required=True, help="delta file to write (.safetensors)")
    a = ds.add_parser("apply", formatter_class=_Formatter, help="base checkpoint + delta -> trained checkpoint",
                      description="Apply a delta to the base weights it was made for, bit for bit.")
    a.add_argument("--base", required=True, help="base checkpoint")
    a.add_argument("--delta", required=True, help="delta file")
    a.add_argument("-o", "--out", required=True, help="checkpoint to write (.safetensors, else torch.save)")
    r = ds.add_parser("revert", formatter_class=_Formatter, help="trained checkpoint - delta -> base checkpoint",
                      description="Undo a delta on the weights it produced, bit for bit.")
    r.add_argument("--trained", required=True, help="trained (delta-applied) checkpoint")
    r.add_argument("--delta", required=True, help="delta file")
    r.add_argument("-o", "--out", required=True, help="checkpoint to write (.safetensors, else torch.save)")
    i = ds.add_parser("info", formatter_class=_Formatter, help="sizes, tensors, counts, vs the full model and LoRA",
                      description="Describe a delta file: per tensor kind, dtype, shape, selected count and bytes; "
                                  "the file size against the full model and against a LoRA adapter with the same "
                                  "number of trainable entries (rank r of a [out, in] weight: r*(in+out) entries).")
    i.add_argument("delta", help="delta file")


def _delta_main(args) -> int:
    from . import delta
    from .masks import MaskSet

    prog = f"fastmask delta {args.delta_command}"

    def load(flag: str, path: str, loader):
        try:
            return loader(path)
        except (OSError, ValueError, TypeError, KeyError, IndexError) as exc:
            msg = _message(exc)
            fail(prog, f"{flag} {msg}" if msg.startswith(path) else f"{flag} {path}: {msg}", code=2)

    try:
        if args.delta_command == "export":
            base = load("--base", args.base, delta.load_state_dict)
            trained = load("--trained", args.trained, delta.load_state_dict)
            masks = load("--masks", args.masks, MaskSet.load)
            report = delta.export(trained, base, masks, args.out, dense=args.dense, strict=args.strict)
            print(delta.format_info(report))
        elif args.delta_command in ("apply", "revert"):
            flag, src = ("--base", args.base) if args.delta_command == "apply" else ("--trained", args.trained)
            state = load(flag, src, delta.load_state_dict)
            try:
                getattr(delta, args.delta_command)(state, args.delta)
            except (OSError, ValueError, TypeError, KeyError, IndexError) as exc:
                fail(prog, f"--delta {_message(exc)}" + (f" (checked against {flag} {src})" if "model" in str(exc)
                                                         or "SHA-256" in str(exc) else ""), code=2)
            delta.save_state_dict(state, args.out)
            print(f"{args.out}: written ({args.delta_command} of {args.delta})")
        else:
            print(delta.format_info(load("delta file", args.delta, delta.info)))
    except (OSError, ValueError, TypeError, KeyError, IndexError) as exc:
        fail(prog, _message(exc), code=2)
    return 0


def _message(exc: BaseException) -> str:
    """One line: KeyError's text without its quotes, OSError's with the file name."""
    if isinstance(exc, KeyError) and exc.args:
        text = str(exc.args[0])
    elif isinstance(exc, OSError) and exc.filename and exc.strerror:
        text = f"{exc.filename}: {exc.strerror}"
    else:
        text = str(exc)
    return " ".join(text.split())


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "delta":
        return _delta_main(args)
    if args.command == "info":
        from . import backends

        print(_version_text())
        print(backends.report())
        return 0

    from .continual.job import ConfigError, JobConfig, MissingDependency, run

    fields = {k: v for k, v in vars(args).items() if k != "command"}
    try:
        run(JobConfig(**fields))  # checks every setting first, before any work
    except ConfigError as exc:
        fail("fastmask continual", str(exc))
    except MissingDependency as exc:
        fail("fastmask continual", str(exc), code=1)
    except KeyboardInterrupt:
        sys.stderr.write("fastmask continual: interrupted\n")
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())

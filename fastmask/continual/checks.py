"""Checks of the job's settings, all made before any model, data or scoring work.

Two stages, both raising :class:`ConfigError` (a ``ValueError`` whose message starts with the
command-line flag it is about) or :class:`MissingDependency` (an ``ImportError`` naming the pip
command that installs what is missing):

- :func:`check_values` (called by :func:`.job.resolve`): numbers in range, lists well formed,
  flags that belong to the other mode (real data vs the embedded default). No I/O.
- :func:`preflight` (called by :func:`.job.run` first): optional dependencies, the device, the
  files and directories (``--data``/``--control`` are scanned, ``--out`` and ``--cache-dir`` are
  created and probed for writing) and the ``--model`` name. Returns notes for the log: what is
  degraded (no plots without matplotlib) or misleading (``--amp`` on a CPU).

The command line uses the same range table (:data:`RANGES`) for its argparse types, so a bad number
is refused while parsing, with argparse's exit code 2.
"""
from __future__ import annotations

import difflib
import importlib.util
import math
import os
import tempfile

from . import methods as Mth

#: The pip command that installs everything the job needs.
INSTALL_HINT = "pip install 'fastmask[job]'"
SEED_MAX = 2**32 - 1


class ConfigError(ValueError):
    """A bad setting of the job. ``flag`` is the command-line option it is about."""

    def __init__(self, flag: str, message: str) -> None:
        super().__init__(f"{flag}: {message}")
        self.flag, self.message = flag, message


class MissingDependency(ImportError):
    """An optional dependency the requested run needs is not installed."""


# field: (flag, integer, low, high, low_open, high_open); None: no bound.
RANGES: dict[str, tuple] = {
    "lr": ("--lr", False, 0.0, None, True, False),
    "weight_decay": ("--weight-decay", False, 0.0, None, False, False),
    "batch_size": ("--batch-size", True, 1, None, False, False),
    "epochs": ("--epochs", True, 1, None, False, False),
    "density": ("--density", False, 0.0, 1.0, True, False),
    "score_fraction": ("--score-fraction", False, 0.0, 1.0, True, False),
    "score_batches": ("--score-batches", True, 1, None, False, False),
    "replay": ("--replay", True, 0, None, False, False),
    "replay_batch": ("--replay-batch", True, 1, None, False, False),
    "threads": ("--threads", True, 1, None, False, False),
    "workers": ("--workers", True, 0, None, False, False),
    "max_steps": ("--max-steps", True, 1, None, False, False),
    "tasks": ("--tasks", True, 1, None, False, False),
    "pretrain_epochs": ("--pretrain-epochs", True, 1, None, False, False),
    "pretrain_lr": ("--pretrain-lr", False, 0.0, None, True, False),
    "pretrain_seed": ("--pretrain-seed", True, 0, SEED_MAX, False, False),
    "limit_per_class": ("--limit-per-class", True, 2, None, False, False),
}
#: Settings that only the embedded default uses, and those that only real data uses.
EMBEDDED_ONLY = ("pretrain_epochs", "pretrain_lr", "pretrain_seed", "cache_dir", "limit_per_class")
REAL_ONLY = ("model", "pretrained", "control", "tasks")
CHOICES = {
    "score_loss": ("--score-loss", Mth.SCORE_LOSSES),
    "score_accumulate": ("--score-accumulate", Mth.ACCUMULATE_MODES),
    "score_stop": ("--score-stop", Mth.SCORE_STOPS),
}


def flag(field: str) -> str:
    """The command-line flag of a :class:`.job.JobConfig` field."""
    return RANGES[field][0] if field in RANGES else "--" + field.replace("_", "-")


def expected(integer: bool, lo, hi, lo_open: bool, hi_open: bool) -> str:
    """What a range accepts, in words: ``a number in (0, 1]``, ``an integer >= 1``..."""
    kind = "an integer" if integer else "a number"
    if lo is not None and hi is not None:
        return f"{kind} in {'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}"
    if lo is not None:
        return f"{kind} {'>' if lo_open else '>='} {lo:g}"
    if hi is not None:
        return f"{kind} {'<' if hi_open else '<='} {hi:g}"
    return kind


def range_problem(value, integer: bool, lo, hi, lo_open: bool, hi_open: bool) -> str | None:
    """None if ``value`` is in the range, else ``"expected ..., got ..."``."""
    want = expected(integer, lo, hi, lo_open, hi_open)
    ok_type = isinstance(value, int) if integer else isinstance(value, (int, float))
    if isinstance(value, bool) or not ok_type:
        return f"expected {want}, got {value!r}"
    if not integer and not math.isfinite(value):
        return f"expected {want} (finite), got {value!r}"
    if lo is not None and (value <= lo if lo_open else value < lo):
        return f"expected {want}, got {value:g}"
    if hi is not None and (value >= hi if hi_open else value > hi):
        return f"expected {want}, got {value:g}"
    return None


def parse_number(text: str, field: str):
    """Parse ``text`` for ``field`` and check its range; ``ValueError`` with the message otherwise."""
    _, integer, lo, hi, lo_open, hi_open = RANGES[field]
    try:
        value = int(text) if integer else float(text)
    except ValueError:
        raise ValueError(f"expected {expected(integer, lo, hi, lo_open, hi_open)}, got {text!r}") from None
    problem = range_problem(value, integer, lo, hi, lo_open, hi_open)
    if problem:
        raise ValueError(problem)
    return value


def parse_list(text: str, what: str, parse) -> tuple:
    """A comma-separated list: non-empty, no repeats, each item through ``parse``."""
    items = [x.strip() for x in text.split(",")]
    if not text.strip() or any(not x for x in items):
        raise ValueError(f"expected comma-separated {what} without empty items, got {text!r}")
    values = tuple(parse(x) for x in items)
    repeated = sorted({str(v) for v in values if values.count(v) > 1})
    if repeated:
        raise ValueError(f"{', '.join(repeated)} given twice in {text!r}")
    return values


def parse_seed(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise ValueError(f"expected integers in [0, {SEED_MAX}], e.g. 0,1,2; got {text!r}") from None
    if not 0 <= value <= SEED_MAX:
        raise ValueError(f"expected integers in [0, {SEED_MAX}], got {value}")
    return value


def parse_lr(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"expected positive numbers, e.g. 1e-3,1e-4; got {text!r}") from None
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"expected positive finite numbers, got {text!r}")
    return value


def parse_method(text: str) -> str:
    if text not in Mth.METHODS:
        raise ValueError(f"unknown method {text!r}; choose from {', '.join(Mth.METHODS)}")
    return text


def check_values(cfg) -> None:
    """Every value of a :class:`.job.JobConfig` whose defaults are filled in (no I/O)."""
    for name, (fl, integer, lo, hi, lo_open, hi_open) in RANGES.items():
        value = getattr(cfg, name)
        if value is None:
            continue
        problem = range_problem(value, integer, lo, hi, lo_open, hi_open)
        if problem:
            raise ConfigError(fl, problem)
    for name, (fl, choices) in CHOICES.items():
        value = getattr(cfg, name)
        if value is not None and value not in choices:
            raise ConfigError(fl, f"expected one of {', '.join(choices)}, got {value!r}")
    lists = (("methods", "--methods", "method names", parse_method), ("seeds", "--seeds", "seeds", None),
             ("lrs", "--lrs", "learning rates", None))
    for name, fl, what, parse in lists:
        values = tuple(getattr(cfg, name))
        if not values:
            raise ConfigError(fl, f"expected at least one of the {what}")
        try:
            if parse is not None:
                for v in values:
                    parse(v)
            if name == "seeds":
                bad = [v for v in values if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v <= SEED_MAX]
                if bad:
                    raise ValueError(f"expected integers in [0, {SEED_MAX}], got {bad[0]!r}")
            if name == "lrs":
                problems = [range_problem(v, False, 0.0, None, True, False) for v in values]
                if any(problems):
                    raise ValueError(next(p for p in problems if p))
        except ValueError as exc:
            raise ConfigError(fl, str(exc)) from None
        repeated = sorted({str(v) for v in values if values.count(v) > 1})
        if repeated:
            raise ConfigError(fl, f"{', '.join(repeated)} given twice")
    if cfg.replay == 0 and cfg.replay_batch:
        raise ConfigError("--replay-batch", "needs --replay N > 0 (the number of samples kept per earlier task)")
    if not isinstance(cfg.progress, bool) and cfg.progress not in ("auto", "always", "never"):
        raise ConfigError("--progress", f"expected auto, always or never, got {cfg.progress!r}")


def check_mode(cfg) -> None:
    """Flags that belong to the other mode, and what real data needs (before defaults are filled)."""
    if cfg.data is None:
        given = [f for f in REAL_ONLY if getattr(cfg, f) is not None]
        if given:
            raise ConfigError(flag(given[0]), "only for real data: it needs --data (an ImageFolder directory); "
                                              "without --data the job runs the embedded digits default")
        return
    given = [f for f in EMBEDDED_ONLY if getattr(cfg, f) is not None]
    if given:
        raise ConfigError(flag(given[0]), "only for the embedded default (without --data); it does nothing with --data")
    if cfg.model is None:
        raise ConfigError("--data", "needs --model (an open_clip model name such as ViT-B-16) and usually --pretrained")
    if cfg.control is None:
        raise ConfigError("--data", "needs --control (an ImageFolder directory of images of the base model's classes)")


# ---------------------------------------------------------------------------------------------
# Pre-flight: dependencies, device, paths, the model name
# ---------------------------------------------------------------------------------------------
def _have(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def check_dependencies(cfg) -> list[str]:
    """Missing packages: an error for what the run cannot do without, a note for the plots."""
    need = [("open_clip", "open_clip_torch", "the models")]
    if cfg.data is None:
        need.append(("sklearn", "scikit-learn", "the embedded default's digits"))
    else:
        need.append(("PIL", "pillow", "reading --data images"))
    missing = [(pkg, why) for module, pkg, why in need if not _have(module)]
    if missing:
        what = ", ".join(f"{pkg} ({why})" for pkg, why in missing)
        raise MissingDependency(f"missing {what}: {INSTALL_HINT}")
    notes = []
    if cfg.plots and not _have("matplotlib"):
        cfg.plots = False
        notes.append(f"no plots: matplotlib is not installed ({INSTALL_HINT}, or --no-plots to silence this)")
    return notes


def check_device(cfg) -> list[str]:
    import torch

    try:
        device = torch.device(cfg.device)
    except (RuntimeError, ValueError):
        raise ConfigError("--device", f"{cfg.device!r} is not a torch device (cpu, cuda, cuda:N, mps, xpu)") from None
    build = f"torch {torch.__version__}"
    if device.type == "cuda":
        if not torch.cuda.is_available():
            why = "a CPU-only build" if torch.version.cuda is None else f"built for CUDA {torch.version.cuda}, but it finds no GPU"
            raise ConfigError("--device", f"{cfg.device}: CUDA is not available here ({build} is {why}); use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ConfigError("--device", f"{cfg.device}: there are {torch.cuda.device_count()} CUDA device(s) here")
    elif device.type == "mps":
        if not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
            raise ConfigError("--device", f"{cfg.device}: MPS is not available here; use --device cpu")
    elif device.type != "cpu":
        try:
            torch.empty(1, device=device)
        except Exception as exc:  # any backend's own error: report its first line
            raise ConfigError("--device", f"{cfg.device}: not usable here ({str(exc).splitlines()[0]})") from None
    notes = []
    if cfg.amp and device.type == "cpu":
        notes.append(
            "--amp on a CPU: bf16 autocast is slow in PyTorch's MultiheadAttention when most weights are frozen "
            "(4-10x slower than with trainable weights, a PyTorch effect), so spu's ms/step will look worse than "
            "full fine-tuning's; time without --amp on a CPU")
    return notes


def _writable_dir(path: str, fl: str, what: str) -> None:
    try:
        os.makedirs(path, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as exc:
        reason = exc.strerror or str(exc)
        raise ConfigError(fl, f"{path}: cannot {what} ({reason})") from None


def _scan(path: str, fl: str, min_classes: int, why: str):
    from . import data as D

    if not os.path.isdir(path):
        raise ConfigError(fl, f"{path}: no such directory" if not os.path.exists(path) else f"{path}: not a directory")
    try:
        names, _, _ = D.scan_image_folder(path)
    except ValueError:
        raise ConfigError(fl, f"{path}: no class folder with images ({', '.join(D.IMAGE_EXTENSIONS)})") from None
    except OSError as exc:
        raise ConfigError(fl, f"{path}: cannot be read ({exc.strerror or exc})") from None
    if len(names) < min_classes:
        raise ConfigError(fl, f"{path}: {len(names)} class folder(s) with images; {why}")
    return names


def vit_clip_problem(name: str) -> str | None:
    """None if ``name`` is an open_clip model SPU can train (open_clip's own transformer towers with
    ``mlp.c_fc``), else why not. Imports open_clip; reads its model config, builds nothing."""
    import open_clip

    cfg = open_clip.get_model_config(name)
    if cfg is None:
        close = difflib.get_close_matches(name, open_clip.list_models(), n=3, cutoff=0.6)
        hint = f"; did you mean {' or '.join(close)}?" if close else ""
        return (f"{name!r} is not an open_clip model name{hint} "
                "(python -c 'import open_clip; print(open_clip.list_models())' lists them)")
    vision, text = cfg.get("vision_cfg", {}), cfg.get("text_cfg", {})
    why = None
    if vision.get("timm_model_name"):
        why = f"its image tower is the timm model {vision['timm_model_name']!r}"
    elif isinstance(vision.get("layers"), (list, tuple)):
        why = "its image tower is a ResNet"
    elif text.get("hf_model_name"):
        why = f"its text tower is the Hugging Face model {text['hf_model_name']!r}"
    elif "multimodal_cfg" in cfg:
        why = "it is a CoCa model"
    elif cfg.get("custom_text"):
        why = "its text tower is a custom one"
    if why is None:
        return None
    return (f"{name}: SPU needs a ViT CLIP built from open_clip's own transformers (mlp.c_fc in every block of "
            f"both towers), and {why}; e.g. ViT-B-16, ViT-B-32, ViT-L-14")


def check_paths_and_model(cfg) -> None:
    if cfg.data is not None:
        _scan(cfg.data, "--data", 2 * cfg.tasks,
              f"--tasks {cfg.tasks} needs at least {2 * cfg.tasks} (two or more classes per task)")
        _scan(cfg.control, "--control", 2, "zero-shot accuracy on the control set needs at least two classes")
        if cfg.pretrained is not None and not os.path.isfile(cfg.pretrained):
            raise ConfigError("--pretrained", f"{cfg.pretrained}: no such file (the job never downloads weights)")
        problem = vit_clip_problem(cfg.model)
        if problem:
            raise ConfigError("--model", problem)
    else:
        from . import model as Mdl

        _writable_dir(cfg.cache_dir or Mdl.default_cache_dir(), "--cache-dir", "write the base model's cache there")
    _writable_dir(cfg.out, "--out", "create or write the output directory")


def preflight(cfg) -> list[str]:
    """Everything that needs the file system, the device or the installed packages; returns notes.

    ``cfg`` is resolved (:func:`.job.resolve`); ``cfg.plots`` is turned off when matplotlib is
    missing (with a note)."""
    notes = check_dependencies(cfg)
    notes += check_device(cfg)
    import fastmask.compat

    fastmask.compat.patch_torchvision()  # before open_clip (and so torchvision) is first imported
    check_paths_and_model(cfg)
    return notes


"""Which parameters a selective update touches.

SPU localizes the update to the first MLP linear of every transformer block, in both towers of a
CLIP model: these weights are *masked* (only their selected entries train). The original work
also trains the c_fc biases and ``visual.proj`` densely: these are *dense* targets. Everything
else is frozen.

Patterns match full parameter names (``model.named_parameters()``): a ``str`` is a glob
(``fnmatch``; ``*`` also matches dots), a compiled ``re.Pattern`` must match the whole name.

Presets (:data:`PRESETS`) carry the same choice to other model families: the masked tensors are
the weights of each block's first MLP linear(s), the layer that widens the residual stream
(``c_fc``, ``fc1``, ``intermediate.dense``, SwiGLU's ``gate_proj`` and ``up_proj``); their biases
are dense. Nothing else is dense by default; add a task head with ``extra_dense=``.

Masks are flat indices into each weight *as stored*, whatever its layout: Hugging Face GPT-2's
``Conv1D`` stores ``mlp.c_fc.weight`` as ``[in, out]`` (the transpose of ``nn.Linear``'s
``[out, in]``), so its flat index ``i`` is input ``i // out``, output ``i % out``. Scores,
selection and the optimizer all see the same stored tensor, so nothing needs transposing.

Automatic detection (``find_targets(model)``, ``score(model, ...)`` without ``targets=``): a preset
*fits* a model when each of its masked patterns matches at least one floating parameter. The one
preset that fits is used, its name is kept in :attr:`Targets.preset` and logged at INFO level on
the ``fastmask.targets`` logger; if none fits, or more than one, a ``ValueError`` lists the presets
and shows how to pass patterns. Presets with ``detect=False`` (``hf_llama_mlp``) are only used by
name.
"""
from __future__ import annotations

import fnmatch
import logging
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from torch import nn

__all__ = ["Preset", "PRESETS", "Targets", "find_targets", "detect_preset", "freeze"]

logger = logging.getLogger(__name__)

Pattern = str | re.Pattern


@dataclass(frozen=True)
class Preset:
    """Named target patterns for one model family.

    ``detect=False`` keeps a preset out of automatic detection (it is used only by name), for
    variants that fit the same models as another preset (``hf_llama_mlp`` beside ``hf_llama``).
    """

    name: str
    masked: tuple[Pattern, ...]
    dense: tuple[Pattern, ...] = ()
    description: str = ""
    detect: bool = True


def _rx(body: str) -> re.Pattern:
    """A full-name regex: ``body``, optionally after any prefix ending in a dot (a wrapper such as
    ``model.``, ``bert.``, ``transformer.`` or a user's own ``backbone.``)."""
    return re.compile(r"(?:.*\.)?" + body)


_LLAMA = r"layers\.\d+\.mlp\."

PRESETS: dict[str, Preset] = {
    p.name: p
    for p in (
        Preset(
            "open_clip",
            masked=("visual.transformer.resblocks.*.mlp.c_fc.weight", "transformer.resblocks.*.mlp.c_fc.weight"),
            dense=("visual.transformer.resblocks.*.mlp.c_fc.bias", "transformer.resblocks.*.mlp.c_fc.bias", "visual.proj"),
            description="open_clip CLIP: mlp.c_fc weights of both towers masked; their biases and visual.proj dense (SPU)",
        ),
        Preset(
            "hf_clip",
            masked=("vision_model.encoder.layers.*.mlp.fc1.weight", "text_model.encoder.layers.*.mlp.fc1.weight"),
            dense=("vision_model.encoder.layers.*.mlp.fc1.bias", "text_model.encoder.layers.*.mlp.fc1.bias",
                   "visual_projection.weight"),
            description="Hugging Face transformers CLIPModel: mlp.fc1 weights masked; biases and visual_projection dense",
        ),
        Preset(
            "timm_vit",
            masked=("blocks.*.mlp.fc1.weight",),
            dense=("blocks.*.mlp.fc1.bias",),
            description="timm VisionTransformer: mlp.fc1 weights masked; their biases dense",
        ),
        Preset(
            "hf_llama",
            masked=(_rx(_LLAMA + r"gate_proj\.weight"), _rx(_LLAMA + r"up_proj\.weight")),
            dense=(_rx(_LLAMA + r"gate_proj\.bias"), _rx(_LLAMA + r"up_proj\.bias")),
            description="Hugging Face Llama/Mistral/Qwen2-style SwiGLU MLPs (layers.N.mlp): gate_proj and up_proj "
                        "weights masked (both widen the stream, as CLIP's c_fc); down_proj frozen (see hf_llama_mlp)",
        ),
        Preset(
            "hf_llama_mlp",
            masked=(_rx(_LLAMA + r"gate_proj\.weight"), _rx(_LLAMA + r"up_proj\.weight"),
                    _rx(_LLAMA + r"down_proj\.weight")),
            dense=(_rx(_LLAMA + r"gate_proj\.bias"), _rx(_LLAMA + r"up_proj\.bias"), _rx(_LLAMA + r"down_proj\.bias")),
            description="hf_llama plus down_proj weights masked (the whole MLP); by name only, never detected",
            detect=False,
        ),
        Preset(
            "hf_gpt2",
            masked=(_rx(r"h\.\d+\.mlp\.c_fc\.weight"),),
            dense=(_rx(r"h\.\d+\.mlp\.c_fc\.bias"),),
            description="Hugging Face GPT-2 (h.N.mlp): c_fc weights masked (Conv1D, stored [in, out]: masks index "
                        "the stored layout); their biases dense",
        ),
        Preset(
            "hf_bert",
            masked=(_rx(r"encoder\.layer\.\d+\.intermediate\.dense\.weight"),),
            dense=(_rx(r"encoder\.layer\.\d+\.intermediate\.dense\.bias"),),
            description="Hugging Face BERT-style encoders (BERT, RoBERTa, and ViT before transformers 5: "
                        "encoder.layer.N.intermediate.dense): weights masked; their biases dense",
        ),
        Preset(
            "hf_vit",
            masked=(re.compile(r"(?:(?:.*\.)?vit\.)?layers\.\d+\.mlp\.fc1\.weight"),),
            dense=(re.compile(r"(?:(?:.*\.)?vit\.)?layers\.\d+\.mlp\.fc1\.bias"),),
            description="Hugging Face ViT from transformers 5 (vit.layers.N.mlp): fc1 weights masked; their biases dense",
        ),
    )
}


def _matches(name: str, pattern: Pattern) -> bool:
    if isinstance(pattern, re.Pattern):
        return pattern.fullmatch(name) is not None
    return fnmatch.fnmatchcase(name, pattern)


@dataclass
class Targets:
    """The parameters a selective update trains, by name: ``masked`` and ``dense``.

    ``preset`` is the name of the preset whose patterns were used (given or detected), or
    ``None`` when only explicit patterns were.
    """

    masked: dict[str, nn.Parameter] = field(default_factory=dict)
    dense: dict[str, nn.Parameter] = field(default_factory=dict)
    preset: str | None = None

    @property
    def names(self) -> list[str]:
        return list(self.masked) + list(self.dense)

    def parameters(self) -> list[nn.Parameter]:
        """Masked then dense parameters, for an optimizer."""
        return list(self.masked.values()) + list(self.dense.values())

    def named_parameters(self) -> list[tuple[str, nn.Parameter]]:
        return list(self.masked.items()) + list(self.dense.items())

    def __repr__(self) -> str:
        n_masked = sum(p.numel() for p in self.masked.values())
        n_dense = sum(p.numel() for p in self.dense.values())
        preset = f"preset={self.preset!r}, " if self.preset else ""
        return (f"Targets({preset}masked={len(self.masked)} tensors / {n_masked} entries, "
                f"dense={len(self.dense)} tensors / {n_dense} entries)")


def _as_patterns(patterns: Pattern | Iterable[Pattern] | None) -> tuple[Pattern, ...]:
    if patterns is None:
        return ()
    if isinstance(patterns, (str, re.Pattern)):
        return (patterns,)
    return tuple(patterns)


def _fits(preset: Preset, names: list[str]) -> bool:
    return bool(preset.masked) and all(any(_matches(n, pat) for n in names) for pat in preset.masked)


def _preset_help(model: nn.Module, names: list[str]) -> str:
    listing = "\n".join(f"  {p.name}: {p.description}" for p in PRESETS.values())
    # Names that look like MLP weights help the caller write patterns; fall back to the first few.
    hints = [n for n in names if re.search(r"mlp|ffn|feed_forward|intermediate|fc1|c_fc", n)] or names
    sample = ", ".join(hints[:6]) + (", ..." if len(hints) > 6 else "")
    return (
        f"presets:\n{listing}\n"
        f"Pass one by name, e.g. find_targets(model, 'hf_llama') or score(..., targets='hf_llama'), or give "
        f"patterns (globs, '*' crosses dots, or compiled regexes matching whole names), e.g.\n"
        f"  find_targets(model, None, masked=['*.mlp.fc1.weight'], dense=['*.mlp.fc1.bias'])\n"
        f"  score(model, batches, loss_fn, targets=['*.mlp.fc1.weight'])\n"
        f"{type(model).__name__}'s parameters include: {sample}"
    )


def detect_preset(model: nn.Module) -> Preset:
    """The one preset of :data:`PRESETS` (``detect=True`` ones) that fits ``model``: each of its
    masked patterns matches at least one floating parameter. Raises ``ValueError`` listing the
    presets (and the fitting ones, if several) when none or more than one fits."""
    names = [n for n, p in model.named_parameters() if p.is_floating_point()]
    fits = [p for p in PRESETS.values() if p.detect and _fits(p, names)]
    if len(fits) == 1:
        return fits[0]
    if not fits:
        head = f"find_targets: no preset fits {type(model).__name__} (a preset fits when each of its masked patterns matches a parameter)"
    else:
        head = (f"find_targets: more than one preset fits {type(model).__name__}: "
                f"{', '.join(p.name for p in fits)}; choose one")
    raise ValueError(f"{head}\n{_preset_help(model, names)}")


def find_targets(
    model: nn.Module,
    preset: str | Preset | None = "auto",
    *,
    masked: Pattern | Iterable[Pattern] | None = None,
    dense: Pattern | Iterable[Pattern] | None = None,
    extra_dense: Pattern | Iterable[Pattern] | None = None,
) -> Targets:
    """Find the masked and dense target parameters of ``model``.

    ``preset`` names an entry of :data:`PRESETS` (``"open_clip"``, ``"hf_clip"``, ``"timm_vit"``,
    ``"hf_llama"``, ``"hf_llama_mlp"``, ``"hf_gpt2"``, ``"hf_bert"``, ``"hf_vit"``), is a
    :class:`Preset`, is ``"auto"`` (the default: :func:`detect_preset` picks the one preset that
    fits the model, logs it at INFO level and records it in :attr:`Targets.preset`), or is ``None``
    (patterns alone).

    ``masked``/``dense`` patterns *replace* the preset's (as before). When both are given, no
    preset is used (nothing is detected); when only one is given with ``"auto"``, the other comes
    from the detected preset, or is empty if no single preset fits. ``extra_dense`` patterns are
    *added* to the dense patterns in effect, e.g. a task head:
    ``find_targets(model, extra_dense="classifier.*")`` (same as
    ``dense=[*PRESETS[name].dense, "classifier.*"]``).

    Every masked pattern must match at least one floating parameter, else a ``ValueError`` lists
    some of the model's names; dense patterns may match nothing (``visual.proj`` is absent from
    some models). A parameter matching both lists is masked.
    """
    if isinstance(preset, str):
        if preset == "auto":
            if masked is not None and dense is not None:
                preset = None
            elif masked is None and dense is None:
                preset = detect_preset(model)
                logger.info("find_targets: detected preset %r for %s (%s)", preset.name, type(model).__name__,
                            preset.description)
            else:
                try:
                    preset = detect_preset(model)
                except ValueError:
                    preset = None
                    logger.info("find_targets: no single preset fits %s; using the given patterns alone",
                                type(model).__name__)
                else:
                    logger.info("find_targets: detected preset %r for %s; its %s patterns complete the given ones",
                                preset.name, type(model).__name__, "dense" if dense is None else "masked")
        elif preset not in PRESETS:
            raise ValueError(f"preset: unknown {preset!r}; known presets: {', '.join(PRESETS)} (or 'auto', or None "
                             f"with masked=/dense= patterns)")
        else:
            preset = PRESETS[preset]
    masked_pats = _as_patterns(masked) if masked is not None else (preset.masked if preset else ())
    dense_pats = _as_patterns(dense) if dense is not None else (preset.dense if preset else ())
    dense_pats = dense_pats + _as_patterns(extra_dense)
    if not masked_pats and not dense_pats:
        names = [n for n, p in model.named_parameters() if p.is_floating_point()]
        raise ValueError("find_targets: give a preset or masked/dense patterns\n" + _preset_help(model, names))
    used = preset.name if preset is not None and (masked is None or dense is None) else None

    named = list(model.named_parameters())
    targets = Targets(preset=used)
    for pattern in masked_pats:
        hits = [(n, p) for n, p in named if _matches(n, pattern)]
        if not hits:
            sample = ", ".join(n for n, _ in named[:8])
            where = f" of preset {preset.name!r}" if preset and masked is None else ""
            raise ValueError(
                f"masked pattern {pattern!r}{where} matches no parameter of {type(model).__name__} "
                f"(its names begin: {sample}, ...)"
            )
        for n, p in hits:
            if not p.is_floating_point():
                raise TypeError(f"parameter {n!r} matched a masked pattern but has dtype {p.dtype}")
            targets.masked[n] = p
    for pattern in dense_pats:
        for n, p in named:
            if n not in targets.masked and _matches(n, pattern):
                targets.dense[n] = p
    # Keep model order, whatever the pattern order.
    order = {n: i for i, (n, _) in enumerate(named)}
    targets.masked = dict(sorted(targets.masked.items(), key=lambda kv: order[kv[0]]))
    targets.dense = dict(sorted(targets.dense.items(), key=lambda kv: order[kv[0]]))
    return targets


def freeze(model: nn.Module, targets: Targets | Mapping[str, nn.Parameter] | Iterable[str] | str):
    """Train only ``targets``: ``requires_grad=True`` on them, ``False`` on every other parameter.

    ``targets`` is a :class:`Targets`, a mapping of names to parameters, a name, or an iterable of
    names. Returns ``targets`` for chaining.
    """
    if isinstance(targets, str):
        keep = {targets}
    elif isinstance(targets, Targets):
        keep = set(targets.names)
    elif isinstance(targets, Mapping):
        keep = set(targets)
    else:
        keep = set(targets)
    names = {n for n, _ in model.named_parameters()}
    unknown = keep - names
    if unknown:
        raise KeyError(f"freeze: {sorted(unknown)[:5]} are not parameters of the model")
    for n, p in model.named_parameters():
        p.requires_grad_(n in keep)
    return targets

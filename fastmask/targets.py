"""Which parameters a selective update touches.

SPU localizes the update to the first MLP linear of every transformer block, in both towers of a
CLIP model: these weights are *masked* (only their selected entries train). The original work
also trains the c_fc biases and ``visual.proj`` densely: these are *dense* targets. Everything
else is frozen.

Patterns match full parameter names (``model.named_parameters()``): a ``str`` is a glob
(``fnmatch``; ``*`` also matches dots), a compiled ``re.Pattern`` must match the whole name.
"""
from __future__ import annotations

import fnmatch
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from torch import nn

__all__ = ["Preset", "PRESETS", "Targets", "find_targets", "freeze"]

Pattern = str | re.Pattern


@dataclass(frozen=True)
class Preset:
    """Named target patterns for one model family."""

    name: str
    masked: tuple[Pattern, ...]
    dense: tuple[Pattern, ...] = ()
    description: str = ""


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
    )
}


def _matches(name: str, pattern: Pattern) -> bool:
    if isinstance(pattern, re.Pattern):
        return pattern.fullmatch(name) is not None
    return fnmatch.fnmatchcase(name, pattern)


@dataclass
class Targets:
    """The parameters a selective update trains, by name: ``masked`` and ``dense``."""

    masked: dict[str, nn.Parameter] = field(default_factory=dict)
    dense: dict[str, nn.Parameter] = field(default_factory=dict)

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
        return f"Targets(masked={len(self.masked)} tensors / {n_masked} entries, dense={len(self.dense)} tensors / {n_dense} entries)"


def _as_patterns(patterns: Pattern | Iterable[Pattern] | None) -> tuple[Pattern, ...]:
    if patterns is None:
        return ()
    if isinstance(patterns, (str, re.Pattern)):
        return (patterns,)
    return tuple(patterns)


def find_targets(
    model: nn.Module,
    preset: str | Preset | None = "open_clip",
    *,
    masked: Pattern | Iterable[Pattern] | None = None,
    dense: Pattern | Iterable[Pattern] | None = None,
) -> Targets:
    """Find the masked and dense target parameters of ``model``.

    ``preset`` names an entry of :data:`PRESETS` (``"open_clip"``, ``"hf_clip"``, ``"timm_vit"``)
    or is a :class:`Preset`; ``masked``/``dense`` patterns replace the preset's (pass
    ``preset=None`` to use patterns alone). Every masked pattern must match at least one floating
    parameter, else a ``ValueError`` lists some of the model's names; dense patterns may match
    nothing (``visual.proj`` is absent from some models). A parameter matching both lists is masked.
    """
    if isinstance(preset, str):
        if preset not in PRESETS:
            raise ValueError(f"preset: unknown {preset!r}; known presets: {', '.join(PRESETS)}")
        preset = PRESETS[preset]
    masked_pats = _as_patterns(masked) if masked is not None else (preset.masked if preset else ())
    dense_pats = _as_patterns(dense) if dense is not None else (preset.dense if preset else ())
    if not masked_pats and not dense_pats:
        raise ValueError("find_targets: give a preset or masked/dense patterns")

    named = list(model.named_parameters())
    targets = Targets()
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

"""Compact masks: sorted int32 flat indices per parameter, their set algebra, and selection.

A :class:`Mask` is the list of selected flat positions of one tensor (sorted, unique, int32,
kept on the CPU) together with that tensor's shape. A :class:`MaskSet` maps parameter names to
masks; it saves to and loads from safetensors (indices as tensors, names and shapes in the
metadata: no pickle), checks itself against a model, and gives the ``{Parameter: indices}``
mapping :class:`fastmask.optim.MaskedAdamW` takes.
"""
from __future__ import annotations

import json
import math
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import torch
from torch import nn

from ._checks import check_indices
from ._version import __version__

__all__ = ["Mask", "MaskSet", "select", "num_selected"]

_FORMAT = "fastmask.maskset/1"


@dataclass(frozen=True, eq=False)
class Mask:
    """Selected flat positions of one tensor: ``indices`` (1-D int32, sorted, unique, CPU) and ``shape``."""

    indices: torch.Tensor
    shape: torch.Size

    def __post_init__(self) -> None:
        shape = torch.Size(self.shape)
        idx = self.indices
        check_indices(idx, shape.numel(), "Mask.indices")
        object.__setattr__(self, "shape", shape)
        # Own a copy: a caller's later in-place write must not reach validated indices.
        object.__setattr__(self, "indices", idx.detach().to(device="cpu", dtype=torch.int32, copy=True).contiguous())

    @property
    def numel(self) -> int:
        return self.shape.numel()

    @property
    def k(self) -> int:
        """Number of selected entries."""
        return self.indices.numel()

    @property
    def density(self) -> float:
        return self.k / self.numel if self.numel else 0.0

    @classmethod
    def from_bool(cls, dense: torch.Tensor) -> Mask:
        """The mask of a boolean tensor's ``True`` entries."""
        if dense.dtype != torch.bool:
            raise TypeError(f"dense: expected a bool tensor, got {dense.dtype}")
        return cls(dense.reshape(-1).nonzero().squeeze(1).to(torch.int32), dense.shape)

    def to_bool(self, device: torch.device | str | None = None) -> torch.Tensor:
        """The dense boolean mask (``True`` where selected)."""
        out = torch.zeros(self.numel, dtype=torch.bool, device=device)
        out[self.indices.to(device=out.device, dtype=torch.long)] = True
        return out.view(self.shape)

    def _same_shape(self, other: Mask, op: str) -> None:
        if not isinstance(other, Mask):
            raise TypeError(f"{op}: expected a Mask, got {type(other).__name__}")
        if other.shape != self.shape:
            raise ValueError(f"{op}: masks of different shapes {tuple(self.shape)} and {tuple(other.shape)}")

    def union(self, other: Mask) -> Mask:
        self._same_shape(other, "union")
        return Mask(torch.unique(torch.cat([self.indices, other.indices])), self.shape)

    def intersection(self, other: Mask) -> Mask:
        self._same_shape(other, "intersection")
        return Mask(self.indices[torch.isin(self.indices, other.indices)], self.shape)

    def difference(self, other: Mask) -> Mask:
        self._same_shape(other, "difference")
        return Mask(self.indices[~torch.isin(self.indices, other.indices)], self.shape)

    __or__ = union
    __and__ = intersection
    __sub__ = difference

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Mask) and self.shape == other.shape and torch.equal(self.indices, other.indices)

    __hash__ = None  # type: ignore[assignment]  # equality is by value of a tensor: unhashable

    def __repr__(self) -> str:
        return f"Mask(shape={tuple(self.shape)}, k={self.k}, density={self.density:.4f})"


class MaskSet(Mapping[str, Mask]):
    """Masks of several parameters, by parameter name (``model.named_parameters()`` names)."""

    def __init__(self, masks: Mapping[str, Mask] | None = None) -> None:
        self._masks: dict[str, Mask] = {}
        for name, mask in (masks or {}).items():
            if not isinstance(mask, Mask):
                raise TypeError(f"masks[{name!r}]: expected a Mask, got {type(mask).__name__}")
            self._masks[str(name)] = mask

    # -- construction -------------------------------------------------------------------------
    @classmethod
    def from_indices(cls, indices: Mapping[str, torch.Tensor], shapes: Mapping[str, tuple[int, ...]]) -> MaskSet:
        missing = set(indices) ^ set(shapes)
        if missing:
            raise ValueError(f"indices and shapes must name the same parameters; differ in {sorted(missing)}")
        return cls({n: Mask(indices[n], torch.Size(shapes[n])) for n in indices})

    @classmethod
    def from_bool(cls, dense: Mapping[str, torch.Tensor]) -> MaskSet:
        return cls({n: Mask.from_bool(t) for n, t in dense.items()})

    # -- mapping ------------------------------------------------------------------------------
    def __getitem__(self, name: str) -> Mask:
        return self._masks[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._masks)

    def __len__(self) -> int:
        return len(self._masks)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, MaskSet) and self._masks == other._masks

    __hash__ = None  # type: ignore[assignment]

    # -- statistics ---------------------------------------------------------------------------
    @property
    def k(self) -> int:
        """Selected entries over all tensors."""
        return sum(m.k for m in self._masks.values())

    @property
    def numel(self) -> int:
        return sum(m.numel for m in self._masks.values())

    @property
    def density(self) -> float:
        return self.k / self.numel if self.numel else 0.0

    def stats(self) -> list[dict]:
        """One row per tensor: name, shape, numel, k, density."""
        return [
            {"name": n, "shape": tuple(m.shape), "numel": m.numel, "k": m.k, "density": m.density}
            for n, m in self._masks.items()
        ]

    def summary(self) -> str:
        """A plain-text table of :meth:`stats` with a total line."""
        width = max([len(n) for n in self._masks] + [5])
        lines = [f"{'name':<{width}}  {'shape':>14}  {'k':>10}  {'density':>8}"]
        for row in self.stats():
            shape = "x".join(map(str, row["shape"]))
            lines.append(f"{row['name']:<{width}}  {shape:>14}  {row['k']:>10}  {row['density']:>8.4f}")
        lines.append(f"{'total':<{width}}  {self.numel:>14}  {self.k:>10}  {self.density:>8.4f}")
        return "\n".join(lines)

    def __repr__(self) -> str:
        return f"MaskSet({len(self)} tensors, k={self.k}, density={self.density:.4f})"

    # -- set algebra (continual learning across tasks) ----------------------------------------
    def _combine(self, other: MaskSet, op: str) -> MaskSet:
        if not isinstance(other, MaskSet):
            raise TypeError(f"{op}: expected a MaskSet, got {type(other).__name__}")
        for n in self._masks.keys() & other._masks.keys():
            if self._masks[n].shape != other._masks[n].shape:
                raise ValueError(
                    f"{op}: parameter {n!r} has shape {tuple(self._masks[n].shape)} in one MaskSet and "
                    f"{tuple(other._masks[n].shape)} in the other"
                )
        if op == "union":
            names = list(self._masks) + [n for n in other._masks if n not in self._masks]
            out = {n: (self._masks[n] | other._masks[n]) if n in self._masks and n in other._masks
                   else self._masks.get(n, other._masks.get(n)) for n in names}
        elif op == "intersection":
            out = {n: self._masks[n] & other._masks[n] for n in self._masks if n in other._masks}
        else:
            out = {n: (m - other._masks[n]) if n in other._masks else m for n, m in self._masks.items()}
        return MaskSet(out)

    def union(self, other: MaskSet) -> MaskSet:
        """Entries selected in either set (a parameter in only one set keeps its mask)."""
        return self._combine(other, "union")

    def intersection(self, other: MaskSet) -> MaskSet:
        """Entries selected in both sets (parameters in both sets only)."""
        return self._combine(other, "intersection")

    def difference(self, other: MaskSet) -> MaskSet:
        """Entries selected here and not in ``other`` (e.g. exclude earlier tasks' entries)."""
        return self._combine(other, "difference")

    __or__ = union
    __and__ = intersection
    __sub__ = difference

    # -- models -------------------------------------------------------------------------------
    def validate(self, model: nn.Module) -> None:
        """Raise if a mask names no parameter of ``model`` or was built for another shape."""
        params = dict(model.named_parameters())
        for name, mask in self._masks.items():
            if name not in params:
                close = [p for p in params if p.split(".")[-2:] == name.split(".")[-2:]][:3]
                hint = f" (parameters with a similar name: {close})" if close else ""
                raise KeyError(
                    f"MaskSet has a mask for {name!r}, but the model has no parameter of that name: "
                    f"was the mask built for another model?{hint}"
                )
            if params[name].shape != mask.shape:
                raise ValueError(
                    f"the mask for {name!r} was built for shape {tuple(mask.shape)}, but the model's "
                    f"parameter has shape {tuple(params[name].shape)}: was it built for another model?"
                )

    def for_model(self, model: nn.Module) -> dict[nn.Parameter, torch.Tensor]:
        """``{Parameter: int32 indices on the parameter's device}``, after :meth:`validate`."""
        self.validate(model)
        params = dict(model.named_parameters())
        return {params[n]: m.indices.to(params[n].device) for n, m in self._masks.items()}

    # -- files --------------------------------------------------------------------------------
    def save(self, path: str | os.PathLike, metadata: Mapping[str, str] | None = None) -> None:
        """Write to a safetensors file: one int32 tensor per parameter, shapes in the metadata."""
        from safetensors.torch import save_file

        meta = {str(k): str(v) for k, v in (metadata or {}).items()}
        meta.update({
            "format": _FORMAT,
            "fastmask_version": __version__,
            "shapes": json.dumps({n: list(m.shape) for n, m in self._masks.items()}),
        })
        save_file({n: m.indices for n, m in self._masks.items()}, os.fspath(path), metadata=meta)

    @classmethod
    def load(cls, path: str | os.PathLike) -> MaskSet:
        """Read a file written by :meth:`save`; every mask is checked (dtype, range, order)."""
        from safetensors import safe_open

        with safe_open(os.fspath(path), framework="pt") as f:
            meta = f.metadata() or {}
            if meta.get("format") != _FORMAT:
                raise ValueError(f"{path}: not a fastmask MaskSet file (format {meta.get('format')!r}, expected {_FORMAT!r})")
            if "shapes" not in meta:
                raise ValueError(f"{path}: fastmask MaskSet file without its 'shapes' metadata (damaged?)")
            shapes = json.loads(meta["shapes"])
            tensors = {n: f.get_tensor(n) for n in f.keys()}
        if set(shapes) != set(tensors):
            raise ValueError(f"{path}: metadata and tensors name different parameters")
        for n, t in tensors.items():
            if t.dtype != torch.int32:
                raise TypeError(f"{path}: indices of {n!r} have dtype {t.dtype}, expected int32")
        return cls({n: Mask(tensors[n], torch.Size(shapes[n])) for n in shapes})

    @staticmethod
    def metadata(path: str | os.PathLike) -> dict[str, str]:
        """The metadata stored with a saved MaskSet (user keys included)."""
        from safetensors import safe_open

        with safe_open(os.fspath(path), framework="pt") as f:
            return dict(f.metadata() or {})


def num_selected(density: float, numel: int) -> int:
    """``floor(density * numel)``, immune to float artifacts such as ``0.29 * 100 = 28.999...``."""
    if not (0.0 <= density <= 1.0) or math.isnan(density):
        raise ValueError(f"density: expected a value in [0, 1], got {density}")
    return min(numel, int(math.floor(density * numel + 1e-6)))


def _topk_sorted(flat: torch.Tensor, k: int) -> torch.Tensor:
    """Flat positions of the ``k`` largest values, sorted; ties go to the lowest positions."""
    n = flat.numel()
    if k == 0:
        return torch.empty(0, dtype=torch.int32)
    if k == n:
        return torch.arange(n, dtype=torch.int32)
    threshold = torch.topk(flat, k, sorted=False).values.min()
    above = (flat > threshold).nonzero().squeeze(1)
    at = (flat == threshold).nonzero().squeeze(1)[: k - above.numel()]
    return torch.sort(torch.cat([above, at])).values.to(device="cpu", dtype=torch.int32)


def select(scores: Mapping[str, torch.Tensor], density: float | Mapping[str, float] = 0.1) -> MaskSet:
    """Per tensor, the ``floor(density * numel)`` entries with the largest score.

    ``scores`` maps parameter names to score tensors (e.g. from :func:`fastmask.score` or
    ``MaskedAdamW.scores()``); ``density`` is one value for all or one per name. Ties at the
    threshold go to the lowest flat positions, so the result is deterministic. Scores must be
    finite or +inf: a NaN score (from a NaN gradient) raises.
    """
    out = {}
    for name, s in scores.items():
        if not isinstance(s, torch.Tensor) or not s.is_floating_point():
            raise TypeError(f"scores[{name!r}]: expected a floating tensor")
        d = density[name] if isinstance(density, Mapping) else density
        flat = s.detach().reshape(-1).float()
        if bool(torch.isnan(flat).any()):
            raise ValueError(f"scores[{name!r}] contains NaN (a NaN gradient during scoring?)")
        k = num_selected(float(d), flat.numel())
        out[name] = Mask(_topk_sorted(flat, k), s.shape)
    return MaskSet(out)

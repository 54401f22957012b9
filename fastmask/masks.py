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
import operator
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import torch
from torch import nn

from ._checks import check_indices
from ._files import safetensors_bytes, write_atomic
from ._version import __version__

__all__ = ["Mask", "MaskSet", "select", "num_selected"]

_FORMAT = "fastmask.maskset/1"
_RESERVED_METADATA = ("format", "fastmask_version", "shapes")
_INT64_MAX = 2**63 - 1


def _check_shape(shape: object, what: str) -> torch.Size:
    """``shape`` as a :class:`torch.Size`, or a clear error: a sequence of non-negative integers."""
    expected = "expected a shape (a sequence of non-negative integers)"
    if isinstance(shape, (str, bytes, Mapping)):
        raise TypeError(f"{what}: {expected}, got {type(shape).__name__}")
    try:
        items = list(shape)  # type: ignore[call-overload]
    except TypeError:  # not iterable (an int, a 0-d tensor, ...)
        raise TypeError(f"{what}: {expected}, got {type(shape).__name__}") from None
    dims = []
    for i, d in enumerate(items):
        if isinstance(d, bool):
            raise TypeError(f"{what}: dimension {i} is a bool ({d}), expected a non-negative integer")
        try:
            d = operator.index(d)
        except TypeError:
            raise TypeError(
                f"{what}: dimension {i} is {d!r} ({type(d).__name__}), expected a non-negative integer"
            ) from None
        if d < 0:
            raise ValueError(f"{what}: dimension {i} is {d}, expected a non-negative integer")
        dims.append(d)
    if math.prod(dims) > _INT64_MAX:
        raise ValueError(f"{what}: shape {tuple(dims)} has more than 2**63 - 1 entries")
    return torch.Size(dims)


def _check_name(name: object, what: str) -> str:
    if not isinstance(name, str):
        raise TypeError(f"{what}: parameter names must be strings, got {name!r} ({type(name).__name__})")
    return name


def _check_density(density: object, what: str) -> float:
    """``density`` as a float in [0, 1], or a clear error naming ``what``."""
    if isinstance(density, (bool, str, bytes)):
        raise TypeError(f"{what}: expected a number in [0, 1], got {density!r} ({type(density).__name__})")
    try:
        d = float(density)  # type: ignore[arg-type]
    except (TypeError, ValueError, RuntimeError):
        raise TypeError(f"{what}: expected a number in [0, 1], got {type(density).__name__}") from None
    if not (0.0 <= d <= 1.0):  # NaN fails both comparisons
        raise ValueError(f"{what}: expected a value in [0, 1], got {d}")
    return d


@dataclass(frozen=True, eq=False)
class Mask:
    """Selected flat positions of one tensor: ``indices`` (1-D int32, sorted, unique, CPU) and ``shape``."""

    indices: torch.Tensor
    shape: torch.Size

    def __post_init__(self) -> None:
        shape = _check_shape(self.shape, "Mask.shape")
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
        if not isinstance(dense, torch.Tensor) or dense.dtype != torch.bool:
            got = dense.dtype if isinstance(dense, torch.Tensor) else type(dense).__name__
            raise TypeError(f"dense: expected a bool tensor, got {got}")
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
        if masks is None:
            masks = {}
        if not isinstance(masks, Mapping):
            raise TypeError(f"masks: expected a mapping of parameter names to Masks, got {type(masks).__name__}")
        out: dict[str, Mask] = {}
        for name, mask in masks.items():
            _check_name(name, "masks")
            if not isinstance(mask, Mask):
                raise TypeError(f"masks[{name!r}]: expected a Mask, got {type(mask).__name__}")
            out[name] = mask
        self._masks = out

    # -- construction -------------------------------------------------------------------------
    @classmethod
    def from_indices(cls, indices: Mapping[str, torch.Tensor], shapes: Mapping[str, tuple[int, ...]]) -> MaskSet:
        for arg, m in (("indices", indices), ("shapes", shapes)):
            if not isinstance(m, Mapping):
                raise TypeError(f"{arg}: expected a mapping of parameter names, got {type(m).__name__}")
            for n in m:
                _check_name(n, arg)
        missing = set(indices) ^ set(shapes)
        if missing:
            raise ValueError(f"indices and shapes must name the same parameters; differ in {sorted(missing)}")
        out = {}
        for n in indices:
            shape = _check_shape(shapes[n], f"shapes[{n!r}]")
            check_indices(indices[n], shape.numel(), f"indices[{n!r}]")
            out[n] = Mask(indices[n], shape)
        return cls(out)

    @classmethod
    def from_bool(cls, dense: Mapping[str, torch.Tensor]) -> MaskSet:
        if not isinstance(dense, Mapping):
            raise TypeError(f"dense: expected a mapping of parameter names to bool tensors, got {type(dense).__name__}")
        out = {}
        for n, t in dense.items():
            _check_name(n, "dense")
            if not isinstance(t, torch.Tensor) or t.dtype != torch.bool:
                got = t.dtype if isinstance(t, torch.Tensor) else type(t).__name__
                raise TypeError(f"dense[{n!r}]: expected a bool tensor, got {got}")
            out[n] = Mask.from_bool(t)
        return cls(out)

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
        """Write to a safetensors file: one int32 tensor per parameter, shapes in the metadata.

        The file is written whole or not at all: everything is checked and serialized first, then
        written to a temporary file next to ``path`` and renamed over it. Equal masks and metadata
        give byte-identical files.
        """
        where = os.fspath(path)
        if metadata is not None and not isinstance(metadata, Mapping):
            raise TypeError(f"{where}: metadata: expected a mapping of strings, got {type(metadata).__name__}")
        meta = {str(k): str(v) for k, v in (metadata or {}).items()}
        clash = [k for k in _RESERVED_METADATA if k in meta]
        if clash:
            raise ValueError(
                f"{where}: metadata: keys {clash} are reserved for the MaskSet file format; "
                f"use other names for your own metadata"
            )
        if "__metadata__" in self._masks:
            raise ValueError(
                f"{where}: parameter '__metadata__': the name is reserved by safetensors, a file holding it "
                f"could not be read back"
            )
        meta.update({
            "format": _FORMAT,
            "fastmask_version": __version__,
            "shapes": json.dumps({n: list(m.shape) for n, m in self._masks.items()}),
        })
        data = safetensors_bytes({n: m.indices for n, m in self._masks.items()}, metadata=meta)
        write_atomic(where, data, "MaskSet")  # through a symlink, as writing in place would

    @classmethod
    def load(cls, path: str | os.PathLike) -> MaskSet:
        """Read a file written by :meth:`save`; every mask is checked (names, shapes, dtype, range, order).

        A malformed file raises ``ValueError``/``TypeError``/``IndexError`` naming the file and, where
        one is at fault, the parameter; nothing is returned half-loaded.
        """
        where = os.fspath(path)
        with _open_safetensors(where) as f:
            meta = f.metadata() or {}
            if "format" not in meta:
                raise ValueError(
                    f"{where}: not a fastmask MaskSet file (no 'format' metadata, expected {_FORMAT!r})"
                )
            if meta["format"] != _FORMAT:
                raise ValueError(
                    f"{where}: not a fastmask MaskSet file (format {meta['format']!r}, expected {_FORMAT!r})"
                )
            if "shapes" not in meta:
                raise ValueError(f"{where}: fastmask MaskSet file without its 'shapes' metadata (damaged?)")
            shapes = _parse_shapes(meta["shapes"], where)
            names = list(f.keys())
            no_shape = [n for n in names if n not in shapes]
            no_tensor = [n for n in shapes if n not in set(names)]
            if no_shape or no_tensor:
                parts = []
                if no_shape:
                    parts.append(f"tensors without a 'shapes' entry: {no_shape}")
                if no_tensor:
                    parts.append(f"'shapes' entries without a tensor: {no_tensor}")
                raise ValueError(
                    f"{where}: metadata and tensors name different parameters ({'; '.join(parts)}); "
                    f"expected one int32 tensor per 'shapes' entry"
                )
            try:
                tensors = {n: f.get_tensor(n) for n in shapes}
            except Exception as e:  # safetensors' own error type is no ValueError
                raise ValueError(f"{where}: cannot read the tensors of this safetensors file: {e}") from e
        out = {}
        for n, shape in shapes.items():
            t = tensors[n]
            what = f"{where}: indices of parameter {n!r}"
            if t.dtype != torch.int32:
                raise TypeError(f"{what} have dtype {t.dtype}, expected int32")
            check_indices(t, shape.numel(), what)
            out[n] = Mask(t, shape)
        return cls(out)

    @staticmethod
    def metadata(path: str | os.PathLike) -> dict[str, str]:
        """The metadata stored with a saved MaskSet (user keys included)."""
        with _open_safetensors(os.fspath(path)) as f:
            return dict(f.metadata() or {})


class _open_safetensors:
    """``safe_open(path)`` whose errors name the file (safetensors' own ones do not)."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __enter__(self):
        from safetensors import safe_open

        if os.path.isdir(self.path):
            raise IsADirectoryError(f"{self.path}: is a directory, expected a MaskSet (.safetensors) file")
        try:
            self._cm = safe_open(self.path, framework="pt")
            return self._cm.__enter__()
        except OSError:
            raise
        except Exception as e:  # SafetensorError: a damaged or non-safetensors file
            raise ValueError(f"{self.path}: not a readable safetensors file ({e})") from e

    def __exit__(self, *exc) -> None:
        self._cm.__exit__(*exc)


def _parse_shapes(text: str, where: str) -> dict[str, torch.Size]:
    """The ``shapes`` metadata of a MaskSet file: a JSON object of parameter name -> list of dims."""
    def no_duplicates(pairs):
        seen = {}
        for k, v in pairs:
            if k in seen:
                raise ValueError(f"{where}: 'shapes' metadata names parameter {k!r} twice")
            seen[k] = v
        return seen

    try:
        raw = json.loads(text, object_pairs_hook=no_duplicates)
    except json.JSONDecodeError as e:
        raise ValueError(
            f"{where}: 'shapes' metadata is not valid JSON ({e}); expected a JSON object of "
            f"parameter name -> list of dimensions"
        ) from None
    if not isinstance(raw, dict):
        raise TypeError(
            f"{where}: 'shapes' metadata is a JSON {type(raw).__name__}, expected a JSON object of "
            f"parameter name -> list of dimensions"
        )
    out = {}
    for n, dims in raw.items():
        if not isinstance(dims, list):
            raise TypeError(
                f"{where}: shape of parameter {n!r} is {dims!r}, expected a list of non-negative integers"
            )
        out[n] = _check_shape(dims, f"{where}: shape of parameter {n!r}")
    return out


def num_selected(density: float, numel: int) -> int:
    """``floor(density * numel)``, immune to float artifacts such as ``0.29 * 100 = 28.999...``."""
    density = _check_density(density, "density")
    try:
        numel = operator.index(numel)
    except TypeError:
        raise TypeError(f"numel: expected a non-negative integer, got {type(numel).__name__}") from None
    if numel < 0:
        raise ValueError(f"numel: expected a non-negative integer, got {numel}")
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
    if not isinstance(scores, Mapping):
        raise TypeError(f"scores: expected a mapping of parameter names to score tensors, got {type(scores).__name__}")
    for name, s in scores.items():
        _check_name(name, "scores")
        if not isinstance(s, torch.Tensor) or not s.is_floating_point():
            got = s.dtype if isinstance(s, torch.Tensor) else type(s).__name__
            raise TypeError(f"scores[{name!r}]: expected a floating tensor, got {got}")
    if isinstance(density, Mapping):
        missing = [n for n in scores if n not in density]
        if missing:
            raise ValueError(
                f"density: the mapping has no density for {missing}; expected one value in [0, 1] "
                f"per name of scores (or a single number for all)"
            )
        dens = {n: _check_density(density[n], f"density[{n!r}]") for n in scores}
    else:
        d = _check_density(density, "density")
        dens = {n: d for n in scores}
    out = {}
    for name, s in scores.items():
        flat = s.detach().reshape(-1).float()
        if bool(torch.isnan(flat).any()):
            raise ValueError(f"scores[{name!r}] contains NaN (a NaN gradient during scoring?)")
        k = num_selected(dens[name], flat.numel())
        out[name] = Mask(_topk_sorted(flat, k), s.shape)
    return MaskSet(out)

"""Sparse deltas: what training changed, against the base weights, in one small safetensors file.

    fastmask.delta.export(trained_model, base_state_dict, masks, "delta.safetensors", dense=["*.bias"])
    fastmask.delta.apply(base_model, "delta.safetensors")     # base -> trained, bit for bit
    fastmask.delta.revert(trained_model, "delta.safetensors") # trained -> base, bit for bit
    fastmask.delta.info("delta.safetensors")                  # sizes, counts, the LoRA comparison

**Exactness scheme: XOR of the bit patterns.** ``base + (trained - base)`` is not exact in floating
point, so the file stores no arithmetic difference. For each selected entry it stores
``bits(trained) ^ bits(base)`` (the tensor's bytes viewed as a same-width integer: int16 for
bf16/fp16, int32 for fp32, int64 for fp64, uint8 for 1-byte types). XOR is its own inverse, so
``apply`` and ``revert`` are the same operation, ``bits ^= x``, and both are exact for every dtype,
NaN payloads and -0.0 included; the file is no larger than storing the trained values alone (one
value per entry plus its int32 index). A XOR means nothing against other weights, so each tensor
records the SHA-256 of its base bytes and of its result bytes (base with the delta applied, which
is the trained tensor): ``apply`` refuses a tensor whose bytes are not the base, ``revert`` one
whose bytes are not the result, naming the parameter. Every tensor is checked before any is
written, so a refused delta leaves the model untouched.

**File** (``format = fastmask.delta/1``): tensors ``indices:NAME`` (int32, sorted, unique flat
positions) and ``xor:NAME`` (the XOR bits at those positions) per masked tensor, ``xor:NAME``
(whole tensor) per dense extra; metadata ``tensors``, a JSON object NAME -> {kind (sparse|dense),
shape, dtype, k, base_sha256, result_sha256, payload_sha256}, and ``model_numel``/``model_bytes``
(the whole base state dict, for size reports). ``payload_sha256`` covers the stored indices and
bits, so a damaged payload is refused when the file is read.
"""
from __future__ import annotations

import fnmatch
import hashlib
import json
import os
from collections.abc import Mapping, Sequence

import torch
from torch import nn

from ._checks import check_indices
from ._files import safetensors_bytes, write_atomic
from ._version import __version__
from .masks import MaskSet, _check_shape, _open_safetensors

__all__ = ["export", "apply", "revert", "info", "format_info", "load_state_dict", "save_state_dict"]

FORMAT = "fastmask.delta/1"
_BITS = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
_DTYPES = {str(d).removeprefix("torch."): d for d in (
    torch.float64, torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.int32, torch.int16,
    torch.int8, torch.uint8, *(getattr(torch, n) for n in ("float8_e4m3fn", "float8_e5m2") if hasattr(torch, n)))}


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _bits(t: torch.Tensor, what: str) -> torch.Tensor:
    """``t``'s bit pattern as a same-width integer tensor (a view, no copy)."""
    if _dtype_name(t.dtype) not in _DTYPES:
        raise TypeError(f"{what}: dtype {t.dtype} is not supported by sparse deltas (expected one of "
                        f"{', '.join(_DTYPES)})")
    return t.view(_BITS[t.element_size()])


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit-identical (NaN payloads and -0.0 included), same shape and dtype."""
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    a, b = a.detach().cpu(), b.detach().cpu()
    if _dtype_name(a.dtype) in _DTYPES:
        a, b = a.view(_BITS[a.element_size()]), b.view(_BITS[b.element_size()])
    return torch.equal(a, b)


def _sha256(t: torch.Tensor) -> str:
    """SHA-256 of a tensor's bytes in row-major order (on the CPU)."""
    flat = t.detach().reshape(-1).contiguous().cpu()
    return hashlib.sha256(flat.view(torch.uint8).numpy() if flat.numel() else b"").hexdigest()


def _payload_sha256(*ts: torch.Tensor) -> str:
    h = hashlib.sha256()
    for t in ts:
        flat = t.reshape(-1).contiguous()
        if flat.numel():
            h.update(flat.view(torch.uint8).numpy())
    return h.hexdigest()


def _tensors(obj: object, what: str) -> dict[str, torch.Tensor]:
    """Named tensors of a model (parameters and buffers) or of a state dict."""
    if isinstance(obj, nn.Module):
        out = dict(obj.named_buffers())
        out.update(obj.named_parameters())
        return out
    if isinstance(obj, Mapping):
        bad = [k for k, v in obj.items() if not isinstance(v, torch.Tensor)]
        if bad:
            raise TypeError(f"{what}: entry {bad[0]!r} is not a tensor ({type(obj[bad[0]]).__name__})")
        return dict(obj)
    raise TypeError(f"{what}: expected an nn.Module or a state dict (mapping of names to tensors), "
                    f"got {type(obj).__name__}")


def _dense_names(patterns: Sequence[str] | str | None, names: list[str], masked: Mapping) -> list[str]:
    if patterns is None:
        return []
    if isinstance(patterns, str):
        patterns = [p for p in patterns.split(",") if p.strip()]
    out: list[str] = []
    for p in patterns:
        if not isinstance(p, str):
            raise TypeError(f"dense: expected parameter names or glob patterns, got {p!r} ({type(p).__name__})")
        p = p.strip()
        wild = any(c in p for c in "*?[")
        if not wild and p in masked:
            raise ValueError(f"dense: parameter {p!r} has a mask; a tensor is either masked or dense, not both")
        hits = [n for n in names if (fnmatch.fnmatchcase(n, p) if wild else n == p) and n not in masked]
        if not hits:
            raise KeyError(f"dense: {p!r} names no (unmasked) tensor of the trained weights")
        out += [n for n in hits if n not in out]
    return out


def export(trained: nn.Module | Mapping[str, torch.Tensor], base: nn.Module | Mapping[str, torch.Tensor],
           masks: MaskSet, path: str | os.PathLike, dense: Sequence[str] | str | None = None,
           strict: bool = True, metadata: Mapping[str, str] | None = None) -> dict:
    """Write what training changed (``trained`` against ``base``) to a delta file; returns :func:`info`.

    ``masks`` says which entries of which tensors changed; ``dense`` names (or glob patterns,
    e.g. ``"*.bias"``) tensors stored whole (biases, projections). With ``strict`` (the default)
    the export refuses a masked tensor changed outside its mask and a tensor changed but in
    neither ``masks`` nor ``dense``, so that applying the delta to ``base`` gives ``trained``
    bit for bit; ``strict=False`` keeps only what the masks and ``dense`` cover.
    """
    where = os.fspath(path)
    if not isinstance(masks, MaskSet):
        raise TypeError(f"{where}: masks: expected a fastmask MaskSet, got {type(masks).__name__}")
    tr, bs = _tensors(trained, "trained"), _tensors(base, "base")
    dense_names = _dense_names(dense, list(tr), masks)
    tensors: dict[str, torch.Tensor] = {}
    meta: dict[str, dict] = {}
    for name in list(masks) + dense_names:
        kind = "sparse" if name in masks else "dense"
        for what, d in (("trained", tr), ("base", bs)):
            if name not in d:
                raise KeyError(f"{where}: parameter {name!r} is missing from the {what} weights")
        t, b = tr[name].detach(), bs[name].detach()
        if t.shape != b.shape:
            raise ValueError(f"{where}: parameter {name!r} has shape {tuple(t.shape)} in the trained weights "
                             f"and {tuple(b.shape)} in the base")
        if t.dtype != b.dtype:
            raise TypeError(f"{where}: parameter {name!r} has dtype {t.dtype} in the trained weights and "
                            f"{b.dtype} in the base")
        tb, bb = _bits(t, f"parameter {name!r}").reshape(-1).cpu(), _bits(b, f"parameter {name!r}").reshape(-1).cpu()
        if kind == "sparse":
            m = masks[name]
            if m.shape != t.shape:
                raise ValueError(f"{where}: the mask for {name!r} was built for shape {tuple(m.shape)}, but the "
                                 f"parameter has shape {tuple(t.shape)}")
            idx = m.indices.long()
            if strict:
                outside = tb != bb
                outside[idx] = False
                n_out = int(outside.sum())
                if n_out:
                    raise ValueError(
                        f"{where}: parameter {name!r}: {n_out} entries changed outside its mask (weight decay or "
                        f"momentum on frozen entries?); give a mask that covers them, store it dense, or "
                        f"export with strict=False to keep the masked entries only")
            x = tb[idx] ^ bb[idx]
            result = bb.clone()
            result[idx] = tb[idx]
            tensors[f"indices:{name}"] = m.indices
            tensors[f"xor:{name}"] = x
            payload = _payload_sha256(m.indices, x)
            k = m.k
        else:
            x = tb ^ bb
            result = tb
            tensors[f"xor:{name}"] = x.reshape(t.shape)
            payload = _payload_sha256(x)
            k = t.numel()
        meta[name] = {"kind": kind, "shape": list(t.shape), "dtype": _dtype_name(t.dtype), "k": k,
                      "base_sha256": _sha256(bb), "result_sha256": _sha256(result), "payload_sha256": payload}
    if strict:
        changed = [n for n in tr if n not in meta and n in bs and not _same(tr[n], bs[n])]
        if changed:
            more = f" and {len(changed) - 5} more" if len(changed) > 5 else ""
            raise ValueError(f"{where}: tensors changed by training but in neither the masks nor dense: "
                             f"{changed[:5]}{more}; add them to dense, or export with strict=False")
    user = {str(k): str(v) for k, v in (metadata or {}).items()}
    reserved = [k for k in ("format", "fastmask_version", "tensors", "model_numel", "model_bytes") if k in user]
    if reserved:
        raise ValueError(f"{where}: metadata: keys {reserved} are reserved for the delta file format")
    user.update({
        "format": FORMAT, "fastmask_version": __version__, "tensors": json.dumps(meta),
        "model_numel": str(sum(v.numel() for v in bs.values())),
        "model_bytes": str(sum(v.numel() * v.element_size() for v in bs.values())),
    })
    write_atomic(where, safetensors_bytes(tensors, metadata=user), "delta")
    return info(where)




def _read(path: str | os.PathLike, with_tensors: bool = True) -> tuple[dict[str, str], dict[str, dict], dict]:
    """Metadata, per-tensor entries and (checked) payloads of a delta file; errors name file and parameter."""
    where = os.fspath(path)
    with _open_safetensors(where) as f:
        meta = dict(f.metadata() or {})
        if meta.get("format") != FORMAT:
            got = f"format {meta['format']!r}" if "format" in meta else "no 'format' metadata"
            raise ValueError(f"{where}: not a fastmask delta file ({got}, expected {FORMAT!r})")
        try:
            entries = json.loads(meta.get("tensors", ""))
        except json.JSONDecodeError as e:
            raise ValueError(f"{where}: 'tensors' metadata is missing or not valid JSON ({e}) (damaged?)") from None
        if not isinstance(entries, dict):
            raise ValueError(f"{where}: 'tensors' metadata is a JSON {type(entries).__name__}, expected an object")
        for key in ("model_numel", "model_bytes"):
            if not meta.get(key, "").isdigit():
                raise ValueError(f"{where}: '{key}' metadata is {meta.get(key)!r}, expected a non-negative integer")
        keys = set(f.keys())
        expected: set[str] = set()
        for name, e in entries.items():
            what = f"{where}: parameter {name!r}"
            if not isinstance(e, dict):
                raise ValueError(f"{what}: metadata entry is {e!r}, expected an object")
            missing = [k for k in ("kind", "shape", "dtype", "k", "base_sha256", "result_sha256", "payload_sha256")
                       if k not in e]
            if missing:
                raise ValueError(f"{what}: metadata entry lacks {missing} (damaged?)")
            if e["kind"] not in ("sparse", "dense"):
                raise ValueError(f"{what}: kind {e['kind']!r}, expected 'sparse' or 'dense'")
            if not isinstance(e["shape"], list):
                raise ValueError(f"{what}: shape {e['shape']!r}, expected a list of non-negative integers")
            e["shape"] = _check_shape(e["shape"], f"{what}: shape")
            if e["dtype"] not in _DTYPES:
                raise ValueError(f"{what}: dtype {e['dtype']!r} is not one of {', '.join(_DTYPES)}")
            e["dtype"] = _DTYPES[e["dtype"]]
            if not isinstance(e["k"], int) or isinstance(e["k"], bool) or not 0 <= e["k"] <= e["shape"].numel():
                raise ValueError(f"{what}: k {e['k']!r} is not a count of entries in [0, {e['shape'].numel()}]")
            expected |= {f"xor:{name}"} | ({f"indices:{name}"} if e["kind"] == "sparse" else set())
        if keys != expected:
            raise ValueError(f"{where}: metadata and tensors differ (tensors without an entry: "
                             f"{sorted(keys - expected)}; entries without a tensor: {sorted(expected - keys)}) "
                             f"(damaged?)")
        payloads: dict[str, tuple] = {}
        if with_tensors:
            for name, e in entries.items():
                what = f"{where}: parameter {name!r}"
                try:
                    x = f.get_tensor(f"xor:{name}")
                    idx = f.get_tensor(f"indices:{name}") if e["kind"] == "sparse" else None
                except Exception as err:
                    raise ValueError(f"{what}: cannot read its tensors ({err})") from err
                bits = _BITS[torch.empty(0, dtype=e["dtype"]).element_size()]
                if x.dtype != bits:
                    raise TypeError(f"{what}: XOR bits have dtype {x.dtype}, expected {bits} for {e['dtype']}")
                if idx is not None:
                    if idx.dtype != torch.int32:
                        raise TypeError(f"{what}: indices have dtype {idx.dtype}, expected int32")
                    check_indices(idx, e["shape"].numel(), f"{what}: indices")
                    if idx.numel() != e["k"] or x.shape != idx.shape:
                        raise ValueError(f"{what}: {idx.numel()} indices and {x.numel()} XOR values, metadata "
                                         f"says k={e['k']}")
                    got = _payload_sha256(idx, x)
                else:
                    if x.shape != e["shape"]:
                        raise ValueError(f"{what}: dense XOR bits have shape {tuple(x.shape)}, metadata says "
                                         f"{tuple(e['shape'])}")
                    got = _payload_sha256(x)
                if got != e["payload_sha256"]:
                    raise ValueError(f"{what}: stored values do not match their checksum (damaged file)")
                payloads[name] = (idx, x)
    return meta, entries, payloads


def _xor_into(model: nn.Module | Mapping[str, torch.Tensor], path: str | os.PathLike, direction: str):
    where = os.fspath(path)
    _, entries, payloads = _read(where)
    tensors = _tensors(model, "model")
    expect, other = ("base_sha256", "result_sha256") if direction == "apply" else ("result_sha256", "base_sha256")
    state = "base" if direction == "apply" else "trained (delta-applied)"
    # Check everything first: a refused delta leaves every tensor untouched.
    for name, e in entries.items():
        what = f"{where}: parameter {name!r}"
        if name not in tensors:
            raise KeyError(f"{what} is missing from the model")
        t = tensors[name]
        if t.shape != e["shape"]:
            raise ValueError(f"{what}: the delta is for shape {tuple(e['shape'])}, the model's tensor has shape "
                             f"{tuple(t.shape)}")
        if t.dtype != e["dtype"]:
            raise TypeError(f"{what}: the delta is for dtype {e['dtype']}, the model's tensor has dtype {t.dtype}")
        h = _sha256(t)
        if h != e[expect]:
            hint = (" (already applied?)" if h == e[other] and direction == "apply" else
                    " (already reverted?)" if h == e[other] else "")
            raise ValueError(f"{what}: the model's tensor is not the {state} weights this delta was made for "
                             f"(SHA-256 {h[:12]}..., expected {e[expect][:12]}...){hint}")
    with torch.no_grad():
        for name, e in entries.items():
            t = tensors[name]
            idx, x = payloads[name]
            bits = _bits(t.detach(), name)
            x = x.to(t.device)
            if idx is None:
                bits.bitwise_xor_(x.reshape(t.shape))
            else:
                i = idx.to(device=t.device, dtype=torch.long)
                flat = bits.view(-1) if bits.is_contiguous() else bits.reshape(-1).clone()
                flat[i] = flat[i] ^ x
                if not bits.is_contiguous():
                    bits.copy_(flat.view(bits.shape))
    return model


def apply(model: nn.Module | Mapping[str, torch.Tensor], path: str | os.PathLike):
    """Turn the base weights into the trained ones, in place, bit for bit; returns ``model``.

    Refuses (before writing anything) a tensor missing from the model, of another shape or dtype,
    or whose bytes are not the base this delta was made for; each error names the parameter.
    """
    return _xor_into(model, path, "apply")


def revert(model: nn.Module | Mapping[str, torch.Tensor], path: str | os.PathLike):
    """Undo :func:`apply`, in place, bit for bit; refuses weights that are not the delta's result."""
    return _xor_into(model, path, "revert")


def info(path: str | os.PathLike) -> dict:
    """What a delta file holds: per tensor kind, shape, dtype, k and bytes; totals; the LoRA comparison.

    For a sparse 2-D tensor ``[out, in]`` with ``k`` entries, ``lora_rank`` is the rank ``r`` whose
    LoRA count ``r * (in + out)`` is closest to ``k`` (at least 1 when ``k > 0``) and ``lora_bytes``
    that adapter's size in the tensor's dtype.
    """
    where = os.fspath(path)
    meta, entries, _ = _read(where, with_tensors=False)
    rows = []
    for name, e in entries.items():
        size = torch.empty(0, dtype=e["dtype"]).element_size()
        numel = e["shape"].numel()
        row = {"name": name, "kind": e["kind"], "shape": tuple(e["shape"]), "dtype": _dtype_name(e["dtype"]),
               "numel": numel, "k": e["k"], "full_bytes": numel * size,
               "delta_bytes": e["k"] * (size + (4 if e["kind"] == "sparse" else 0)),
               "lora_rank": None, "lora_bytes": None}
        if e["kind"] == "sparse" and len(e["shape"]) == 2:
            per_rank = sum(e["shape"])
            r = max(1 if e["k"] else 0, round(e["k"] / per_rank)) if per_rank else 0
            row["lora_rank"], row["lora_bytes"] = r, r * per_rank * size
        rows.append(row)
    lora = [r for r in rows if r["lora_rank"] is not None]
    return {
        "path": where, "format": meta["format"], "fastmask_version": meta.get("fastmask_version"),
        "file_bytes": os.path.getsize(where), "tensors": rows,
        "k": sum(r["k"] for r in rows), "delta_bytes": sum(r["delta_bytes"] for r in rows),
        "full_bytes": sum(r["full_bytes"] for r in rows),
        "model_numel": int(meta["model_numel"]), "model_bytes": int(meta["model_bytes"]),
        "lora_bytes": sum(r["lora_bytes"] for r in lora) if lora else None,
        "lora_delta_bytes": sum(r["delta_bytes"] for r in lora) if lora else None,
    }


def _human(n: int | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n} B" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def format_info(report: dict) -> str:
    """A plain-text table of :func:`info`."""
    rows = report["tensors"]
    w = max([len(r["name"]) for r in rows] + [6])
    lines = [f"{report['path']}: {report['format']} (fastmask {report['fastmask_version']}), {len(rows)} tensors",
             f"{'tensor':<{w}}  {'kind':<6} {'dtype':<9} {'shape':>12} {'k':>10} {'density':>8} "
             f"{'delta':>10} {'full':>10} {'LoRA r':>6} {'LoRA':>10}"]
    for r in rows:
        dens = r["k"] / r["numel"] if r["numel"] else 0.0
        lines.append(f"{r['name']:<{w}}  {r['kind']:<6} {r['dtype']:<9} {'x'.join(map(str, r['shape'])) or '()':>12} "
                     f"{r['k']:>10} {dens:>8.4f} {_human(r['delta_bytes']):>10} {_human(r['full_bytes']):>10} "
                     f"{'-' if r['lora_rank'] is None else r['lora_rank']:>6} {_human(r['lora_bytes']):>10}")
    ratio = lambda a, b: f"{a / b:.2%}" if b else "-"  # noqa: E731
    lines.append(f"file: {_human(report['file_bytes'])} ({report['file_bytes']} bytes) = "
                 f"{ratio(report['file_bytes'], report['model_bytes'])} of the full model "
                 f"({_human(report['model_bytes'])}, {report['model_numel']} entries), "
                 f"{ratio(report['file_bytes'], report['full_bytes'])} of the tensors it covers "
                 f"({_human(report['full_bytes'])})")
    if report["lora_bytes"] is not None:
        lines.append(f"masked 2-D tensors: delta {_human(report['lora_delta_bytes'])} vs a LoRA adapter of the same "
                     f"trainable-entry count {_human(report['lora_bytes'])} (int32 index + value per entry vs "
                     f"value only)")
    return "\n".join(lines)


# -- checkpoints (CLI) --------------------------------------------------------------------------
def load_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """A state dict from a .safetensors file or a torch checkpoint (weights only; a ``state_dict`` key is followed)."""
    where = os.fspath(path)
    if not os.path.isfile(where):
        raise FileNotFoundError(f"{where}: no such file")
    if where.endswith(".safetensors"):
        from safetensors.torch import load_file

        try:
            return load_file(where)
        except Exception as e:
            raise ValueError(f"{where}: not a readable safetensors file ({e})") from e
    try:
        obj = torch.load(where, map_location="cpu", weights_only=True)
    except Exception as e:
        first = (str(e).splitlines() or [""])[0]
        raise ValueError(f"{where}: not a readable torch checkpoint ({type(e).__name__}: {first})") from e
    for key in ("state_dict", "model"):
        if isinstance(obj, Mapping) and isinstance(obj.get(key), Mapping):
            obj = obj[key]
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(f"{where}: expected a state dict (a mapping of names to tensors)")
    return dict(obj)


def save_state_dict(state: Mapping[str, torch.Tensor], path: str | os.PathLike) -> None:
    """Save a state dict whole or not at all (safetensors for ``.safetensors``, else ``torch.save``)."""
    where = os.fspath(path)
    if where.endswith(".safetensors"):
        data = safetensors_bytes({k: v.contiguous() for k, v in state.items()})
    else:
        import io

        buf = io.BytesIO()
        torch.save(dict(state), buf)
        data = buf.getvalue()
    write_atomic(where, data, "checkpoint")

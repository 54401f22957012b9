"""Shared pieces of the Triton backend: the per-tensor table, block heuristics, in-kernel helpers.

One launch serves every tensor of a call. The host describes the tensors in a small int64 table
(one row per field, one column per tensor) that the kernels read: a program finds its tensor by
counting the block starts at or below its program id, then loads that tensor's data pointers
from the table and casts them to typed pointers (as Triton's grouped-GEMM tutorial does).
"""
from __future__ import annotations

import math
import os
import weakref
from collections import OrderedDict
from typing import Callable

import numpy as np
import torch
import triton
import triton.language as tl

#: Kernels were decorated for the interpreter (``TRITON_INTERPRET=1`` when this module loaded):
#: ``triton.jit`` decides this once, at decoration time.
INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
_INTERPRETED = tl.constexpr(INTERPRETED)  # the same, usable inside kernels

# Table rows (compile-time constants so kernels can use them; ``.value`` on the host).
BLOCK_START = tl.constexpr(0)  # first program id of the tensor
PTR_A = tl.constexpr(1)  # data pointers: params (step) or scores (score_accumulate)
PTR_B = tl.constexpr(2)  # grads
PTR_C = tl.constexpr(3)  # scores (fused step), else 0
SEG_LO = tl.constexpr(4)  # compact segment [SEG_LO, SEG_HI) of the tensor
SEG_HI = tl.constexpr(5)
NUMEL = tl.constexpr(6)
TABLE_ROWS = 7

TL_DTYPES = {
    torch.float32: tl.float32,
    torch.bfloat16: tl.bfloat16,
    torch.float16: tl.float16,
    torch.float64: tl.float64,
}


def dense_block(device: torch.device) -> int:
    """Entries per program for passes over whole tensors.

    On a GPU 1024 fp32 entries (4 KiB) per program with 4 warps keeps enough bytes in flight per
    SM without leaving most programs of a small tensor idle. The interpreter pays per program, not
    per entry, so it gets bigger blocks.
    """
    return 4096 if device.type == "cpu" else 1024


def num_warps_for(block: int) -> int:
    return max(1, min(8, block // 256))


def pad_tensors(n: int) -> int:
    """Vector width used to search the block-start row: a power of two >= n (compile-time)."""
    return max(16, triton.next_power_of_2(n))


class _Table:
    """One device table: its pinned host copy, the event recorded after the host-to-device copy
    on the stream that made it, and the streams that have been ordered after that copy."""

    __slots__ = ("host", "table", "event", "origin", "streams", "done")

    def __init__(self, host, table, event, origin):
        self.host, self.table, self.event, self.origin = host, table, event, origin
        self.streams = {origin}  # streams whose later work is ordered after the copy
        self.done = False  # the copy is known to have completed (seen by an eager Event.query())

    def use_on(self, stream) -> None:
        """Make ``stream``'s next kernel safe to read the table (eager mode; never syncs the host)."""
        if not self.done and self.event.query():  # cudaEventQuery: does not wait
            self.done = True
        key = _stream_key(stream)
        if key in self.streams:
            return
        if not self.done:
            stream.wait_event(self.event)  # device-side ordering after the copy
        # The table was allocated on `origin`: without this its memory could be handed to new
        # work on `origin` when the cache drops it while a kernel on `stream` still reads it.
        self.table.record_stream(stream)
        self.streams.add(key)


def _stream_key(stream) -> tuple:
    return (stream.device_index, stream.stream_id)


def _capturing(device: torch.device) -> bool:
    with torch.cuda.device(device):
        return torch.cuda.is_current_stream_capturing()


class TableCache:
    """Device copies of per-call tables, keyed by their full contents.

    An optimizer passes the same tensors every step, so the table (data pointers, offsets,
    sizes) repeats: caching it avoids a host-to-device copy per step. The key is the table's
    contents, so a hit can never give a stale table, even if memory was reused.

    Streams and CUDA graphs (nothing here waits on the host):

    * eager: a new table is copied (pinned memory, non-blocking) on the current stream and an event
      is recorded after the copy. A launch on any other stream first makes that stream wait for the
      event (``Stream.wait_event``, once per stream, and only until the copy is seen complete) and
      records the stream on the table's memory (``record_stream``), so the caching allocator does
      not reuse it under a running kernel when the cache evicts it (LRU, ``size`` entries);
    * under CUDA graph capture a launch embeds the table's address, and a graph can be replayed at
      any later time: a table whose copy is known complete (seen by an eager call) is used and
      pinned for the life of the process (never evicted); otherwise a new table is copied inside
      the capture (the copy becomes a node of the graph, ordered before the kernel) and kept, with
      its pinned host buffer, for the life of the process. A table made during a capture is never
      handed to eager calls (its contents exist only once the graph has run). Each capture that
      needs its own table keeps a few hundred bytes (and the graph pool's segment holding them)
      alive: captures are few, tables tiny.

    On the CPU (Triton's interpreter) a plain content-keyed LRU.
    """

    def __init__(self, size: int = 64) -> None:
        self._size = size
        self._entries: OrderedDict[tuple, _Table | torch.Tensor] = OrderedDict()
        self._pinned: dict[tuple, _Table] = {}  # used by a captured graph: never evicted
        self._captured: list[tuple[torch.Tensor, torch.Tensor]] = []  # made during captures

    def get(self, rows: list[list[int]], device: torch.device) -> torch.Tensor:
        key = (device, tuple(tuple(r) for r in rows))
        if device.type != "cuda":
            hit = self._entries.get(key)
            if hit is None:
                hit = self._entries[key] = torch.tensor(rows, dtype=torch.int64, device=device)
                self._evict()
            else:
                self._entries.move_to_end(key)
            return hit

        entry = self._pinned.get(key) or self._entries.get(key)
        if _capturing(device):
            if entry is not None and entry.done:
                self._entries.pop(key, None)
                self._pinned[key] = entry
                return entry.table
            return self._copy_in_capture(rows, device)
        stream = torch.cuda.current_stream(device)
        if entry is None:
            entry = self._new(rows, device, stream)
            self._entries[key] = entry
            self._evict()
        elif key in self._entries:
            self._entries.move_to_end(key)
        entry.use_on(stream)
        return entry.table

    def _evict(self) -> None:
        while len(self._entries) > self._size:
            self._entries.popitem(last=False)

    @staticmethod
    def _new(rows, device, stream) -> _Table:
        # Pinned + non_blocking: the copy is queued on the stream, the host never waits; the pinned
        # buffer stays alive with the entry (torch's pinned allocator also waits for the copy
        # before reusing it).
        host = torch.tensor(rows, dtype=torch.int64).pin_memory()
        with torch.cuda.device(device):
            table = host.to(device, non_blocking=True)
            event = torch.cuda.Event()
            event.record(stream)
        return _Table(host, table, event, _stream_key(stream))

    def _copy_in_capture(self, rows, device) -> torch.Tensor:
        try:
            host = torch.tensor(rows, dtype=torch.int64).pin_memory()
            with torch.cuda.device(device):
                table = host.to(device, non_blocking=True)  # captured: replayed before the kernel
        except RuntimeError as exc:  # an older torch whose pinned-memory allocator refuses captures
            raise RuntimeError(
                "fastmask (triton): cannot copy the kernel's tensor table inside this CUDA graph capture "
                f"({exc}); run one eager step with the same tensors, then torch.cuda.synchronize(), then "
                "another eager step before capturing, so that the capture reuses the table made then") from exc
        self._captured.append((host, table))
        return table


class DerivedCache:
    """Device tensors computed on the device from an index buffer's contents (the fused step's
    per-program ranges), cached per buffer as ``fastmask.ops`` caches its index check.

    An entry belongs to the buffer's base tensor (held weakly: the entry goes when the base does),
    the view's position and length, and a caller's ``layout`` (segment offsets, sizes, block); it
    is valid for one version of the base (every in-place torch write bumps the version counter,
    and a new version replaces the entry). A write that does not bump the version (through
    ``.data`` or numpy) leaves the entry stale: a caller must cache only what stays *safe* when
    stale (the fused step clamps its ranges to the segments, so stale ranges cost locality, never
    correctness or bounds). Buffers made under ``torch.inference_mode()`` have no version counter:
    their tensors are computed on every call.

    Streams and CUDA graphs follow :class:`TableCache`'s rules (nothing waits on the host): an
    eager miss computes on the current stream and records an event after it; another stream
    waits for that event (once, and only until the computation is seen complete) and is recorded
    on the tensor's memory, so that replacing or evicting the entry cannot free it under a running
    kernel. Under capture, an entry whose computation is known complete (seen by an eager call) is
    used and pinned for the life of the process; otherwise the computation is captured (it reruns
    at every replay, before the kernel that reads it) and its tensor kept, and never handed to
    eager calls. On the CPU (the interpreter) the same keys, without events.
    """

    def __init__(self, size: int = 64) -> None:
        self._size = size
        # (device, id(base), offset, numel, layout) -> (weakref to base, version, _Table or tensor)
        self._entries: OrderedDict[tuple, tuple] = OrderedDict()
        self._pinned: dict[tuple, tuple] = {}  # (key, version) -> entry: used by a captured graph
        self._captured: list[torch.Tensor] = []  # computed during captures

    def _forget(self, key: tuple, ref: weakref.ref) -> None:
        hit = self._entries.get(key)
        if hit is not None and hit[0] is ref:
            del self._entries[key]

    def get(self, idx: torch.Tensor, layout: tuple, compute: Callable[[], torch.Tensor]) -> torch.Tensor:
        device = idx.device
        cuda = device.type == "cuda"
        if idx.is_inference():  # no version counter to key on
            out = compute()
            if cuda and _capturing(device):
                self._captured.append(out)
            return out
        base = idx._base if idx._base is not None else idx
        key = (device, id(base), idx.storage_offset(), idx.numel(), layout)
        version = idx._version
        hit = self._pinned.get((key, version)) or self._entries.get(key)
        if hit is not None and (hit[0]() is not base or hit[1] != version):  # a reused id, or a new version
            hit = None
        if not cuda:
            if hit is None:
                ref = weakref.ref(base, lambda r, k=key: self._forget(k, r))
                hit = self._entries[key] = (ref, version, compute())
                self._entries.move_to_end(key)
                self._evict()
            elif key in self._entries:
                self._entries.move_to_end(key)
            return hit[2]

        if _capturing(device):
            if hit is not None and hit[2].done:
                if self._entries.get(key) is hit:
                    del self._entries[key]
                self._pinned[(key, version)] = hit
                return hit[2].table
            out = compute()  # captured: recomputed by every replay, before the kernel reading it
            self._captured.append(out)
            return out
        stream = torch.cuda.current_stream(device)
        if hit is None:
            out = compute()
            ref = weakref.ref(base, lambda r, k=key: self._forget(k, r))
            hit = self._entries[key] = (ref, version, _Table(None, out, self._record(device, stream),
                                                             _stream_key(stream)))
            self._entries.move_to_end(key)
            self._evict()
        elif key in self._entries:
            self._entries.move_to_end(key)
        hit[2].use_on(stream)
        return hit[2].table

    def _evict(self) -> None:
        while len(self._entries) > self._size:
            self._entries.popitem(last=False)

    @staticmethod
    def _record(device, stream):
        """An event recorded on ``stream`` after the computation just queued there."""
        with torch.cuda.device(device):
            event = torch.cuda.Event()
            event.record(stream)
        return event


def launch_context(device: torch.device):
    """Triton launches on the current CUDA device: make it the tensors' device."""
    import contextlib

    if device.type == "cuda":
        return torch.cuda.device(device)
    return contextlib.nullcontext()


@triton.jit
def find_block(table_ptr, n_tensors, pid, T_PAD: tl.constexpr):
    """(tensor, first program of that tensor) for program ``pid``.

    Block starts are non-decreasing; the tensor owning ``pid`` is the last one whose start is
    <= pid (tensors with no blocks share their start with the next one and are skipped this way).
    """
    ts = tl.arange(0, T_PAD)
    starts = tl.load(table_ptr + ts, mask=ts < n_tensors, other=2**62)
    t = tl.sum((starts <= pid).to(tl.int32), axis=0) - 1
    first = tl.load(table_ptr + t)
    return t, first


#: Compact entries per 16 bytes (int32 indices, fp32 state): the plain step aligns its programs'
#: first entries to this, so that its contiguous loads and stores can be 16-byte vectors.
COMPACT_ALIGN = tl.constexpr(4)


def aligned16(ptrs) -> bool:
    """Every address is a multiple of 16 bytes: the kernels may then hint their table pointers so
    (Triton specializes pointer *arguments* on this by itself, but not pointers read from a table)."""
    return all(p % 16 == 0 for p in ptrs)


@triton.jit
def table_ptr_of(table_ptr, row, n_tensors, t, DTYPE: tl.constexpr, ALIGNED: tl.constexpr):
    """Tensor ``t``'s data pointer from table row ``row``, typed; hinted 16-byte aligned if the host
    checked that every pointer of the row is (``aligned16``)."""
    p = tl.load(table_ptr + row * n_tensors + t).to(tl.pointer_type(DTYPE))
    if ALIGNED:
        p = tl.multiple_of(p, 16)
    return p


@triton.jit
def lower_bound(idx_ptr, lo, hi, target, n_iter):
    """First position j in [lo, hi) with idx[j] >= target (hi if none); idx sorted there.

    Branch-free bisection with a fixed number of rounds (``n_iter`` >= bit length of the segment
    size + 1), so all lanes of a program stay in step.
    """
    for _ in range(n_iter):
        active = lo < hi
        mid = (lo + hi) // 2
        v = tl.load(idx_ptr + mid, mask=active, other=0)
        right = active & (v < target)
        lo = tl.where(right, mid + 1, lo)
        hi = tl.where(active & (v >= target), mid, hi)
    return lo


@triton.jit
def statistic(g, SCORE_MODE: tl.constexpr):
    """Per-entry score statistic: 0 = g (signed), 1 = |g|, 2 = g*g (empirical Fisher)."""
    if SCORE_MODE == 0:
        s = g
    elif SCORE_MODE == 1:
        s = tl.abs(g)
    else:
        s = g * g
    return s


@triton.jit
def accumulate_scores(g_ptr, sc_ptr, offs, mask, scale, HAS_SCALE: tl.constexpr, SCORE_MODE: tl.constexpr):
    """``sc[offs] += statistic(g[offs] (/ scale))`` for one dense block; ``mask=None``: a whole block,
    loaded and stored without masks (vector accesses where the pointers are known aligned)."""
    if mask is None:
        g = tl.load(g_ptr + offs).to(tl.float32)
        acc = tl.load(sc_ptr + offs)
    else:
        g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        acc = tl.load(sc_ptr + offs, mask=mask, other=0.0)
    if HAS_SCALE:
        g = tl.div_rn(g, scale)
    tl.store(sc_ptr + offs, acc + statistic(g, SCORE_MODE), mask=mask)


@triton.jit
def to_param_dtype(x, P_DTYPE: tl.constexpr):
    """fp32 -> param dtype, rounding to nearest even.

    bf16 is rounded by hand: Triton's interpreter truncates fp32 -> bf16, and an optimizer step
    of about one bf16 ulp (common: lr 1e-2 on weights near 1) then drifts steadily toward zero.
    Doing it in integer ops gives torch's rounding on every platform, for a few ALU ops in a
    memory-bound kernel. NaN is kept NaN (the carry could otherwise turn it into an infinity).
    """
    if P_DTYPE == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = bits + 0x7FFF + ((bits >> 16) & 1)
        y = (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
        y = tl.where(x != x, x.to(tl.bfloat16), y)
    else:
        y = x.to(P_DTYPE)
    return y


# ------------------------------------------------------------------------------------------------
# exact arithmetic helpers (csrc/adamw_math.h is the C++ twin of these)
#
# Kernels that use them must be launched with ``enable_fp_fusion=False``: Triton lets LLVM
# contract a*b + c into an FMA by default, which rounds once where torch rounds twice. The FMAs
# torch does use are written out with ``fma_f32``.
# ------------------------------------------------------------------------------------------------
def f64_bits(x: float) -> int:
    """The IEEE bits of ``x`` as a signed int64: how a float64 scalar reaches a kernel.

    Triton passes a Python float as fp32 (and the interpreter turns one into an fp32 constant),
    so float64 scalars travel as their bits and ``as_f64`` rebuilds them in the kernel. Kernels
    must not specialize on these arguments (``do_not_specialize``)."""
    return int(np.array(float(x), dtype=np.float64).view(np.int64))


def f32_bits(x: float) -> int:
    """``x`` rounded once to fp32 (to nearest even, as a C cast), as signed int32 bits."""
    with np.errstate(over="ignore"):
        return int(np.array(float(x), dtype=np.float64).astype(np.float32).view(np.int32))


@triton.jit
def as_f64(bits):
    return bits.to(tl.int64).to(tl.float64, bitcast=True)


@triton.jit
def as_f32(bits):
    return bits.to(tl.int32).to(tl.float32, bitcast=True)


@triton.jit
def fma_f32(a, b, c):
    """fp32 ``a * b + c`` rounded once (IEEE fusedMultiplyAdd).

    On a GPU, ``tl.fma``. The interpreter's ``tl.fma`` is ``a * b + c`` in numpy (two roundings),
    so there it is computed in fp64: ``a * b`` is exact (48 bits), the sum is rounded to odd
    (round to nearest, then, if inexact and even, one ulp towards the exact value, known from
    TwoSum's error term), and rounding that to fp32 is the correctly rounded result (Boldo and
    Melquiond: 53 >= 24 + 2 bits).
    """
    if _INTERPRETED:
        p = a.to(tl.float64) * b.to(tl.float64)
        c64 = c.to(tl.float64)
        s = p + c64
        bv = s - p
        err = (p - (s - bv)) + (c64 - bv)
        bits = s.to(tl.int64, bitcast=True)
        finite = tl.abs(s) < float("inf")
        to_odd = finite & (err != 0.0) & ((bits & 1) == 0)
        step = tl.where((err > 0.0) == (s > 0.0), 1, -1)
        r = tl.where(to_odd, bits + step, bits).to(tl.float64, bitcast=True).to(tl.float32)
    else:
        r = tl.fma(a, b, c)
    return r


def _pow_f64_interpreted(base, exp):
    # The interpreter has no libdevice: C's pow, as torch's CPU kernel calls it for short inputs.
    from triton.runtime.interpreter import TensorHandle

    out = np.vectorize(math.pow, otypes=[np.float64])(base.handle.data, exp.handle.data)
    return tl.tensor(TensorHandle(out, tl.float64), exp.type)


if INTERPRETED:
    pow_f64 = _pow_f64_interpreted
else:
    from triton.language.extra import libdevice

    #: float64 ``base ** exp``: CUDA's ``pow`` (libdevice ``__nv_pow``), the function torch's CUDA
    #: ``torch.pow`` runs, so bias corrections match the reference on the GPU bit for bit.
    pow_f64 = libdevice.pow


@triton.jit
def maximum_torch(a, b):
    """``torch.maximum``: NaN propagates (``tl.maximum`` drops it by default); else ``a > b ? a : b``."""
    return tl.where(a != a, a, tl.where(b != b, b, tl.where(a > b, a, b)))


@triton.jit
def lerp_torch(start, end, w):
    """``torch.lerp(start, end, w)`` with a scalar weight, as torch's kernels round it: one FMA,
    ``fma(w, end - start, start)`` for ``|w| < 0.5``, else ``fma(w - 1, end - start, end)``."""
    diff = end - start
    small = (w < 0.5) & (w > -0.5)
    return tl.where(small, fma_f32(w, diff, start), fma_f32(w - 1.0, diff, end))


@triton.jit
def addcmul_torch(v, g, w, CUDA_ROUNDING: tl.constexpr):
    """``v.addcmul_(g, g, value=w)`` as torch rounds it on the device the tensors live on.

    torch's CPU kernel computes ``fma(w * g, g, v)``; its CUDA kernel (``pointwise_op_impl``)
    ``fma(w, g * g, v)``, or ``fma(g, g, v)`` when ``w == 1``. The two differ in about 6% of the
    entries, so a kernel that matches the reference on one device cannot use the other's form.
    """
    if CUDA_ROUNDING:
        r = tl.where(w == 1.0, fma_f32(g, g, v), fma_f32(w, g * g, v))
    else:
        r = fma_f32(w * g, g, v)
    return r


SCORE_MODE_IDS = {"grad": 0, "abs": 1, "fisher": 2}

"""A pool of spawned worker processes in one gloo process group, for the distributed tests.

``RankPool`` lives for a test module (the ``ranks`` fixture): each test sends a module-level
function that every rank runs under one gloo process group on 127.0.0.1. A rank that raises sends
its traceback back, a rank that dies or does not answer in time fails the test, and in both cases
the pool is killed and re-created for the next test. Import ``pool_holder`` and ``ranks`` into a
test module to use it there (each module gets its own pool).
"""
from __future__ import annotations

import multiprocessing.connection
import os
import pickle
import time
import traceback
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist

WORLD = 2
RUN_TIMEOUT = 120  # seconds for one test function on every rank
COLLECTIVE_TIMEOUT = 60  # gloo's own timeout: a collective nobody answers fails instead of hanging


# ------------------------------------------------------------------------------------------------
# the rank pool
# ------------------------------------------------------------------------------------------------
def _worker(rank: int, world: int, port: int, conn) -> None:
    """Worker process: join the gloo group, then run ``(fn, args)`` messages until told to stop."""
    try:
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")  # loopback only
        torch.set_num_threads(1)  # two ranks share two cores
        import fastmask.compat

        fastmask.compat.patch_torchvision()
        store = dist.TCPStore("127.0.0.1", port, is_master=False, timeout=timedelta(seconds=COLLECTIVE_TIMEOUT))
        dist.init_process_group("gloo", store=store, rank=rank, world_size=world,
                                timeout=timedelta(seconds=COLLECTIVE_TIMEOUT))
    except BaseException:
        conn.send_bytes(pickle.dumps(("err", traceback.format_exc())))
        return
    try:
        while True:
            try:
                fn, args = pickle.loads(conn.recv_bytes())
            except EOFError:
                break
            if fn is None:
                break
            try:
                torch.manual_seed(0)
                out = ("ok", fn(rank, world, *args))
            except BaseException:
                out = ("err", traceback.format_exc())
            conn.send_bytes(pickle.dumps(out))
    finally:
        dist.destroy_process_group()


class RankPool:
    """``world`` spawned processes in one gloo group; ``run(fn, *args)`` returns every rank's
    ``fn(rank, world, *args)``, or raises with the failing ranks' tracebacks."""

    def __init__(self, world: int = WORLD) -> None:
        ctx = torch.multiprocessing.get_context("spawn")
        # The parent holds the store on a free port it chose itself (port 0): no port race.
        self.store = dist.TCPStore("127.0.0.1", 0, world_size=None, is_master=True, wait_for_workers=False,
                                   timeout=timedelta(seconds=COLLECTIVE_TIMEOUT))
        self.world = world
        self.conns, self.procs = [], []
        for r in range(world):
            mine, theirs = ctx.Pipe()
            proc = ctx.Process(target=_worker, args=(r, world, self.store.port, theirs), daemon=True)
            proc.start()
            theirs.close()
            self.conns.append(mine)
            self.procs.append(proc)
        self.broken = False

    def run(self, fn, *args, timeout: float = RUN_TIMEOUT) -> list:
        payload = pickle.dumps((fn, args))
        for c in self.conns:
            c.send_bytes(payload)
        results: dict[int, object] = {}
        errors: dict[int, str] = {}
        deadline = time.monotonic() + timeout
        pending = set(range(self.world))
        while pending:
            left = deadline - time.monotonic()
            if errors:  # the others may be stuck in a collective with the failed rank: short grace
                left = min(left, 10.0)
            if left <= 0:
                break
            waitables = [self.conns[r] for r in pending] + [self.procs[r].sentinel for r in pending]
            for obj in multiprocessing.connection.wait(waitables, timeout=left):
                r = next(i for i in pending if obj in (self.conns[i], self.procs[i].sentinel))
                if obj is self.conns[r] or self.conns[r].poll():
                    try:
                        status, value = pickle.loads(self.conns[r].recv_bytes())
                    except EOFError:
                        status, value = "err", f"rank {r} closed its pipe (exit code {self.procs[r].exitcode})"
                else:
                    self.procs[r].join(1)
                    status, value = "err", f"rank {r} died (exit code {self.procs[r].exitcode})"
                pending.discard(r)
                (results if status == "ok" else errors)[r] = value
        for r in pending:
            errors[r] = f"rank {r} did not answer within {timeout:.0f} s (killed)"
        if errors:
            self.close(kill=True)
            report = "\n".join(f"--- rank {r} ---\n{tb}" for r, tb in sorted(errors.items()))
            raise AssertionError(f"{getattr(fn, '__name__', fn)} failed on rank(s) {sorted(errors)}:\n{report}")
        return [results[r] for r in range(self.world)]

    def close(self, kill: bool = False) -> None:
        self.broken = True
        if not kill:
            for c in self.conns:
                try:
                    c.send_bytes(pickle.dumps((None, ())))
                except OSError:
                    pass
            for p in self.procs:
                p.join(10)
        for p in self.procs:
            if p.is_alive():
                p.kill()
                p.join(5)
        for c in self.conns:
            c.close()


@pytest.fixture(scope="module")
def pool_holder():
    holder: dict[str, RankPool] = {}
    yield holder
    if "pool" in holder and not holder["pool"].broken:
        holder["pool"].close()


@pytest.fixture
def ranks(pool_holder) -> RankPool:
    """The module's rank pool, re-created after a failure."""
    pool = pool_holder.get("pool")
    if pool is None or pool.broken:
        pool_holder["pool"] = pool = RankPool(WORLD)
    return pool

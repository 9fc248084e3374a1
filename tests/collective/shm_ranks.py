"""Rank functions for the shared-memory all_reduce tests (tests/collective/test_shm.py).

Each joins the world with a small chunk size (`CHUNK`, so messages below, at and above one
chunk stay small), does its part and returns plain values for the test to check.
"""
from __future__ import annotations

import json
import os
import signal
import time

import numpy as np

CHUNK = 8 << 10
DTYPES = ("float16", "float32", "float64", "int8", "uint8", "int32", "int64")
OPS = ("sum", "max", "min", "prod")


def value(rank: int, dtype: str, n: int, salt: int = 0) -> np.ndarray:
    """Small values (a product of three stays exact in int8 and float16), different per rank;
    signed dtypes get negative ones too."""
    v = (np.arange(n) * 7 + rank * 3 + salt) % 5 + 1
    if np.dtype(dtype).kind in "if":
        v = np.where(np.arange(n) % 3 == rank % 3, -v, v)
    return v.astype(dtype)


def sizes(dtype: str) -> list[int]:
    """Element counts: tiny, odd, just under, equal to and above one chunk (odd sizes too)."""
    per_chunk = CHUNK // np.dtype(dtype).itemsize
    return [1, 7, per_chunk // 3 + 1, per_chunk - 1, per_chunk, 2 * per_chunk + 5]


def _init(timeout: float):
    from shoal.collective import _shm_group
    import shoal.collective as dist
    _shm_group.CHUNK_BYTES = CHUNK
    return dist, dist.init_parallel_env(timeout=timeout)


def every_dtype() -> dict:
    dist, world = _init(30)
    r = dist.get_rank()
    out = {"uses_shm": world.uses_shm, "shm_ops_before": world.shm_ops}
    calls = 0
    for dt in DTYPES:
        for n in sizes(dt):
            for op in OPS + ("avg",):
                x = value(r, dt, n)
                dist.all_reduce(x, op)
                calls += 1
                out[f"{op}/{dt}/{n}"] = x
            x = value(r, dt, n, salt=1)
            dist.broadcast(x, src=n % dist.get_world_size())
            out[f"broadcast/{dt}/{n}"] = x
            gathered: list = []
            dist.all_gather(gathered, value(r, dt, n, salt=2))
            out[f"all_gather/{dt}/{n}"] = np.stack(gathered)
            calls += 2
    x = value(r, "float32", 3 * 40).reshape(3, 40)[:, ::2]   # not contiguous: through a copy
    dist.all_reduce(x)
    out["strided"] = x
    task = dist.all_reduce(y := value(r, "float64", 5000), sync_op=False)
    task.wait()
    out["async"] = y
    out["calls"] = calls + 2
    out["shm_ops"] = world.shm_ops
    dist.destroy_process_group()
    return out


def never_calls(late: int, timeout: float) -> dict:
    """Rank `late` never calls all_reduce (it sleeps past the others' timeout)."""
    dist, world = _init(timeout)
    r = dist.get_rank()
    out = {"rank": r, "uses_shm": world.uses_shm}
    if r == late:
        time.sleep(timeout + 4)
        return out
    t0 = time.monotonic()
    try:
        dist.all_reduce(np.ones(3000, np.float32))
    except dist.CollectiveTimeoutError as e:
        out.update(elapsed=time.monotonic() - t0, missing=e.missing, message=str(e))
    try:
        dist.all_reduce(np.ones(8, np.float32))
    except dist.GroupBrokenError as e:
        out["broken"] = str(e)
    return out


def killed_mid_run(victim: int, report_dir: str) -> dict:
    """Rank `victim` SIGKILLs itself after two all_reduces; the others keep calling and write
    what they saw to report_dir/<rank>.json at once (spawn stops them soon after it sees the
    victim die, so a return value would never arrive; SIGTERM is ignored to let them write)."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    dist, world = _init(30)
    r = dist.get_rank()
    report = {"uses_shm": world.uses_shm, "segment": world._shm.name if world._shm else None}
    for _ in range(2):
        dist.all_reduce(np.ones(20000, np.float32))
    if r == victim:
        time.sleep(0.2)   # the others are already waiting in the next all_reduce
        os.kill(os.getpid(), signal.SIGKILL)
    t0 = time.monotonic()
    try:
        for _ in range(3):
            dist.all_reduce(np.ones(20000, np.float32))
        report["error"] = None
    except dist.CollectiveError as e:
        report.update(error=type(e).__name__, message=str(e))
    report["elapsed"] = time.monotonic() - t0
    with open(os.path.join(report_dir, f"{r}.json.tmp"), "w") as f:
        json.dump(report, f)
    os.rename(os.path.join(report_dir, f"{r}.json.tmp"), os.path.join(report_dir, f"{r}.json"))
    return report


def mismatched(case: str) -> dict:
    """Rank 1 makes another call than rank 0 (a bigger array, or a broadcast)."""
    dist, world = _init(5)
    r = dist.get_rank()
    x = np.ones(100 if r == 0 or case != "size" else 300, np.float32)
    t0 = time.monotonic()
    try:
        if r == 1 and case == "kind":
            dist.broadcast(x, src=0)
        else:
            dist.all_reduce(x)
        out = {"error": None}
    except dist.CollectiveError as e:
        out = {"error": type(e).__name__, "message": str(e)}
    out["elapsed"] = time.monotonic() - t0
    try:
        dist.all_reduce(np.ones(4, np.float32))
    except dist.GroupBrokenError:
        out["broken"] = True
    return out


def subgroups() -> dict:
    """Groups [0, 2] and [1, 2] of a world of 3, each with its own segment, beside the world."""
    dist, world = _init(30)
    r = dist.get_rank()
    groups = [dist.new_group([0, 2]), dist.new_group([1, 2])]
    out = {"world": (world.uses_shm, world._shm.name)}
    for i, g in enumerate(groups):
        if r in g.ranks:
            x = value(r, "int64", 3000)
            dist.all_reduce(x, group=g)
            out[f"g{i}"] = x
            out[f"g{i}/shm"] = (g.uses_shm, g.shm_ops, g._shm.name)
    x = value(r, "int32", 3000)
    dist.all_reduce(x)
    out["world_sum"] = x
    dist.destroy_process_group()
    return out


PIECES = (1, 17, 5000, 3, 40000, 7)  # across tiles and chunks, and pieces inside one tile


def gather_into() -> dict:
    """all_reduce_into of several arrays into one flat buffer (data parallel's bucket), averaged
    for floats, summed for int64, and the bad calls it refuses before sending anything."""
    from shoal.collective import InvalidArgumentError, _api
    dist, world = _init(30)
    r, n = dist.get_rank(), dist.get_world_size()
    out = {"uses_shm": world.uses_shm}
    ops0 = world.shm_ops
    for dt in ("float32", "float64", "int64"):
        pieces = [value(r, dt, k, salt=i) for i, k in enumerate(PIECES)]
        pieces[2] = pieces[2].reshape(50, 100)  # any shape: read as its flat elements
        flat = np.full(sum(PIECES), -1, dt)
        scale = 1.0 / n if dt != "int64" else 1.0
        _api.all_reduce_into(pieces, flat, scale=scale)
        out[f"into/{dt}"] = flat
        out[f"pieces_unchanged/{dt}"] = all(
            np.array_equal(p.reshape(-1), value(r, dt, k, salt=i).reshape(-1))
            for i, (p, k) in enumerate(zip(pieces, PIECES)))
    task = _api.all_reduce_into([value(r, "float32", 300), value(r, "float32", 9)],
                                y := np.zeros(309, np.float32), sync_op=False)
    task.wait()
    out["async"] = y
    out["shm_ops"] = world.shm_ops - ops0
    errors = []
    for bad in (lambda: _api.all_reduce_into([np.ones(3, np.float32)], np.zeros(4, np.float32)),
                lambda: _api.all_reduce_into([np.ones(4, np.float64)], np.zeros(4, np.float32)),
                lambda: _api.all_reduce_into([np.ones(4, np.float32)], np.zeros((2, 2), np.float32))):
        try:
            bad()
        except InvalidArgumentError as e:
            errors.append(str(e))
    out["errors"] = errors
    dist.all_reduce(z := np.ones(2, np.float32))  # the group is still in step after the refusals
    out["after"] = z
    dist.destroy_process_group()
    return out

"""Rank functions for the collective tests, run by shoal.launcher.spawn in fresh processes.

Each one joins the world (init_parallel_env from the contract spawn sets), does its part and
returns plain values (numpy arrays, lists) for the test to compare with a numpy reference.
"""
from __future__ import annotations

import time

import numpy as np

DTYPES = ("float32", "float64", "int64")


def value(rank: int, dtype: str, n: int, salt: int = 0) -> np.ndarray:
    """Rank `rank`'s input: small values (prod stays exact), different per rank and salt."""
    return ((np.arange(n) * 7 + rank * 3 + salt) % 5 + 1).astype(dtype)


def every_op(n: int) -> dict:
    import shoal
    import shoal.collective as dist
    dist.init_parallel_env(timeout=20)
    r, w = dist.get_rank(), dist.get_world_size()
    out = {"rank": r, "size": w}
    for dt in DTYPES:
        for op in ("sum", "max", "min", "prod", "avg"):
            x = value(r, dt, n)
            dist.all_reduce(x, op)
            out[f"all_reduce/{op}/{dt}"] = x
        big = value(r, dt, 70_000)  # > 256 KiB: the ring algorithm
        dist.all_reduce(big)
        out[f"all_reduce/big/{dt}"] = big
        x = value(r, dt, n)
        dist.broadcast(x, src=w - 1)
        out[f"broadcast/{dt}"] = x
        x = value(r, dt, n)
        dist.reduce(x, dst=1 % w)
        out[f"reduce/{dt}"] = x
        gathered: list = []
        dist.all_gather(gathered, value(r, dt, n))
        out[f"all_gather/{dt}"] = np.stack(gathered)
        x = np.zeros(n, dt)
        dist.scatter(x, [value(i, dt, n, salt=9) for i in range(w)] if r == 0 else None, src=0)
        out[f"scatter/{dt}"] = x
        for rep in range(3):  # this Gloo's own reduce_scatter was timing-dependent: repeat ours
            x = np.zeros(n, dt)
            dist.reduce_scatter(x, [value(r, dt, n, salt=i + rep) for i in range(w)])
            out[f"reduce_scatter/{rep}/{dt}"] = x
        received: list = []
        dist.alltoall([value(r, dt, n, salt=10 * j) for j in range(w)], received)
        out[f"alltoall/{dt}"] = np.stack(received)
        if w > 1:  # a ring of send/recv
            x = np.zeros(n, dt)
            if r % 2 == 0:
                dist.send(value(r, dt, n), dst=(r + 1) % w)
                dist.recv(x, src=(r - 1) % w)
            else:
                dist.recv(x, src=(r - 1) % w)
                dist.send(value(r, dt, n), dst=(r + 1) % w)
            out[f"sendrecv/{dt}"] = x
        dist.barrier()
    # Tensors, non-contiguous arrays and sync_op=False, in issue order
    t = shoal.to_tensor(value(r, "float32", n))
    dist.all_reduce(t)
    out["tensor"] = t.numpy()
    strided = np.zeros((n, 2), np.float32)
    strided[:, 0] = value(r, "float32", n)
    view = strided[:, 0]
    dist.all_reduce(view)
    out["strided"] = strided[:, 0].copy()
    arrays = [value(r, "float64", n, salt=s) for s in range(4)]
    tasks = [dist.all_reduce(a, sync_op=False) for a in arrays]
    dist.all_reduce(arrays[0])           # sync after async: runs after them, in order
    out["async_done"] = [t.is_completed() for t in tasks]
    for task in tasks:
        task.wait()
    out["async"] = np.stack(arrays)
    dist.destroy_process_group()
    return out


def subgroups() -> dict:
    import shoal.collective as dist
    dist.init_parallel_env(timeout=20)
    r = dist.get_rank()
    g = dist.new_group([0, 2])
    out = {"rank": r, "group_rank": dist.get_rank(g), "group_size": dist.get_world_size(g)}
    x = np.full(4, r + 1, np.float32)
    if r in (0, 2):
        dist.all_reduce(x, group=g)
        y = np.full(2, r, np.int64)
        dist.broadcast(y, src=2, group=g)
        out["bcast"] = y
    else:
        try:
            dist.all_reduce(x, group=g)
        except dist.InvalidArgumentError as e:
            out["refused"] = str(e)
    out["x"] = x
    world = np.full(3, r, np.int64)
    dist.all_reduce(world)  # the world still works beside the group
    out["world"] = world
    dist.destroy_process_group()
    return out


def late_rank(late: int, timeout: float) -> dict:
    """Rank `late` arrives long after the others' all_reduce timed out."""
    import shoal.collective as dist
    dist.init_parallel_env(timeout=timeout)
    r = dist.get_rank()
    out = {"rank": r}
    if r == late:
        time.sleep(timeout + 4)
        return out
    t0 = time.monotonic()
    try:
        dist.all_reduce(np.ones(8, np.float32))
    except dist.CollectiveTimeoutError as e:
        out.update(elapsed=time.monotonic() - t0, missing=e.missing, op=e.op, message=str(e))
    try:
        dist.all_reduce(np.ones(8, np.float32))
    except dist.GroupBrokenError as e:
        out["broken"] = str(e)
    return out


def fails_in_barrier(bad: int) -> None:
    """Rank `bad` raises; the others wait in a barrier that never completes."""
    import shoal.collective as dist
    dist.init_parallel_env(timeout=60)
    if dist.get_rank() == bad:
        raise RuntimeError(f"rank {bad} fails on purpose")
    dist.barrier()


def world_info() -> dict:
    import os

    import shoal.collective as dist
    dist.init_parallel_env(timeout=20)
    keep = ("PADDLE_", "SHOAL_", "TRAINING_ROLE")
    return {"rank": dist.get_rank(), "size": dist.get_world_size(),
            "env": {k: v for k, v in os.environ.items() if k.startswith(keep)}}


def nccl_ops(n: int) -> dict:
    """The nccl backend on cupy arrays (each rank on its own GPU), and numpy through it."""
    import os

    import cupy

    import shoal.collective as dist
    rank = int(os.environ["PADDLE_TRAINER_ID"])
    cupy.cuda.Device(rank % cupy.cuda.runtime.getDeviceCount()).use()
    dist.init_parallel_env("nccl", timeout=30)
    r, w = dist.get_rank(), dist.get_world_size()
    out = {}
    for dt in DTYPES:
        x = cupy.asarray(value(r, dt, n))
        dist.all_reduce(x, "max")
        out[f"all_reduce/max/{dt}"] = cupy.asnumpy(x)
        gathered: list = []
        dist.all_gather(gathered, cupy.asarray(value(r, dt, n)))
        out[f"all_gather/{dt}"] = np.stack([cupy.asnumpy(g) for g in gathered])
        y = cupy.zeros(n, dt)
        dist.reduce_scatter(y, [cupy.asarray(value(r, dt, n, salt=i)) for i in range(w)])
        out[f"reduce_scatter/{dt}"] = cupy.asnumpy(y)
        b = cupy.asarray(value(r, dt, n))
        dist.broadcast(b, src=0)
        out[f"broadcast/{dt}"] = cupy.asnumpy(b)
        received: list = []
        dist.alltoall([cupy.asarray(value(r, dt, n, salt=10 * j)) for j in range(w)], received)
        out[f"alltoall/{dt}"] = np.stack([cupy.asnumpy(a) for a in received])
    host = value(r, "float32", n)
    dist.all_reduce(host)   # a numpy array through the device
    out["host"] = host
    dist.barrier()
    dist.destroy_process_group()
    return out


def reinit_twice() -> list:
    """destroy_process_group, then a new world in the same processes (new rendezvous keys)."""
    import shoal.collective as dist
    sums = []
    for _ in range(2):
        dist.init_parallel_env(timeout=10)
        x = np.array([dist.get_rank() + 1], np.int64)
        dist.all_reduce(x)
        sums.append(int(x[0]))
        dist.destroy_process_group()
    return sums


def mismatched_ops() -> dict:
    """Rank 1 calls barrier where rank 0 calls all_reduce: the diagnosis names the mismatch;
    operations queued behind the failure fail at once with GroupBrokenError."""
    import shoal.collective as dist
    dist.init_parallel_env(timeout=1.5)
    r = dist.get_rank()
    out = {}
    try:
        if r == 0:
            tasks = [dist.all_reduce(np.ones(1 << 16, np.float32), sync_op=False) for _ in range(4)]
            t0 = time.monotonic()
            errors = []
            for t in tasks:
                try:
                    t.wait()
                except dist.CollectiveError as e:
                    errors.append(type(e).__name__)
            out["errors"], out["elapsed"] = errors, time.monotonic() - t0
        else:
            dist.barrier()
    except dist.CollectiveError as e:
        out["error"] = str(e)
    return out

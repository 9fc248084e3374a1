"""spawn(): a collective job of `nprocs` processes started from one script.

    def train(lr):
        dist.init_parallel_env()
        ...
    if __name__ == "__main__":
        shoal.launcher.spawn(train, args=(0.1,), nprocs=2)

Each process gets the same environment contract as under `fleetrun --nproc_per_node`
(PADDLE_TRAINER_ID, PADDLE_TRAINERS_NUM, PADDLE_TRAINER_ENDPOINTS, PADDLE_CURRENT_ENDPOINT,
PADDLE_MASTER, SHOAL_JOB_TOKEN, ...); the rendezvous store is served by this (the parent)
process. Processes are started with the `spawn` method (Gloo's TCP threads must never be
forked), each in its own process group and with PR_SET_PDEATHSIG, so they die with the parent.
When any process fails (raises, or exits non-zero, or is killed) the others get SIGTERM, then
SIGKILL after a grace period, and spawn raises ProcessFailedError naming the rank, how it
failed and its traceback, within seconds. Returns the functions' return values, by rank.
"""
from __future__ import annotations

import contextlib
import multiprocessing
import os
import queue
import secrets
import signal
import sys
import time
import traceback

from shoal.configs.cluster import WorkerEnv
from shoal.launcher.errors import LaunchError

_PR_SET_PDEATHSIG = 1
_GRACE_S = 3.0


class ProcessFailedError(LaunchError):
    """A process of a spawned job failed; `rank`, `exitcode` and `traceback` say how."""

    def __init__(self, message: str, *, rank: int, exitcode: int | None, traceback: str = ""):
        super().__init__(message)
        self.rank, self.exitcode, self.traceback = rank, exitcode, traceback


def _entry(func, args, kwargs, rank, env, results, parent):
    os.setpgrp()   # its own process group: stopping it stops what it started
    try:
        import ctypes
        ctypes.CDLL(None).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):
        pass
    if os.getppid() != parent:  # the parent died before the death signal was armed
        os._exit(1)
    os.environ.update(env)
    try:
        value = func(*args, **kwargs)
    except BaseException as e:  # noqa: BLE001 - reported to the parent, then exit non-zero
        results.put((rank, False, f"{type(e).__name__}: {e}\n{traceback.format_exc()}"))
        results.close()
        results.join_thread()   # the report is in the pipe before the process ends
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(1)
    results.put((rank, True, value))


@contextlib.contextmanager
def _environ(extra: dict):
    saved = {k: os.environ.get(k) for k in extra}
    os.environ.update(extra)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _describe(code: int | None) -> str:
    if code is None:
        return "still running"
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit code {code}"


def spawn(func, args=(), nprocs: int = 1, *, kwargs=None, host: str = "127.0.0.1",
          timeout: float | None = None, env: dict | None = None, restart: int = 0) -> list:
    """Run `func(*args, **kwargs)` in `nprocs` new processes that form one collective job.

    Args:
        func: a module-level function (it is pickled by reference into each process).
        nprocs: the number of ranks (>= 1).
        host: the address every rank's sockets bind (127.0.0.1 by default).
        timeout: seconds the whole job may run (None: no limit); on expiry every process is
            stopped and LaunchError raised.
        env: extra environment variables for every process.
        restart: the rendezvous generation (SHOAL_RESTART) the processes see.

    Returns [func's return value for rank 0, rank 1, ...] (values must be picklable).
    Raises ProcessFailedError when a process fails, after stopping every other one."""
    from shoal.collective import StoreServer

    if not isinstance(nprocs, int) or isinstance(nprocs, bool) or nprocs < 1:
        raise LaunchError(f"spawn(nprocs={nprocs!r}): give an int >= 1")
    if not callable(func):
        raise LaunchError(f"spawn(func={func!r}): func must be callable")
    token = secrets.token_hex(16)
    ctx = multiprocessing.get_context("spawn")
    results = ctx.Queue()
    with StoreServer(host, 0, token=token) as store:
        endpoints = tuple(f"{host}:0" for _ in range(nprocs))
        threads = str(max(1, (os.cpu_count() or 1) // nprocs))
        procs = []
        try:
            for rank in range(nprocs):
                contract = WorkerEnv(trainers_num=nprocs, trainer_id=rank, pservers=(),
                                     trainer_endpoints=endpoints, current_endpoint=endpoints[rank],
                                     master=store.endpoint, job_token=token, restart=restart,
                                     launch_t0=time.time()).to_environ()
                child_env = {"OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", threads),
                             "OPENBLAS_NUM_THREADS": os.environ.get("OPENBLAS_NUM_THREADS", threads),
                             **(env or {}), **contract, "SHOAL_MASTER_SERVED": "launcher"}
                p = ctx.Process(target=_entry, args=(func, tuple(args), dict(kwargs or {}), rank,
                                                     child_env, results, os.getpid()),
                                name=f"shoal-rank{rank}", daemon=False)
                with _environ(child_env):  # inherited at start: BLAS reads its threads at import
                    p.start()
                procs.append(p)
            return _supervise(procs, results, timeout)
        finally:
            _stop(procs)
            results.close()


def _supervise(procs, results, timeout) -> list:
    deadline = None if timeout is None else time.monotonic() + timeout
    values, done = {}, set()
    while len(done) < len(procs):
        try:
            rank, ok, value = results.get(timeout=0.05)
        except queue.Empty:
            pass
        else:
            if not ok:
                procs[rank].join(timeout=_GRACE_S)
                raise ProcessFailedError(
                    f"rank {rank} of {len(procs)} failed ({_describe(procs[rank].exitcode)}): "
                    f"{value.splitlines()[0]}\n{value}", rank=rank,
                    exitcode=procs[rank].exitcode, traceback=value)
            values[rank] = value
        for rank, p in enumerate(procs):
            if rank in done or p.exitcode is None:
                continue
            if p.exitcode == 0 and rank in values:
                done.add(rank)
                continue
            # exited without a result (killed, os._exit) or with one still in the queue
            try:
                r, ok, value = results.get(timeout=0.5)
                if ok:
                    values[r] = value
                    continue
                raise ProcessFailedError(f"rank {r} of {len(procs)} failed: {value}", rank=r,
                                         exitcode=procs[r].exitcode, traceback=value)
            except queue.Empty:
                if rank in values:
                    raise ProcessFailedError(f"rank {rank} of {len(procs)} returned its result, "
                                             f"then exited ({_describe(p.exitcode)}): an "
                                             f"operation still in flight at exit?", rank=rank,
                                             exitcode=p.exitcode) from None
                raise ProcessFailedError(f"rank {rank} of {len(procs)} died "
                                         f"({_describe(p.exitcode)}) without a result; see its "
                                         f"output above", rank=rank, exitcode=p.exitcode) from None
        if deadline is not None and time.monotonic() > deadline:
            late = [r for r, p in enumerate(procs) if p.exitcode is None]
            raise LaunchError(f"spawn: ranks {late} still running after the timeout of {timeout:g}s; "
                              f"every process was stopped")
    return [values[r] for r in range(len(procs))]


def _stop(procs) -> None:
    """SIGTERM every live process group, SIGKILL what is left after the grace period."""
    live = [p for p in procs if p.exitcode is None and p.pid is not None]
    for p in live:
        try:
            os.killpg(p.pid, signal.SIGTERM)
        except OSError:
            p.terminate()
    deadline = time.monotonic() + _GRACE_S
    for p in live:
        p.join(timeout=max(0.0, deadline - time.monotonic()))
    for p in procs:
        if p.pid is None:
            continue
        try:
            os.killpg(p.pid, signal.SIGKILL)  # the group too: what a rank started goes with it
        except OSError:
            pass
        p.join(timeout=1)

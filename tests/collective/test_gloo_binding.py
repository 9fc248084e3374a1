"""shoal.collective._gloo against numpy references: ranks are spawned processes on 127.0.0.1.

Each multi-rank job runs many checks per process (spawn costs ~0.5 s a process): the ranks
save what every operation produced, and the parent compares it with numpy. The rendezvous
goes through a small file store in this module (a directory of key files).
"""
from __future__ import annotations

import contextlib
import multiprocessing
import os
import threading
import time
import traceback
import zlib
from pathlib import Path

import numpy as np
import pytest

HAVE_GLOO_HEADERS = os.path.exists("/usr/include/gloo/context.h")
if HAVE_GLOO_HEADERS:
    # The headers are there, so the binding must have been built: a failed import fails the tests.
    from shoal.collective import _gloo
else:  # pragma: no cover
    pytest.skip("libgloo-dev is not installed (/usr/include/gloo/context.h missing): "
                "apt-get install libgloo-dev, then reinstall Shoal", allow_module_level=True)

HOST = "127.0.0.1"
OPS = ("sum", "max", "min", "prod")
DTYPES = ("float32", "float64", "int64")
SMALL = 37            # odd, so gloo's ring splits it into unequal segments
BIG = 70_001          # float32: 280 KB, above auto's 256 KiB bcube/ring switch
JOB_DEADLINE_S = 60.0
_SPAWN = multiprocessing.get_context("spawn")


# ---------------------------------------------------------------- a file store

class StoreTimeout(Exception):
    """A key did not appear in time."""


class FileStore:
    """Keys are files in a directory: set writes atomically (temp file + rename), get and wait poll."""

    def __init__(self, root, get_timeout_s: float = 30.0):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.get_timeout_s = get_timeout_s

    def _path(self, key: str) -> Path:
        return self.root / key.encode().hex()

    def set(self, key: str, value: bytes) -> None:
        path = self._path(key)
        tmp = path.with_name(f"{path.name}.tmp.{os.getpid()}.{threading.get_ident()}")
        tmp.write_bytes(bytes(value))
        os.replace(tmp, path)

    def get(self, key: str) -> bytes:
        self._poll([key], self.get_timeout_s)
        return self._path(key).read_bytes()

    def wait(self, keys: list[str], timeout_ms: int) -> None:
        self._poll(keys, timeout_ms / 1000)

    def _poll(self, keys, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while True:
            missing = [k for k in keys if not self._path(k).exists()]
            if not missing:
                return
            if time.monotonic() > deadline:
                raise StoreTimeout(f"keys {missing} not set within {timeout_s * 1000:.0f} ms")
            time.sleep(0.002)


# ---------------------------------------------------------------- deterministic data

def values(key: str, rank: int, n: int, dtype: str, op: str = "sum") -> np.ndarray:
    """Rank `rank`'s input for the check `key`: small integers, so float sums are exact in any order."""
    rng = np.random.default_rng([zlib.crc32(key.encode()), rank])
    if op == "prod":
        x = rng.integers(1, 4, n)
    elif dtype == "uint8":
        x = rng.integers(0, 60, n)
    else:
        x = rng.integers(-40, 41, n)
    return x.astype(dtype)


def rs_blocks(dtype: str) -> list[int]:
    """reduce_scatter block sizes: small ones repeated, then blocks of 2 and (float32) 3 segments."""
    return [6] * 5 + [20_000] + ([600_001] if dtype == "float32" else [])


def reference(arrays, op: str) -> np.ndarray:
    fn = {"sum": np.sum, "max": np.max, "min": np.min, "prod": np.prod}[op]
    return fn(np.stack(arrays), axis=0).astype(arrays[0].dtype)


# ---------------------------------------------------------------- spawned ranks

def _rank_entry(target, rank: int, world: int, workdir: str) -> None:
    try:
        results = target(rank, world, Path(workdir)) or {}
        np.savez(os.path.join(workdir, f"rank{rank}.npz"), **results)
    except BaseException:
        Path(workdir, f"rank{rank}.err").write_text(traceback.format_exc())
        os._exit(1)


@contextlib.contextmanager
def spawned(target, ranks, world: int, workdir: Path):
    """Start `target(rank, world, workdir)` for each rank; always terminate, kill and join them."""
    procs = {r: _SPAWN.Process(target=_rank_entry, args=(target, r, world, str(workdir)), daemon=True)
             for r in ranks}
    try:
        for p in procs.values():
            p.start()
        yield procs
    finally:
        for p in procs.values():
            if p.is_alive():
                p.terminate()
        for p in procs.values():
            p.join(5)
            if p.is_alive():
                p.kill()
                p.join(5)


def join_all(procs, workdir: Path, deadline_s: float = JOB_DEADLINE_S) -> dict:
    """Wait for every rank (within the deadline) and return {rank: its saved results}."""
    deadline = time.monotonic() + deadline_s
    for r, p in procs.items():
        p.join(max(0.0, deadline - time.monotonic()))
        if p.is_alive():
            pytest.fail(f"rank {r} did not finish within {deadline_s:.0f} s")
    for r, p in procs.items():
        err = workdir / f"rank{r}.err"
        if p.exitcode != 0:
            pytest.fail(f"rank {r} exited with {p.exitcode}:\n" + (err.read_text() if err.exists() else ""))
    return {r: dict(np.load(workdir / f"rank{r}.npz")) for r in procs}


def run_job(target, world: int, workdir: Path) -> dict:
    with spawned(target, range(world), world, workdir) as procs:
        return join_all(procs, workdir)


# ---------------------------------------------------------------- the all-operations job

def _all_ops_rank(rank: int, n: int, workdir: Path) -> dict:
    store = FileStore(workdir / "store")
    ctx = _gloo.Context(store, rank, n, HOST, 15_000)
    assert (ctx.rank, ctx.size, ctx.timeout_ms) == (rank, n, 15_000)
    out = {}

    # Bad arguments raise before communicating: had any of these sent a byte, the
    # collectives below would mismatch or hang.
    for call, exc in [
        (lambda: ctx.allgather(np.zeros(3, np.float32), np.zeros(3 * n + 1, np.float32)), ValueError),
        (lambda: ctx.allreduce(np.zeros(4, np.complex64)), TypeError),
        (lambda: ctx.broadcast(np.zeros(4, np.float32), root=n), ValueError),
        (lambda: ctx.reduce_scatter(np.zeros(2 * n + 1), np.zeros(2)), ValueError),
        (lambda: ctx.send(np.zeros(2), dst=rank), ValueError),
        (lambda: ctx.recv(np.zeros(2), src=(rank + 1) % n, tag=2**32), ValueError),
    ]:
        try:
            call()
        except exc:
            pass
        else:
            raise AssertionError(f"{call} did not raise {exc}")

    for dt in DTYPES:
        for op in OPS:
            for algo in ("ring", "bcube"):
                a = values(f"ar.{dt}.{op}.{algo}", rank, SMALL, dt, op)
                ctx.allreduce(a, op, algo)
                out[f"ar.{dt}.{op}.{algo}"] = a
        for algo in ("auto", "bcube", "ring"):
            a = values(f"arbig.{dt}.{algo}", rank, BIG, dt)
            ctx.allreduce(a, algorithm=algo, timeout_ms=20_000)
            out[f"arbig.{dt}.{algo}"] = a

        x = values(f"ag.{dt}", rank, 5, dt)
        y = np.full(5 * n, -1, dt)
        ctx.allgather(x, y)
        out[f"ag.{dt}"] = y

        a = values(f"bc.{dt}", rank, 11, dt)
        ctx.broadcast(a, root=n - 1)
        out[f"bc.{dt}"] = a

        for op in ("sum", "max"):
            a = values(f"rd.{dt}.{op}", rank, SMALL, dt, op)
            ctx.reduce(a, root=1, op=op)
            out[f"rd.{dt}.{op}"] = a

        x = values(f"ga.{dt}", rank, 6, dt)
        y = np.full(6 * n, -1, dt) if rank == n - 1 else None
        ctx.gather(x, y, root=n - 1)
        if y is not None:
            out[f"ga.{dt}"] = y

        ins = [values(f"sc.{dt}.{j}", 1, 7, dt) for j in range(n)] if rank == 1 else None
        y = np.full(7, -1, dt)
        ctx.scatter(ins, y, root=1)
        out[f"sc.{dt}"] = y

        x = values(f"a2a.{dt}", rank, 4 * n, dt)
        y = np.full(4 * n, -1, dt)
        ctx.alltoall(x, y)
        out[f"a2a.{dt}"] = y

        for rep, blk in enumerate(rs_blocks(dt)):
            op = ("sum", "max", "prod")[rep % 3]
            x = values(f"rs.{dt}.{rep}", rank, blk * n, dt, op)
            before = x.copy()
            y = np.full(blk, -1, dt)
            ctx.reduce_scatter(x, y, op=op)
            assert np.array_equal(x, before), "reduce_scatter changed its input"
            out[f"rs.{dt}.{rep}"] = y

        ctx.barrier()

        # A ring of send/recv: rank 0 sends first, the others receive first (a send
        # completes only once the receiver has posted the matching recv).
        x = values(f"p2p.{dt}", rank, 9, dt)
        y = np.full(9, -1, dt)
        if rank == 0:
            ctx.send(x, dst=1 % n, tag=3)
            ctx.recv(y, src=n - 1, tag=3)
        else:
            ctx.recv(y, src=rank - 1, tag=3)
            ctx.send(x, dst=(rank + 1) % n, tag=3)
        out[f"p2p.{dt}"] = y

    for dt in ("float16", "int8", "uint8", "int32"):
        a = values(f"ar.{dt}", rank, SMALL, dt)
        ctx.allreduce(a)
        out[f"ar.{dt}"] = a

    # Zero elements: nothing to do, nothing sent.
    ctx.allreduce(np.zeros(0, np.float32))
    ctx.allgather(np.zeros(0), np.zeros(0))
    ctx.reduce_scatter(np.zeros(0), np.zeros(0))
    ctx.barrier(timeout_ms=5_000)

    # A recv nobody answers times out after its own timeout, and breaks the context. The
    # other ranks stay connected until rank 0 is done (else it would see them leave).
    if rank == 0:
        t0 = time.monotonic()
        try:
            ctx.recv(np.zeros(3), src=n - 1, tag=99, timeout_ms=300)
        except _gloo.GlooTimeoutError:
            pass
        else:
            raise AssertionError("recv did not time out")
        out["recv_timeout_s"] = np.array(time.monotonic() - t0)
        try:
            ctx.barrier()
        except _gloo.GlooError as e:
            assert "broken" in str(e) and "recv failed" in str(e), str(e)
        else:
            raise AssertionError("a broken context accepted a barrier")
        store.set("timeout_checked", b"1")
    else:
        store.get("timeout_checked")
    ctx.close()
    return out


@pytest.mark.parametrize("world", [2, 3, 4])
def test_every_operation_matches_numpy(world, tmp_path):
    res = run_job(_all_ops_rank, world, tmp_path)
    ranks = range(world)

    def same(name, got, want):
        assert got.dtype == want.dtype, name
        np.testing.assert_array_equal(got, want, err_msg=name)

    for dt in DTYPES:
        for op in OPS:
            for algo in ("ring", "bcube"):
                key = f"ar.{dt}.{op}.{algo}"
                want = reference([values(key, r, SMALL, dt, op) for r in ranks], op)
                for r in ranks:
                    same(f"rank {r} {key}", res[r][key], want)
        for algo in ("auto", "bcube", "ring"):
            key = f"arbig.{dt}.{algo}"
            want = reference([values(key, r, BIG, dt) for r in ranks], "sum")
            for r in ranks:
                same(f"rank {r} {key}", res[r][key], want)

        want = np.concatenate([values(f"ag.{dt}", r, 5, dt) for r in ranks])
        for r in ranks:
            same(f"rank {r} ag.{dt}", res[r][f"ag.{dt}"], want)

        for r in ranks:
            same(f"rank {r} bc.{dt}", res[r][f"bc.{dt}"], values(f"bc.{dt}", world - 1, 11, dt))

        for op in ("sum", "max"):
            key = f"rd.{dt}.{op}"
            inputs = [values(key, r, SMALL, dt, op) for r in ranks]
            for r in ranks:
                # The root gets the reduction; the other ranks' arrays are left unchanged.
                same(f"rank {r} {key}", res[r][key], reference(inputs, op) if r == 1 else inputs[r])

        same(f"ga.{dt}", res[world - 1][f"ga.{dt}"],
             np.concatenate([values(f"ga.{dt}", r, 6, dt) for r in ranks]))

        for r in ranks:
            same(f"rank {r} sc.{dt}", res[r][f"sc.{dt}"], values(f"sc.{dt}.{r}", 1, 7, dt))

        inputs = [values(f"a2a.{dt}", r, 4 * world, dt).reshape(world, 4) for r in ranks]
        for r in ranks:
            same(f"rank {r} a2a.{dt}", res[r][f"a2a.{dt}"], np.concatenate([inputs[i][r] for i in ranks]))

        for rep, blk in enumerate(rs_blocks(dt)):
            op = ("sum", "max", "prod")[rep % 3]
            key = f"rs.{dt}.{rep}"
            full = reference([values(key, r, blk * world, dt, op) for r in ranks], op)
            for r in ranks:
                same(f"rank {r} {key}", res[r][key], full[r * blk:(r + 1) * blk])

        for r in ranks:
            same(f"rank {r} p2p.{dt}", res[r][f"p2p.{dt}"], values(f"p2p.{dt}", (r - 1) % world, 9, dt))

    for dt in ("float16", "int8", "uint8", "int32"):
        want = reference([values(f"ar.{dt}", r, SMALL, dt) for r in ranks], "sum")
        for r in ranks:
            same(f"rank {r} ar.{dt}", res[r][f"ar.{dt}"], want)

    assert float(res[0]["recv_timeout_s"]) < 3.0


# ---------------------------------------------------------------- a single rank, in this process

@pytest.fixture
def solo(tmp_path):
    ctx = _gloo.Context(FileStore(tmp_path / "store"), 0, 1, HOST, 5_000)
    try:
        yield ctx
    finally:
        ctx.close()


def test_world_size_one_is_local(solo):
    for dt in ("float16", "float32", "float64", "int8", "uint8", "int32", "int64"):
        x = values(f"one.{dt}", 0, 10, dt)
        a = x.copy()
        for op in OPS:
            solo.allreduce(a, op)
        solo.broadcast(a, root=0)
        solo.reduce(a, root=0, op="max")
        np.testing.assert_array_equal(a, x)
        for fn in (solo.allgather, solo.alltoall, solo.reduce_scatter):
            y = np.zeros_like(x)
            fn(x, y)
            np.testing.assert_array_equal(y, x)
        y = np.zeros_like(x)
        solo.gather(x, y, root=0)
        np.testing.assert_array_equal(y, x)
        y = np.zeros_like(x)
        solo.scatter([x], y, root=0)
        np.testing.assert_array_equal(y, x)
    solo.barrier()
    empty = np.zeros(0, np.float32)
    solo.allreduce(empty)
    solo.allgather(empty, np.zeros(0, np.float32))
    solo.gather(empty, np.zeros(0, np.float32), root=0)
    solo.scatter([empty], np.zeros(0, np.float32), root=0)
    solo.alltoall(empty, np.zeros(0, np.float32))
    solo.reduce_scatter(empty, np.zeros(0, np.float32))
    solo.broadcast(empty, root=0)
    solo.timeout_ms = 1234
    assert (solo.rank, solo.size, solo.timeout_ms) == (0, 1, 1234)


def test_bad_arguments_raise_specific_errors(solo, tmp_path):
    f32 = np.zeros(4, np.float32)
    cases = [
        (lambda: solo.allgather(f32, np.zeros(6, np.float32)), ValueError,
         "allgather: output has 6 elements, expected size*input = 4"),
        (lambda: solo.allreduce(np.zeros(4, np.bool_)), TypeError, "supported: float16, float32"),
        (lambda: solo.allreduce(np.zeros(4, np.dtype(">f4"))), TypeError, "unsupported dtype"),
        (lambda: solo.allreduce([1.0, 2.0]), TypeError, "must be a numpy.ndarray, got list"),
        (lambda: solo.allreduce(np.zeros((4, 4), np.float32)[:, 1]), ValueError, "not C-contiguous"),
        (lambda: solo.allreduce(np.zeros(4, np.float32), op="avg"), ValueError,
         "unknown op 'avg'; expected one of: sum, max, min, prod"),
        (lambda: solo.allreduce(f32, algorithm="tree"), ValueError, "ring, bcube, auto"),
        (lambda: solo.allreduce(f32, timeout_ms=-1), ValueError, "timeout_ms=-1"),
        (lambda: solo.allgather(f32, np.zeros(4, np.float64)), TypeError, "output has dtype float64"),
        (lambda: solo.allgather(f32, f32), ValueError, "overlap"),
        (lambda: solo.broadcast(f32, root=1), ValueError, "broadcast: root=1 is out of range [0, 1)"),
        (lambda: solo.reduce(f32, root=-1), ValueError, "root=-1 is out of range"),
        (lambda: solo.gather(f32, None, root=0), ValueError, "output is required at the root"),
        (lambda: solo.scatter(None, f32, root=0), TypeError, "inputs must be a list of 1"),
        (lambda: solo.scatter([f32, f32], np.zeros(4, np.float32), root=0), ValueError,
         "inputs has 2 arrays, expected size = 1"),
        (lambda: solo.scatter([np.zeros(3, np.float32)], f32, root=0), ValueError, "inputs[0] has 3 elements"),
        (lambda: solo.alltoall(f32, np.zeros(5, np.float32)), ValueError, "expected input.size = 4"),
        (lambda: solo.reduce_scatter(np.zeros(5, np.float32), f32), ValueError,
         "input has 5 elements, expected size*output = 4"),
        (lambda: solo.send(f32, dst=0), ValueError, "dst=0 is this rank"),
        (lambda: solo.recv(f32, src=3), ValueError, "src=3 is out of range [0, 1)"),
    ]
    ro = np.zeros(4, np.float32)
    ro.flags.writeable = False
    cases.append((lambda: solo.allreduce(ro), ValueError, "read-only"))
    for call, exc, fragment in cases:
        with pytest.raises(exc) as info:
            call()
        assert fragment in str(info.value)
    with pytest.raises(ValueError, match="must be > 0"):
        solo.timeout_ms = 0
    solo.barrier()  # still usable: argument errors do not break a context

    store = FileStore(tmp_path / "store2")
    for args, fragment in [((0, 0), "size=0 must be >= 1"), ((2, 2), "rank=2 is out of range [0, 2)"),
                           ((-1, 2), "rank=-1")]:
        with pytest.raises(ValueError, match=fragment.replace("[", r"\[").replace(")", r"\)")):
            _gloo.Context(store, args[0], args[1], HOST, 1000)
    with pytest.raises(ValueError, match="timeout_ms=0 must be > 0"):
        _gloo.Context(store, 0, 1, HOST, 0)

    solo.close()
    solo.close()
    with pytest.raises(_gloo.GlooError, match="context is closed"):
        solo.allreduce(f32)
    with pytest.raises(_gloo.GlooError, match="context is closed"):
        solo.timeout_ms


# ---------------------------------------------------------------- rendezvous failures

def test_rank_that_never_joins_times_out(tmp_path):
    t0 = time.monotonic()
    with pytest.raises(_gloo.GlooTimeoutError) as info:
        _gloo.Context(FileStore(tmp_path / "store"), 0, 2, HOST, 1500)
    elapsed = time.monotonic() - t0
    assert 1.4 < elapsed < 4.5, elapsed
    assert "rendezvous" in str(info.value) and "not set within" in str(info.value)
    assert isinstance(info.value.__cause__, StoreTimeout)


class _FailingStore(FileStore):
    def __init__(self, root, fail: str, exc: BaseException):
        super().__init__(root)
        self.fail, self.exc = fail, exc

    def set(self, key, value):
        if self.fail == "set":
            raise self.exc
        super().set(key, value)

    def wait(self, keys, timeout_ms):
        if self.fail == "wait":
            raise self.exc
        super().wait(keys, timeout_ms)


def test_store_exceptions_become_gloo_errors(tmp_path):
    with pytest.raises(_gloo.GlooError) as info:
        _gloo.Context(_FailingStore(tmp_path / "a", "set", OSError("disk full")), 0, 2, HOST, 5000)
    assert type(info.value) is _gloo.GlooError and "disk full" in str(info.value)
    assert isinstance(info.value.__cause__, OSError)
    with pytest.raises(_gloo.GlooTimeoutError, match="store.wait failed"):
        _gloo.Context(_FailingStore(tmp_path / "b", "wait", TimeoutError("late")), 0, 2, HOST, 5000)
    with pytest.raises(KeyboardInterrupt):
        _gloo.Context(_FailingStore(tmp_path / "c", "wait", KeyboardInterrupt()), 0, 2, HOST, 5000)


# ---------------------------------------------------------------- a peer that dies

def _dying_peer_rank(rank: int, world: int, workdir: Path) -> dict:
    ctx = _gloo.Context(FileStore(workdir / "store"), rank, world, HOST, 15_000)
    ctx.barrier()
    time.sleep(0.5)  # rank 0 is meanwhile blocked in recv on a second thread
    ctx.send(np.arange(5, dtype=np.int32), dst=0, tag=5)
    ctx.barrier()
    os._exit(0)  # gone without closing anything, as a crashed process would be


def test_peer_that_dies_breaks_the_context(tmp_path):
    with spawned(_dying_peer_rank, [1], 2, tmp_path) as procs:
        ctx = _gloo.Context(FileStore(tmp_path / "store"), 0, 2, HOST, 15_000)
        try:
            ctx.barrier()
            got = np.zeros(5, np.int32)
            box = []
            t = threading.Thread(target=lambda: box.append(ctx.recv(got, src=1, tag=5)))
            t.start()
            time.sleep(0.1)
            # A second thread on a busy context is refused, not interleaved.
            with pytest.raises(_gloo.GlooError, match="not thread-safe"):
                ctx.barrier()
            t.join(10)
            assert not t.is_alive() and box == [None]
            np.testing.assert_array_equal(got, np.arange(5))
            ctx.barrier()
            procs[1].join(10)
            assert procs[1].exitcode == 0
            t0 = time.monotonic()
            with pytest.raises((_gloo.GlooIoError, _gloo.GlooTimeoutError)):
                ctx.allreduce(np.ones(1000, np.float32), timeout_ms=3000)
            assert time.monotonic() - t0 < 5
            with pytest.raises(_gloo.GlooError, match="broken by an earlier failure: allreduce failed"):
                ctx.allreduce(np.ones(10, np.float32))
        finally:
            ctx.close()

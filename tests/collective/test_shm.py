"""The shared-memory all_reduce of gloo groups on one host (csrc/shm.cpp, _shm_group.py)."""
import glob
import json
import os
import time

import numpy as np
import pytest

from shoal.launcher._spawn import ProcessFailedError, spawn
from tests.collective import shm_ranks
from tests.collective.shm_ranks import DTYPES, OPS, sizes, value

pytest.importorskip("shoal.collective._gloo", reason="the Gloo binding is not built (libgloo-dev)")
pytest.importorskip("shoal.collective._shm", reason="the shared-memory binding is not built")


def _reference(op, arrays):
    stack = np.stack(arrays)
    if op == "avg":
        s = stack.sum(0, dtype=stack.dtype)
        return s / len(arrays) if s.dtype.kind == "f" else s // len(arrays)
    return {"sum": np.sum, "max": np.max, "min": np.min, "prod": np.prod}[op](
        stack, axis=0, **({"dtype": stack.dtype} if op in ("sum", "prod") else {}))


def _check_every_dtype(results, world):
    for r, out in enumerate(results):
        for dt in DTYPES:
            for n in sizes(dt):
                inputs = [value(i, dt, n) for i in range(world)]
                for op in OPS + ("avg",):
                    got = out[f"{op}/{dt}/{n}"]
                    assert got.dtype == np.dtype(dt)
                    want = _reference(op, inputs).astype(dt)
                    np.testing.assert_allclose(got, want, rtol=1e-3 if dt == "float16" else 1e-6,
                                               err_msg=f"rank {r} {op} {dt} n={n}")
                    np.testing.assert_array_equal(got, results[0][f"{op}/{dt}/{n}"])
                np.testing.assert_array_equal(out[f"broadcast/{dt}/{n}"],
                                              value(n % world, dt, n, salt=1))
                np.testing.assert_array_equal(out[f"all_gather/{dt}/{n}"],
                                              np.stack([value(i, dt, n, salt=2)
                                                        for i in range(world)]))
        strided = [value(i, "float32", 120).reshape(3, 40)[:, ::2] for i in range(world)]
        np.testing.assert_array_equal(out["strided"], sum(strided))
        np.testing.assert_array_equal(out["async"], sum(value(i, "float64", 5000)
                                                        for i in range(world)))


@pytest.mark.parametrize("world", [2, 3])
def test_shm_collectives_match_numpy(world):
    results = spawn(shm_ranks.every_dtype, nprocs=world, timeout=120)
    _check_every_dtype(results, world)
    for out in results:
        assert out["uses_shm"] and out["shm_ops_before"] == 0
        # every all_reduce, broadcast and all_gather went through shared memory
        assert out["shm_ops"] == out["calls"], (out["shm_ops"], out["calls"])


def test_shoal_shm_0_keeps_gloo_and_agrees():
    results = spawn(shm_ranks.every_dtype, nprocs=2, timeout=120, env={"SHOAL_SHM": "0"})
    _check_every_dtype(results, 2)
    for out in results:
        assert not out["uses_shm"] and out["shm_ops"] == 0


def test_a_bad_shoal_shm_value_is_refused():
    from shoal.collective import _shm_group
    from shoal.collective.errors import CollectiveError
    old = os.environ.get("SHOAL_SHM")
    os.environ["SHOAL_SHM"] = "yes"
    try:
        with pytest.raises(CollectiveError, match="SHOAL_SHM='yes'"):
            _shm_group.enabled()
    finally:
        if old is None:
            del os.environ["SHOAL_SHM"]
        else:
            os.environ["SHOAL_SHM"] = old


def test_a_rank_that_never_calls_times_out_naming_it():
    t0 = time.monotonic()
    results = spawn(shm_ranks.never_calls, (2, 2.0), nprocs=3, timeout=60)
    for out in results[:2]:
        assert out["uses_shm"]
        assert out["missing"] == [2], out
        assert 1.5 < out["elapsed"] < 2.0 + 2.0 + 3.0   # the timeout, plus the diagnosis grace
        assert "rank(s) [2]" in out["message"]
        assert "unusable" in out["broken"]
    assert time.monotonic() - t0 < 45


def test_a_killed_rank_fails_the_others_fast_and_leaves_no_segment(tmp_path):
    with pytest.raises(ProcessFailedError) as info:
        spawn(shm_ranks.killed_mid_run, (1, str(tmp_path)), nprocs=3, timeout=60)
    assert info.value.rank == 1
    reports = {int(os.path.basename(p).split(".")[0]): json.load(open(p))
               for p in glob.glob(str(tmp_path / "*.json"))}
    assert sorted(reports) == [0, 2], reports
    for rep in reports.values():
        assert rep["uses_shm"]
        # the group timeout is 30 s: seeing the peer's process gone takes milliseconds
        assert rep["error"] == "PeerFailedError", rep
        assert rep["elapsed"] < 5.0, rep
        assert "rank 1" in rep["message"] or "[1]" in rep["message"], rep
    segment = reports[0]["segment"]
    assert segment and not os.path.exists("/dev/shm" + segment)


@pytest.mark.parametrize("case", ["size", "kind"])
def test_ranks_making_different_calls_fail_at_once_naming_both(case):
    results = spawn(shm_ranks.mismatched, (case,), nprocs=2, timeout=60)
    for out in results:
        assert out["error"] == "CollectiveError", out
        assert "met rank" in out["message"] and "another call" in out["message"], out
        assert ("broadcast" in out["message"]) == (case == "kind"), out
        assert out["elapsed"] < 2.0 and out.get("broken"), out   # not the 5 s timeout


def test_subgroups_get_their_own_segments():
    results = spawn(shm_ranks.subgroups, nprocs=3, timeout=120)
    names = set()
    for r, out in enumerate(results):
        assert out["world"][0]
        names.add(out["world"][1])
        np.testing.assert_array_equal(out["world_sum"], sum(value(i, "int32", 3000)
                                                            for i in range(3)))
        for i, members in enumerate(([0, 2], [1, 2])):
            if r in members:
                np.testing.assert_array_equal(out[f"g{i}"], sum(value(m, "int64", 3000)
                                                                for m in members))
                uses, ops, name = out[f"g{i}/shm"]
                assert uses and ops == 1
                names.add(name)
            else:
                assert f"g{i}" not in out
    assert len(names) == 3, names   # the world and the two groups: three segments
    for name in names:
        assert not os.path.exists("/dev/shm" + name)


@pytest.mark.parametrize("world,env", [(2, {}), (3, {}), (2, {"SHOAL_SHM": "0"})])
def test_all_reduce_into_reads_the_pieces_in_place_and_averages_into_the_bucket(world, env):
    """Data parallel's bucket: the concatenation of several arrays reduced into one flat buffer
    (through shared memory: read where they are; with SHOAL_SHM=0: Gloo after a copy)."""
    results = spawn(shm_ranks.gather_into, nprocs=world, timeout=120,
                    env=env)
    for out in results:
        for dt in ("float32", "float64", "int64"):
            per_rank = [np.concatenate([value(r, dt, k, salt=i).reshape(-1)
                                        for i, k in enumerate(shm_ranks.PIECES)])
                        for r in range(world)]
            total = np.sum(per_rank, axis=0, dtype=dt)
            want = total if dt == "int64" else total * np.dtype(dt).type(1.0 / world)
            np.testing.assert_allclose(out[f"into/{dt}"], want, rtol=1e-6, err_msg=dt)
            np.testing.assert_array_equal(out[f"into/{dt}"], results[0][f"into/{dt}"])
            assert out[f"pieces_unchanged/{dt}"]
        np.testing.assert_allclose(out["async"], sum(np.concatenate([value(r, "float32", 300),
                                                                     value(r, "float32", 9)])
                                                     for r in range(world)), rtol=1e-6)
        assert out["uses_shm"] == (not env) and out["shm_ops"] == (4 if not env else 0)
        assert len(out["errors"]) == 3
        assert "hold 3 elements, out 4" in out["errors"][0]
        assert "needs out's dtype" in out["errors"][1] and "must be flat" in out["errors"][2]
        np.testing.assert_array_equal(out["after"], [world, world])

"""The collective API on real processes (spawn) against numpy references."""
import time

import numpy as np
import pytest

from shoal.launcher._spawn import ProcessFailedError, spawn
from tests.collective import ranks
from tests.collective.ranks import DTYPES, value

pytest.importorskip("shoal.collective._gloo", reason="the Gloo binding is not built (libgloo-dev)")

N = 6


def _reduce(op, arrays):
    stack = np.stack(arrays)
    if op == "avg":
        s = stack.sum(0)
        return s / len(arrays) if s.dtype.kind == "f" else s // len(arrays)
    return {"sum": np.sum, "max": np.max, "min": np.min, "prod": np.prod}[op](stack, axis=0)


@pytest.mark.parametrize("world", [2, 3])
def test_every_op_matches_numpy(world):
    results = spawn(ranks.every_op, (N,), nprocs=world, timeout=90)
    for r, out in enumerate(results):
        assert out["rank"] == r and out["size"] == world
        for dt in DTYPES:
            inputs = [value(i, dt, N) for i in range(world)]
            for op in ("sum", "max", "min", "prod", "avg"):
                got = out[f"all_reduce/{op}/{dt}"]
                assert got.dtype == np.dtype(dt)
                np.testing.assert_allclose(got, _reduce(op, inputs).astype(dt), rtol=1e-6)
            np.testing.assert_array_equal(out[f"all_reduce/big/{dt}"],
                                          sum(value(i, dt, 70_000) for i in range(world)))
            np.testing.assert_array_equal(out[f"broadcast/{dt}"], value(world - 1, dt, N))
            if r == 1 % world:
                np.testing.assert_array_equal(out[f"reduce/{dt}"], sum(inputs))
            else:  # a non-root's tensor is left as it was
                np.testing.assert_array_equal(out[f"reduce/{dt}"], value(r, dt, N))
            np.testing.assert_array_equal(out[f"all_gather/{dt}"], np.stack(inputs))
            np.testing.assert_array_equal(out[f"scatter/{dt}"], value(r, dt, N, salt=9))
            for rep in range(3):
                want = sum(value(i, dt, N, salt=r + rep) for i in range(world))
                np.testing.assert_array_equal(out[f"reduce_scatter/{rep}/{dt}"], want)
            np.testing.assert_array_equal(out[f"alltoall/{dt}"],
                                          np.stack([value(j, dt, N, salt=10 * r)
                                                    for j in range(world)]))
            np.testing.assert_array_equal(out[f"sendrecv/{dt}"], value((r - 1) % world, dt, N))
        want32 = sum(value(i, "float32", N) for i in range(world))
        np.testing.assert_array_equal(out["tensor"], want32)
        np.testing.assert_array_equal(out["strided"], want32)
        want = np.stack([sum(value(i, "float64", N, salt=s) for i in range(world)) for s in range(4)])
        want[0] *= world  # all-reduced twice: the sync call ran after the async one
        assert all(out["async_done"])
        np.testing.assert_array_equal(out["async"], want)


def test_world_of_one():
    (out,) = spawn(ranks.every_op, (N,), nprocs=1, timeout=60)
    np.testing.assert_array_equal(out["all_reduce/sum/int64"], value(0, "int64", N))
    np.testing.assert_array_equal(out["reduce_scatter/0/float32"], value(0, "float32", N))


def test_group_of_a_subset():
    results = spawn(ranks.subgroups, nprocs=3, timeout=60)
    for r, out in enumerate(results):
        assert out["world"].tolist() == [3, 3, 3]
        if r == 1:
            assert out["group_rank"] == -1 and "not a member" in out["refused"]
            assert out["x"].tolist() == [2, 2, 2, 2]  # untouched
        else:
            assert out["group_rank"] == r // 2 and out["group_size"] == 2
            assert out["x"].tolist() == [4, 4, 4, 4] and out["bcast"].tolist() == [2, 2]


def test_rank_that_never_arrives_times_out_naming_it():
    t0 = time.monotonic()
    results = spawn(ranks.late_rank, (2, 2.0), nprocs=3, timeout=60)
    for out in results[:2]:
        assert out["op"] == "all_reduce" and out["missing"] == [2], out
        assert 1.5 < out["elapsed"] < 2.0 + 2.0 + 3.0   # the timeout, plus the diagnosis grace
        assert "rank(s) [2]" in out["message"]
        assert "unusable" in out["broken"]
    assert time.monotonic() - t0 < 45


def test_failing_rank_stops_the_job():
    t0 = time.monotonic()
    with pytest.raises(ProcessFailedError) as info:
        spawn(ranks.fails_in_barrier, (1,), nprocs=3, timeout=60)
    assert info.value.rank == 1 and "fails on purpose" in str(info.value)
    assert time.monotonic() - t0 < 20


def test_contract_each_rank_receives():
    results = spawn(ranks.world_info, nprocs=2, timeout=60)
    tokens = {out["env"]["SHOAL_JOB_TOKEN"] for out in results}
    assert len(tokens) == 1
    for r, out in enumerate(results):
        env = out["env"]
        assert out["rank"] == r and out["size"] == 2
        assert env["TRAINING_ROLE"] == "TRAINER" and env["PADDLE_TRAINER_ID"] == str(r)
        assert env["PADDLE_TRAINERS_NUM"] == "2" and env["PADDLE_PSERVERS_IP_PORT_LIST"] == ""
        assert env["PADDLE_MASTER"].startswith("127.0.0.1:")
        assert env["SHOAL_RESTART"] == "0"


def test_bad_arguments_are_refused_before_sending():
    import shoal.collective as dist
    with pytest.raises(dist.NotInitializedError):
        dist.all_reduce(np.ones(2))
    (out,) = spawn(bad_arguments, nprocs=1, timeout=60)
    assert out == ["op", "list", "shape", "src", "type", "send-self"], out


def bad_arguments():
    import shoal.collective as dist
    dist.init_parallel_env(timeout=10)
    seen = []
    for name, call in [
        ("op", lambda: dist.all_reduce(np.ones(2), "mean")),
        ("list", lambda: dist.all_gather([np.ones(2)] * 3, np.ones(2))),
        ("shape", lambda: dist.reduce_scatter(np.ones(2), [np.ones(3)])),
        ("src", lambda: dist.broadcast(np.ones(2), src=5)),
        ("type", lambda: dist.all_reduce([1.0, 2.0])),
        ("send-self", lambda: dist.send(np.ones(2), dst=0)),
    ]:
        try:
            call()
        except dist.InvalidArgumentError:
            seen.append(name)
    x = np.ones(2)
    dist.all_reduce(x)  # the group still works after refused calls
    assert x.tolist() == [1.0, 1.0]
    return seen


def test_a_second_world_in_the_same_processes_rendezvous_afresh():
    assert spawn(ranks.reinit_twice, nprocs=2, timeout=60) == [[3, 3], [3, 3]]


def test_ranks_in_different_collectives_are_named_and_queued_ops_fail_fast():
    r0, r1 = spawn(ranks.mismatched_ops, nprocs=2, timeout=60)
    assert r0["errors"][0] in ("CollectiveTimeoutError", "PeerFailedError", "CollectiveError")
    assert r0["errors"][1:] == ["GroupBrokenError"] * 3, r0
    assert r0["elapsed"] < 1.5 + 2.5 + 2.0  # one timeout, one diagnosis, then at once
    assert "different collective" in r1["error"] and "rank 0: all_reduce" in r1["error"], r1

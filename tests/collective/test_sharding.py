"""ZeRO sharding (stage 1, 2, hybrid) on real processes against plain DataParallel."""
import numpy as np
import pytest

import shoal
import shoal.collective as dist
from shoal.collective.sharding._plan import plan
from shoal.launcher._spawn import spawn
from tests.collective import sharding_ranks

pytest.importorskip("shoal.collective._gloo", reason="the Gloo binding is not built (libgloo-dev)")

PARAMS = {"fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias", "fc3.weight", "fc3.bias",
          "side.weight", "side.bias"}


def _same(a: dict, b: dict, rtol=1e-4, atol=1e-5):
    assert set(a) == set(b) == PARAMS
    for k in b:
        np.testing.assert_allclose(a[k], b[k], rtol=rtol, atol=atol, err_msg=k)


def _check_partition(results):
    owned = [set(out["owned"]) for out in results]
    assert set().union(*owned) == PARAMS
    assert sum(len(o) for o in owned) == len(PARAMS)   # disjoint
    for out, mine in zip(results, owned):
        assert mine  # every rank owns something
        assert set(out["state_params"]) == mine   # Adam state only for the owned parameters


CONFIGS_2 = [(1, None, 32), (2, None, 32), (1, 0.05, 0.0003), (2, 0.05, 0.0003), (2, None, 0.0003)]


def test_stage1_and_stage2_on_two_ranks_equal_data_parallel_with_adam_and_clipping():
    per_rank = spawn(sharding_ranks.compare, (CONFIGS_2,), nprocs=2, timeout=180)
    for c, (stage, clip, fuse) in enumerate(CONFIGS_2):
        results = [rank[c] for rank in per_rank]
        for out in results:
            _same(out["sh"], out["dp"])
            assert "differ" in out["bad_load"] and "sharding_rank" in out["bad_load"]
        for k in PARAMS:   # the replicas agree bit for bit after the gather
            np.testing.assert_array_equal(results[0]["sh"][k], results[1]["sh"][k], err_msg=k)
        _check_partition(results)
        assert (results[0]["buckets"] == 1) == (fuse == 32)
    # the clip is active: clipped runs end elsewhere than the unclipped one of the same stage
    clipped, plain = per_rank[0][3]["dp"], per_rank[0][4]["dp"]
    assert not np.allclose(clipped["fc1.weight"], plain["fc1.weight"], atol=1e-4)


def test_over_gloo_without_shared_memory_reduce_and_reduce_scatter_equal_data_parallel():
    # SHOAL_SHM=0: stage 2 reduces each unequal segment to its owner, reduce-scatters equal ones
    configs = [(2, None, 32), (2, 0.05, 0.0003), (1, None, 0.0003)]
    per_rank = spawn(sharding_ranks.compare, (configs, 5, 12, 0, False), nprocs=2, timeout=180)
    for c in range(len(configs)):
        results = [rank[c] for rank in per_rank]
        for out in results:
            _same(out["sh"], out["dp"])
            assert out["shm"] is False
        for k in PARAMS:
            np.testing.assert_array_equal(results[0]["sh"][k], results[1]["sh"][k], err_msg=k)
        _check_partition(results)


@pytest.mark.parametrize("shm", [True, False])
def test_stage2_on_three_ranks_uneven_split_equals_data_parallel(shm):
    configs = [(2, None, 32), (2, 0.05, 0.0003), (1, None, 0.0003)]
    per_rank = spawn(sharding_ranks.compare, (configs, 5, 12, 0, shm), nprocs=3, timeout=180)
    for c in range(len(configs)):
        results = [rank[c] for rank in per_rank]
        for out in results:
            _same(out["sh"], out["dp"])
        _check_partition(results)


def test_hybrid_two_way_sharding_times_two_way_dp_equals_data_parallel_over_four():
    configs = [(2, None, 0.0003), (1, 0.05, 32)]
    per_rank = spawn(sharding_ranks.compare, (configs, 3, 8, 2), nprocs=4, timeout=240)
    for c in range(len(configs)):
        results = [rank[c] for rank in per_rank]
        for out in results:
            _same(out["sh"], out["dp"])
        _check_partition(results[:2])   # each sharding group partitions the parameters
        _check_partition(results[2:])
        assert results[0]["owned"] == results[2]["owned"]   # the same shard across dp


@pytest.mark.parametrize("stage", [1, 2])
def test_gradient_merge_around_sharding_equals_merged_data_parallel(stage):
    r0, r1 = spawn(sharding_ranks.merged, (stage,), nprocs=2, timeout=180)
    for out in (r0, r1):
        _same(out["sh"], out["dp"])
        # the first micro-batch of each merge only accumulates: no collective in its backward
        assert out["seqs"][0::2] == [0, 0, 0] and all(n > 0 for n in out["seqs"][1::2])


@pytest.mark.parametrize("stage", [1, 2])
def test_no_sync_accumulates_locally_and_the_next_backward_reduces_it(stage):
    for out in spawn(sharding_ranks.accumulated, (stage,), nprocs=2, timeout=180):
        _same(out["sh"], out["dp"])
        assert out["sh_seqs"][0::2] == [0, 0, 0] and all(n > 0 for n in out["sh_seqs"][1::2])


@pytest.mark.parametrize("shm", [True, False])
def test_stage2_holds_well_under_data_parallel_gradient_and_state_memory(shm):
    r0, r1 = spawn(sharding_ranks.memory, (3, 12, 24, shm), nprocs=2, timeout=180)
    for out in (r0, r1):
        dp, sh = out["dp"], out["stage2"]
        assert sh["grads+state"] < 0.7 * dp["grads+state"], out
        assert dp["state"] == 2 * out["param_bytes"]    # Adam: two moments of every parameter
        assert sh["state"] == out["param_bytes"]        # ... of half of them (12 equal weights)
        assert sh["params"] == dp["params"] == out["param_bytes"]


@pytest.mark.parametrize("shm", [True, False])
def test_one_big_parameter_per_bucket_equals_data_parallel_and_holds_only_a_shard(shm):
    width, layers = 48, 6
    r0, r1 = spawn(sharding_ranks.big, (shm,), nprocs=2, timeout=180)
    weight = width * width * 4
    for out in (r0, r1):
        assert all(o is not None for o in out["bucket_owners"])   # one owner a bucket
        assert out["bucket_bytes"] == weight + 4                   # no padding: weight + flag
        for kind in ("stage1", "stage2"):
            state = out[kind + "_state"]
            for k, v in out["dp_state"].items():
                np.testing.assert_allclose(state[k], v, rtol=1e-4, atol=1e-5, err_msg=f"{kind} {k}")
        dp, sh = out["dp"], out["stage2"]
        # after backward a rank holds exactly its shard (its parameters and their flags)
        shard = out["stage2_owned_bytes"] + 4 * out["stage2_owned_params"]
        assert sh["grads_after_backward"] == shard
        # during it: the shard plus O(bucket) (the bucket being filled and those in flight)
        assert sh["grads"] <= out["stage2_owned_bytes"] + 3 * out["bucket_bytes"], out
        assert sh["grads+state"] <= 0.55 * dp["grads+state"], (sh, dp)
    for k in r0["stage2_state"]:   # the replicas agree bit for bit after the gather
        np.testing.assert_array_equal(r0["stage2_state"][k], r1["stage2_state"][k], err_msg=k)
    assert r0["stage2_owned_bytes"] + r1["stage2_owned_bytes"] == layers * (weight + width * 4)
    assert abs(r0["stage2_owned_bytes"] - r1["stage2_owned_bytes"]) <= weight


def test_bad_inputs_raise_typed_errors_with_the_fix():
    for out in spawn(sharding_ranks.bad_inputs, nprocs=2, timeout=120):
        assert "does not divide the world size 2" in out["degree"]
        assert "not the model's" in out["foreign"]
        assert "bind(" in out["unbound"]
        assert "hybrid_dp=True" in out["no_hybrid"]
        assert out["from_config"] == (2, 2, True)


def test_bad_inputs_that_fail_before_any_communication():
    model = sharding_ranks.build(seed=0)
    with pytest.raises(dist.InvalidArgumentError, match="stage=3"):
        dist.ShardedDataParallel(model, stage=3)
    with pytest.raises(dist.InvalidArgumentError, match="stage=True"):
        dist.ShardedDataParallel(model, stage=True)
    for p in model.parameters():
        p.requires_grad = False
    with pytest.raises(dist.InvalidArgumentError, match="no trainable parameter"):
        dist.ShardedDataParallel(model, stage=1)
    with pytest.raises(dist.InvalidArgumentError, match="shoal optimizer"):
        dist.ShardingOptimizer(object())
    with pytest.raises(dist.InvalidArgumentError, match="ShardedDataParallel"):
        dist.ShardingOptimizer(shoal.optimizer.SGD(0.1, parameters=model.parameters()), model)
    with pytest.raises(dist.InvalidArgumentError, match="divide"):
        dist.sharding_groups(0)


def test_plan_partitions_whole_parameters_balanced_with_equal_padded_segments():
    shoal.seed(0)
    params = [shoal.to_tensor(np.zeros(n, np.float32)) for n in (40, 7, 33, 20, 20, 5, 64, 1)]
    for nranks, limit in ((2, 1 << 20), (3, 1 << 20), (3, 200)):
        buckets, owner = plan(params, nranks, limit)
        assert sorted(id(p) for b in buckets for p in b.params) == sorted(id(p) for p in params)
        assert set(owner.values()) <= set(range(nranks)) and len(owner) == len(params)
        for b in buckets:
            for r in range(nranks):   # rank r's parameters and flags fit its segment, no overlap
                spans = sorted((off, off + n) for (o, off), n in zip(b.slots, b.sizes) if o == r)
                flags = sorted(f for (o, _), f in zip(b.slots, b.flags) if o == r)
                cells = [c for lo, hi in spans for c in range(lo, hi)] + flags
                assert len(cells) == len(set(cells)) and all(0 <= c < b.seg for c in cells)
        loads = [sum(p.data.size for p in params if owner[id(p)] == r) for r in range(nranks)]
        assert max(loads) - min(loads) <= 64   # within the largest parameter
        assert plan(params, nranks, limit)[1] == owner   # deterministic

"""DataParallel and gradient merge on real processes against one-process training."""
import numpy as np
import pytest

from shoal.launcher._spawn import spawn
from tests.collective import dp_ranks

pytest.importorskip("shoal.collective._gloo", reason="the Gloo binding is not built (libgloo-dev)")


def _same(a: dict, b: dict, rtol=2e-5, atol=2e-6):
    keys = [k for k in b if "." in k]
    assert keys
    for k in keys:
        np.testing.assert_allclose(a[k], b[k], rtol=rtol, atol=atol, err_msg=k)


@pytest.mark.parametrize("fuse_mb", [32, 0.0002])  # one bucket; a bucket per parameter or two
def test_two_ranks_equal_one_process_on_the_global_batch(fuse_mb):
    ref = dp_ranks.train_reference(steps=3)
    results = spawn(dp_ranks.train_dp, (3, fuse_mb), nprocs=2, timeout=90)
    for out in results:
        _same(out, ref)
    assert (results[0]["buckets"] == 1) == (fuse_mb == 32)
    for k in ref:  # the replicas are identical, bit for bit
        np.testing.assert_array_equal(results[0][k], results[1][k])


def test_gradient_merge_of_four_equals_one_step_on_four_times_the_batch():
    ref = dp_ranks.train_reference(steps=1)
    results = spawn(dp_ranks.train_merged_fleet, (4,), nprocs=2, timeout=90)
    for out in results:
        _same(out, ref)
        # three micro-steps accumulate locally (no all-reduce); the fourth reduces the buckets
        assert out["reductions"][:3] == [0, 0, 0] and out["reductions"][3] >= 1


def test_drift_check_fires_when_a_replica_is_perturbed():
    results = spawn(dp_ranks.drifting, (2,), nprocs=2, timeout=90)
    for out in results:
        assert out["steps"] == 1, out
        assert "rank(s) [1]" in out["error"] and "fc2" in out["error"]


def test_drift_check_is_quiet_when_replicas_agree():
    results = spawn(dp_ranks.drifting, (0,), nprocs=2, timeout=90)
    assert [out["steps"] for out in results] == [4, 4]  # rank 1's perturbation goes unchecked


def test_a_failed_backward_no_sync_and_unused_parameters_keep_replicas_in_step():
    r0, r1 = spawn(dp_ranks.robust_passes, nprocs=2, timeout=90)
    for out in (r0, r1):
        assert "fails on purpose" in out["raised"]
        assert out["side_unchanged"]  # no gradient anywhere: Adam does not touch it
    for k in r0["state"]:
        np.testing.assert_array_equal(r0["state"][k], r1["state"][k], err_msg=k)

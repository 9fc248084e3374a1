"""recompute under DataParallel on 2 real processes: the same training as without it."""
import numpy as np
import pytest

from shoal.launcher._spawn import spawn
from tests.collective import recompute_ranks

pytest.importorskip("shoal.collective._gloo", reason="the Gloo binding is not built (libgloo-dev)")


def test_data_parallel_with_recompute_equals_data_parallel_without():
    # a bucket per parameter (or two): a hook that fired on a partial gradient would start its
    # bucket early and the reduced gradient would miss the rest
    results = spawn(recompute_ranks.both, (3, 0.0002), nprocs=2, timeout=120)
    for out in results:
        plain, rec = out["plain"], out["recomputed"]
        assert plain["buckets"] > 4 and plain.keys() == rec.keys()
        for k in plain:
            np.testing.assert_array_equal(plain[k], rec[k], err_msg=k)
    for k in results[0]["plain"]:   # the replicas agree, bit for bit
        if k not in ("losses",):
            np.testing.assert_array_equal(results[0]["recomputed"][k],
                                          results[1]["recomputed"][k], err_msg=k)

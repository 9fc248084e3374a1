"""The nccl backend (GPU): run on a machine with CUDA GPUs, skipped elsewhere."""
import numpy as np
import pytest

from shoal.launcher import spawn
from tests.collective import ranks
from tests.collective.ranks import DTYPES, value

pytestmark = pytest.mark.requires_gpu
N = 5


def _gpus() -> int:
    import cupy
    return cupy.cuda.runtime.getDeviceCount()


@pytest.mark.parametrize("world", [1, 2])
def test_nccl_ops_match_numpy(world):
    if world > _gpus():
        pytest.skip(f"NCCL needs one GPU per rank; this machine has {_gpus()}")
    results = spawn(ranks.nccl_ops, (N,), nprocs=world, timeout=120)
    for r, out in enumerate(results):
        for dt in DTYPES:
            inputs = [value(i, dt, N) for i in range(world)]
            np.testing.assert_array_equal(out[f"all_reduce/max/{dt}"], np.max(inputs, axis=0))
            np.testing.assert_array_equal(out[f"all_gather/{dt}"], np.stack(inputs))
            np.testing.assert_array_equal(out[f"reduce_scatter/{dt}"],
                                          sum(value(i, dt, N, salt=r) for i in range(world)))
            np.testing.assert_array_equal(out[f"broadcast/{dt}"], value(0, dt, N))
            np.testing.assert_array_equal(out[f"alltoall/{dt}"],
                                          np.stack([value(j, dt, N, salt=10 * r) for j in range(world)]))
        np.testing.assert_array_equal(out["host"], sum(value(i, "float32", N) for i in range(world)))

"""Collective communication: Gloo (CPU) and NCCL (GPU) process groups, the collective API with
timeouts, data parallel and gradient merge.

    import shoal.collective as dist
    dist.init_parallel_env()           # under `fleetrun --nproc_per_node N script.py`
    dist.all_reduce(x)                 # numpy, cupy or Tensor, in place
    model = dist.DataParallel(model)   # parameters broadcast from rank 0; gradients bucketed
"""
from shoal.collective._api import (ReduceOp, all_gather, all_reduce, alltoall, barrier, broadcast,
                                   destroy_process_group, get_rank, get_world_size,
                                   init_parallel_env, is_initialized, new_group, recv, reduce,
                                   reduce_scatter, scatter, send)
from shoal.collective._group import ProcessGroup, Task, backends, get_backend, register_backend
from shoal.collective.data_parallel import DataParallel
from shoal.collective.sharding import (ShardedDataParallel, ShardingOptimizer, held_bytes,
                                       sharding_groups)
from shoal.collective.pipeline import PipelineLayer, PipelineParallel, ScheduleError
from shoal.collective.transforms import TransformedOptimizer, gradient_merge
from shoal.collective._store import PrefixStore, StoreClient, StoreServer
from shoal.collective.errors import (BackendUnavailableError, CollectiveError,
                                     CollectiveTimeoutError, GroupBrokenError, InvalidArgumentError,
                                     NotInitializedError, PeerFailedError, RendezvousError,
                                     ReplicaDriftError, StoreTimeoutError)

__all__ = [
    "init_parallel_env", "is_initialized", "destroy_process_group", "get_rank", "get_world_size",
    "new_group", "ReduceOp", "all_reduce", "broadcast", "reduce", "all_gather", "scatter",
    "reduce_scatter", "alltoall", "barrier", "send", "recv", "Task", "DataParallel",
    "gradient_merge", "TransformedOptimizer", "ShardedDataParallel", "ShardingOptimizer",
    "sharding_groups", "held_bytes", "PipelineLayer", "PipelineParallel",
    "ScheduleError", "ProcessGroup",
    "register_backend", "get_backend", "backends", "StoreServer", "StoreClient", "PrefixStore",
    "CollectiveError", "CollectiveTimeoutError", "BackendUnavailableError", "NotInitializedError",
    "RendezvousError", "StoreTimeoutError", "PeerFailedError", "GroupBrokenError",
    "ReplicaDriftError", "InvalidArgumentError",
]

"""fleet in collective mode (`fleet.init(is_collective=True)`): data parallel over collectives.

`distributed_model` wraps the model in DataParallel (buckets of the strategy's
fuse_grad_size_in_MB); `distributed_optimizer` chains the strategy's gradient transforms
(gradient_merge) before the user's optimizer. Roles: every process is a worker; rank and world
size come from the collective world (`shoal.collective.init_parallel_env`).
"""
from __future__ import annotations


from shoal.configs import DistributedStrategy
from shoal.fleet._strategy import StrategyChoice
from shoal.fleet.errors import FleetError

# fleet names that only mean something with parameter servers
_PS_ONLY = ("init_server", "run_server", "save_persistables", "load_model", "shrink", "flush",
            "communicator", "all_to_all", "_connected", "server_load_dir")


class CollectiveRuntime(StrategyChoice):
    """The state of `fleet` in a collective process. The training thread drives it."""

    collective = True

    def __init__(self, strategy: DistributedStrategy | None, env, *, timeout: float | None = None):
        import shoal.collective as dist
        self.env, self.local = env, env is None
        self._take_strategy(strategy, env)
        self._dist = dist
        self.world = dist.init_parallel_env(timeout=timeout)
        self.model = None
        self.optimizer = None
        self.communicator = None

    def __getattr__(self, name):
        if name in _PS_ONLY:
            raise FleetError(f"fleet.{name.lstrip('_')}() is for parameter-server jobs; this job is "
                             f"collective (fleet.init(is_collective=True)): save with "
                             f"shoal.save(model.state_dict(), path) on rank 0")
        raise AttributeError(name)

    # -- roles -------------------------------------------------------------------------
    def is_server(self) -> bool:
        return False

    def is_worker(self) -> bool:
        return True

    def worker_index(self) -> int:
        return self._dist.get_rank()

    def worker_num(self) -> int:
        return self._dist.get_world_size()

    def server_num(self) -> int:
        return 0

    def _need(self, worker: bool, what: str) -> None:
        if not worker:
            raise FleetError(f"fleet.{what}() is for servers; a collective job has none")

    # -- training ------------------------------------------------------------------------
    def distributed_model(self, model):
        from shoal.collective import DataParallel
        s = self.strategy
        size = s.fuse_grad_size_in_MB if s.fuse_all_reduce_ops else 1e-9  # unfused: one per parameter
        self.model = DataParallel(model, fuse_grad_size_in_MB=size)
        return self.model

    def distributed_optimizer(self, optimizer, strategy: DistributedStrategy | None):
        from shoal.collective.transforms import TransformedOptimizer, gradient_merge
        self.set_strategy(strategy, "fleet.distributed_optimizer")
        s, transforms = self.strategy, []
        if s.gradient_merge:
            transforms.append(gradient_merge(s.gradient_merge_configs.k_steps,
                                             s.gradient_merge_configs.avg))
        self.optimizer = TransformedOptimizer(optimizer, transforms, model=self.model)
        return self.optimizer

    def init_worker(self, model=None) -> None:
        """Nothing to connect: the world joined at fleet.init()."""

    def barrier_worker(self) -> None:
        self._dist.barrier()

    def reduce(self, name: str, array):
        import numpy as np
        out = np.array(array, copy=True)
        self._dist.all_reduce(out)
        return out

    def stop_worker(self, stop_servers: bool = True) -> None:
        self._dist.barrier()
        self._dist.destroy_process_group()

"""fleet in collective mode (`fleet.init(is_collective=True)`): data parallel over collectives.

`distributed_model` and `distributed_optimizer` apply the strategy's pieces in the order
shoal.configs._composition fixes (shoal.fleet._strategies): recompute, amp, pipeline, sharding
or DataParallel on the model; lars/lamb, gradient_merge, amp, sharding, localsgd on the
optimizer. Roles: every process is a worker; rank and world
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
        """`model` with the strategy's model pieces (recompute, amp, pipeline, sharding) and
        data parallel, in shoal.configs._composition's order."""
        from shoal.fleet._strategies import wrap_model
        self.model = wrap_model(self._wiring(), model)
        if self.optimizer is not None:
            self.optimizer.bind(self.model)
        return self.model

    def distributed_optimizer(self, optimizer, strategy: DistributedStrategy | None):
        """`optimizer` with the strategy's optimizer pieces (lars/lamb, gradient_merge, amp,
        sharding, localsgd), in shoal.configs._composition's order."""
        from shoal.fleet._strategies import wrap_optimizer
        w = getattr(self, "_wired", None)
        if strategy is not None and w is not None and self.model is not None \
                and isinstance(strategy, DistributedStrategy) and strategy != w.s:
            raise FleetError(f"fleet.distributed_optimizer: its strategy differs from the one "
                             f"fleet.distributed_model applied in {w.s.diff(strategy)}; pass "
                             f"one strategy to fleet.init instead")
        self.set_strategy(strategy, "fleet.distributed_optimizer")
        self.optimizer = wrap_optimizer(self._wiring(), optimizer)
        return self.optimizer

    def _wiring(self):
        from shoal.fleet._strategies import Wiring
        w = getattr(self, "_wired", None)
        if w is None or w.s != self.strategy:
            w = self._wired = Wiring(self.strategy, self._dist.get_world_size())
        return w

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

"""The fleet facade: Paddle's `paddle.distributed.fleet` names over Shoal's parameter servers
(and, with `init(is_collective=True)`, over its collectives: DataParallel and gradient merge).

    import shoal.fleet as fleet
    fleet.init()                                   # role from the environment, or local mode
    opt = fleet.distributed_optimizer(shoal.optimizer.Adam(1e-3, parameters=model.parameters()))
    if fleet.is_server():
        fleet.init_server(); fleet.run_server()    # blocks until the workers are done
    else:
        fleet.init_worker(model)                   # tables created, dense values pulled
        for batch in fleet.prefetched(loader, model):
            loss = ...; loss.backward(); opt.step(); opt.clear_grad()
        fleet.stop_worker()                        # flushes, then stops the servers

Roles come from the environment contract (shoal.configs.cluster): TRAINING_ROLE,
PADDLE_TRAINER_ID, ... as fleetrun (or Paddle's launcher) sets them. With none
of them set the job runs in one process with in-process tables and says so
in one line; with some set and others missing, `init` raises naming them.

Blocking: init_worker, stop_worker, barrier_worker, save_persistables,
load_model, shrink and reduce wait for every worker (timeouts bounded by
the RPC timeout). One training thread per process drives fleet.
"""
from __future__ import annotations

import contextlib
import os

from shoal.configs import DistributedStrategy
from shoal.configs.cluster import ClusterEnv, Role
from shoal.fleet._data import prefetched
from shoal.fleet._optimizer import DistributedOptimizer
from shoal.fleet._runtime import PSRuntime
from shoal.fleet.errors import FleetError

_runtime: PSRuntime | None = None
_model = None


def _rt(what: str) -> PSRuntime:
    if _runtime is None:
        raise FleetError(f"fleet.{what}(): call fleet.init() first")
    return _runtime


def init(role_maker=None, is_collective: bool = False, strategy: DistributedStrategy | None = None,
         *, rpc_timeout: float = 60.0, collective_timeout: float | None = None) -> None:
    """Read this process's role from the environment (or enter local mode).

    Args:
        role_maker: accepted for Paddle compatibility; must be None (the role
            always comes from the environment contract).
        is_collective: collective (data-parallel) training: join the collective
            world (shoal.collective.init_parallel_env) instead of the servers;
            distributed_model / distributed_optimizer then apply DataParallel
            and the strategy's gradient merge.
        strategy: a DistributedStrategy; wins over SHOAL_STRATEGY's file.
        rpc_timeout: seconds any wait on the servers may take.
        collective_timeout: collective mode: seconds the rendezvous and each collective may
            take (default shoal.collective's, 300).

    Raises:
        ContractError: some contract variables are set and others missing or bad.
        FleetError: a role_maker; is_collective=True in a server process.
    """
    global _runtime, _model
    if role_maker is not None:
        raise FleetError("fleet.init(role_maker=...): Shoal reads roles from the environment "
                         "contract (TRAINING_ROLE, PADDLE_*); pass role_maker=None")
    if strategy is not None and not isinstance(strategy, DistributedStrategy):
        raise FleetError(f"fleet.init: strategy must be a DistributedStrategy, got "
                         f"{type(strategy).__name__}")
    if _runtime is not None and _runtime.communicator is not None:
        raise FleetError("fleet.init() while a worker is running: call fleet.stop_worker() first")
    env = ClusterEnv.detect(os.environ)
    if is_collective:
        if env is not None and env.role is not Role.TRAINER:
            raise FleetError(f"fleet.init(is_collective=True) in a {env.role.value} process: a "
                             f"collective job has only workers; start it with fleetrun "
                             f"--nproc_per_node N (no --server_num)")
        from shoal.fleet._collective import CollectiveRuntime
        _runtime = CollectiveRuntime(strategy, env, timeout=collective_timeout)
    else:
        _runtime = PSRuntime(strategy, env, rpc_timeout=rpc_timeout)
    _model = None


def is_server() -> bool:
    return _rt("is_server").is_server()


def is_worker() -> bool:
    return _rt("is_worker").is_worker()


def is_first_worker() -> bool:
    return _rt("is_first_worker").is_worker() and _runtime.worker_index() == 0


def worker_index() -> int:
    return _rt("worker_index").worker_index()


def server_index() -> int:
    """This server's index (0-based); -1 on a worker."""
    rt = _rt("server_index")
    return rt.env.server_index if rt.is_server() else -1


def worker_num() -> int:
    return _rt("worker_num").worker_num()


def server_num() -> int:
    return _rt("server_num").server_num()


def is_local() -> bool:
    """True in local mode (no contract variable set: one process, in-process tables)."""
    return _rt("is_local").local


def strategy() -> DistributedStrategy:
    """The strategy in force (explicit > SHOAL_STRATEGY file > defaults)."""
    return _rt("strategy").strategy


def distributed_model(model):
    """PS mode: remember `model` for init_worker() (whose tables it creates) and return it
    unchanged. Collective mode: return it wrapped in DataParallel (parameters broadcast from
    rank 0; gradients all-reduced in buckets of the strategy's fuse_grad_size_in_MB)."""
    global _model
    rt = _rt("distributed_model")
    if getattr(rt, "collective", False):
        _model = rt.distributed_model(model)
        return _model
    _model = model
    return model


def distributed_optimizer(optimizer, strategy: DistributedStrategy | None = None):
    """Wrap the user's optimizer. PS mode: its dense step runs on the servers (or locally in
    GEO). Collective mode: the strategy's gradient transforms (gradient_merge) run before each
    update; call distributed_model first so gradient merge can skip the all-reduce of the
    micro-steps it merges."""
    rt = _rt("distributed_optimizer")
    if getattr(rt, "collective", False):
        return rt.distributed_optimizer(optimizer, strategy)
    rt.set_strategy(strategy, "fleet.distributed_optimizer")
    rt.optimizer = DistributedOptimizer(optimizer, rt)
    return rt.optimizer


def init_server(dirname: str | None = None) -> None:
    """Prepare this server; with `dirname`, run_server loads that checkpoint before serving."""
    rt = _rt("init_server")
    rt._need(False, "init_server")
    rt.server_load_dir = dirname


def run_server() -> None:
    """Serve until a worker's stop_worker (or SIGTERM). Blocks."""
    rt = _rt("run_server")
    rt.run_server(getattr(rt, "server_load_dir", None))


def init_worker(model=None) -> None:
    """Connect to the servers; worker 0 creates the tables and pushes its dense values, the
    others wait for it, then every worker pulls the dense values. Binds the model's sparse
    layers to this worker's communicator."""
    _rt("init_worker").init_worker(model if model is not None else _model)


def stop_worker(stop_servers: bool = True) -> None:
    """Flush every queued gradient, wait for all workers, stop the servers (worker 0; not with
    `stop_servers=False`, when a later phase of the job uses them)."""
    _rt("stop_worker").stop_worker(stop_servers)


def flush() -> None:
    """Send and apply everything this worker has queued or trained locally (GEO); blocks. In
    pass mode it ends the pass: a collective, every worker must call it."""
    rt = _rt("flush")
    rt._connected("flush")
    rt._flush()


def begin_pass(dataset=None, slots: dict | None = None, *, keys: dict | None = None,
               samples: slice | None = None) -> bool:
    """Pass mode (a_sync_configs.use_ps_gpu): pull the whole records of every key of `dataset`
    (an InMemoryDataset with its data loaded) once into this worker's copy; the pass's steps then
    train against it without an RPC. `slots` maps each sparse table to the dataset slots that
    feed it (needed when the model has several tables); `keys` ({table: uint64 keys}) replaces
    the dataset for other readers; `samples` limits the pass to a range of the positions the
    dataset's batches come in (a resumed or shortened epoch: slice(skip * batch_size, stop)).
    In other modes it does nothing and returns False, so one script runs in every mode.
    Blocks."""
    return _rt("begin_pass").begin_pass(dataset, slots, keys, samples)


def end_pass() -> None:
    """Pass mode: write the pass back, merged with the other workers' (every worker calls);
    the dense values are then the servers'. Nothing in other modes. Blocks."""
    _rt("end_pass").end_pass()


@contextlib.contextmanager
def train_pass(dataset, slots: dict | None = None):
    """`begin_pass(dataset, slots)` ... `end_pass()` around a block. If the block raises, the
    pass is not ended (the other workers would wait for a write-back that may never be whole);
    the error propagates::

        with fleet.train_pass(train_set):
            for batch in train_set.batches():
                ...
    """
    begin_pass(dataset, slots)
    yield
    end_pass()


def barrier_worker() -> None:
    _rt("barrier_worker").barrier_worker()


def save_persistables(dirname: str, mode: int = 0, extra: dict | None = None) -> None:
    """Checkpoint every table and worker 0's optimizer/LR state plus `extra` (all workers call)."""
    _rt("save_persistables").save_persistables(dirname, mode, extra)


def load_model(dirname: str) -> dict:
    """Load a checkpoint written by save_persistables; returns its `extra` (all workers call)."""
    return _rt("load_model").load_model(dirname)


def shrink() -> int:
    """Decay show/click, delete cold rows and age unseen days by one; returns rows deleted."""
    return _rt("shrink").shrink()


def reduce_sum(name: str, array):
    """The elementwise sum of `array` over all workers (each worker calls with the same name)."""
    return _rt("reduce_sum").reduce(name, array)


def all_to_all(parts: list) -> list:
    """Send parts[j] (a sample Batch) to worker j; return the part every worker sent here, in rank
    order. A collective: every worker calls it. `dataset.global_shuffle(fleet)` uses it."""
    rt = _rt("all_to_all")
    rt._connected("all_to_all")
    if rt.worker_num() == 1:
        return list(parts)
    if rt.exchange is None:
        from shoal.fleet._exchange import Exchange
        rt.exchange = Exchange(rt)
    return rt.exchange(parts)


def restart_step() -> int:
    """The training step a restarted worker of a sync or half-async job resumes at (the step the
    other workers wait at; skip that many batches of this worker's data); 0 otherwise."""
    return getattr(_rt("restart_step"), "restart_step", 0)


def communicator():
    """This worker's communicator (for its wait times), or None before init_worker."""
    return _rt("communicator").communicator


__all__ = ["init", "is_server", "is_worker", "is_first_worker", "worker_index", "server_index", "worker_num",
           "server_num", "is_local", "strategy", "distributed_model", "distributed_optimizer",
           "init_server", "run_server", "init_worker", "stop_worker", "flush", "barrier_worker",
           "save_persistables", "load_model", "shrink", "reduce_sum", "all_to_all", "communicator",
           "restart_step", "begin_pass", "end_pass", "train_pass",
           "prefetched",
           "DistributedOptimizer", "DistributedStrategy", "FleetError"]

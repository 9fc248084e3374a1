"""The parameter-server runtime behind the fleet facade: roles, tables, communicator, checkpoints.

One `PSRuntime` per process (`shoal.fleet` holds it). It reads the role from
the environment contract (configs/cluster.py), or runs local mode when no
contract variable is set; builds the table specs from the model's sparse
layers and the strategy (DESIGN.md "Tables come from the model and the
strategy"); and wires the communicator of the strategy's mode into the
model's sparse layers and the distributed optimizer.
"""
from __future__ import annotations

import os
import sys
import time

import numpy as np

from shoal.configs import CommMode, DistributedStrategy
from shoal.configs import cluster
from shoal.fleet._optimizer import DistributedOptimizer, FlatParams, dense_spec
from shoal.fleet._strategy import StrategyChoice
from shoal.fleet.errors import FleetError
from shoal.ps.checkpoint import read_manifest
from shoal.ps.client import PSClient
from shoal.ps.communicator import DENSE_TABLE, Communicator, Mode, make_communicator
from shoal.ps.spec import SparseTableSpec
from shoal.worker.nn.sparse import bind_sparse_backend, sparse_layers
from shoal.worker.serialization import load as load_tree
from shoal.worker.serialization import save as save_tree



def _worker_file(rank: int, save_id: str) -> str:
    return f"worker-{rank:05d}-{save_id}.npz"

_MODE_NAMES = {CommMode.SYNC: "sync", CommMode.ASYNC: "async", CommMode.HALF_ASYNC: "half_async",
               CommMode.GEO: "geo", CommMode.PASS: "pass"}


def _local_line(strategy: DistributedStrategy) -> str:
    return (f"shoal.fleet: no TRAINING_ROLE / PADDLE_* variable is set: local mode, one process "
            f"with in-process tables (the strategy's {_MODE_NAMES[strategy.communicator_mode]} "
            f"mode runs as sync with one worker)")


class PSRuntime(StrategyChoice):
    """The state of `fleet` in one process. Not thread-safe: the training thread drives it."""

    def __init__(self, strategy: DistributedStrategy | None = None, env=None, *, rpc_timeout: float = 60.0,
                 quiet: bool = False):
        self.env = env
        self.local = env is None
        self._take_strategy(strategy, env)
        self.rpc_timeout = rpc_timeout
        self.client: PSClient | None = None
        self.communicator: Communicator | None = None
        self.optimizer: DistributedOptimizer | None = None
        self.model = None
        self.flat: FlatParams | None = None
        self.exchange = None  # worker-to-worker all_to_all, started by the first global_shuffle
        self.restart_step = 0  # a restarted worker of a sync/half-async job: the step to resume at
        self.rejoined = False  # a restarted worker that joined a running job (past its init)
        if self.local and not quiet:
            print(_local_line(self.strategy), file=sys.stderr, flush=True)

    # -- roles -------------------------------------------------------------------------
    def is_server(self) -> bool:
        return isinstance(self.env, cluster.ServerEnv)

    def is_worker(self) -> bool:
        return not self.is_server()

    def worker_index(self) -> int:
        return 0 if self.local else self.env.trainer_id if self.is_worker() else -1

    def worker_num(self) -> int:
        return 1 if self.local else self.env.trainers_num

    def server_num(self) -> int:
        if self.local:
            return 1
        return len(self.env.servers if self.is_server() else self.env.pservers)

    def _need(self, worker: bool, what: str) -> None:
        if worker and not self.is_worker():
            raise FleetError(f"fleet.{what}() is for workers; this process is server "
                             f"{self.env.server_index} (TRAINING_ROLE=PSERVER)")
        if not worker and not self.is_server():
            raise FleetError(f"fleet.{what}() is for servers; this process is "
                             f"{'the local-mode worker' if self.local else 'a worker'} "
                             f"(TRAINING_ROLE=TRAINER)")

    # -- servers -----------------------------------------------------------------------
    def run_server(self, load_dir: str | None = None) -> None:
        """Serve this server's shard until stopped (blocks). `load_dir` loads a checkpoint first."""
        self._need(False, "run_server")
        from shoal.ps.server import report_endpoint, serve
        env = self.env
        serve(env.server_index, len(env.servers), env.current_endpoint, env.job_token,
              auth=env.auth.value, load_dir=load_dir,
              report=lambda ep: report_endpoint(ep, env.report_path) if env.report_path else None)

    # -- workers -----------------------------------------------------------------------
    def _client(self) -> PSClient:
        if self.local:
            return PSClient.local()
        env = self.env
        if not env.pservers:
            raise FleetError("this worker has no parameter servers: PADDLE_PSERVERS_IP_PORT_LIST is "
                             "empty (start servers, e.g. fleetrun --server_num 2 --worker_num 2)")
        return PSClient(list(env.pservers), env.job_token, auth=env.auth.value, timeout=self.rpc_timeout,
                        client_id=f"worker-{env.trainer_id}-{os.getpid()}")

    def table_specs(self, model) -> list[SparseTableSpec]:
        """A spec per sparse table of `model`: the layer gives name and dim, the strategy the rest."""
        dims: dict[str, int] = {}
        for layer in sparse_layers(model):
            have = dims.setdefault(layer.table, layer.dim)
            if have != layer.dim:
                raise FleetError(f"sparse table {layer.table!r} is used with dim {have} and dim "
                                 f"{layer.dim} by two layers; layers sharing a table need one dim")
        specs = []
        for name, dim in dims.items():
            if name == DENSE_TABLE:
                raise FleetError(f"sparse table name {name!r} is reserved for the dense parameters; "
                                 f"rename the layer's table")
            cfg = self.strategy.table_config(name)
            if cfg.dim is not None and cfg.dim != dim:
                raise FleetError(f"strategy sparse_table for {name!r} says dim={cfg.dim} but the "
                                 f"model's layer has dim={dim}")
            specs.append(SparseTableSpec(name=name, dim=dim, **cfg.spec_fields()))
        return specs

    def barrier(self, name: str) -> None:
        """Every worker meets at `name` (on server 0). A name is reused from one phase to the next
        (a gathering ends when all arrived), so a restarted worker meets the others at their next."""
        if self.worker_num() > 1:
            self.client.barrier(name, self.worker_num(), self.rpc_timeout,
                                member=self.worker_index())

    def init_worker(self, model) -> None:
        self._need(True, "init_worker")
        if self.communicator is not None:
            raise FleetError("fleet.init_worker() was already called in this process")
        if model is None:
            raise FleetError("fleet.init_worker(model): pass the model (or call "
                             "fleet.distributed_model(model) first) so its tables can be created")
        specs = self.table_specs(model)
        params = self.optimizer.inner._params if self.optimizer is not None else []
        if self.optimizer is None and model.parameters():
            raise FleetError("fleet.init_worker(): the model has dense parameters but no optimizer "
                             "was wrapped; call fleet.distributed_optimizer(opt) first")
        flat = FlatParams(params)
        if flat.size:
            specs.append(dense_spec(self.optimizer.inner, flat.size, DENSE_TABLE))
        self.client = client = self._client()
        restarted = bool(getattr(self.env, "restart", 0))
        try:
            if restarted and self.worker_num() > 1 and "init-worker" in client.gatherings("init-worker"):
                restarted = False  # the predecessor died before init: the others wait there for it
            self.rejoined = restarted
            if restarted:
                self._rejoin(client, specs)
            elif self.worker_index() == 0:
                created = {spec.name: client.create_table(spec) for spec in specs}
                # a table the servers loaded from a checkpoint (init_server(dirname)) keeps its values
                if flat.size and created[DENSE_TABLE]:
                    client.init_dense(DENSE_TABLE, flat.buffer)
            else:
                for spec in specs:
                    client.register_table(spec)
            if not restarted:
                self.barrier("init-worker")  # the tables exist and hold worker 0's dense values
            if flat.size:
                flat.load(client.pull_dense(DENSE_TABLE))
            self.communicator = self._communicator(client, specs)
            self.communicator.steps = self.restart_step
            if restarted:
                self.communicator.replay = True
        except BaseException:
            client.close()
            self.client = None
            raise
        if flat.size and self.communicator.trains_dense_locally:
            self.communicator.set_dense_base(flat.buffer)
        self.flat, self.model = flat, model
        if self.optimizer is not None:
            self.optimizer._attach(flat)
        bind_sparse_backend(model, self.communicator)

    def _rejoin(self, client: PSClient, specs) -> None:
        """A restarted worker (SHOAL_RESTART > 0) joins a running job past its init. Async and
        GEO jobs take it back at once. In sync and half-async jobs the others wait for it at a
        per-step barrier: it finds that barrier on server 0 and resumes at its step
        (`restart_step`), so every worker still runs the same number of steps. Its predecessor's
        part of that step is replaced on the servers it reached, not added; a shard that had
        already applied the step is pulled after it, so the re-pushed gradient is computed on
        weights partly one step newer (sync), and in half-async a step pushed before the death
        is applied twice."""
        if self.worker_index() == 0:  # idempotent: a table that exists is kept as it is
            for spec in specs:
                client.create_table(spec)
        else:
            for spec in specs:
                client.register_table(spec)
        mode = self.strategy.communicator_mode
        if mode is CommMode.PASS and self.worker_num() > 1:
            raise FleetError(f"worker {self.worker_index()} was restarted (generation "
                             f"{self.env.restart}) into a pass-mode job: the servers merge a pass "
                             f"over every worker's write-back, and this worker's part of the "
                             f"running pass died with its predecessor; restart the whole job from "
                             f"its last checkpoint (fleet.load_model) instead of restarting workers")
        if mode in (CommMode.SYNC, CommMode.HALF_ASYNC) and self.worker_num() > 1:
            # sync names a step's barrier by the step; half-async by the step count after it
            self.restart_step = self._find_step(client, *(("sync-step-", 0) if mode is CommMode.SYNC
                                                          else ("half-async-step-", 1)))

    def _find_step(self, client: PSClient, prefix: str, after: int) -> int:
        """The step the other workers are waiting at (polling server 0's open barriers)."""
        me, deadline = self.worker_index(), time.monotonic() + self.rpc_timeout
        while True:
            open_ = client.gatherings("")
            steps = {int(name[len(prefix):]): g for name, g in open_.items()
                     if name.startswith(prefix) and name[len(prefix):].isdigit()}
            if steps:
                name = min(steps)
                if me not in steps[name]["members"]:
                    return name - after
                # the predecessor arrived there before it died: its pushes of that step are in;
                # meet the others there (counted once) so the step is applied before the pull
                self.barrier(f"{prefix}{name}")
                return name - after + 1
            others = sorted(n for n, g in open_.items() if g["arrived"] and not n.startswith(prefix))
            if others:
                raise FleetError(f"worker {me} was restarted (generation {self.env.restart}), but "
                                 f"the other workers wait at {others}, not at a training step: a "
                                 f"restart rejoins a sync or half-async job only between its steps")
            if time.monotonic() > deadline:
                raise FleetError(f"worker {me} was restarted (generation {self.env.restart}) into a "
                                 f"{prefix.split('-step')[0]} job, but no other worker reached a "
                                 f"step barrier within {self.rpc_timeout}s to rejoin at; are the "
                                 f"other workers still running?")
            time.sleep(0.05)

    def _communicator(self, client: PSClient, specs) -> Communicator:
        mode = CommMode.SYNC if self.local else self.strategy.communicator_mode
        cfg = self.strategy.a_sync_configs
        return make_communicator(
            _MODE_NAMES[mode], client, worker_index=self.worker_index(),
            worker_num=self.worker_num(), timeout=self.rpc_timeout,
            send_queue_size=cfg.send_queue_size, max_merge_var_num=cfg.max_merge_var_num,
            k_steps=cfg.k_steps, pass_timeout=cfg.pass_timeout,
            sparse_lr={s.name: s.learning_rate for s in specs if s.kind == "sparse"})

    def _flush(self) -> None:
        """Everything this worker queued or trained locally reaches the servers; the worker's
        dense copy is then the servers' (what it evaluates or saves is what was trained)."""
        comm = self.communicator
        if comm.trains_dense_locally and self.flat.size:
            fresh = comm.flush(self.flat.buffer)
        else:
            fresh = comm.flush()
        if fresh is not None and self.flat.size:
            self.flat.load(fresh)

    def stop_worker(self, stop_servers: bool = True) -> None:
        """Send everything queued (no gradient is lost), wait for every worker, then worker 0
        stops the servers (unless `stop_servers` is False: another phase of the job will use
        them, and whoever started them stops them)."""
        self._need(True, "stop_worker")
        if self.communicator is None:
            raise FleetError("fleet.stop_worker(): init_worker() was not called")
        try:
            self._flush()
            self.communicator.stop()
            self.barrier("stop-worker")
            if stop_servers and self.worker_index() == 0 and not self.local:
                self.client.stop_servers()
        finally:
            try:
                self.communicator.stop()  # idempotent; after a failed flush it still ends the threads
            except Exception:  # the first error is the one the caller sees
                pass
            bind_sparse_backend(self.model, None)
            if self.exchange is not None:
                self.exchange.close()
                self.exchange = None
            self.client.close()
            self.communicator = None

    # -- pass mode ---------------------------------------------------------------------
    def _pass_keys(self, dataset, slots, samples: slice | None = None) -> dict[str, np.ndarray]:
        """table -> the uint64 keys, in the slots that feed it, of `dataset`'s samples (those of
        `samples`, a range of the order its batches come in, when given)."""
        if hasattr(dataset, "slot_values"):  # an InMemoryDataset: no copy of a pending shuffle
            sparse_names = dataset.sparse_slots
        else:
            sparse = getattr(dataset, "sparse", None)
            if not isinstance(sparse, dict):
                raise FleetError(f"fleet.begin_pass: expected an InMemoryDataset with its data "
                                 f"loaded (or a Batch), got {type(dataset).__name__}; pass mode "
                                 f"scans a pass's keys before it trains, so a streaming "
                                 f"QueueDataset cannot be a pass")
            sparse_names = sorted(sparse)
        tables = sorted({layer.table for layer in sparse_layers(self.model)})
        if slots is None:
            if len(tables) != 1:
                raise FleetError(f"fleet.begin_pass: the model has {len(tables)} sparse tables "
                                 f"{tables}; say which dataset slots feed which, e.g. "
                                 f"slots={{{tables[0]!r}: [...]}} (slots: {sparse_names})"
                                 if tables else "fleet.begin_pass: the model has no sparse layer")
            slots = {tables[0]: sparse_names}
        unknown = sorted(set(slots) - set(tables))
        if unknown:
            raise FleetError(f"fleet.begin_pass: slots names table(s) {unknown} the model does not "
                             f"use; its sparse tables: {tables}")
        keys = {}
        for table, names in slots.items():
            missing = [n for n in names if n not in sparse_names]
            if missing:
                raise FleetError(f"fleet.begin_pass: slot(s) {missing} for table {table!r} are not "
                                 f"sparse slots of the dataset (its sparse slots: {sparse_names})")
            if hasattr(dataset, "slot_values"):
                span = samples or slice(0, None)
                keys[table] = dataset.slot_values(names, span.start or 0, span.stop)
            else:
                part = dataset if samples is None else dataset.slice(
                    samples.start or 0, min(samples.stop or len(dataset), len(dataset)))
                keys[table] = np.concatenate(
                    [np.asarray(part.sparse[n].values, np.uint64) for n in names] or
                    [np.zeros(0, np.uint64)])
        return keys

    def begin_pass(self, dataset=None, slots: dict | None = None, keys: dict | None = None,
                   samples: slice | None = None) -> bool:
        """Pass mode: pull the whole records of `dataset`'s keys (or of `keys`: table -> uint64
        keys) once (see PassCommunicator); other modes: nothing. Returns whether a pass began."""
        self._need(True, "begin_pass")
        self._connected("begin_pass")
        if (dataset is None) == (keys is None):
            raise FleetError("fleet.begin_pass: give either a dataset (with slots when the model "
                             "has several sparse tables) or keys={table: uint64 keys}, not both")
        if samples is not None and not (isinstance(samples, slice) and samples.step in (None, 1)):
            raise FleetError(f"fleet.begin_pass: samples must be a slice of sample positions "
                             f"(e.g. slice(skip * batch_size, None)), got {samples!r}")
        if self.communicator.mode is not Mode.PASS:
            return False
        self.communicator.begin_pass(self._pass_keys(dataset, slots, samples) if keys is None else keys)
        return True

    def end_pass(self) -> None:
        """Pass mode: write the pass back and meet the other workers (every worker calls);
        other modes: nothing."""
        self._need(True, "end_pass")
        self._connected("end_pass")
        if self.communicator.mode is Mode.PASS:
            self._flush()

    def barrier_worker(self) -> None:
        self._need(True, "barrier_worker")
        self._connected("barrier_worker")
        self.barrier("barrier-worker")

    def _connected(self, what: str) -> None:
        if self.communicator is None:
            raise FleetError(f"fleet.{what}(): call fleet.init_worker() first")

    def reduce(self, name: str, array: np.ndarray) -> np.ndarray:
        """The elementwise sum of `array` over all workers (through server 0); every worker calls."""
        self._connected("reduce")
        if self.worker_num() == 1:
            return np.array(array)
        return self.client.reduce(name, array, self.worker_num(), self.rpc_timeout)

    # -- checkpoints -------------------------------------------------------------------
    def save_persistables(self, dirname: str, mode: int = 0, extra: dict | None = None) -> None:
        """Every table (modes 0 all, 1 delta, 2 base, 3 day tick) plus worker 0's state
        (optimizer/LR state and `extra`, e.g. the data offset). Every worker calls it."""
        self._need(True, "save_persistables")
        self._connected("save_persistables")
        if mode not in (0, 1, 2, 3):
            raise FleetError(f"save_persistables: mode={mode!r}; choose 0 (all), 1 (delta), 2 (base) "
                             f"or 3 (day tick)")
        self._flush()
        # one save id for every worker: worker 0 draws it, the others learn it through a reduce
        draw = np.zeros(2, np.int64)
        if self.worker_index() == 0:
            draw[:] = (int(time.time()), int.from_bytes(os.urandom(7), "little"))
        stamp, nonce = (int(x) for x in self.reduce("save-id", draw))
        save_id = f"{stamp}-{nonce:014x}"
        names = [_worker_file(r, save_id) for r in range(self.worker_num())]
        if mode != 3:  # each worker's own state, kept with (and listed in) this save's manifest
            os.makedirs(dirname, exist_ok=True)
            state = {"optimizer": self.optimizer.state_dict() if self.optimizer else {},
                     "extra": dict(extra or {}), "saved_at": time.time(), "worker": self.worker_index()}
            save_tree(state, os.path.join(dirname, names[self.worker_index()]))
        self.barrier("save-begin")
        if self.worker_index() == 0:
            self.client.save(dirname, mode, save_id=save_id, worker_files=names if mode != 3 else None)
        self.barrier("save-end")

    def load_model(self, dirname: str) -> dict:
        """Load a checkpoint (onto any number of servers); returns the `extra` saved with it."""
        self._need(True, "load_model")
        self._connected("load_model")
        self._flush()
        manifest = read_manifest(dirname)  # before touching anything: a bad directory changes nothing
        if not self.rejoined:  # a restarted worker that rejoined a running job: the others loaded it
            self.barrier("load-begin")
            if self.worker_index() == 0:
                self.client.load(dirname)
            self.barrier("load-end")
        self.communicator.reset()
        if self.flat.size:
            self.flat.load(self.client.pull_dense(DENSE_TABLE))
            if self.communicator.trains_dense_locally:
                self.communicator.set_dense_base(self.flat.buffer)
        files = manifest.get("worker_files") or []
        if not files:
            return {}
        # as many workers as saved: each takes its own; otherwise worker r takes r mod the saved count
        state = load_tree(os.path.join(dirname, files[self.worker_index() % len(files)]))
        if self.optimizer is not None and state.get("optimizer"):
            self.optimizer.set_state_dict(state["optimizer"])
        return dict(state.get("extra", {}))

    def shrink(self) -> int:
        """Shrink every sparse table (decay, delete cold rows) and age unseen days by one."""
        self._connected("shrink")
        self._flush()
        self.barrier("shrink-begin")
        deleted = self.client.shrink(day_tick=True) if self.worker_index() == 0 else 0
        self.barrier("shrink-end")
        return deleted

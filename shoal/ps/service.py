"""What one parameter server does: one handler per op over its table shards.

`PSService.handlers()` maps op names to `handler(header, arrays) -> (header,
arrays)` for the RPC server (ps/rpc). Handlers run concurrently on the RPC
server's threads; tables lock per shard, the table registry, the push ledger
and the rendezvous (barrier/reduce) have their own locks. A handler refuses a
bad request by raising (the RPC server turns that into an error reply) and
changes nothing when it does.
"""
from __future__ import annotations

import collections
import threading
import time

import numpy as np

from shoal.ps import checkpoint as ckpt
from shoal.ps.dense_table import DenseTable
from shoal.ps.errors import PSError, PSTimeoutError, TableError
from shoal.ps.sparse_table import SparseTable
from shoal.ps.spec import spec_conflicts, spec_from_dict

# Ops that never wait on other requests and finish in about a memory pass: the RPC
# server serves them on the receiving thread (no thread switch per request).
INLINE_OPS = frozenset({"pull_dense", "push_dense", "init_dense", "create_table", "stats"})

OPS = ("create_table", "init_dense", "pull_sparse", "push_sparse", "pull_dense", "push_dense",
       "push_delta", "pull_records", "push_pass", "barrier", "reduce", "gatherings", "save", "commit_save", "load", "shrink", "stats", "stop")


def _arrays(arrays: list, n: int, op: str, what: str) -> list:
    if len(arrays) != n:
        raise PSError(f"{op}: expected {n} arrays ({what}), got {len(arrays)}")
    return arrays


def _field(header: dict, name: str, kind, op: str):
    value = header.get(name)
    if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
        raise PSError(f"{op}: header field {name!r} must be {getattr(kind, '__name__', kind)}, "
                      f"got {value!r}")
    return value


class _PushLedger:
    """Remembers the (client, seq) of recent pushes so a retried push is applied once."""

    def __init__(self, keep: int = 65536):
        self.keep = keep
        self.cond = threading.Condition()
        self.done: collections.OrderedDict = collections.OrderedDict()
        self.running: set = set()

    def run_once(self, header: dict, apply) -> bool:
        """Call `apply()` unless this (client, seq) already was; True if it ran now."""
        client, seq = header.get("client"), header.get("seq")
        if not isinstance(client, str) or not isinstance(seq, int):
            apply()  # no identity: nothing to deduplicate against
            return True
        key = (client, seq)
        with self.cond:
            while key in self.running:  # the original is being applied: wait for its outcome
                self.cond.wait()
            if key in self.done:
                return False
            self.running.add(key)
        ok = False
        try:
            apply()
            ok = True
        finally:
            with self.cond:
                self.running.discard(key)
                if ok:
                    self.done[key] = None
                    while len(self.done) > self.keep:
                        self.done.popitem(last=False)
                self.cond.notify_all()
        return True


class _Held:
    """What _StepSum and _PassMerge share: parts held under a lock until a set is complete, and
    tables whose completed set could not be applied (every later part to them is refused)."""

    what = "step"

    def __init__(self, max_open: int):
        self.lock = threading.Lock()
        self.open: dict[tuple, object] = {}  # (table, number) -> the parts held so far
        self.max_open = max_open
        self.broken: dict[str, str] = {}     # table -> why a completed set could not be applied

    def apply(self, table: str, number, parts: list, fn) -> None:
        """Run `fn(parts)` for a completed set; if it fails, every later part for `table` is
        refused (the other workers were told their parts were taken)."""
        try:
            fn(parts)
        except BaseException as e:
            with self.lock:
                self.broken[table] = f"{self.what} {number} could not be applied ({e})"
            raise


class _StepSum(_Held):
    """Sync mode: the pushes of one training step from every worker, applied once together.

    A push whose header carries ``"sync": [step, count]`` is validated and
    held; the one that completes the set of `count` applies the merged sum
    (sparse: keys concatenated and merged by the table; dense: gradients
    summed) with the table's rule, before it is answered. So once every
    worker's pushes of a step are answered, the step is applied everywhere.
    """

    def __init__(self, max_open: int = 256):
        super().__init__(max_open)           # open: (table, step) -> [count, parts]
        self.done: dict[str, int] = {}     # table -> the last step completed

    def add(self, table: str, sync, part) -> list | None:
        """Hold `part`; the list of all parts once this completes the step, else None.

        `sync` is [step, count], [step, count, worker] or [step, count, worker, replay]. With
        the worker's rank, a second part from the same worker replaces its first (a restarted
        worker re-pushing the step its predecessor died in). With `replay` (1: the restarted
        worker's first step) a part for a step that already completed is dropped: its
        predecessor's part was applied."""
        if (not isinstance(sync, list) or len(sync) not in (2, 3, 4)
                or not all(isinstance(x, int) and not isinstance(x, bool) for x in sync)
                or sync[1] < 1 or (len(sync) >= 3 and not 0 <= sync[2] < sync[1])
                or (len(sync) == 4 and sync[3] not in (0, 1))):
            raise PSError(f"push to {table!r}: header field 'sync' must be [step, count], "
                          f"[step, count, worker] or [step, count, worker, replay] with count >= 1, "
                          f"0 <= worker < count and replay 0 or 1, got {sync!r}")
        step, count = sync[0], sync[1]
        key = (table, step)
        with self.lock:
            if table in self.broken:
                raise PSError(f"sync push to {table!r}: an earlier {self.broken[table]}; the "
                              f"table no longer matches sync training: restart the job from its "
                              f"last checkpoint")
            if len(sync) == 4 and sync[3] and step <= self.done.get(table, -1):
                return None  # the step completed with the predecessor's part: nothing to add
            entry = self.open.get(key)
            if entry is None:
                if len(self.open) >= self.max_open:
                    raise PSError(f"push to {table!r}: {len(self.open)} sync steps are waiting for "
                                  f"workers that never pushed; is a worker missing?")
                entry = self.open[key] = [count, {}]
            if entry[0] != count:
                raise PSError(f"push to {table!r} step {step}: this worker says count={count}, "
                              f"others said {entry[0]}; every worker must use the same count")
            entry[1][sync[2] if len(sync) >= 3 else ("anonymous", len(entry[1]))] = part
            if len(entry[1]) < count:
                return None
            del self.open[key]
            self.done[table] = max(step, self.done.get(table, -1))
            return list(entry[1].values())


class _PassMerge(_Held):
    """Pass mode: every worker's write-back of one pass, in chunks, merged and applied once.

    A push_pass carries ``"sync": [pass, count, worker]`` and ``"chunk": [i, total]``; the
    chunk that completes the set (every one of `count` workers, each with all its chunks)
    applies them all together before it is answered. A resent chunk replaces itself.
    """

    what = "pass"

    def __init__(self, max_open: int = 64):
        super().__init__(max_open)  # open: (table, pass) -> {"count", "totals", "parts"}

    @staticmethod
    def _ints(value, n: int) -> bool:
        return (isinstance(value, list) and len(value) == n
                and all(isinstance(x, int) and not isinstance(x, bool) for x in value))

    def add(self, table: str, sync, chunk, part) -> list | None:
        """Hold `part`; every part of the pass once this one completes it, else None."""
        if not self._ints(sync, 3) or sync[1] < 1 or not 0 <= sync[2] < sync[1] or sync[0] < 0:
            raise PSError(f"push_pass to {table!r}: header field 'sync' must be [pass, count, "
                          f"worker] with pass >= 0, count >= 1 and 0 <= worker < count, got {sync!r}")
        if not self._ints(chunk, 2) or not 0 <= chunk[0] < chunk[1]:
            raise PSError(f"push_pass to {table!r}: header field 'chunk' must be [i, total] with "
                          f"0 <= i < total, got {chunk!r}")
        number, count, worker = sync
        with self.lock:
            if table in self.broken:
                raise PSError(f"push_pass to {table!r}: an earlier {self.broken[table]}; restart the "
                              f"job from its last checkpoint")
            entry = self.open.get((table, number))
            if entry is None:
                if len(self.open) >= self.max_open:
                    raise PSError(f"push_pass to {table!r}: {len(self.open)} passes are waiting for "
                                  f"workers that never wrote back; is a worker missing?")
                entry = self.open[(table, number)] = {"count": count, "totals": {}, "parts": {}}
            if entry["count"] != count:
                raise PSError(f"push_pass to {table!r} pass {number}: this worker says count={count}, "
                              f"others said {entry['count']}; every worker must use the same count")
            if entry["totals"].setdefault(worker, chunk[1]) != chunk[1]:
                raise PSError(f"push_pass to {table!r} pass {number}: worker {worker} announced "
                              f"{entry['totals'][worker]} chunks before, {chunk[1]} now")
            entry["parts"][(worker, chunk[0])] = part
            if len(entry["totals"]) < count or len(entry["parts"]) < sum(entry["totals"].values()):
                return None
            del self.open[(table, number)]
            return list(entry["parts"].values())


class _Gathering:
    def __init__(self, count: int):
        self.count, self.arrived, self.total, self.done = count, 0, None, False
        self.members: dict[int, int] = {}   # rank -> its calls waiting here (a restarted rank: 2)


class PSService:
    """The tables and ops of server `index` of `n_servers`.

    Args:
        max_waiters: how many barrier/reduce calls may wait at once (each holds
            an RPC thread); a gathering larger than this is refused up front.
    """

    def __init__(self, index: int, n_servers: int, max_waiters: int = 60):
        if not 0 <= index < n_servers:
            raise PSError(f"server index {index} is outside [0, {n_servers})")
        self.index, self.n_servers, self.max_waiters = index, n_servers, max_waiters
        self.tables: dict[str, SparseTable | DenseTable] = {}
        self._tables_lock = threading.Lock()
        self._ledger = _PushLedger()
        self._steps = _StepSum()
        self._passes = _PassMerge()
        self._gather_cond = threading.Condition()
        self._gatherings: dict[str, _Gathering] = {}
        self.stop_requested = threading.Event()
        self.started = time.time()

    def handlers(self) -> dict:
        return {op: getattr(self, f"op_{op}") for op in OPS}

    # -- tables ------------------------------------------------------------------
    def _table(self, header: dict, op: str, kind: str | None = None):
        name = header.get("table")
        table = self.tables.get(name) if isinstance(name, str) else None
        if table is None:
            raise TableError(f"{op}: unknown table {name!r}; tables on server {self.index}: "
                             f"{sorted(self.tables)} (create it with create_table first)")
        if kind is not None and table.spec.kind != kind:
            raise TableError(f"{op}: table {name!r} is {table.spec.kind}, this op needs a {kind} table")
        return table

    def _create(self, spec):
        with self._tables_lock:
            have = self.tables.get(spec.name)
            if have is not None:
                diff = spec_conflicts(have.spec, spec)
                if diff:
                    raise TableError(f"create_table: table {spec.name!r} exists with a different "
                                     f"spec (field: (existing, requested)) {diff}; use another name "
                                     f"or the same spec")
                return have, False
            table = SparseTable(spec, self.index) if spec.kind == "sparse" else \
                DenseTable(spec, self.index, self.n_servers)
            self.tables[spec.name] = table
            return table, True

    def op_create_table(self, header, arrays):
        spec = spec_from_dict(header.get("spec"))
        _, created = self._create(spec)
        return {"created": created}, []

    def op_init_dense(self, header, arrays):
        table = self._table(header, "init_dense", "dense")
        table.init(_arrays(arrays, 1, "init_dense", "values")[0])
        return {}, []

    def op_pull_sparse(self, header, arrays):
        table = self._table(header, "pull_sparse", "sparse")
        (keys,) = _arrays(arrays, 1, "pull_sparse", "keys")
        training, unique = header.get("training", True), header.get("unique", False)
        if not isinstance(training, bool) or not isinstance(unique, bool):
            raise PSError(f"pull_sparse: 'training' and 'unique' must be true or false, got "
                          f"{training!r} and {unique!r}")
        return {}, [table.pull(keys, training=training, unique=unique)]

    def op_push_sparse(self, header, arrays):
        table = self._table(header, "push_sparse", "sparse")
        keys, packed = _arrays(arrays, 2, "push_sparse", "keys, [grads | show | click]")
        if "sync" not in header:
            apply = lambda: table.push_packed(keys, packed)  # noqa: E731
        else:
            def apply():
                table.check_packed(keys, packed)
                parts = self._steps.add(table.spec.name, header["sync"], (keys, packed))
                if parts is not None:
                    self._steps.apply(table.spec.name, header["sync"][0], parts, lambda ps: table.push_packed(
                        np.concatenate([k for k, _ in ps]), np.concatenate([p for _, p in ps])))
        return {"applied": self._ledger.run_once(header, apply)}, []

    def op_pull_dense(self, header, arrays):
        return {}, [self._table(header, "pull_dense", "dense").pull()]

    def op_push_dense(self, header, arrays):
        table = self._table(header, "push_dense", "dense")
        (grad,) = _arrays(arrays, 1, "push_dense", "grad")
        lr = header.get("lr")
        if lr is not None and not isinstance(lr, float):
            raise PSError(f"push_dense {table.spec.name!r}: header field 'lr' must be a float, got {lr!r}")
        if "sync" not in header:
            apply = lambda: table.push(grad, lr)  # noqa: E731
        else:
            def apply():
                table.check(grad, "push_dense")
                parts = self._steps.add(table.spec.name, header["sync"], grad)
                if parts is not None:
                    self._steps.apply(table.spec.name, header["sync"][0], parts,
                                      lambda ps: table.push(table.check(np.sum(ps, axis=0, dtype=np.float32),
                                                                        "push_dense"), lr))
        return {"applied": self._ledger.run_once(header, apply)}, []

    def op_push_delta(self, header, arrays):
        table = self._table(header, "push_delta")
        if table.spec.kind == "sparse":
            keys, deltas = _arrays(arrays, 2, "push_delta", "keys, deltas")
            apply = lambda: table.add_delta(keys, deltas)  # noqa: E731
        else:
            (delta,) = _arrays(arrays, 1, "push_delta", "delta")
            apply = lambda: table.push_delta(delta)  # noqa: E731
        return {"applied": self._ledger.run_once(header, apply)}, []

    def op_pull_records(self, header, arrays):
        table = self._table(header, "pull_records", "sparse")
        (keys,) = _arrays(arrays, 1, "pull_records", "keys")
        found, records = table.pull_records(keys)
        return {"width": table.record_width}, [found.view(np.uint8), records]

    def op_push_pass(self, header, arrays):
        """A chunk of a worker's write-back of one pass, held until every worker's arrived, then
        merged and applied once (SparseTable.merge_pass; _PassMerge)."""
        table = self._table(header, "push_pass", "sparse")
        keys, packed = _arrays(arrays, 2, "push_pass", "keys, packed pass rows")
        if "sync" not in header or "chunk" not in header:
            raise PSError(f"push_pass {table.spec.name!r}: header fields 'sync' ([pass, n_workers, "
                          f"worker]) and 'chunk' ([i, total]) are required: a pass is merged over "
                          f"every worker's write-back")
        name = table.spec.name

        def apply():
            table.check_pass(keys, packed)
            parts = self._passes.add(name, header["sync"], header["chunk"], (keys, packed))
            if parts is not None:
                self._passes.apply(name, header["sync"][0], parts, lambda ps: table.merge_pass(
                    np.concatenate([k for k, _ in ps]), np.concatenate([p for _, p in ps])))
        return {"applied": self._ledger.run_once(header, apply)}, []

    # -- rendezvous ----------------------------------------------------------------
    def _gather(self, op: str, header: dict, array):
        name = _field(header, "name", str, op)
        count = _field(header, "count", int, op)
        timeout = header.get("timeout", 60.0)
        if not 1 <= count <= self.max_waiters:
            raise PSError(f"{op} {name!r}: count {count} must lie in [1, {self.max_waiters}] "
                          f"(start servers with more threads for larger gatherings)")
        if not isinstance(timeout, (int, float)) or not 0 < timeout <= 3600:  # also NaN and inf
            raise PSError(f"{op} {name!r}: timeout must be a number of seconds in (0, 3600], got {timeout!r}")
        member = header.get("member")
        if member is not None and (not isinstance(member, int) or isinstance(member, bool)
                                   or not 0 <= member < count):
            raise PSError(f"{op} {name!r}: member must be a rank in [0, {count}), got {member!r}")
        deadline = time.monotonic() + timeout
        with self._gather_cond:
            g = self._gatherings.get(name)
            if g is None:
                g = self._gatherings[name] = _Gathering(count)
            if g.count != count:
                raise PSError(f"{op} {name!r}: this caller says count={count}, earlier ones said "
                              f"{g.count}; every participant must pass the same count")
            again = member is not None and member in g.members  # a restarted rank arriving again
            if again and array is not None:
                raise PSError(f"reduce {name!r}: rank {member} already contributed")
            if array is not None and g.total is not None and \
                    (g.total.shape != array.shape or g.total.dtype != array.dtype):
                raise PSError(f"reduce {name!r}: array {array.dtype}{list(array.shape)} does not "
                              f"match {g.total.dtype}{list(g.total.shape)} from others")
            if member is not None:
                g.members[member] = g.members.get(member, 0) + 1
            if array is not None:
                if g.total is None:
                    g.total = np.zeros_like(array)
                g.total += array
            if not again:
                g.arrived += 1
            if g.arrived == g.count:
                g.done = True
                del self._gatherings[name]
                self._gather_cond.notify_all()
            while not g.done:
                left = deadline - time.monotonic()
                if left <= 0:
                    message = (f"{op} {name!r} on server {self.index}: {g.arrived} of {count} "
                               f"participants arrived within {timeout}s")
                    if member is not None:
                        g.members[member] -= 1
                    if member is None or g.members[member] == 0:
                        g.arrived -= 1  # leave, so a later full set still completes correctly
                        g.members.pop(member, None)
                    if array is not None:
                        g.total -= array
                    if g.arrived == 0 and self._gatherings.get(name) is g:
                        del self._gatherings[name]  # nobody left: a later count or shape may differ
                    raise PSTimeoutError(message)
                self._gather_cond.wait(left)
            return g.total

    def op_barrier(self, header, arrays):
        self._gather("barrier", header, None)
        return {}, []

    def op_gatherings(self, header, arrays):
        """The open barriers/reduces whose names start with `prefix`: name -> count, arrived and
        the ranks that named themselves (a restarted worker finds the step the others are at)."""
        prefix = _field(header, "prefix", str, "gatherings")
        with self._gather_cond:
            open_ = {name: {"count": g.count, "arrived": g.arrived, "members": sorted(g.members)}
                     for name, g in self._gatherings.items() if name.startswith(prefix)}
        return {"open": open_}, []

    def op_reduce(self, header, arrays):
        (array,) = _arrays(arrays, 1, "reduce", "the array to sum")
        total = self._gather("reduce", header, np.array(array))
        return {}, [total.copy()]

    # -- checkpoints and maintenance -------------------------------------------------
    def op_save(self, header, arrays):
        directory = _field(header, "dir", str, "save")
        mode = _field(header, "mode", int, "save")
        if mode == 3:
            for t in self._sparse():
                t.day_tick()
            return {"day_tick": True}, []
        save_id = _field(header, "save_id", str, "save")
        with self._tables_lock:
            tables = dict(self.tables)
        return ckpt.save_shard(directory, self.index, save_id, tables, mode), []

    def op_commit_save(self, header, arrays):
        if self.index != 0:
            raise PSError(f"commit_save goes to server 0, not server {self.index}")
        directory = _field(header, "dir", str, "commit_save")
        files = header.get("files")
        if not isinstance(files, list) or len(files) != self.n_servers:
            raise PSError(f"commit_save: expected {self.n_servers} shard files, got {files!r}")
        with self._tables_lock:
            specs = [t.spec for t in self.tables.values()]
        worker_files = header.get("worker_files", [])
        if not isinstance(worker_files, list):
            raise PSError(f"commit_save: worker_files must be a list of file names, got {worker_files!r}")
        ckpt.write_manifest(directory, _field(header, "save_id", str, "commit_save"),
                            _field(header, "mode", int, "commit_save"), specs, files, worker_files)
        return {}, []

    def op_load(self, header, arrays):
        directory = _field(header, "dir", str, "load")
        manifest = ckpt.read_manifest(directory)
        specs = [spec_from_dict(d) for d in manifest["tables"]]
        for spec in specs:  # validate every spec against what exists before creating any
            have = self.tables.get(spec.name)
            diff = {} if have is None else spec_conflicts(have.spec, spec)
            if diff:
                raise TableError(f"load {directory}: table {spec.name!r} exists on server "
                                 f"{self.index} with a spec that differs from the checkpoint's "
                                 f"(field: (here, checkpoint)) {diff}; resume with the settings the "
                                 f"checkpoint was written with (strategy sparse_table, optimizer), "
                                 f"or load it before creating tables")
        tables = {spec.name: self._create(spec)[0] for spec in specs}
        return {"rows": ckpt.load_into(directory, self.index, self.n_servers, tables)}, []

    def _sparse(self, name=None):
        if name is not None:
            return [self._table({"table": name}, "shrink", "sparse")]
        return [t for t in list(self.tables.values()) if t.spec.kind == "sparse"]

    def op_shrink(self, header, arrays):
        tables = self._sparse(header.get("table"))
        deleted = {t.spec.name: t.shrink() for t in tables}
        if header.get("day_tick", False):
            for t in tables:
                t.day_tick()
        return {"deleted": deleted}, []

    def op_stats(self, header, arrays):
        tables = {}
        for name, t in list(self.tables.items()):
            info = t.stats() if t.spec.kind == "sparse" else {"size": t.end - t.start}
            info["checksum"] = t.checksum()
            info["kind"] = t.spec.kind
            tables[name] = info
        return {"index": self.index, "n_servers": self.n_servers, "tables": tables,
                "uptime": time.time() - self.started}, []

    def op_stop(self, header, arrays):
        self.stop_requested.set()
        return {}, []

    def close(self) -> None:
        """Finish queued work (dense pushes written behind) and release the sparse tables' storage
        tiers, once no request is in flight."""
        for table in list(self.tables.values()):
            table.close()

"""Pass mode (Paddle's PSGPU "pass"): a worker trains a whole pass against its own copy of the rows.

`begin_pass(keys)` pulls, once, the FULL record of every key a dataset chunk
holds (embedding, rule state, show/click statistics: `pull_records`) into a
`PassTable` on the worker, in GPU memory (cupy) when the machine has one,
else in host memory (numpy). Every step's pull and push then run
locally: pulls gather rows from the copy, pushes apply the table's own CTR
rule to it with the fused kernel the servers use (`Backend.ctr_push`), so
no RPC runs per step. The dense parameters train locally with the user's
optimizer, as in GEO. `end_pass()` writes everything back in one go and
meets the other workers.

Several workers: the write-backs of a pass are MERGED AS DELTAS, not owned.
Every worker starts the pass from the same server values (pulled after the
previous pass's barrier) and sends, per key, the change of its copy. The
servers hold a pass's write-backs until every worker's arrived, then move
each row by the shows-weighted mean of the workers' changes of its learned
columns and by the sum of their statistics (SparseTable.merge_pass); the
dense parameters move by the mean of the workers' changes. Why deltas:
ownership would make the hot keys of a Zipf-distributed chunk (which every
worker's pass holds) a lock that serializes the workers; a merge lets them
all train at once and is exact for one worker. The weights make a key seen
by one worker take that worker's move in full, and a key seen by all the
average of their moves, weighted by how much data each saw of it.

Semantics beside per-step training: the entry policy (admission) is applied
when a pass pulls its keys; a key not admitted then reads as zeros and is
not trained for the rest of the pass, and its shows and clicks reach the
server's pending counts at the end of the pass. A key a pass did not list
(a batch from outside the scanned chunk) is fetched when first pulled
(counted in `misses`) and written back with the rest. Every worker must
call `end_pass` (and `flush`, which ends a pass) the same number of times:
the merge waits for all of them, bounded by the timeout. A restarted worker
cannot rejoin a pass.
"""
from __future__ import annotations

import dataclasses
import time

import numpy as np

from shoal.kernels import available_backends, get_backend
from shoal.ps._keymap import KeyMap, unique_inverse
from shoal.ps.communicator.base import DENSE_TABLE, Communicator, CommunicatorError, Mode
from shoal.ps.sparse_table import SparseShard


class PassTable:
    """The worker's copy of one sparse table for a pass: whole records, a key map on the host, the
    records on the backend's device; the records at the pass's start (`base`) beside them.

    The split embed/embedx layout (embedx_threshold) trains with the shard's numpy rules, so its
    tables stay on the host whatever `backend` says. Keys the servers did not admit are kept apart (`absent`, with their shows and clicks): they
    read as zeros and are not trained. Not thread-safe: the training thread drives it.
    """

    def __init__(self, spec, backend):
        # the server's row layout and rule, without the server-side parts (tiers, admission)
        self.shard = SparseShard(dataclasses.replace(spec, memory_budget_mb=None, storage="memory",
                                                     ssd_path=None, entry="none", shards=1), 0)
        if self.shard._native is None:  # the split embed/embedx layout: the shard's numpy rules
            backend = get_backend("numpy")
        self.spec, self.be = spec, backend
        self.width = self.shard.width
        self.runs = self.shard.part_runs()
        self.map = KeyMap()
        self.absent = KeyMap()
        self.absent_stats = np.zeros((0, 2), np.float32)
        xp = backend.xp
        self.values = xp.zeros((0, self.width), xp.float32)
        self.base = xp.zeros((0, self.width), xp.float32)
        self.has_embedx = np.zeros(0, bool)
        self.row_keys = np.zeros(0, np.uint64)

    def __len__(self) -> int:
        return len(self.map) + len(self.absent)

    def _grow(self, bound: int) -> None:
        cap = len(self.row_keys)
        if bound <= cap:
            return
        cap = max(bound, 2 * cap, 1024)
        xp = self.be.xp
        for name in ("values", "base"):
            old = getattr(self, name)
            new = xp.zeros((cap, self.width), xp.float32)
            new[:len(old)] = old
            setattr(self, name, new)
        for name in ("has_embedx", "row_keys"):
            old = getattr(self, name)
            new = np.zeros(cap, old.dtype)
            new[:len(old)] = old
            setattr(self, name, new)
        if self.be.name == "numpy":  # the numpy rule path (split layout) works on the shard's arrays
            sh = self.shard
            sh.values, sh.has_embedx, sh.row_keys, sh.cap = self.values, self.has_embedx, self.row_keys, cap

    def known(self, keys: np.ndarray) -> np.ndarray:
        """Which of `keys` this copy holds (admitted or not)."""
        return (self.map.lookup(keys) >= 0) | (self.absent.lookup(keys) >= 0)

    def load(self, keys: np.ndarray, found: np.ndarray, records: np.ndarray) -> None:
        """Take the servers' records of unique `keys` none of which this copy holds yet."""
        if records.shape[1] != self.width + 1:
            raise CommunicatorError(
                f"pass mode on table {self.spec.name!r}: the servers' records are "
                f"{records.shape[1]} columns wide, this worker's layout needs {self.width + 1}; "
                f"the servers and workers must run the same Shoal with the same table spec")
        if found.any():
            k, rec = (keys, records) if found.all() else (keys[found], records[found])
            start = self.map.row_bound
            rows, _ = self.map.get_or_insert(k)
            # new keys of a map that never frees get the next ids in order: a slice, not a gather
            assert rows[0] == start and rows[-1] == start + len(rows) - 1, "rows are not fresh"
            at = slice(start, start + len(rows))
            self._grow(at.stop)
            dev = self.be.asarray(rec[:, :self.width])
            self.values[at] = dev
            self.base[at] = dev
            self.has_embedx[at] = rec[:, self.width] != 0
            self.row_keys[at] = k
        if not found.all():
            arows, _ = self.absent.get_or_insert(keys[~found])
            if self.absent.row_bound > len(self.absent_stats):
                grown = np.zeros((max(self.absent.row_bound, 2 * len(self.absent_stats)), 2), np.float32)
                grown[:len(self.absent_stats)] = self.absent_stats
                self.absent_stats = grown
            self.absent_stats[arows] = 0.0

    def pull(self, keys: np.ndarray) -> np.ndarray:
        """Embeddings [n, dim] (host) of unique known `keys`; zeros for keys not admitted."""
        rows = self.map.lookup(keys)
        return self.be.to_numpy(self.be.ctr_pull(self.values, self.be.asarray(rows), self.spec.dim))

    def push(self, keys: np.ndarray, grads: np.ndarray, shows: np.ndarray, clicks: np.ndarray) -> None:
        """The table's rule on the copy, for unique known `keys`; keys not admitted only count
        their shows and clicks."""
        rows = self.map.lookup(keys)
        has = rows >= 0
        if not has.all():
            arows = self.absent.lookup(keys[~has])
            if (arows < 0).any():
                raise CommunicatorError(
                    f"pass mode push to {self.spec.name!r}: {int((arows < 0).sum())} keys were "
                    f"never pulled on this worker (a push follows the pull of its forward)")
            self.absent_stats[arows] += np.stack([shows[~has], clicks[~has]], axis=1)  # unique keys
            rows, grads, shows, clicks = rows[has], grads[has], shows[has], clicks[has]
        if not len(rows):
            return
        sh = self.shard
        if sh._native is not None:
            be = self.be
            be.ctr_push(self.values, be.asarray(rows), be.asarray(grads), be.asarray(shows),
                        be.asarray(clicks), *sh._native)
        else:
            sh.apply_rows(rows, grads, shows, clicks)

    def write_back(self) -> tuple[np.ndarray, np.ndarray]:
        """(keys, packed [n, width + 1]): this copy's change over the pass, in the layout of
        SparseTable.merge_pass (learned columns weighted by their part's show delta)."""
        sh, xp = self.shard, self.be.xp
        n = self.map.row_bound  # rows are never freed during a pass: rows [0, n) are the keys
        keys = self.row_keys[:n]
        packed = xp.empty((n, self.width + 1), xp.float32)
        xp.subtract(self.values[:n], self.base[:n], out=packed[:, :self.width])
        shows = packed[:, sh.show].copy()
        weight_x = shows * self.be.asarray(self.has_embedx[:n])
        for part, cols in self.runs:
            packed[:, cols] *= (shows if part == 1 else weight_x)[:, None]
        packed[:, sh.unseen] = 0.0
        packed[:, self.width] = weight_x
        packed = self.be.to_numpy(packed)
        akeys, arows = self.absent.items()
        if len(akeys):
            extra = np.zeros((len(akeys), self.width + 1), np.float32)
            extra[:, sh.show], extra[:, sh.click] = self.absent_stats[arows, 0], self.absent_stats[arows, 1]
            keys, packed = np.concatenate([keys, akeys]), np.concatenate([packed, extra])
        return keys, packed


class PassCommunicator(Communicator):
    """Pass mode. Args (beyond the base): `backend`, the kernels backend of the pass tables
    (default: cupy when a CUDA GPU and the gpu extra are there, else numpy). The dense model
    stays on the host either way (parameter-server mode keeps it in numpy); what crosses to the
    device per step is the batch's rows and gradients, not an RPC."""

    mode = Mode.PASS
    trains_dense_locally = True

    def __init__(self, client, worker_index=0, worker_num=1, timeout=60.0, *, backend=None, **config):
        super().__init__(client, worker_index, worker_num, timeout, **config)
        if backend is None:
            backend = "cupy" if "cupy" in available_backends() else "numpy"
        self.backend = get_backend(backend)
        self.passes = 0        # passes ended (the next write-back's number)
        self.in_pass = False
        self.misses = 0        # keys pulled during a pass that its begin_pass had not listed
        self._tables: dict[str, PassTable] = {}
        self._dense_base: np.ndarray | None = None
        self._broken: str | None = None

    def _sparse_specs(self) -> dict:
        return {n: s for n, s in self.client.specs.items() if s.kind == "sparse"}

    def _table(self, table: str) -> PassTable:
        local = self._tables.get(table)
        if local is None:
            spec = self._sparse_specs().get(table)
            if spec is None:
                raise CommunicatorError(f"pass mode: unknown sparse table {table!r} (known: "
                                        f"{sorted(self._sparse_specs())}); build the model before "
                                        f"fleet.init_worker(model)")
            local = self._tables[table] = PassTable(spec, self.backend)
        return local

    def _fetch(self, local: PassTable, keys: np.ndarray) -> None:
        t0 = time.perf_counter()
        found, records = self.client.pull_records(local.spec.name, keys)
        self.waits.pull_wait += time.perf_counter() - t0
        local.load(keys, found, records)

    # -- passes ---------------------------------------------------------------------
    def begin_pass(self, keys: dict[str, np.ndarray]) -> None:
        """Start a pass over `keys` (table -> uint64 keys of the chunk, duplicates allowed): their
        whole records are pulled once into this worker's pass tables. Blocks."""
        self._raise_pending()
        if self.in_pass:
            raise CommunicatorError(f"worker {self.worker_index}: begin_pass: pass {self.passes} "
                                    f"is still open; call end_pass() first")
        tables = {}
        for table, k in keys.items():
            if not isinstance(k, np.ndarray) or k.dtype != np.uint64 or k.ndim != 1:
                raise CommunicatorError(f"begin_pass: keys of table {table!r} must be a 1-D uint64 "
                                        f"array, got {getattr(k, 'dtype', type(k).__name__)} "
                                        f"{getattr(k, 'shape', '')}")
            tables[table] = self._table(table)
        for table, k in keys.items():
            uniq, _ = unique_inverse(k)
            local = tables[table]
            new = uniq[~local.known(uniq)]
            if len(new):
                self._fetch(local, new)
        self.in_pass = True

    def end_pass(self, dense: np.ndarray | None = None) -> np.ndarray | None:
        """Write this worker's pass back (every sparse table, and `dense`: the worker's flat
        dense values), wait until every worker's is applied, and return the fresh dense values
        (None without `dense`). Every worker must call it; blocks, bounded by the timeout."""
        self._raise_pending()
        if self._broken is not None:
            raise CommunicatorError(f"worker {self.worker_index}: pass mode: {self._broken}")
        if dense is not None and self._dense_base is None:
            raise CommunicatorError("pass mode: set_dense_base(values) must be called with the "
                                    "dense values pulled at init_worker before a pass ends")
        try:
            return self._end_pass(dense)
        except BaseException as e:
            # some servers may have taken this worker's write-back: resending could apply it twice
            self._broken = (f"pass {self.passes} failed while it was written back ({e}); the "
                            f"servers may hold part of it: restart the job from its last checkpoint")
            raise

    def _end_pass(self, dense):
        t0 = time.perf_counter()
        sync = (self.passes, self.worker_num, self.worker_index)
        pending = []
        for table in self._sparse_specs():  # every table, empty if need be: the merge counts workers
            keys, packed = self._table(table).write_back()
            pending.append(self.client.push_pass_async(table, keys, packed, sync))
        self.client._wait_all(pending)
        fresh = None
        if dense is not None:
            self.client.push_dense_delta(DENSE_TABLE, (dense - self._dense_base)
                                         * np.float32(1.0 / self.worker_num))
        if self.worker_num > 1:  # every worker's write-back is held or applied: once all meet, applied
            self._barrier("pass-end", self.passes)
        if dense is not None:
            fresh = self.client.pull_dense(DENSE_TABLE)
            self._dense_base = fresh.copy()
        self._tables = {}
        self.passes += 1
        self.in_pass = False
        self.waits.push_wait += time.perf_counter() - t0
        return fresh

    # -- the sparse seam ---------------------------------------------------------------
    def pull(self, table, keys, *, training):
        self._raise_pending()
        local = self._table(table)
        if not training:  # evaluation: this pass's values where the copy has them, else the servers'
            rows = local.map.lookup(keys)
            out = np.zeros((len(keys), local.spec.dim), np.float32)
            mine = rows >= 0
            if mine.any():
                out[mine] = local.pull(keys[mine])
            if not mine.all():
                out[~mine] = super().pull(table, keys[~mine], training=False)
            return out
        unknown = ~local.known(keys)
        if unknown.any():
            self.misses += int(unknown.sum())
            self._fetch(local, keys[unknown])
        return local.pull(keys)

    def push(self, table, keys, grads, *, shows, clicks):
        self._raise_pending()
        self._table(table).push(keys, np.asarray(grads, np.float32), np.asarray(shows, np.float32),
                                np.asarray(clicks, np.float32))

    # -- dense and the step ------------------------------------------------------------
    def set_dense_base(self, values: np.ndarray) -> None:
        """The dense values the worker starts from (as pulled at init_worker or after a load)."""
        self._dense_base = np.array(values, np.float32)

    def step(self, dense, lr):
        """A step trains only the local copies: nothing is sent."""
        self._raise_pending()
        self.steps += 1
        return None

    def flush(self, dense: np.ndarray | None = None) -> np.ndarray | None:
        """End the open pass (or the rows fetched outside one): see end_pass."""
        return self.end_pass(dense if self._dense_base is not None else None)

    def reset(self) -> None:
        super().reset()
        self._tables = {}
        self.in_pass = False

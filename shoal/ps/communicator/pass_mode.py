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
when a pass pulls its keys, once per pass and worker (so count_filter counts
passes, not batches, and show_click admits at the next pass); a key not
admitted then reads as zeros and is not trained for the rest of the pass,
and its shows and clicks reach the server's pending counts at the end of
the pass. The embedx weight of the split layout is the key's shows over the
whole pass, also those before its embedx was created. A key a pass did not list
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
from shoal.ps._keymap import KeyMap, merge_rows, unique_inverse
from shoal.ps.communicator.base import DENSE_TABLE, Communicator, CommunicatorError, Mode
from shoal.ps.errors import PSTimeoutError, RemoteError
from shoal.ps.pass_records import Part, part_runs
from shoal.ps.sparse_table import SparseShard


class PassTable:
    """The worker's copy of one sparse table for a pass: whole records, a key map on the host, the
    records on the backend's device; the records at the pass's start (`base`) beside them, and
    the pass's own shows and clicks per row.

    The split embed/embedx layout (embedx_threshold) trains with the shard's numpy rules, so its
    tables stay on the host whatever `backend` says. Keys the servers did not admit are kept apart
    (`absent`, with their shows and clicks): they read as zeros and are not trained. Not
    thread-safe: the training thread drives it.
    """

    def __init__(self, spec, backend):
        # the server's row layout and rule, without the server-side parts (tiers, admission)
        self.shard = SparseShard(dataclasses.replace(spec, memory_budget_mb=None, storage="memory",
                                                     ssd_path=None, entry="none", shards=1), 0)
        if self.shard._native is None:  # the split embed/embedx layout: the shard's numpy rules
            backend = get_backend("numpy")
        self.spec, self.be = spec, backend
        self.width = self.shard.width
        self.runs = part_runs(self.shard)
        self.map = KeyMap()
        self.absent = KeyMap()
        self.absent_stats = np.zeros((0, 2), np.float32)
        xp = backend.xp
        self.values = xp.zeros((0, self.width), xp.float32)
        self.base = xp.zeros((0, self.width), xp.float32)
        self.has_embedx = np.zeros(0, bool)
        self.row_keys = np.zeros(0, np.uint64)
        self.stats = np.zeros((0, 2), np.float32)  # this pass's shows and clicks per row

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
        for name in ("has_embedx", "row_keys", "stats"):
            old = getattr(self, name)
            new = np.zeros((cap,) + old.shape[1:], old.dtype)
            new[:len(old)] = old
            setattr(self, name, new)
        if self.be.name == "numpy":  # the numpy rule path (split layout) works on these arrays
            self.shard.use_arena(self.values, self.has_embedx, self.row_keys)

    def known(self, keys: np.ndarray) -> np.ndarray:
        """Which of `keys` this copy holds (admitted or not)."""
        return ~self.lookup(keys)[1]

    def lookup(self, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(rows, unknown) of `keys`: rows -1 where not admitted or not held, `unknown` where not
        held at all (one map probe per key; the absent map only for the misses)."""
        rows = self.map.lookup(keys)
        unknown = rows < 0
        if unknown.any():
            miss = np.flatnonzero(unknown)
            unknown[miss] = self.absent.lookup(keys[miss]) < 0
        return rows, unknown

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
            rows, is_new = self.map.get_or_insert(k)
            # new keys of a map that never frees get the next ids in order: a slice, not a gather
            if not is_new.all() or not np.array_equal(rows, np.arange(start, start + len(k))):
                raise CommunicatorError(f"pass mode on table {self.spec.name!r}: load() takes "
                                        f"unique keys this copy does not hold yet")
            at = slice(start, start + len(rows))
            self._grow(at.stop)
            dev = self.be.asarray(rec[:, :self.width])
            self.values[at] = dev
            self.base[at] = dev
            self.has_embedx[at] = rec[:, self.width] != 0
            self.row_keys[at] = k
            self.stats[at] = 0.0
        if not found.all():
            arows, _ = self.absent.get_or_insert(keys[~found])
            if self.absent.row_bound > len(self.absent_stats):
                grown = np.zeros((max(self.absent.row_bound, 2 * len(self.absent_stats)), 2), np.float32)
                grown[:len(self.absent_stats)] = self.absent_stats
                self.absent_stats = grown
            self.absent_stats[arows] = 0.0

    def pull(self, keys: np.ndarray, rows: np.ndarray | None = None) -> np.ndarray:
        """Embeddings [n, dim] (host) of unique known `keys` (at `rows`, from `lookup`, when
        given); zeros for keys not admitted."""
        rows = self.map.lookup(keys) if rows is None else rows
        return self.be.to_numpy(self.be.ctr_pull(self.values, self.be.asarray(rows), self.spec.dim))

    def check(self, keys, grads, shows, clicks, unknown: np.ndarray | None = None) -> None:
        """Raise unless (keys, grads [n, dim], shows [n], clicks [n]) is a valid push of known keys
        (`unknown`: from `lookup`, when the caller has it)."""
        n, name = len(keys), self.spec.name
        if grads.shape != (n, self.spec.dim) or shows.shape != (n,) or clicks.shape != (n,):
            raise CommunicatorError(f"pass mode push to {name!r}: grads {grads.shape}, shows "
                                    f"{shows.shape}, clicks {clicks.shape} do not fit {n} keys of "
                                    f"dim {self.spec.dim}")
        if not (np.isfinite(grads).all() and np.isfinite(shows).all() and np.isfinite(clicks).all()):
            raise CommunicatorError(f"pass mode push to {name!r}: grads, shows or clicks hold NaN "
                                    f"or inf; nothing was applied")
        if (shows < 0).any() or (clicks < 0).any():
            raise CommunicatorError(f"pass mode push to {name!r}: shows and clicks must be >= 0")
        unknown = self.lookup(keys)[1] if unknown is None else unknown
        if unknown.any():
            raise CommunicatorError(f"pass mode push to {name!r}: {int(unknown.sum())} keys were "
                                    f"never pulled on this worker (a push follows the pull of its "
                                    f"forward)")

    def push(self, keys: np.ndarray, grads: np.ndarray, shows: np.ndarray, clicks: np.ndarray,
             rows: np.ndarray | None = None) -> None:
        """The table's rule on the copy, for unique known `keys` (at `rows`, from `lookup`, when
        given; see `check`); keys not admitted only count their shows and clicks."""
        rows = self.map.lookup(keys) if rows is None else rows
        has = rows >= 0
        if not has.all():
            arows = self.absent.lookup(keys[~has])
            self.absent_stats[arows] += np.stack([shows[~has], clicks[~has]], axis=1)  # unique keys
            rows, grads, shows, clicks = rows[has], grads[has], shows[has], clicks[has]
        if not len(rows):
            return
        self.stats[rows] += np.stack([shows, clicks], axis=1)
        sh = self.shard
        if sh._native is not None:
            be = self.be
            be.ctr_push(self.values, be.asarray(rows), be.asarray(grads), be.asarray(shows),
                        be.asarray(clicks), *sh._native)
        else:
            sh.apply_rows(rows, grads, shows, clicks)

    def write_back(self) -> tuple[np.ndarray, np.ndarray]:
        """(keys, packed [n, width + 2]): this copy's change over the pass, in the layout of
        shoal.ps.pass_records (learned columns weighted by the part's shows in this pass)."""
        xp = self.be.xp
        n = self.map.row_bound  # rows are never freed during a pass: rows [0, n) are the keys
        keys = self.row_keys[:n]
        packed = xp.empty((n, self.width + 2), xp.float32)
        xp.subtract(self.values[:n], self.base[:n], out=packed[:, :self.width])
        shows, clicks = self.stats[:n, 0], self.stats[:n, 1]
        weights = {Part.EMBED: shows, Part.EMBEDX: shows * self.has_embedx[:n]}
        dev = {part: self.be.asarray(w)[:, None] for part, w in weights.items()}
        for part, cols in self.runs:
            packed[:, cols] *= dev[part]
        out = self.be.to_numpy(packed)
        self._counts(out, shows, clicks)
        out[:, self.width], out[:, self.width + 1] = weights[Part.EMBED], weights[Part.EMBEDX]
        akeys, arows = self.absent.items()
        if len(akeys):
            extra = np.zeros((len(akeys), self.width + 2), np.float32)
            self._counts(extra, self.absent_stats[arows, 0], self.absent_stats[arows, 1])
            keys, out = np.concatenate([keys, akeys]), np.concatenate([out, extra])
        return keys, out

    def _counts(self, packed: np.ndarray, shows: np.ndarray, clicks: np.ndarray) -> None:
        sh = self.shard
        packed[:, sh.show], packed[:, sh.click] = shows, clicks
        packed[:, sh.delta] = self.spec.score(shows, clicks)
        packed[:, sh.unseen] = 0.0


class PassCommunicator(Communicator):
    """Pass mode. Args (beyond the base): `backend`, the kernels backend of the pass tables
    (default: cupy when a CUDA GPU and the gpu extra are there, else numpy). The dense model
    stays on the host either way (parameter-server mode keeps it in numpy); what crosses to the
    device per step is the batch's rows and gradients, not an RPC. `pass_timeout`: seconds the
    end of a pass waits for the other workers (servers are checked every `timeout` meanwhile)."""

    mode = Mode.PASS
    trains_dense_locally = True

    def __init__(self, client, worker_index=0, worker_num=1, timeout=60.0, *, backend=None,
                 pass_timeout: float = 3600.0, **config):
        super().__init__(client, worker_index, worker_num, timeout, **config)
        if backend is None:
            backend = "cupy" if "cupy" in available_backends() else "numpy"
        self.backend = get_backend(backend)
        self.pass_timeout = max(float(pass_timeout), timeout)
        self.passes = 0        # passes ended (the next write-back's number)
        self.in_pass = False
        self.misses = 0        # keys pulled during a pass that its begin_pass had not listed
        self._tables: dict[str, PassTable] = {}
        self._buffer: dict[str, list] = {}  # this step's pushes per table, applied merged at step()
        self._pulled: dict[str, tuple] = {}  # table -> (keys, rows) of its last training pull
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

    def _check_usable(self, what: str) -> None:
        self._raise_pending()
        if self._broken is not None:
            raise CommunicatorError(f"worker {self.worker_index}: pass mode {what}: {self._broken}")

    # -- passes ---------------------------------------------------------------------
    def begin_pass(self, keys: dict[str, np.ndarray]) -> None:
        """Start a pass over `keys` (table -> uint64 keys of the chunk, duplicates allowed): their
        whole records are pulled once into this worker's pass tables. Blocks."""
        self._check_usable("begin_pass")
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
        (None without `dense`). A collective: every worker must call it (and flush, save, load
        and shrink, which end a pass) the same number of times. Blocks, up to `pass_timeout`."""
        self._check_usable("end_pass")
        if self._buffer:
            raise CommunicatorError(
                f"worker {self.worker_index}: pass mode holds gradients of step {self.steps} that "
                f"optimizer.step() never applied; call it after backward() before ending a pass")
        if dense is not None and self._dense_base is None:
            raise CommunicatorError("pass mode: set_dense_base(values) must be called with the "
                                    "dense values pulled at init_worker before a pass ends")
        written = [(table, *self._table(table).write_back()) for table in self._sparse_specs()]
        for table, _, packed in written:  # nothing is sent unless every table's rows are sound
            if not np.isfinite(packed).all():
                raise CommunicatorError(
                    f"worker {self.worker_index}: pass {self.passes} of table {table!r} holds NaN "
                    f"or inf after training (a learning rate too large?); nothing was written back")
        try:
            return self._end_pass(written, dense)
        except BaseException as e:
            # some servers may have taken this worker's write-back: resending could apply it twice
            self._broken = (f"pass {self.passes} failed while it was written back ({e}); the "
                            f"servers may hold part of it: restart the job from its last checkpoint")
            raise

    def _end_pass(self, written, dense):
        t0 = time.perf_counter()
        sync = (self.passes, self.worker_num, self.worker_index)
        # every table, empty if need be (the merge counts workers); the last worker's call runs the
        # merge before it is answered, so it may take up to the pass timeout
        pending = [self.client.push_pass_async(table, keys, packed, sync, timeout=self.pass_timeout)
                   for table, keys, packed in written]
        self.client._wait_all(pending)
        fresh = None
        if dense is not None:
            self.client.push_dense_delta(DENSE_TABLE, (dense - self._dense_base)
                                         * np.float32(1.0 / self.worker_num))
        if self.worker_num > 1:  # every worker's write-back is held or applied: once all meet, applied
            self._pass_barrier()
        if dense is not None:
            fresh = self.client.pull_dense(DENSE_TABLE)
            self._dense_base = fresh.copy()
        self._tables, self._pulled = {}, {}
        self.passes += 1
        self.in_pass = False
        self.waits.push_wait += time.perf_counter() - t0
        return fresh

    def _pass_barrier(self) -> None:
        """Meet the other workers at the end of this pass: in rounds of the RPC timeout, up to
        `pass_timeout` (a pass can be an epoch, and workers' passes differ in length), failing
        at once when a server stops answering."""
        name, deadline = f"pass-end-{self.passes}", time.monotonic() + self.pass_timeout
        while True:
            left = deadline - time.monotonic()
            try:
                self.client.barrier(name, self.worker_num, min(self.timeout, max(left, 0.001)),
                                    member=self.worker_index)
                return
            except (PSTimeoutError, RemoteError) as e:
                if isinstance(e, RemoteError) and e.kind != "PSTimeoutError":
                    raise
                down = self.client.unresponsive(timeout=min(2.0, self.timeout))
                if down:
                    raise CommunicatorError(
                        f"worker {self.worker_index}: end of pass {self.passes}: server(s) "
                        f"{', '.join(down)} do not answer (down or hung)") from e
                if time.monotonic() >= deadline:
                    raise CommunicatorError(
                        f"worker {self.worker_index}: end of pass {self.passes}: not every worker "
                        f"ended it within a_sync_configs.pass_timeout={self.pass_timeout}s; every "
                        f"worker must call end_pass (and flush, save, load, shrink, which end a "
                        f"pass) the same number of times ({e})") from e

    # -- the sparse seam ---------------------------------------------------------------
    def pull(self, table, keys, *, training):
        self._check_usable("pull")
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
        rows, unknown = local.lookup(keys)
        if unknown.any():
            self.misses += int(unknown.sum())
            self._fetch(local, keys[unknown])
            rows, unknown = local.lookup(keys)
        self._pulled[table] = (keys, rows)  # the layer pushes these very keys in its backward
        return local.pull(keys, rows)

    def push(self, table, keys, grads, *, shows, clicks):
        """Hold a step's gradients (validated now); step() applies each table's, merged by key,
        once, as the servers do in sync mode."""
        self._check_usable("push")
        grads, shows, clicks = (np.asarray(a, np.float32) for a in (grads, shows, clicks))
        local = self._table(table)
        pulled = self._pulled.get(table)
        if pulled is not None and pulled[0] is keys:  # rows of known keys never move in a pass
            rows, unknown = pulled[1], np.zeros(len(keys), bool)
        else:
            rows, unknown = local.lookup(keys)
        local.check(keys, grads, shows, clicks, unknown)
        self._buffer.setdefault(table, []).append((keys, grads, shows, clicks, rows))

    # -- dense and the step ------------------------------------------------------------
    def set_dense_base(self, values: np.ndarray) -> None:
        """The dense values the worker starts from (as pulled at init_worker or after a load)."""
        self._dense_base = np.array(values, np.float32)

    def step(self, dense, lr):
        """Apply this step's sparse gradients to the local copies (each key once, its pushes
        merged); nothing is sent."""
        self._check_usable("step")
        buffered, self._buffer = self._buffer, {}
        for table, parts in buffered.items():
            local = self._tables[table]
            if len(parts) == 1:
                local.push(*parts[0])
                continue
            keys = np.concatenate([p[0] for p in parts])
            packed = np.concatenate([np.concatenate([g, s[:, None], c[:, None]], axis=1)
                                     for _, g, s, c, _ in parts])
            uniq, merged = merge_rows(keys, packed)
            dim = local.spec.dim
            local.push(uniq, merged[:, :dim], merged[:, dim], merged[:, dim + 1])
        self.steps += 1
        return None

    def flush(self, dense: np.ndarray | None = None) -> np.ndarray | None:
        """End the open pass (or the rows fetched outside one): see end_pass."""
        return self.end_pass(dense if self._dense_base is not None else None)

    def reset(self) -> None:
        super().reset()
        self._tables, self._pulled = {}, {}
        self._buffer = {}
        self.in_pass = False

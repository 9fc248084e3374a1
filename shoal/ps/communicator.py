"""The worker's communicator: how sparse and dense gradients reach the servers, by mode.

One object per worker implements the worker/ sparse seam (`pull`, `push`)
and the dense step (`step`), in one of Paddle's modes (DESIGN.md
"Communicator modes"):

- sync: every push is tagged (step, n_workers); each server holds a step's
  pushes until all workers' arrived and applies their sum once; the step ends
  with a barrier, then the fresh dense values are pulled. With one worker
  this is local training exactly; with n it is local training on the n×
  batch (gradients are pre-scaled by 1/n, as the mean over the larger batch).
- async: pushes go into a bounded send queue; a sender thread merges up to
  `max_merge_var_num` queued gradients per table (sparse by key, dense summed)
  and sends them; a receiver thread pulls the dense values after each dense
  send; the next batch's rows can be prefetched while this one computes.
- half_async: async's queue and sender, but each step waits for its sends
  and a barrier, so workers stay in step (Paddle's HalfAsyncCommunicator).
- geo: the worker trains a local copy for `k_steps` (sparse rows with plain
  SGD at the table's rate, dense parameters with the user's optimizer), then
  pushes (local - base) / n_workers as deltas and pulls fresh values.

`flush()` (called by stop_worker) sends and applies everything queued, so no
gradient is lost. Errors of background threads are re-raised on the
training thread at the next call. Not thread-safe: one training thread
drives a communicator (its own threads are internal).
"""
from __future__ import annotations

import enum
import queue
import threading
import time
import numpy as np

from shoal.kernels import mapped_zeros, release_free_memory
from shoal.ps._keymap import KeyMap, merge_rows
from shoal.ps.client import PSClient
from shoal.ps.errors import PSError, PSTimeoutError, RemoteError


class Mode(enum.Enum):
    SYNC = "sync"
    ASYNC = "async"
    HALF_ASYNC = "half_async"
    GEO = "geo"


class CommunicatorError(PSError):
    """A communicator was misused, or one of its background threads failed."""


DENSE_TABLE = "dense"  # the table that holds the model's dense parameters, flattened
_PREFETCH_DEPTH = 2    # prefetched pulls kept per table (this batch's and the next one's)


class Waits:
    """Seconds spent waiting on the servers, per kind (for the per-step breakdown)."""

    def __init__(self):
        self.pull_wait = 0.0
        self.push_wait = 0.0

    def as_dict(self) -> dict[str, float]:
        return {"pull_wait": self.pull_wait, "push_wait": self.push_wait}


class Communicator:
    """The base: sparse pulls (with prefetch) and the bookkeeping every mode shares.

    Args:
        client: a PSClient that knows every table (create_table or register_table).
        worker_index, worker_num: this worker's rank and the number of workers.
        timeout: seconds any wait on the servers or a queue may take.
    """

    mode: Mode
    prefetches = False            # whether a loader should prefetch the next batch's rows
    trains_dense_locally = False  # GEO: the user's optimizer updates the dense copy on the worker

    def __init__(self, client: PSClient, worker_index: int = 0, worker_num: int = 1,
                 timeout: float = 60.0, **_config):
        self.client, self.worker_index, self.worker_num = client, worker_index, worker_num
        self.timeout = timeout
        self.steps = 0
        self.waits = Waits()
        self.prefetch_hits = 0  # training pulls answered by a prefetch (the rest went to the servers)
        self._prefetched: dict[str, list] = {}  # table -> [(unique keys, pull handle)]
        self._error: BaseException | None = None
        self._stopped = False

    # -- the sparse seam (worker/nn/sparse.py's SparseBackend) ----------------------
    def prefetch(self, table: str, keys: np.ndarray) -> None:
        """Start pulling `keys` (unique) for the next forward of `table`; returns at once."""
        self._raise_pending()
        # a loader runs one batch ahead: the rows of the batch about to train and of the next one
        # may wait here; an older one nobody used is dropped (its reply is collected by the RPC
        # client; the rows it created belong to a batch that was read)
        waiting = self._prefetched.setdefault(table, [])
        waiting.append((keys, self.client.pull_sparse_async(table, keys, training=True, unique=True)))
        del waiting[:-_PREFETCH_DEPTH]

    def pull(self, table: str, keys: np.ndarray, *, training: bool) -> np.ndarray:
        self._raise_pending()
        t0 = time.perf_counter()
        rows = None
        waiting = self._prefetched.get(table)
        if waiting and training:
            for i, (k, handle) in enumerate(waiting):
                if k.shape == keys.shape and np.array_equal(k, keys):
                    del waiting[i]
                    rows = handle.wait()
                    self.prefetch_hits += 1
                    break
        if rows is None:  # the sparse layers pass unique keys
            rows = self.client.pull_sparse(table, keys, training=training, unique=True)
        self.waits.pull_wait += time.perf_counter() - t0
        return rows

    def push(self, table: str, keys: np.ndarray, grads: np.ndarray, *, shows: np.ndarray,
             clicks: np.ndarray) -> None:
        raise NotImplementedError

    # -- dense -----------------------------------------------------------------
    def pull_dense(self) -> np.ndarray | None:
        if DENSE_TABLE not in self.client.specs:
            return None
        t0 = time.perf_counter()
        values = self.client.pull_dense(DENSE_TABLE)
        self.waits.pull_wait += time.perf_counter() - t0
        return values

    def _drop_prefetches(self) -> None:
        """Wait for prefetches nobody used (a loader stopped early), so nothing stays in flight."""
        waiting, self._prefetched = self._prefetched, {}
        for entries in waiting.values():
            for _, handle in entries:
                handle.wait()

    def reset(self) -> None:
        """Forget what this worker holds of the tables (prefetched rows, local copies, pulled
        dense values): after load_model, everything is read from the servers again."""
        self._drop_prefetches()

    def _barrier(self, what: str) -> None:
        """Every worker meets here (server 0); a timeout names the mode's contract."""
        try:
            self.client.barrier(f"{what}-{self.steps}", self.worker_num, self.timeout)
        except (PSTimeoutError, RemoteError) as e:
            if isinstance(e, RemoteError) and e.kind != "PSTimeoutError":
                raise
            down = self.client.unresponsive(timeout=min(2.0, self.timeout))
            cause = (f"server(s) {', '.join(down)} do not answer (down or hung), so other workers "
                     f"are stuck on them" if down else
                     f"every server answers: a worker is missing or slow. In {self.mode.value} mode "
                     f"every worker must run the same number of steps (give each the same number "
                     f"of batches, e.g. equal file shards and drop_last=True)")
            raise CommunicatorError(
                f"worker {self.worker_index}: {self.mode.value} step {self.steps}: not every worker "
                f"reached this step within {self.timeout}s: {cause} ({e})") from e

    def step(self, dense: np.ndarray | None, lr: float) -> np.ndarray | None:
        """End a training step. `dense` is the flat dense gradient (the flat local values in
        GEO); returns fresh dense values for the worker to load, or None to keep its own."""
        raise NotImplementedError

    def flush(self) -> np.ndarray | None:
        """Send and apply everything this worker has queued; returns the servers' dense values
        when the worker's copy may be behind them (else None). Blocks (bounded by the timeout)."""

    def stop(self) -> None:
        """flush(), then stop the background threads. Idempotent."""
        if not self._stopped:
            try:
                self._drop_prefetches()
                self.flush()
            finally:
                self._stopped = True
                self._close_threads()

    def _close_threads(self) -> None:
        pass

    # -- failures of background threads -------------------------------------------
    def _fail(self, e: BaseException) -> None:
        if self._error is None:
            self._error = e

    def _raise_pending(self) -> None:
        if self._error is not None:
            e, self._error = self._error, None
            raise CommunicatorError(f"worker {self.worker_index}: the {self.mode.value} "
                                    f"communicator's background send failed: {e}") from e
        if self._stopped:
            raise CommunicatorError(f"worker {self.worker_index}: the communicator is stopped "
                                    f"(stop_worker was called)")


class SyncCommunicator(Communicator):
    """Sync: a step's sparse gradients are buffered per table and sent once at `step()`, tagged
    [step, n_workers], with an empty push for a table this worker did not touch, so every
    server hears from every worker exactly once per table and step."""

    mode = Mode.SYNC

    def __init__(self, client, worker_index=0, worker_num=1, timeout=60.0, **config):
        super().__init__(client, worker_index, worker_num, timeout, **config)
        self._buffer: dict[str, list] = {}
        self._pending: list = []
        self._scale = np.float32(1.0 / worker_num)

    def _sync(self):
        return None if self.worker_num == 1 else (self.steps, self.worker_num)

    def push(self, table, keys, grads, *, shows, clicks):
        self._raise_pending()
        self._buffer.setdefault(table, []).append((keys, grads, shows, clicks))

    def _send_sparse(self) -> None:
        buffered, self._buffer = self._buffer, {}
        tables = [name for name, spec in self.client.specs.items() if spec.kind == "sparse"]
        unknown = sorted(set(buffered) - set(tables))
        if unknown:
            raise CommunicatorError(f"worker {self.worker_index}: gradients for sparse table(s) "
                                    f"{unknown} that were never created (known: {tables}); build "
                                    f"the model before fleet.init_worker(model)")
        for table in tables:
            parts = buffered.get(table, [])
            if not parts and self.worker_num == 1:
                continue
            dim = self.client.specs[table].dim
            if len(parts) == 1:
                keys, grads, shows, clicks = parts[0]
            elif parts:
                keys, grads, shows, clicks = (np.concatenate(c) for c in zip(*parts))
            else:
                keys, grads = np.zeros(0, np.uint64), np.zeros((0, dim), np.float32)
                shows = clicks = np.zeros(0, np.float32)
            if self.worker_num > 1:
                grads = grads * self._scale
            self._pending.append(self.client.push_sparse_async(table, keys, grads, shows, clicks,
                                                               sync=self._sync()))

    def step(self, dense, lr):
        self._raise_pending()
        t0 = time.perf_counter()
        self._send_sparse()
        if dense is not None:
            g = dense if self.worker_num == 1 else dense * self._scale
            self._pending.append(self.client.push_dense_async(DENSE_TABLE, g, lr, sync=self._sync()))
        pending, self._pending = self._pending, []
        self.client._wait_all(pending)  # each call's own deadline: a hung server fails within it
        if self.worker_num > 1:
            # every worker's pushes of this step are held or applied; once all are here, all applied
            self._barrier("sync-step")
        self.waits.push_wait += time.perf_counter() - t0
        self.steps += 1
        return self.pull_dense() if dense is not None else None

    def flush(self):
        if self._buffer:  # gradients of a step that was never completed
            raise CommunicatorError(
                f"worker {self.worker_index}: sync mode holds gradients of step {self.steps} that "
                f"optimizer.step() never sent; call it after backward() before stopping")
        pending, self._pending = self._pending, []
        self.client._wait_all(pending)
        return None


class _Sender:
    """The async modes' send queue and sender thread (plus the dense receiver).

    Items are ("sparse", table, keys, packed) or ("dense", grad, lr). The
    sender takes what is queued, merges up to `max_merge` items per table,
    sends them and waits for the acknowledgements; `drain()` returns once
    everything queued before it has been acknowledged.
    """

    def __init__(self, comm: "AsyncCommunicator", queue_size: int, max_merge: int, on_dense_sent):
        self.comm, self.max_merge, self.on_dense_sent = comm, max_merge, on_dense_sent
        self.queue: queue.Queue = queue.Queue(queue_size)
        self.cond = threading.Condition()
        self.queued = self.sent = 0
        self.closing = False
        self.thread = threading.Thread(target=self._loop, name="shoal-comm-send", daemon=True)
        self.thread.start()

    def put(self, item, timeout: float) -> None:
        with self.cond:
            self.queued += 1
        try:
            self.queue.put(item, timeout=timeout)
        except queue.Full:
            with self.cond:
                self.queued -= 1
            raise CommunicatorError(f"the send queue stayed full for {timeout}s: the servers do "
                                    f"not take gradients (is one down?)") from None

    def _take(self) -> list:
        try:
            first = self.queue.get(timeout=0.2)
        except queue.Empty:
            return []
        items = [first]
        while len(items) < 4 * self.max_merge:
            try:
                items.append(self.queue.get_nowait())
            except queue.Empty:
                break
        return items

    def _send(self, items: list) -> None:
        client, handles, dense_sent = self.comm.client, [], False
        by_table: dict[str, list] = {}
        dense: list = []
        for item in items:
            if item[0] == "sparse":
                by_table.setdefault(item[1], []).append(item)
            else:
                dense.append(item)
        for table, group in by_table.items():
            for i in range(0, len(group), self.max_merge):
                chunk = group[i:i + self.max_merge]
                keys = np.concatenate([c[2] for c in chunk])
                packed = np.concatenate([c[3] for c in chunk])
                uniq, merged = merge_rows(keys, packed) if len(chunk) > 1 else (keys, packed)
                dim = merged.shape[1] - 2
                handles.append(client.push_sparse_async(table, uniq, merged[:, :dim],
                                                        merged[:, dim], merged[:, dim + 1]))
        for i in range(0, len(dense), self.max_merge):
            chunk = dense[i:i + self.max_merge]
            grad = chunk[0][1] if len(chunk) == 1 else np.sum([c[1] for c in chunk], axis=0,
                                                             dtype=np.float32)
            handles.append(client.push_dense_async(DENSE_TABLE, grad, chunk[-1][2]))
            dense_sent = True
        client._wait_all(handles)
        if dense_sent:
            self.on_dense_sent()

    def _loop(self) -> None:
        while True:
            items = self._take()
            if not items:
                if self.closing:
                    return
                continue
            try:
                self._send(items)
            except BaseException as e:  # surfaces on the training thread at its next call
                self.comm._fail(e)
            with self.cond:
                self.sent += len(items)
                self.cond.notify_all()

    def drain(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        with self.cond:
            target = self.queued
            while self.sent < target:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise CommunicatorError(f"{target - self.sent} queued gradient sends did not "
                                            f"finish within {timeout}s")
                self.cond.wait(left)

    def close(self) -> None:
        self.closing = True
        self.thread.join(timeout=30)


class AsyncCommunicator(Communicator):
    """Args (beyond the base): send_queue_size, max_merge_var_num (Paddle's a_sync_configs)."""

    mode = Mode.ASYNC
    prefetches = True

    receives = True  # a receiver thread refreshes the dense values after each dense send

    def __init__(self, client, worker_index=0, worker_num=1, timeout=60.0, *,
                 send_queue_size: int = 16, max_merge_var_num: int = 1, **config):
        super().__init__(client, worker_index, worker_num, timeout, **config)
        self._latest: np.ndarray | None = None
        self._recv_wanted = threading.Event()
        self._recv_lock = threading.Lock()
        self._recv_generation = 0  # bumped by reset(): a pull that started before is dropped
        self._recv_closing = False
        self._sender = _Sender(self, send_queue_size, max(1, max_merge_var_num),
                               self._recv_wanted.set if self.receives else (lambda: None))
        self._receiver = None
        if self.receives:
            self._receiver = threading.Thread(target=self._recv_loop, name="shoal-comm-recv",
                                              daemon=True)
            self._receiver.start()

    def _recv_loop(self) -> None:
        while not self._recv_closing:
            if not self._recv_wanted.wait(0.2):
                continue
            self._recv_wanted.clear()
            with self._recv_lock:
                generation = self._recv_generation
            try:
                values = self.client.pull_dense(DENSE_TABLE)
            except BaseException as e:
                self._fail(e)
                continue
            with self._recv_lock:
                if generation == self._recv_generation:
                    self._latest = values

    def push(self, table, keys, grads, *, shows, clicks):
        self._raise_pending()
        packed = np.concatenate([grads, shows[:, None], clicks[:, None]], axis=1).astype(np.float32, copy=False)
        t0 = time.perf_counter()
        self._sender.put(("sparse", table, keys, packed), self.timeout)
        self.waits.push_wait += time.perf_counter() - t0

    def step(self, dense, lr):
        self._raise_pending()
        t0 = time.perf_counter()
        if dense is not None:
            self._sender.put(("dense", dense, lr), self.timeout)
        self.waits.push_wait += time.perf_counter() - t0
        self.steps += 1
        with self._recv_lock:
            latest, self._latest = self._latest, None
        return latest

    def flush(self):
        self._sender.drain(self.timeout)
        self._raise_pending()
        with self._recv_lock:
            self._latest = None
            self._recv_generation += 1
        return self.pull_dense()  # the worker's copy lags the servers by the last sends

    def reset(self) -> None:
        super().reset()
        with self._recv_lock:
            self._latest = None
            self._recv_generation += 1

    def _close_threads(self):
        self._sender.close()
        self._recv_closing = True
        if self._receiver is not None:
            self._receiver.join(timeout=30)


class HalfAsyncCommunicator(AsyncCommunicator):
    mode = Mode.HALF_ASYNC
    prefetches = False  # workers stay in step: a prefetch would read rows a step old
    receives = False    # every step ends with a pull of its own

    def step(self, dense, lr):
        super().step(dense, lr)
        t0 = time.perf_counter()
        self._sender.drain(self.timeout)
        self._raise_pending()
        if self.worker_num > 1:
            self._barrier("half-async-step")
        self.waits.push_wait += time.perf_counter() - t0
        return self.pull_dense() if dense is not None else None


class _LocalRows:
    """GEO's worker-side copy of one sparse table: the rows it trains and their values at the
    last sync (base)."""

    def __init__(self, dim: int):
        self.map = KeyMap()
        self.dim = dim
        self.values = mapped_zeros((1024, dim), np.float32)
        self.base = mapped_zeros((1024, dim), np.float32)
        self.touched = mapped_zeros((1024,), bool)
        self.row_keys = mapped_zeros((1024,), np.uint64)
        self.stats = mapped_zeros((1024, 2), np.float32)  # shows, clicks since the last sync

    def ensure(self, n: int) -> None:
        if n > len(self.values):
            cap = max(n, 2 * len(self.values))
            for name in ("values", "base", "touched", "row_keys", "stats"):
                old = getattr(self, name)
                new = mapped_zeros((cap,) + old.shape[1:], old.dtype)
                new[:len(old)] = old
                setattr(self, name, new)


class GeoCommunicator(Communicator):
    """Args (beyond the base): k_steps, and `sparse_lr` (table -> the local SGD rate)."""

    mode = Mode.GEO
    trains_dense_locally = True

    def __init__(self, client, worker_index=0, worker_num=1, timeout=60.0, *, k_steps: int = 100,
                 sparse_lr: dict[str, float] | None = None, **config):
        super().__init__(client, worker_index, worker_num, timeout, **config)
        if k_steps < 1:
            raise CommunicatorError(f"GEO needs a_sync_configs.k_steps >= 1, got {k_steps}")
        self.k_steps = k_steps
        self.sparse_lr = dict(sparse_lr or {})
        self._local: dict[str, _LocalRows] = {}
        self._dense_base: np.ndarray | None = None
        self._broken: str | None = None  # a sync that failed half-way must not be resent

    def _rows(self, table: str) -> _LocalRows:
        local = self._local.get(table)
        if local is None:
            local = self._local[table] = _LocalRows(self.client.specs[table].dim)
        return local

    def pull(self, table, keys, *, training):
        self._raise_pending()
        if not training:  # evaluation reads the servers' values, read-only
            return super().pull(table, keys, training=False)
        local = self._rows(table)
        rows = local.map.lookup(keys)
        missing = rows < 0
        if missing.any():
            new_keys = keys[missing]
            t0 = time.perf_counter()
            fresh = self.client.pull_sparse(table, new_keys, training=True)
            self.waits.pull_wait += time.perf_counter() - t0
            new_rows, _ = local.map.get_or_insert(new_keys)
            local.ensure(local.map.row_bound)
            local.row_keys[new_rows] = new_keys
            local.values[new_rows] = fresh
            local.base[new_rows] = fresh
            rows[missing] = new_rows
        return local.values[rows]

    def push(self, table, keys, grads, *, shows, clicks):
        self._raise_pending()
        local = self._rows(table)
        dim = local.dim
        packed = np.concatenate([np.asarray(grads, np.float32), shows[:, None], clicks[:, None]],
                                axis=1).astype(np.float32, copy=False)
        uniq, merged = merge_rows(keys, packed)
        rows = local.map.lookup(uniq)
        if (rows < 0).any():
            raise CommunicatorError(f"GEO push to {table!r}: {int((rows < 0).sum())} keys were "
                                    f"never pulled on this worker")
        lr = np.float32(self.sparse_lr.get(table, self.client.specs[table].learning_rate))
        local.values[rows] -= lr * merged[:, :dim]
        local.touched[rows] = True
        local.stats[rows] += merged[:, dim:]  # rows are unique (merged by key): one add per row

    def step(self, dense, lr):
        self._raise_pending()
        self.steps += 1
        if dense is not None and self._dense_base is None:
            raise CommunicatorError("GEO: set_dense_base(values) must be called with the dense "
                                    "values pulled at init_worker before the first step")
        if self.steps % self.k_steps:
            return None
        return self._sync(dense)

    def _sync(self, dense: np.ndarray | None) -> np.ndarray | None:
        if self._broken is not None:
            raise CommunicatorError(f"worker {self.worker_index}: GEO: {self._broken}")
        try:
            return self._sync_once(dense)
        except BaseException as e:
            # some deltas may have been applied already; resending them would apply them twice
            self._broken = (f"a sync failed after {self.steps} steps ({e}); this worker's changes "
                            f"since the previous sync were not all pushed")
            raise

    def reset(self) -> None:
        super().reset()
        self._local = {}

    def _sync_once(self, dense: np.ndarray | None) -> np.ndarray | None:
        t0 = time.perf_counter()
        scale = np.float32(1.0 / self.worker_num)
        for table, local in self._local.items():
            rows = np.flatnonzero(local.touched)
            if not len(rows):
                continue
            keys = local.row_keys[rows]
            delta = (local.values[rows] - local.base[rows]) * scale
            self.client.push_sparse_delta(table, keys, delta, local.stats[rows, 0], local.stats[rows, 1])
            local.stats[rows] = 0.0
            fresh = self.client.pull_sparse(table, keys, training=True)
            local.values[rows] = fresh
            local.base[rows] = fresh
            local.touched[rows] = False
        fresh_dense = None
        if dense is not None:
            self.client.push_dense_delta(DENSE_TABLE, (dense - self._dense_base) * scale)
            fresh_dense = self.client.pull_dense(DENSE_TABLE)
            self._dense_base = fresh_dense.copy()
        release_free_memory()  # a sync's deltas and fresh rows are a burst every k steps
        self.waits.push_wait += time.perf_counter() - t0
        return fresh_dense

    def set_dense_base(self, values: np.ndarray) -> None:
        """The dense values the worker starts from (as pulled at init_worker)."""
        self._dense_base = np.array(values, np.float32)

    def flush(self, dense: np.ndarray | None = None) -> np.ndarray | None:
        """Push what the local copy learned since the last sync (`dense`: the worker's current
        flat dense values); returns the fresh dense values."""
        return self._sync(dense if self._dense_base is not None else None)


_MODES: dict[Mode, type[Communicator]] = {
    Mode.SYNC: SyncCommunicator, Mode.ASYNC: AsyncCommunicator,
    Mode.HALF_ASYNC: HalfAsyncCommunicator, Mode.GEO: GeoCommunicator,
}


def make_communicator(mode: Mode | str, client: PSClient, **kwargs) -> Communicator:
    """The communicator of `mode` ('sync', 'async', 'half_async', 'geo') over `client`."""
    try:
        mode = Mode(mode.value if isinstance(mode, enum.Enum) else mode)
    except ValueError:
        raise CommunicatorError(f"unknown communicator mode {mode!r}; choose one of "
                                f"{[m.value for m in Mode]}") from None
    return _MODES[mode](client, **kwargs)


__all__ = ["Mode", "Communicator", "SyncCommunicator", "AsyncCommunicator",
           "HalfAsyncCommunicator", "GeoCommunicator", "CommunicatorError", "make_communicator",
           "DENSE_TABLE"]

"""What every communicator mode shares: the sparse pulls with prefetch, waits, background failures."""
from __future__ import annotations

import enum
import time

import numpy as np

from shoal.ps.client import PSClient
from shoal.ps.errors import PSError, PSTimeoutError, RemoteError


class Mode(enum.Enum):
    SYNC = "sync"
    ASYNC = "async"
    HALF_ASYNC = "half_async"
    GEO = "geo"
    PASS = "pass"


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
                if k is keys or (k.shape == keys.shape and np.array_equal(k, keys)):
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

    def _barrier(self, what: str, number: int | None = None) -> None:
        """Every worker meets here (server 0) at `what`-`number` (default: the step); a timeout
        names the mode's contract."""
        number = self.steps if number is None else number
        try:
            self.client.barrier(f"{what}-{number}", self.worker_num, self.timeout,
                                member=self.worker_index)
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
                f"worker {self.worker_index}: {self.mode.value} {what} {number}: not every worker "
                f"reached it within {self.timeout}s: {cause} ({e})") from e

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



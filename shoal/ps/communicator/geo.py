"""GEO mode: a worker-side copy trained for k steps, then deltas pushed and fresh values pulled."""
from __future__ import annotations

import time

import numpy as np

from shoal.kernels import mapped_zeros, release_free_memory
from shoal.ps._keymap import KeyMap, merge_rows
from shoal.ps.communicator.base import DENSE_TABLE, Communicator, CommunicatorError, Mode


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

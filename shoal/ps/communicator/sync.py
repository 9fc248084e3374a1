"""Sync mode: one aggregated step on the servers per training step, then a barrier."""
from __future__ import annotations

import time

import numpy as np

from shoal.ps.communicator.base import DENSE_TABLE, Communicator, CommunicatorError, Mode


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

    replay = False  # set on a restarted worker: its first step may repeat one already applied

    def _sync(self):
        # the rank lets a server replace a restarted worker's re-push instead of counting it twice
        if self.worker_num == 1:
            return None
        return (self.steps, self.worker_num, self.worker_index, int(self.replay))

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
        self.replay = False
        return self.pull_dense() if dense is not None else None

    def flush(self):
        if self._buffer:  # gradients of a step that was never completed
            raise CommunicatorError(
                f"worker {self.worker_index}: sync mode holds gradients of step {self.steps} that "
                f"optimizer.step() never sent; call it after backward() before stopping")
        pending, self._pending = self._pending, []
        self.client._wait_all(pending)
        return None

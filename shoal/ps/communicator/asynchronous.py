"""Async and half-async modes: a bounded send queue, a merging sender thread, a dense receiver."""
from __future__ import annotations

import queue
import threading
import time

import numpy as np

from shoal.ps._keymap import merge_rows
from shoal.ps.communicator.base import DENSE_TABLE, Communicator, CommunicatorError, Mode


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

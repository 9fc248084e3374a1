"""The dense table of one server: its even slice of a flat float32 vector, with a rule.

The rule is the user's dense optimizer run server-side ('sgd' or 'adam', through
the kernels' fused updates) or 'sum', where a push adds (GEO deltas).

Pushes are written behind: `push` validates the gradient, queues it and
returns, and one applier thread runs the rule, in arrival order, while the
next request is already on the wire. Every read and every other write first
waits for the queue to drain, so a pull (or save) sees every push that was
acknowledged before it started: the rule's cost leaves the push's latency,
not its consistency. All methods are thread-safe.
"""
from __future__ import annotations

import collections
import logging
import threading

import numpy as np

from shoal.kernels import get_backend
from shoal.ps.errors import PSError, TableError
from shoal.ps.spec import DenseTableSpec

_log = logging.getLogger("shoal.ps.dense_table")


class DenseTable:
    """This server's slice [start, end) of a dense vector.

    Args:
        max_pending: queued pushes at most; a push beyond blocks until the
            applier catches up (bounded memory, back-pressure on the sender).
    """

    def __init__(self, spec: DenseTableSpec, server: int, n_servers: int, max_pending: int = 4):
        self.spec = spec
        self.start, self.end = spec.bounds(server, n_servers)
        size = self.end - self.start
        self.values = np.zeros(size, np.float32)
        self.m = np.zeros(size, np.float32) if spec.rule == "adam" else None
        self.v = np.zeros(size, np.float32) if spec.rule == "adam" else None
        self.step = 0
        self.max_pending = max_pending
        self._be = get_backend("numpy")
        self._values_lock = threading.Lock()  # held while values / optimizer state change or are read
        self._cond = threading.Condition()    # guards the queue below
        self._queue: collections.deque = collections.deque()
        self._failure: BaseException | None = None
        self._closed = False
        self._applier = threading.Thread(target=self._apply_loop, daemon=True,
                                         name=f"shoal-dense-{spec.name}")
        self._applier.start()

    def check(self, arr, op: str) -> np.ndarray:
        """`arr` if it is a valid push for this slice (float32, the slice's shape, finite), else raise."""
        want = (self.end - self.start,)
        if not isinstance(arr, np.ndarray) or arr.dtype != np.float32 or arr.shape != want:
            raise TableError(f"{op} on dense table {self.spec.name!r}: expected float32 of shape "
                             f"{want} (this server's slice [{self.start}, {self.end}) of "
                             f"{self.spec.size}), got {getattr(arr, 'dtype', type(arr).__name__)} "
                             f"{getattr(arr, 'shape', '')}")
        if not self._be.all_finite(arr):
            raise TableError(f"{op} on dense table {self.spec.name!r}: values hold NaN or inf; "
                             f"nothing was applied")
        return arr

    # -- the applier -----------------------------------------------------------------
    def _apply(self, grad: np.ndarray, lr: float | None) -> None:
        spec = self.spec
        lr = spec.learning_rate if lr is None else lr
        if spec.rule == "sum":
            self.values += grad
        elif spec.rule == "sgd":
            self._be.sgd_(self.values, grad, lr)
        else:
            self.step += 1
            self._be.adam_(self.values, grad, self.m, self.v, lr, spec.beta1,
                           spec.beta2, spec.epsilon, self.step)

    def _apply_loop(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._closed:
                    self._cond.wait()
                if not self._queue:
                    return
                grad, lr = self._queue[0]
            try:
                with self._values_lock:
                    self._apply(grad, lr)
            except BaseException as e:  # validated input cannot fail; keep the cause for callers
                _log.exception("dense table %r: a queued push failed", self.spec.name)
                self._failure = e
            with self._cond:
                self._queue.popleft()  # only now: a waiter for an empty queue sees this push applied
                self._cond.notify_all()

    def _settle(self) -> None:
        """Wait until every acknowledged push is applied (raise if one failed)."""
        with self._cond:
            while self._queue:
                self._cond.wait()
        if self._failure is not None:
            raise PSError(f"dense table {self.spec.name!r}: a queued push failed on this server "
                          f"({self._failure!r}); see the server log") from self._failure

    # -- requests --------------------------------------------------------------------
    def init(self, values: np.ndarray) -> None:
        """Set the slice's values (the optimizer state starts over)."""
        values = self.check(values, "init_dense")
        self._settle()
        with self._values_lock:
            self.values[:] = values
            if self.m is not None:
                self.m[:] = 0.0
                self.v[:] = 0.0
            self.step = 0

    def pull(self) -> np.ndarray:
        """A copy of the slice, with every push acknowledged before this call applied."""
        self._settle()
        with self._values_lock:
            return self.values.copy()

    def push(self, grad: np.ndarray, lr: float | None = None) -> None:
        """Queue one step of the table's rule with gradient `grad` ('sum' adds it).

        `lr` overrides the spec's learning rate for this step (the worker's
        LR scheduler drives it). Returns once `grad` is validated and queued
        (blocking while `max_pending` pushes wait); the caller must not
        modify `grad` after.
        """
        grad = self.check(grad, "push_dense")
        if lr is not None and not (isinstance(lr, float) and 0.0 <= lr < float("inf")):
            raise TableError(f"push_dense on dense table {self.spec.name!r}: lr={lr!r} must be a "
                             f"finite non-negative float")
        if self._failure is not None:
            self._settle()
        with self._cond:
            if self._closed:
                raise PSError(f"dense table {self.spec.name!r} is closed (the server is stopping)")
            while len(self._queue) >= self.max_pending:
                self._cond.wait()
                if self._closed:  # the applier may already have exited: never ack a lost push
                    raise PSError(f"dense table {self.spec.name!r} is closed (the server is stopping)")
            self._queue.append((grad, lr))
            self._cond.notify_all()

    def push_delta(self, delta: np.ndarray) -> None:
        """Add `delta` to the values whatever the rule (GEO sends trained-minus-pulled)."""
        delta = self.check(delta, "push_delta")
        self._settle()
        with self._values_lock:
            self.values += delta

    def export(self) -> dict[str, np.ndarray]:
        self._settle()
        with self._values_lock:
            out = {"start": np.array([self.start], np.int64), "values": self.values.copy(),
                   "step": np.array([self.step], np.int64)}
            if self.m is not None:
                out.update(m=self.m.copy(), v=self.v.copy())
            return out

    def load_full(self, values: np.ndarray, m: np.ndarray | None, v: np.ndarray | None,
                  step: int) -> None:
        """Take this server's slice of the whole vector (and optimizer state) from a checkpoint."""
        if values.shape != (self.spec.size,):
            raise TableError(f"dense table {self.spec.name!r}: checkpoint holds {values.shape[0]} "
                             f"values, the spec says {self.spec.size}")
        self._settle()
        with self._values_lock:
            self.values[:] = values[self.start:self.end]
            if self.m is not None and m is not None:
                self.m[:] = m[self.start:self.end]
                self.v[:] = v[self.start:self.end]
            self.step = step

    def checksum(self) -> float:
        self._settle()
        with self._values_lock:
            return float(self.values.astype(np.float64).sum())

    def close(self) -> None:
        """Apply what is queued, then stop the applier thread."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._applier.join()

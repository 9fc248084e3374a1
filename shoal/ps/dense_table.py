"""The dense table of one server: its even slice of a flat float32 vector, with a rule.

The rule is the user's dense optimizer run server-side ('sgd' or 'adam', through
the kernels' fused updates) or 'sum', where a push adds (GEO deltas). Every
call is thread-safe (one lock) and validates before it changes anything.
"""
from __future__ import annotations

import threading

import numpy as np

from shoal.kernels import get_backend
from shoal.ps.errors import TableError
from shoal.ps.spec import DenseTableSpec


class DenseTable:
    def __init__(self, spec: DenseTableSpec, server: int, n_servers: int):
        self.spec = spec
        self.start, self.end = spec.bounds(server, n_servers)
        size = self.end - self.start
        self.values = np.zeros(size, np.float32)
        self.m = np.zeros(size, np.float32) if spec.rule == "adam" else None
        self.v = np.zeros(size, np.float32) if spec.rule == "adam" else None
        self.step = 0
        self.lock = threading.Lock()
        self._be = get_backend("numpy")

    def _check(self, arr, op: str) -> np.ndarray:
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

    def init(self, values: np.ndarray) -> None:
        """Set the slice's values (the optimizer state starts over)."""
        values = self._check(values, "init_dense")
        with self.lock:
            self.values[:] = values
            if self.m is not None:
                self.m[:] = 0.0
                self.v[:] = 0.0
            self.step = 0

    def pull(self) -> np.ndarray:
        with self.lock:
            return self.values.copy()

    def push(self, grad: np.ndarray) -> None:
        """One step of the table's rule with gradient `grad` ('sum' adds it)."""
        grad = self._check(grad, "push_dense")
        spec = self.spec
        with self.lock:
            if spec.rule == "sum":
                self.values += grad
            elif spec.rule == "sgd":
                self._be.sgd_(self.values, grad, spec.learning_rate)
            else:
                self.step += 1
                self._be.adam_(self.values, grad, self.m, self.v, spec.learning_rate, spec.beta1,
                               spec.beta2, spec.epsilon, self.step)

    def push_delta(self, delta: np.ndarray) -> None:
        """Add `delta` to the values whatever the rule (GEO sends trained-minus-pulled)."""
        delta = self._check(delta, "push_delta")
        with self.lock:
            self.values += delta

    def export(self) -> dict[str, np.ndarray]:
        with self.lock:
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
        with self.lock:
            self.values[:] = values[self.start:self.end]
            if self.m is not None and m is not None:
                self.m[:] = m[self.start:self.end]
                self.v[:] = v[self.start:self.end]
            self.step = step

    def checksum(self) -> float:
        with self.lock:
            return float(self.values.astype(np.float64).sum())

"""Row-sparse gradients: (unique row ids, rows) instead of a vocabulary-sized array."""
from __future__ import annotations

from shoal.kernels import backend_of
from shoal.worker.errors import ShapeError


class SparseGrad:
    """The gradient of a table of shape `shape` that is zero outside rows `ids`.

    `ids` may hold duplicates until `merged()` sums them; `rows[i]` belongs to
    row `ids[i]`. Adding two SparseGrads concatenates them (no densifying);
    adding a dense array gives a dense array.
    """

    __slots__ = ("ids", "rows", "shape")

    def __init__(self, ids, rows, shape: tuple[int, ...]):
        if ids.ndim != 1 or rows.shape != (ids.shape[0],) + tuple(shape[1:]):
            raise ShapeError(
                f"SparseGrad of a table {tuple(shape)}: ids {tuple(ids.shape)} and rows "
                f"{tuple(rows.shape)} must be (n,) and (n, {', '.join(map(str, shape[1:]))})")
        self.ids, self.rows, self.shape = ids, rows, tuple(shape)

    @property
    def dtype(self):
        return self.rows.dtype

    def merged(self) -> SparseGrad:
        """The same gradient with unique, sorted ids."""
        ids, rows = backend_of(self.rows).segment_sum(self.ids, self.rows)
        return SparseGrad(ids, rows, self.shape)

    def to_dense(self):
        """The full-size array (for inspection and tests, not for training)."""
        be = backend_of(self.rows)
        out = be.xp.zeros(self.shape, dtype=self.rows.dtype)
        be.scatter_add_rows(out, self.ids, self.rows)
        return out

    def numpy(self):
        return backend_of(self.rows).to_numpy(self.to_dense())

    def __add__(self, other):
        if isinstance(other, SparseGrad):
            xp = backend_of(self.rows).xp
            return SparseGrad(xp.concatenate([self.ids, other.ids]),
                              xp.concatenate([self.rows, other.rows]), self.shape)
        dense = other.copy()
        backend_of(dense).scatter_add_rows(dense, self.ids, self.rows)
        return dense

    __radd__ = __add__

    def __repr__(self) -> str:
        return f"SparseGrad(shape={list(self.shape)}, rows={self.ids.shape[0]}, dtype={self.dtype})"

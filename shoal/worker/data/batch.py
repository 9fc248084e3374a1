"""Column-wise samples: `Ragged` id lists and `Batch` (alias `SampleBlock`).

A Batch holds B samples as columns: ``dense[name]`` is float32 [B, dim] per
dense slot (the label included), ``sparse[name]`` a `Ragged` per sparse slot.
A dataset's whole in-memory data is one Batch too (a "sample block"):
slicing, concatenating and permuting (`take`) are vectorized over offsets
with numpy, never a Python loop over samples.
"""
from __future__ import annotations

import threading
from collections.abc import Sequence

import numpy as np

from shoal.worker.data.errors import DataError
from shoal.worker.data.slots import Slot, SlotList


_unit_lock = threading.Lock()
_unit = np.arange(1, dtype=np.int64)
_unit.flags.writeable = False


def unit_offsets(n: int) -> np.ndarray:
    """offsets 0..n of n rows of one value each: a read-only view of one shared arange.

    Single-id slots are the common case (every slot of a CTR sample): sharing
    their offsets saves 8 bytes per sample and slot in memory.
    """
    global _unit
    with _unit_lock:
        if len(_unit) < n + 1:
            grown = np.arange(max(n + 1, 2 * len(_unit)), dtype=np.int64)
            grown.flags.writeable = False
            _unit = grown
        return _unit[:n + 1]


def _shares_unit(offsets: np.ndarray) -> bool:
    """O(1): offsets that are a view of the shared 0..n arange (from `unit_offsets`)."""
    return offsets.base is not None and offsets.base is _unit and offsets[0] == 0


def is_unit_offsets(offsets: np.ndarray) -> bool:
    """True when `offsets` are 0, 1, ..., n (every row holds exactly one value)."""
    if offsets.base is not None and offsets.base is _unit:
        return offsets[0] == 0
    return int(offsets[-1]) == len(offsets) - 1 and bool((offsets[1:] - offsets[:-1] == 1).all())


class Ragged:
    """B variable-length rows stored flat: row i is ``values[offsets[i]:offsets[i + 1]]``.

    Attributes:
        values: [nnz] uint64 (id slots) or float32 (sparse float slots).
        offsets: int64 [B + 1], offsets[0] == 0, non-decreasing, offsets[-1] == nnz.

    Example:
        >>> r = Ragged.from_lengths(np.array([5, 6, 7], np.uint64), [2, 1])
        >>> r.lengths.tolist(), r.row_ids().tolist()
        ([2, 1], [0, 0, 1])
    """

    __slots__ = ("values", "offsets")

    def __init__(self, values: np.ndarray, offsets: np.ndarray, *, validate: bool = True):
        self.values = values
        self.offsets = offsets
        if validate:
            self._check()

    def _check(self) -> None:
        v, o = self.values, self.offsets
        if not isinstance(v, np.ndarray) or v.ndim != 1:
            raise DataError(f"Ragged values must be a 1-D numpy array, got {type(v).__name__}"
                            f"{'' if not isinstance(v, np.ndarray) else f' of shape {v.shape}'}")
        if not isinstance(o, np.ndarray) or o.ndim != 1 or o.dtype != np.int64 or len(o) < 1:
            raise DataError("Ragged offsets must be a 1-D int64 numpy array of length B + 1 >= 1")
        if o[0] != 0 or o[-1] != len(v):
            raise DataError(f"Ragged offsets must run from 0 to len(values)={len(v)}, got {o[0]}..{o[-1]}")
        if len(o) > 1 and (np.diff(o) < 0).any():
            raise DataError("Ragged offsets must be non-decreasing")

    @classmethod
    def from_lengths(cls, values: np.ndarray, lengths: Sequence[int] | np.ndarray) -> "Ragged":
        lengths = np.asarray(lengths, dtype=np.int64)
        offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        return cls(np.asarray(values), offsets)

    @classmethod
    def empty(cls, dtype: np.dtype, size: int = 0) -> "Ragged":
        return cls(np.zeros(0, dtype=dtype), np.zeros(size + 1, dtype=np.int64), validate=False)

    @property
    def size(self) -> int:
        """B, the number of rows."""
        return len(self.offsets) - 1

    @property
    def nnz(self) -> int:
        return len(self.values)

    @property
    def lengths(self) -> np.ndarray:
        """int64 [B]: the number of values of each row."""
        return np.diff(self.offsets)

    def row_ids(self) -> np.ndarray:
        """int64 [nnz]: the row of every value (``np.repeat(arange(B), lengths)``)."""
        return np.repeat(np.arange(self.size, dtype=np.int64), self.lengths)

    def slice(self, start: int, stop: int) -> "Ragged":
        """Rows start..stop-1 (values are a view; offsets are rebased)."""
        a, b = int(self.offsets[start]), int(self.offsets[stop])
        return Ragged(self.values[a:b], self.offsets[start:stop + 1] - a, validate=False)

    def take(self, indices: np.ndarray) -> "Ragged":
        """Rows in the order of `indices` (int64, each in [0, B); checked by the caller)."""
        if _shares_unit(self.offsets):  # one value per row: a plain gather, no offset arithmetic
            return Ragged(self.values[indices], unit_offsets(len(indices)), validate=False)
        starts = self.offsets[indices]
        lens = self.offsets[indices + 1] - starts
        offsets = np.zeros(len(indices) + 1, dtype=np.int64)
        np.cumsum(lens, out=offsets[1:])
        nnz = int(offsets[-1])
        if nnz == len(indices) and (lens == 1).all():  # one value per row (the common id slot)
            return Ragged(self.values[starts], unit_offsets(len(indices)), validate=False)
        else:
            positions = np.repeat(starts - offsets[:-1], lens) + np.arange(nnz, dtype=np.int64)
        return Ragged(self.values[positions], offsets, validate=False)

    @staticmethod
    def concat(parts: Sequence["Ragged"]) -> "Ragged":
        """The rows of all parts, in order (the values' dtypes must agree)."""
        if not parts:
            raise DataError("Ragged.concat needs at least one part")
        values = np.concatenate([p.values for p in parts])
        sizes = [p.size for p in parts]
        if all(is_unit_offsets(p.offsets) for p in parts):
            return Ragged(values, unit_offsets(sum(sizes)), validate=False)
        offsets = np.empty(sum(sizes) + 1, dtype=np.int64)
        offsets[0] = 0
        pos, base = 1, 0
        for p, n in zip(parts, sizes):
            offsets[pos:pos + n] = p.offsets[1:] + base
            pos += n
            base += p.nnz
        return Ragged(values, offsets, validate=False)

    def equals(self, other: "Ragged") -> bool:
        """Same rows with the same values and dtype."""
        return (isinstance(other, Ragged) and self.values.dtype == other.values.dtype
                and np.array_equal(self.offsets, other.offsets) and np.array_equal(self.values, other.values))

    def __len__(self) -> int:
        return self.size

    def __repr__(self) -> str:
        return f"Ragged(size={self.size}, nnz={self.nnz}, dtype={self.values.dtype})"


class Batch:
    """B samples, column-wise: what datasets yield, and what they hold in memory.

    Attributes:
        size: B.
        dense: name -> float32 [B, dim] for every dense slot ("label" among
            them in the CTR slot list).
        sparse: name -> `Ragged` for every sparse slot (values uint64 for id
            slots, float32 for sparse float slots).
        slots: the SlotList of the columns, in line order.

    `SampleBlock` is the same class: a block of many samples is a Batch.

    Args:
        dense, sparse: the columns; every one must have B rows.
        slots: their slot list (default: the dense columns then the sparse
            ones, in dict order).
        size: B, required only when there are no columns.
        validate: check shapes, dtypes and slots (off for internal results).

    Example:
        >>> b = dataset_block.slice(0, 512)       # a batch: views, no copy of dense data
        >>> shuffled = block.take(np.random.default_rng(0).permutation(len(block)))
    """

    __slots__ = ("size", "dense", "sparse", "slots")

    def __init__(self, dense: dict[str, np.ndarray], sparse: dict[str, Ragged], slots: SlotList | None = None,
                 size: int | None = None, *, validate: bool = True):
        self.dense = dict(dense)
        self.sparse = dict(sparse)
        if size is None:
            first = next(iter(self.dense.values()), None)
            if first is not None:
                size = len(first)
            elif self.sparse:
                size = next(iter(self.sparse.values())).size
            else:
                raise DataError("Batch: size is required when there are no columns")
        self.size = int(size)
        if slots is None:
            slots = SlotList([Slot(n, "float", dense=True, dim=a.shape[1] if a.ndim == 2 and a.shape[1] else 1)
                              for n, a in self.dense.items()]
                             + [Slot(n, "uint64" if r.values.dtype == np.uint64 else "float")
                                for n, r in self.sparse.items()])
        self.slots = slots
        if validate:
            self._check()

    def _check(self) -> None:
        for s in self.slots:
            if s.dense:
                a = self.dense.get(s.name)
                if a is None:
                    raise DataError(f"Batch: dense slot {s.name!r} has no column")
                if not isinstance(a, np.ndarray) or a.dtype != np.float32 or a.shape != (self.size, s.dim):
                    raise DataError(f"Batch: dense column {s.name!r} must be float32 [{self.size}, {s.dim}], got "
                                    f"{getattr(a, 'dtype', type(a).__name__)} {getattr(a, 'shape', '')}")
            else:
                r = self.sparse.get(s.name)
                if not isinstance(r, Ragged):
                    raise DataError(f"Batch: sparse slot {s.name!r} needs a Ragged column, got {type(r).__name__}")
                r._check()
                if r.size != self.size or r.values.dtype != s.numpy_dtype:
                    raise DataError(f"Batch: sparse column {s.name!r} must have {self.size} rows of "
                                    f"{s.numpy_dtype}, got {r.size} rows of {r.values.dtype}")
        names = set(self.slots.names)
        extra = sorted((set(self.dense) | set(self.sparse)) - names)
        if extra or len(self.dense) + len(self.sparse) != len(self.slots):
            raise DataError(f"Batch: columns {extra or sorted(set(self.dense) & set(self.sparse))} are not "
                            f"(exactly once) in the slot list {self.slots.names}")

    @classmethod
    def empty(cls, slots: SlotList) -> "Batch":
        """A block of 0 samples with the columns of `slots`."""
        return cls({s.name: np.zeros((0, s.dim), np.float32) for s in slots.dense},
                   {s.name: Ragged.empty(s.numpy_dtype) for s in slots.sparse}, slots, 0, validate=False)

    def __len__(self) -> int:
        return self.size

    @property
    def nbytes(self) -> int:
        """Bytes held by the columns' arrays."""
        return (sum(a.nbytes for a in self.dense.values())
                + sum(r.values.nbytes + r.offsets.nbytes for r in self.sparse.values()))

    def slice(self, start: int, stop: int) -> "Batch":
        """Samples start..stop-1 (clipped to [0, B]); dense columns and sparse values are views."""
        start, stop = max(0, min(start, self.size)), max(0, min(stop, self.size))
        stop = max(start, stop)
        return Batch({k: a[start:stop] for k, a in self.dense.items()},
                     {k: r.slice(start, stop) for k, r in self.sparse.items()},
                     self.slots, stop - start, validate=False)

    def take(self, indices: np.ndarray | Sequence[int], *, consume: bool = False) -> "Batch":
        """The samples at `indices`, in that order (a permutation shuffles; repeats are allowed).

        With `consume`, each column of this batch is dropped as soon as its
        copy is made (this batch is empty afterwards): a shuffle then needs
        one column of extra memory, not a second copy of everything.

        Raises:
            DataError: an index outside [0, B).
        """
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        if len(idx) and (idx.min() < 0 or idx.max() >= self.size):
            raise DataError(f"Batch.take: indices must lie in [0, {self.size}), got {idx.min()}..{idx.max()}")
        dense, sparse = self.dense, self.sparse
        if consume:
            self.dense, self.sparse = {}, {}
        return Batch({k: (dense.pop(k) if consume else dense[k])[idx] for k in list(dense)},
                     {k: (sparse.pop(k) if consume else sparse[k]).take(idx) for k in list(sparse)},
                     self.slots, len(idx), validate=False)

    @staticmethod
    def concat(blocks: Sequence["Batch"], *, consume: bool = False) -> "Batch":
        """The samples of all blocks, in order.

        With `consume`, the blocks' columns are dropped as each column of the
        result is made (the blocks are empty afterwards), so the peak is one
        column above the data, not twice the data.

        Raises:
            DataError: no blocks, or blocks with different slot lists.
        """
        if not blocks:
            raise DataError("Batch.concat needs at least one block")
        slots = blocks[0].slots
        for b in blocks[1:]:
            if b.slots != slots:
                raise DataError(f"Batch.concat: slot lists differ: {slots!r} vs {b.slots!r}")
        if len(blocks) == 1:
            return blocks[0]
        size = sum(b.size for b in blocks)
        get = (lambda cols, name: cols.pop(name)) if consume else (lambda cols, name: cols[name])
        dense = {s.name: np.concatenate([get(b.dense, s.name) for b in blocks]) for s in slots.dense}
        sparse = {s.name: Ragged.concat([get(b.sparse, s.name) for b in blocks]) for s in slots.sparse}
        return Batch(dense, sparse, slots, size, validate=False)

    def equals(self, other: "Batch") -> bool:
        """Same slots and bit-identical columns."""
        return (isinstance(other, Batch) and self.size == other.size and self.slots == other.slots
                and all(np.array_equal(a, other.dense[k]) for k, a in self.dense.items())
                and all(r.equals(other.sparse[k]) for k, r in self.sparse.items()))

    def __repr__(self) -> str:
        return (f"Batch(size={self.size}, dense={ {k: list(a.shape) for k, a in self.dense.items()} }, "
                f"sparse={len(self.sparse)} slots, nnz={sum(r.nnz for r in self.sparse.values())})")


SampleBlock = Batch

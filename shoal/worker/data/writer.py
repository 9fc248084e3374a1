"""Writing Batches as MultiSlot text (the format the reader and Paddle's datasets read)."""
from __future__ import annotations

import os
from collections.abc import Iterable

import numpy as np

from shoal._atomic import atomic_write
from shoal.worker.data import _multislot
from shoal.worker.data.batch import Batch
from shoal.worker.data.errors import DataError
from shoal.worker.data.reader import default_threads


def _float_decimals(values: np.ndarray, decimals: int | None, name: str) -> int:
    if len(values) and not np.isfinite(values).all():
        raise DataError(f"write_multislot: slot {name!r} holds nan or inf, which the format cannot carry")
    if len(values) and np.array_equal(values, np.trunc(values)):
        return 0  # integral (a 0/1 label): written as "0" / "1", as in Paddle's sample files
    return -1 if decimals is None else int(decimals)


def format_multislot(block: Batch, decimals: int | None = 5, n_threads: int | None = None) -> bytes:
    """The MultiSlot text of `block`'s samples, one line each, slots in `block.slots` order.

    Args:
        decimals: digits after the point for float values (5 as in the sample
            files: values with at most 5 decimals read back bit-identical), or
            None for the shortest text that reads back to the same float32.
            A float slot whose values are all integers is written without a
            point either way.
        n_threads: format with this many threads (default min(4, cores)).

    Raises:
        DataError: a float column with nan or inf.
    """
    if decimals is not None and not 0 <= decimals <= 30:
        raise DataError(f"decimals={decimals}: expected 0..30 or None")
    cols = []
    for s in block.slots:
        if s.dense:
            a = np.ascontiguousarray(block.dense[s.name]).reshape(-1)
            cols.append((_multislot.DENSE_FLOAT, a, None, s.dim, _float_decimals(a, decimals, s.name)))
        else:
            r = block.sparse[s.name]
            v = np.ascontiguousarray(r.values)
            if s.dtype == "uint64":
                cols.append((_multislot.SPARSE_UINT64, v, r.offsets, 0, 0))
            else:
                cols.append((_multislot.SPARSE_FLOAT, v, r.offsets, 0, _float_decimals(v, decimals, s.name)))
    return _multislot.format(cols, block.size, n_threads or default_threads())


def write_multislot(blocks: Batch | Iterable[Batch], path: str | os.PathLike, decimals: int | None = 5,
                    n_threads: int | None = None) -> int:
    """Write one Batch (or an iterable of them, streamed) to `path` as MultiSlot text.

    The file appears complete or not at all (written to a temporary name,
    fsynced, renamed). Returns the number of samples written. See
    `format_multislot` for `decimals`.

    Example:
        >>> write_multislot(synthetic_ctr(1000, seed=0), "part-00000.txt")
    """
    n = 0

    def write(f):
        nonlocal n
        for b in [blocks] if isinstance(blocks, Batch) else blocks:
            f.write(format_multislot(b, decimals, n_threads))
            n += b.size
    atomic_write(path, write)
    return n

"""Ragged columns and Batch blocks: slicing, take (gather by offsets), concat, validation."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shoal.worker.data import Batch, DataError, Ragged, SampleBlock, Slot, SlotList


def ragged_lists(draw_lengths):
    vals = [list(range(100 * i, 100 * i + n)) for i, n in enumerate(draw_lengths)]
    flat = np.array([v for r in vals for v in r], dtype=np.uint64)
    return vals, Ragged.from_lengths(flat, draw_lengths)


@settings(max_examples=80, deadline=None)
@given(lengths=st.lists(st.integers(0, 4), max_size=30), data=st.data())
def test_ragged_take_slice_concat_match_lists(lengths, data):
    rows, r = ragged_lists(lengths)
    assert r.size == len(rows) and r.nnz == sum(lengths)
    assert r.lengths.tolist() == lengths
    assert r.row_ids().tolist() == [i for i, n in enumerate(lengths) for _ in range(n)]
    idx = data.draw(st.lists(st.integers(0, max(len(rows) - 1, 0)), max_size=40)) if rows else []
    t = r.take(np.array(idx, dtype=np.int64))
    assert [t.values[a:b].tolist() for a, b in zip(t.offsets[:-1], t.offsets[1:])] == [rows[i] for i in idx]
    a = data.draw(st.integers(0, len(rows)))
    b = data.draw(st.integers(a, len(rows)))
    s = r.slice(a, b)
    s._check()
    assert [s.values[x:y].tolist() for x, y in zip(s.offsets[:-1], s.offsets[1:])] == rows[a:b]
    c = Ragged.concat([r.slice(0, a), r.slice(a, b), r.slice(b, len(rows))])
    assert c.equals(r)


def make_block(n=10):
    slots = SlotList([Slot("label", "float", dense=True, dim=1), Slot("ids", "uint64"), Slot("w", "float")])
    lengths = np.arange(n) % 3 + 1
    ids = Ragged.from_lengths(np.arange(lengths.sum(), dtype=np.uint64), lengths)
    w = Ragged.from_lengths(np.arange(n, dtype=np.float32), np.ones(n, dtype=np.int64))
    return Batch({"label": np.arange(n, dtype=np.float32).reshape(n, 1)}, {"ids": ids, "w": w}, slots)


def test_batch_take_permutes_every_column_together():
    b = make_block(10)
    perm = np.random.default_rng(0).permutation(10)
    t = b.take(perm)
    assert t.size == 10 and t.dense["label"][:, 0].tolist() == perm.astype(np.float32).tolist()
    assert t.sparse["w"].values.tolist() == perm.astype(np.float32).tolist()
    assert t.sparse["ids"].lengths.tolist() == (perm % 3 + 1).tolist()
    back = t.take(np.argsort(perm))
    assert back.equals(b)
    with pytest.raises(DataError, match=r"indices must lie in \[0, 10\)"):
        b.take([0, 10])


def test_batch_slice_concat_and_empty():
    b = make_block(10)
    parts = [b.slice(0, 3), b.slice(3, 3), b.slice(3, 10)]
    assert [p.size for p in parts] == [3, 0, 7]
    assert Batch.concat(parts).equals(b)
    assert b.slice(8, 100).size == 2
    e = Batch.empty(b.slots)
    assert e.size == 0 and Batch.concat([e, b]).equals(b)
    assert SampleBlock is Batch and b.nbytes > 0 and "size=10" in repr(b)


def test_batch_validation():
    slots = SlotList([Slot("x", "float", dense=True, dim=2), Slot("ids", "uint64")])
    ids = Ragged.from_lengths(np.arange(3, dtype=np.uint64), [1, 2])
    Batch({"x": np.zeros((2, 2), np.float32)}, {"ids": ids}, slots)
    with pytest.raises(DataError, match=r"float32 \[2, 2\]"):
        Batch({"x": np.zeros((2, 3), np.float32)}, {"ids": ids}, slots)
    with pytest.raises(DataError, match="3 rows"):
        Batch({"x": np.zeros((3, 2), np.float32)}, {"ids": ids}, slots)
    with pytest.raises(DataError, match="offsets must run from 0"):
        Ragged(np.arange(3, dtype=np.uint64), np.array([0, 2], np.int64))
    with pytest.raises(DataError, match="slot lists differ"):
        Batch.concat([make_block(2), Batch({"x": np.zeros((2, 2), np.float32)}, {"ids": ids}, slots)])

"""The synthetic Criteo-like generator: determinism, chunk independence, the hidden model, files on disk."""
from __future__ import annotations

import itertools
import json
import os

import numpy as np
import pytest

import shoal.datasets
from shoal.worker.data import (Batch, MultiSlotReader, SlotList, best_auc, ensure_synthetic_ctr, synthetic_ctr,
                               synthetic_ctr_blocks, write_multislot)
from shoal.worker.data.synthetic import _auc, hidden_model


def test_deterministic_by_seed_and_independent_of_chunking():
    a = synthetic_ctr(5000, seed=0)
    assert a.equals(synthetic_ctr(5000, seed=0))
    for chunk in (999, 4096, 70_000):
        blocks = list(synthetic_ctr_blocks(5000, chunk=chunk, seed=0))
        assert all(b.size == chunk for b in blocks[:-1]) and blocks[-1].size == 5000 - chunk * (len(blocks) - 1)
        assert Batch.concat(blocks).equals(a)
    ones = list(itertools.islice(synthetic_ctr_blocks(5000, chunk=1, seed=0, start=32_700), 200))
    assert Batch.concat(ones).equals(synthetic_ctr(200, seed=0, start=32_700))  # across an internal chunk
    assert synthetic_ctr(1200, seed=0, start=3800).equals(a.slice(3800, 5000))
    assert not synthetic_ctr(100, seed=0, stream=1).equals(a.slice(0, 100))


def test_layout_ranges_and_click_rate():
    block = synthetic_ctr(200_000, seed=0)
    assert block.slots == SlotList.ctr()
    dense = block.dense["dense"]
    assert dense.shape == (200_000, 13) and dense.dtype == np.float32
    assert dense.min() >= 0 and dense.max() < 1 and abs(float(dense.mean()) - 0.5) < 0.01
    on_grid = (np.round(dense.astype(np.float64) * 1e5) / 1e5).astype(np.float32)  # multiples of 1e-5
    assert np.array_equal(on_grid, dense)
    label = block.dense["label"]
    assert set(np.unique(label).tolist()) == {0.0, 1.0}
    assert abs(float(label.mean()) - 0.29) < 0.02
    vocab = hidden_model(0).vocab
    assert (vocab >= 1e5).all() and (vocab <= 1e6).all()
    for s in range(26):
        r = block.sparse[f"C{s + 1}"]
        assert r.nnz == r.size and r.values.dtype == np.uint64
        assert r.values.min() >= s * 10**6 + 1 and r.values.max() <= s * 10**6 + vocab[s]
        counts = np.bincount((r.values - np.uint64(s * 10**6 + 1)).astype(np.int64))
        top = np.sort(counts)[::-1]
        assert top[0] > 20 * top[100]  # Zipf: a few ids dominate
    auc = best_auc(block)
    assert 0.85 < auc < 0.93


def test_auc_matches_pairwise_definition():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 300)
    scores = rng.integers(0, 20, 300).astype(float)  # many ties
    pos, neg = scores[labels == 1], scores[labels == 0]
    pairs = (pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()
    assert _auc(labels, scores) == pytest.approx(pairs / (len(pos) * len(neg)), abs=1e-12)


def test_write_read_round_trip(tmp_path):
    block = synthetic_ctr(3000, seed=0)
    p = tmp_path / "part.txt"
    write_multislot(block, p)
    back = MultiSlotReader(SlotList.ctr(), n_threads=3, min_chunk_bytes=10_000).read_file(p)
    assert back.equals(block)
    first = p.read_text().splitlines()[0].split()
    assert first[0] == "1" and first[1] in ("0", "1") and first[2] == "13" and len(first[3]) == 7
    assert len(first) == 2 + 14 + 2 * 26


def test_ensure_synthetic_ctr_caches_and_regenerates(tmp_path):
    out = ensure_synthetic_ctr(tmp_path, n_train=5000, n_test=1000, seed=0, n_files=3)
    assert [os.path.basename(f) for f in out.train] == ["part-00000.txt", "part-00001.txt", "part-00002.txt"]
    assert len(out.test) == 3
    train = MultiSlotReader(SlotList.ctr()).read_files(out.train)
    assert train.equals(synthetic_ctr(5000, seed=0))
    test = MultiSlotReader(SlotList.ctr()).read_files(out.test)
    assert test.equals(synthetic_ctr(1000, seed=0, stream=1))
    mtimes = [os.stat(f).st_mtime_ns for f in out.train + out.test]
    again = ensure_synthetic_ctr(tmp_path, n_train=5000, n_test=1000, seed=0, n_files=3)
    assert again.train == out.train and [os.stat(f).st_mtime_ns for f in again.train + again.test] == mtimes
    manifest = json.loads((tmp_path / "MANIFEST.json").read_text())
    assert manifest["params"]["n_train"] == 5000
    other = ensure_synthetic_ctr(tmp_path, n_train=4000, n_test=500, seed=0, n_files=2)
    assert len(other.train) == 2 and not os.path.exists(out.train[2])
    assert MultiSlotReader(SlotList.ctr()).read_files(other.train).size == 4000
    os.truncate(other.test[0], 10)  # a damaged file is noticed and regenerated
    fixed = ensure_synthetic_ctr(tmp_path, n_train=4000, n_test=500, seed=0, n_files=2)
    assert MultiSlotReader(SlotList.ctr()).read_files(fixed.test).size == 500


def test_shoal_datasets_alias():
    for name in ("synthetic_ctr", "ensure_synthetic_ctr", "write_multislot", "InMemoryDataset", "QueueDataset",
                 "SlotList"):
        assert getattr(shoal.datasets, name) is getattr(__import__("shoal.worker.data", fromlist=[name]), name)


def test_other_seed_other_data():  # last: it replaces the cached hidden model of seed 0
    a, b = synthetic_ctr(2000, seed=0), synthetic_ctr(2000, seed=1)
    assert not np.array_equal(a.dense["dense"], b.dense["dense"])
    assert not np.array_equal(a.sparse["C1"].values, b.sparse["C1"].values)

"""Shared helpers of the data-layer tests: a pure-Python MultiSlot parser and writer, sample signatures."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from shoal.worker.data import Batch, Ragged, SlotList

SAMPLE = Path(__file__).resolve().parents[3] / ".." / "shared" / "data" / "ctr_multislot_sample.txt"


def reference_parse(text: str, slots: SlotList) -> list[list[list]]:
    """Lines -> per line, per slot, the list of values (float or int), by str.split: the slow obvious way."""
    rows = []
    for line in text.splitlines():
        tok = line.split()
        if not tok:
            continue
        pos, row = 0, []
        for s in slots:
            count = int(tok[pos])
            vals = tok[pos + 1:pos + 1 + count]
            pos += 1 + count
            row.append([float(np.float32(v)) for v in vals] if s.dtype == "float" else [int(v) for v in vals])
        assert pos == len(tok)
        rows.append(row)
    return rows


def block_rows(block: Batch) -> list[list[list]]:
    """A Batch as the same nested lists as reference_parse."""
    cols = []
    for s in block.slots:
        if s.dense:
            cols.append([[float(x) for x in r] for r in block.dense[s.name]])
        else:
            r = block.sparse[s.name]
            vals = r.values.tolist() if s.dtype == "uint64" else [float(x) for x in r.values]
            cols.append([vals[a:b] for a, b in zip(r.offsets[:-1], r.offsets[1:])])
    return [list(row) for row in zip(*cols)] if cols else []


def block_from_rows(rows: list[list[list]], slots: SlotList) -> Batch:
    dense, sparse = {}, {}
    for i, s in enumerate(slots):
        col = [r[i] for r in rows]
        if s.dense:
            dense[s.name] = np.array(col, dtype=np.float32).reshape(len(rows), s.dim)
        else:
            flat = [v for r in col for v in r]
            sparse[s.name] = Ragged.from_lengths(np.array(flat, dtype=s.numpy_dtype), [len(r) for r in col])
    return Batch(dense, sparse, slots, len(rows))


def signatures(block: Batch) -> np.ndarray:
    """One sortable byte string per sample (single-id slots only): to compare multisets of samples."""
    parts = [block.dense[s.name].view(np.uint32).astype(np.uint64) for s in block.slots.dense]
    parts += [block.sparse[s.name].values.reshape(-1, 1) for s in block.slots.sparse]
    m = np.ascontiguousarray(np.concatenate(parts, axis=1))
    return np.sort(m.view(np.dtype((np.void, m.shape[1] * 8))).reshape(-1))

"""What a sparse shard does for pass mode: whole-record pulls, and the merge of write-backs.

A pass (ps/communicator/pass_mode.py) pulls each key's whole record once,
trains it on the worker, and writes back the change. The layouts:

- a pulled record: the shard's row (embedding, rule state, statistics) plus
  its embedx flag: `shard.width + 1` float32 columns;
- a write-back row (`shard.width + 2` columns): the learned columns (each
  part's embedding columns and rule state) hold the worker's change times the
  part's weight; show, click and delta score hold the pass's own counts (not
  differences of large floats, which stop changing past 2^24 shows); unseen
  days is ignored; then the weight of the embed part (the worker's shows of
  the key in the pass, 0 where the key was not admitted at the worker) and of
  the embedx part (the same where the worker's copy had embedx, else 0).

The servers sum every worker's rows of a key, then move the learned columns
by sum(w * change) / sum(w), the shows-weighted mean of the workers' moves,
and add the counts. Rows the table does not hold count their shows and
clicks towards admission. A tiered shard works in slices of half its budget,
spilling after each, so a pass never holds more hot rows than the budget.
"""
from __future__ import annotations

import enum

import numpy as np


class Part(enum.IntEnum):
    """What a column of a record is, for the merge."""

    STAT = 0    # show, click, delta score, unseen days: counts, added
    EMBED = 1   # the embed part's embedding columns and rule state: weighted mean of moves
    EMBEDX = 2  # the split layout's embedx part: the same, with its own weight


def column_parts(shard) -> np.ndarray:
    """The Part of each column of `shard`'s records."""
    parts = np.full(shard.width, Part.STAT, np.int8)
    dim = shard.spec.dim
    if shard.split:
        parts[0], parts[1:dim] = Part.EMBED, Part.EMBEDX
    else:
        parts[:dim] = Part.EMBED
    for name, (start, k) in shard.cols.items():
        if name.startswith("state."):
            parts[start:start + k] = Part.EMBED if name.startswith("state.embed.") else Part.EMBEDX
    return parts


def part_runs(shard) -> list[tuple[Part, slice]]:
    """(part, columns) for each run of adjacent learned columns of one part (a record has a few;
    one without the split layout), so weighting works on slices, not column lists."""
    parts = column_parts(shard)
    edges = np.flatnonzero(np.diff(parts)) + 1
    starts, stops = np.r_[0, edges], np.r_[edges, len(parts)]
    return [(Part(int(parts[a])), slice(int(a), int(b))) for a, b in zip(starts, stops)
            if parts[a] != Part.STAT]


def _slices(shard, n: int):
    """Slices of n keys: one, or for a tiered shard pieces of half its budget."""
    step = n if shard.cold is None else max(1, shard.cold.budget_rows // 2)
    return [slice(i, min(i + step, n)) for i in range(0, n, step)] or [slice(0, 0)]


def pull_records(shard, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(found [n], records [n, width + 1]) for unique `keys` of `shard`, pulled for training: cold
    rows promoted, admitted keys created, unseen days reset; zeros where not admitted. Under the
    shard's lock."""
    found = np.zeros(len(keys), bool)
    records = np.zeros((len(keys), shard.width + 1), np.float32)
    for part in _slices(shard, len(keys)):
        k = keys[part]
        rows = shard.map.lookup(k)
        cold = None
        if shard.cold is not None and len(shard.cold.tier):
            cold = np.flatnonzero(rows < 0)
        shard._admit(k, rows, cold)
        ok = rows >= 0
        r = rows if ok.all() else rows[ok]
        shard.values[r, shard.unseen] = 0.0
        out = records[part]
        if ok.all():
            out[:, :shard.width] = shard.values[r]
            out[:, shard.width] = shard.has_embedx[r]
        else:
            out[ok, :shard.width] = shard.values[r]
            out[ok, shard.width] = shard.has_embedx[r]
        found[part] = ok
        if shard.cold is not None:
            shard.cold.spill(rows)
    return found, records


def merge(shard, keys: np.ndarray, packed: np.ndarray) -> None:
    """Apply merged write-back rows (unique `keys`, packed [n, width + 2]: see the module) to
    `shard`. Under the shard's lock."""
    w_embed, w_embedx = shard.width, shard.width + 1
    runs = part_runs(shard)
    stats = (shard.show, shard.click, shard.delta)
    for part in _slices(shard, len(keys)):
        k, p = keys[part], packed[part]
        rows = shard.map.lookup(k)
        if shard.cold is not None:
            shard._promote_into(k, rows)
        has = rows >= 0
        if shard.pending is not None and not has.all():  # not admitted: shows count for admission
            miss = ~has
            prow = shard.pending.rows_for(k[miss])
            shard.pending.cols["show"][prow] += p[miss, shard.show]
            shard.pending.cols["click"][prow] += p[miss, shard.click]
        if has.any():
            r, q = (rows, p) if has.all() else (rows[has], p[has])
            block = shard.values[r]
            scales = {}
            for kind, cols in runs:
                if kind not in scales:
                    weight = q[:, w_embed if kind is Part.EMBED else w_embedx]
                    scales[kind] = np.divide(1.0, weight, out=np.zeros_like(weight),
                                             where=weight > 0)[:, None]
                block[:, cols] += q[:, cols] * scales[kind]
            for col in stats:
                block[:, col] += q[:, col]
            block[:, shard.unseen] = 0.0
            shard.values[r] = block
            if shard.split:
                shard.has_embedx[r] |= q[:, w_embedx] > 0
        if shard.cold is not None:
            shard.cold.spill(rows)

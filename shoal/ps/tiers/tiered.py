"""The cold half of a tiered sparse shard: a RAM budget, spilling, promotion, and the whole-table
operations (shrink, day_tick, export, load) over the rows in the storage tier.

A shard with `memory_budget_mb` keeps its hot rows in its arena and key map,
and every other row in a StorageTier, each key in exactly one of the two.
When the arena holds more rows than the budget allows after an operation,
the coldest rows (largest unseen_days, then lowest show/click score; or,
with eviction 'lfu', fewest shows, then largest unseen_days; ties in any
order) go to the tier in one batch, down to 60% of the budget, and leave
the arena and the key map; the rows the operation itself touched go last.
Finding the coldest rows is a scan of the arena (a partition, not a sort,
over column views of every row below row_bound, free rows masked out), so
it happens once per 40% of the budget of new rows, not on every call: on
the Zipf stream of bench/tiered.py with eviction 'lfu', 60% gave 0.44-0.45x
the all-RAM speed against 0.41-0.42x for 80% and 0.40-0.41x for 50% (fewer
scans against a smaller hot set on average); once the scan and the tier got
cheaper, 60%, 75% and 85% measured the same within the noise (a spill to
97% cuts the cold reads by only a fifth: most are tail keys coming back).
A training pull, a push or a GEO delta of a cold key brings it back in the
same vectorized call; a read-only pull reads it where it is. A cold record
is the row's float32 record followed by its embedx flag, so unseen days,
scores and rule state travel with it and the tier-wide operations update
them in batches.

The budget counts the arena and its key map as they really grow: a row's
record, key and embedx flag, and the map's slot table, a power of two of
16-byte slots that doubles past 70% load. The rows a request adds enter the
arena before the spill that follows it, so the budget keeps room for one
request's new keys of up to an eighth of the hot rows (in the arena and the
map) rather than let the map double: with 24 bytes of index per row and no
room, a 50M-key table under a 2600 MiB budget peaked at 4554 MiB RSS, its
maps twice the size counted; counted this way, at 3741 MiB (bench/tiered.py,
before the ssd tier kept its key index in RAM). Not counted: a map's first
1024 slots (16 KiB), the cold index (~33 bytes per cold key: a 50M-key table
now needs memory_budget_mb=1300 to peak under 4 GiB), and RocksDB's own
memory (see shoal.ps.tiers.ssd).

The cold index: a tier answers which keys it holds in RAM (the ssd tier's
key index, see shoal.ps.tiers.ssd), so a key that missed the arena costs a
disk read only if it is cold; most such keys are new. The index is outside
the budget and reported as the tier's `ram_bytes`.

Restart: a tiered table starts EMPTY in both tiers. A new table opens an
empty storage tier, which drops whatever rows an earlier server process
left there (RocksDB: the column family is dropped and made anew, no
per-key pass). That server's hot rows died with it, so its cold rows alone
are a state the table never was in; the last checkpoint brings every row
back (load -> SparseTable.load_rows), and the RocksDB WAL is what lets the
dead server's database open cleanly for its successor.
"""
from __future__ import annotations

import numpy as np

from shoal.ps.tiers._base import StorageTier, make_tier

BATCH = 65536       # rows per batch when a tier-wide operation walks the cold rows
_LOW_WATER = 0.6    # a spill goes down to this share of the budget (measured: see above)
_SLOT_BYTES = 16    # a KeyMap slot: key and row + 1 (csrc/keymap.cpp)
_MAX_LOAD = 0.7     # the KeyMap doubles its slots when a key would pass this load
_ROOM = 1 / 8       # room for one request's new rows, as a share of the budget's rows


def budget_rows(budget_bytes: float, row_bytes: int) -> int:
    """The most hot rows (at least 1) that fit `budget_bytes` with room for a request's new rows:
    (1 + _ROOM) * rows * row_bytes of arena plus the slot table of a map that holds
    (1 + _ROOM) * rows keys without growing."""
    best, slots = 1, 16
    while slots * _SLOT_BYTES < budget_bytes:
        by_map = slots * _MAX_LOAD / (1 + _ROOM)
        by_bytes = (budget_bytes - slots * _SLOT_BYTES) / (row_bytes * (1 + _ROOM))
        best = max(best, int(min(by_map, by_bytes)))
        slots *= 2
    return best


def _ordered_bits(x: np.ndarray) -> np.ndarray:
    """uint64 codes of float32 `x` that sort as the floats do (sign bit flipped for x >= 0, all
    bits for x < 0)."""
    bits = np.ascontiguousarray(x, np.float32).view(np.uint32)
    flip = np.where(bits >> np.uint32(31), np.uint32(0xFFFFFFFF), np.uint32(0x80000000))
    return (bits ^ flip).astype(np.uint64)


def _order_key(first: np.ndarray, second: np.ndarray) -> np.ndarray:
    """One uint64 per row that orders rows by `first`, then `second` (float32 each)."""
    return (_ordered_bits(first) << np.uint64(32)) | _ordered_bits(second)


def _smallest(sort_key: np.ndarray, live: np.ndarray, last: np.ndarray, n: int) -> np.ndarray:
    """Positions of the `n` smallest of `sort_key` among the `live` ones, taking those flagged
    `last` only once the others are all taken. O(len) (a partition, not a sort: a lexsort of the
    arena cost more than the rest of a spill together)."""
    first = np.flatnonzero(live & ~last)
    if n >= len(first):
        rest = np.flatnonzero(live & last)
        k = n - len(first)
        if 0 < k < len(rest):
            rest = rest[np.argpartition(sort_key[rest], k - 1)[:k]]
        return np.concatenate([first, rest[:k]])
    if n <= 0:
        return first[:0]
    return first[np.argpartition(sort_key[first], n - 1)[:n]]


class ColdRows:
    """The tier of one shard and the budget of its arena. Not thread-safe: under the shard's lock."""

    def __init__(self, shard, index: int, server: int):
        spec = shard.spec
        self.shard, self.spec = shard, spec
        self.width = shard.width + 1
        self.budget_rows = budget_rows(spec.memory_budget_mb * 2 ** 20 / spec.shards,
                                       4 * shard.width + 8 + 1)
        self.low_rows = max(1, int(self.budget_rows * _LOW_WATER))
        self.tier: StorageTier = make_tier(spec.storage, width=self.width, table=spec.name,
                                           shard=index, server=server, path=spec.ssd_path)

    # -- the two tiers ---------------------------------------------------------------
    def _records(self, rows: np.ndarray) -> np.ndarray:
        sh = self.shard
        rec = np.empty((len(rows), self.width), np.float32)
        rec[:, :sh.width] = sh.values[rows]
        rec[:, sh.width] = sh.has_embedx[rows]
        return rec

    def promote(self, keys: np.ndarray) -> np.ndarray:
        """Move the cold ones of `keys` (unique, absent from the arena) into the arena; their rows,
        -1 for keys the tier does not hold."""
        rows = np.full(len(keys), -1, np.int64)
        if len(self.tier) == 0 or len(keys) == 0:
            return rows
        found, rec = self.tier.take(keys)
        at = np.flatnonzero(found)
        if len(at) == 0:
            return rows
        sh = self.shard
        rec, k = rec[at], keys[at]
        r, _ = sh.map.get_or_insert(k)
        sh._grow(sh.map.row_bound)
        sh.row_keys[r] = k
        sh.values[r] = rec[:, :sh.width]
        sh.has_embedx[r] = rec[:, sh.width] != 0
        rows[at] = r
        return rows

    def read(self, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(found, embeddings [n, dim]) of the cold ones of `keys`, leaving them cold."""
        found, rec = self.tier.get(keys)
        return found, rec[:, :self.spec.dim]

    def spill(self, touched: np.ndarray) -> int:
        """If the arena is over budget, move its coldest rows to the tier; returns rows moved.

        The rows the calling operation `touched` (row ids, -1 ignored) go last, so a row just
        promoted or created is not sent straight back."""
        sh = self.shard
        if len(sh.map) <= self.budget_rows:
            return 0
        # candidates in ROW order: tied rows (all new rows look alike) are then taken in an
        # order unrelated to the map's slots (a key's slot is its hash), so erasing them leaves
        # no run of a linear-probing map nearly full (inserts there would probe for ever: a 50M-key
        # table stalled so when ties were taken in slot order). The keys are computed over every
        # row below row_bound (column views, no gathers; free rows are masked out): most are live.
        live = sh.map.in_use()
        recent = np.zeros(len(live), bool)
        recent[touched[touched >= 0]] = True
        v = sh.values[:len(live)]
        unseen = -v[:, sh.unseen]  # more unseen days: colder
        if self.spec.eviction == "lfu":
            sort_key = _order_key(v[:, sh.show], unseen)
        else:
            sort_key = _order_key(unseen, self.spec.score(v[:, sh.show], v[:, sh.click]))
        pick = _smallest(sort_key, live, recent, len(sh.map) - self.low_rows)
        keys = sh.row_keys[pick]
        self.tier.put(keys, self._records(pick))
        sh.map.erase(keys)
        return len(pick)

    def forget(self, keys: np.ndarray) -> None:
        """Drop the cold copies of `keys` (a load puts them in the arena)."""
        self.tier.delete(keys[self.tier.contains(keys)])

    # -- tier-wide operations ----------------------------------------------------------
    def shrink(self) -> int:
        """The shard's shrink over the cold rows: decay, then delete the dead; returns rows deleted."""
        sh, spec = self.shard, self.spec
        decay = np.float32(spec.show_click_decay_rate)
        deleted = 0
        for keys, rec in self.tier.batches(BATCH):
            rec[:, sh.show] *= decay
            rec[:, sh.click] *= decay
            score = spec.score(rec[:, sh.show], rec[:, sh.click])
            dead = (score < spec.delete_threshold) | (rec[:, sh.unseen] > spec.delete_after_unseen_days)
            self.tier.put(keys[~dead], rec[~dead])
            self.tier.delete(keys[dead])
            deleted += int(dead.sum())
        return deleted

    def day_tick(self) -> None:
        for keys, rec in self.tier.batches(BATCH):
            rec[:, self.shard.unseen] += 1.0
            self.tier.put(keys, rec)

    def export(self, mode: int) -> list[dict[str, np.ndarray]]:
        """The cold rows a save of `mode` writes, as `SparseShard.export` parts (mode 1 resets their
        delta score in the tier)."""
        sh = self.shard
        parts = []
        for keys, rec in self.tier.batches(BATCH):
            block = rec[:, :sh.width]
            keep = sh._keep(block, mode)
            if keep is not None:
                keys, rec, block = keys[keep], rec[keep], block[keep]
            parts.append(sh._named(keys, block, rec[:, sh.width] != 0))
            if mode == 1 and len(keys):
                rec[:, sh.delta] = 0.0
                self.tier.put(keys, rec)
        return parts

    def checksum(self) -> float:
        return float(sum(rec[:, :self.shard.width].astype(np.float64).sum()
                         for _, rec in self.tier.batches(BATCH)))

    def stats(self) -> dict:
        return {"rows": len(self.tier), "bytes": self.tier.nbytes(),
                "ram_bytes": self.tier.ram_bytes(), "budget_rows": self.budget_rows}

    def close(self) -> None:
        self.tier.close()

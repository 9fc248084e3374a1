"""The `memory` tier: cold records in a compact RAM arena (a KeyMap and one float32 array).

It bounds the hot arena without a disk, and it is the reference the `ssd`
tier is tested against: same contract, no files.
"""
from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from shoal.ps._keymap import KeyMap
from shoal.ps.tiers._base import StorageTier, register_tier


class MemoryTier(StorageTier):
    """Records in RAM; freed slots are reused. Lost when the process ends."""

    def __init__(self, width: int):
        super().__init__(width)
        self.map = KeyMap()
        self.records = np.zeros((0, width), np.float32)

    @classmethod
    def open(cls, *, width, table, shard, server, path) -> MemoryTier:
        return cls(width)

    def contains(self, keys):
        return self.map.lookup(keys) >= 0

    def get(self, keys):
        return self._at(self.map.lookup(keys))

    def take(self, keys):
        return self._at(self.map.erase(keys))  # the freed rows keep their records until reused

    def _at(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        found = rows >= 0
        out = np.zeros((len(rows), self.width), np.float32)
        out[found] = self.records[rows[found]]
        return found, out

    def put(self, keys, records):
        rows, _ = self.map.get_or_insert(keys)
        if self.map.row_bound > len(self.records):
            grown = np.zeros((max(self.map.row_bound, 2 * len(self.records)), self.width), np.float32)
            grown[:len(self.records)] = self.records
            self.records = grown
        self.records[rows] = records

    def delete(self, keys):
        self.map.erase(keys)

    def batches(self, size: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        keys, rows = self.map.items()
        snapshot = self.records[rows]
        for start in range(0, len(keys), size):
            yield keys[start:start + size], snapshot[start:start + size]

    def __len__(self) -> int:
        return len(self.map)

    def ram_bytes(self) -> int:
        return 16 * self.map.capacity + self.records.nbytes

    def close(self) -> None:
        self.map.clear()
        self.records = np.zeros((0, self.width), np.float32)


register_tier("memory", MemoryTier)

"""Key partitioning and counter-based hashing over uint64 keys (vectorized numpy).

`key % n` is skewed for structured ids (slot prefixes, strided ids), so keys
go to servers (and to shards inside a server) by a splitmix64 mix. The same
mix, keyed by a table seed, makes a new row's initial values a pure function
of (seed, key): reproducible runs and exact resharding.
"""
from __future__ import annotations

import numpy as np

PARTITION_HASH = "splitmix64-mod"
PARTITION_VERSION = 1

_C1 = np.uint64(0xBF58476D1CE4E5B9)
_C2 = np.uint64(0x94D049BB133111EB)
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def splitmix64(x: np.ndarray) -> np.ndarray:
    """The splitmix64 finalizer, elementwise over a uint64 array (wrapping arithmetic)."""
    z = np.asarray(x, dtype=np.uint64) + _GOLDEN
    z = (z ^ (z >> np.uint64(30))) * _C1
    z = (z ^ (z >> np.uint64(27))) * _C2
    return z ^ (z >> np.uint64(31))


def partition(keys: np.ndarray, n: int) -> np.ndarray:
    """The server (0..n-1) that owns each key: splitmix64(key) mod n, as int64."""
    if n <= 0:
        raise ValueError(f"partition: the number of servers must be positive, got {n}")
    if n == 1:
        return np.zeros(len(keys), dtype=np.int64)
    return (splitmix64(keys) % np.uint64(n)).astype(np.int64)


def shard_of(keys: np.ndarray, n_shards: int) -> np.ndarray:
    """The shard inside a server: the high bits of a second mix, independent of `partition`."""
    if n_shards == 1:
        return np.zeros(len(keys), dtype=np.int64)
    return ((splitmix64(splitmix64(keys)) >> np.uint64(40)) % np.uint64(n_shards)).astype(np.int64)


def uniform_rows(seed: int, keys: np.ndarray, width: int, low: float, high: float,
                 offset: int = 0) -> np.ndarray:
    """float32 rows [len(keys), width] uniform in [low, high), a pure function of
    (seed, key, offset + column): the same key always starts with the same values."""
    base = splitmix64(np.asarray(keys, dtype=np.uint64) ^ splitmix64(np.array([seed], np.uint64)))
    cols = np.arange(offset, offset + width, dtype=np.uint64) * _GOLDEN
    bits = splitmix64(base[:, None] + cols[None, :])
    unit = (bits >> np.uint64(40)).astype(np.float32) * np.float32(1.0 / (1 << 24))
    return (low + (high - low) * unit).astype(np.float32)

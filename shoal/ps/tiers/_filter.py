"""A known-cold filter: which keys a shard's storage tier may hold, answered in RAM.

Most keys a training pull misses in the arena are new, in no tier at all;
asking RocksDB about them costs a multi-get of a few microseconds per key
(measured with rocksdict on this machine, bench/tiered.py). The filter
answers "surely not cold" for them with one random memory read per key.

It is a blocked Bloom filter (one 64-bit word per key, five bits set in
it, 16 bits per key of capacity: 0.4-0.5% false positives when full,
measured), grown by levels: when a level has taken its capacity of
distinct keys, a new level of twice the capacity starts, and a lookup asks
every level (a handful at most: the levels double). It never forgets a key
by itself: a key that left the tier (promoted, deleted) is a false
positive (a wasted tier lookup, never a wrong answer) until the owner
replaces the filter by one built from the keys the tier holds (ColdRows
does at every shrink, which reads them all anyway). Every operation is vectorized; none loops over keys.
"""
from __future__ import annotations

import numpy as np

from shoal.ps.partition import splitmix64

BITS_PER_KEY = 16
_K = 5                              # bits set per key, each from 6 bits of the hash
_SALT = np.uint64(0xD6E8FEB86659FD93)  # keeps the filter's hash independent of shard_of's
_MAX_WORD_BITS = 64 - 6 * _K        # the word index uses the hash's top bits
_SIX = np.uint64(63)


def _hash(keys: np.ndarray) -> np.ndarray:
    return splitmix64(keys ^ _SALT)


def _masks(h: np.ndarray) -> np.ndarray:
    m = np.uint64(1) << (h & _SIX)
    for i in range(1, _K):
        m |= np.uint64(1) << ((h >> np.uint64(6 * i)) & _SIX)
    return m


class _Level:
    """One Bloom filter of a fixed number of words (a power of two)."""

    def __init__(self, capacity: int):
        bits = max(6, min(_MAX_WORD_BITS, int(np.ceil(np.log2(capacity * BITS_PER_KEY / 64)))))
        self.shift = np.uint64(64 - bits)
        self.words = np.zeros(1 << bits, np.uint64)
        self.capacity = (len(self.words) * 64) // BITS_PER_KEY
        self.count = 0

    def test(self, h: np.ndarray, m: np.ndarray) -> np.ndarray:
        return (self.words[h >> self.shift] & m) == m

    def add(self, h: np.ndarray, m: np.ndarray) -> None:
        np.bitwise_or.at(self.words, h >> self.shift, m)


class KeyFilter:
    """May `keys` be in the tier? False means surely not; True means maybe (ask the tier).

    Not thread-safe (used under the shard's lock, like the tier).
    """

    def __init__(self, capacity: int = 1 << 16):
        self.initial = max(1024, int(capacity))
        self.clear()

    def clear(self) -> None:
        """Forget every key."""
        self.levels = [_Level(self.initial)]

    def may_contain(self, keys: np.ndarray) -> np.ndarray:
        """bool [len(keys)]: False where the key was surely never added (since the last clear)."""
        h = _hash(keys)
        m = _masks(h)
        found = self.levels[0].test(h, m)
        for level in self.levels[1:]:
            found |= level.test(h, m)
        return found

    def add(self, keys: np.ndarray) -> None:
        """Remember `keys` (unique)."""
        if len(keys) == 0:
            return
        h = _hash(keys)
        m = _masks(h)
        top = self.levels[-1]
        # count the keys no level knows yet, so keys that come and go do not fill a level
        known = top.test(h, m)
        for level in self.levels[:-1]:
            known |= level.test(h, m)
        new = int(len(keys) - known.sum())
        if top.count + new > top.capacity:
            top = _Level(max(2 * top.capacity, new))
            self.levels.append(top)
        top.add(h, m)
        top.count += new

    @property
    def nbytes(self) -> int:
        return sum(level.words.nbytes for level in self.levels)

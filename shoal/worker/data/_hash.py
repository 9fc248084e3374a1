"""splitmix64, over numpy uint64 arrays and Python ints: counter-based draws and shuffle destinations."""
from __future__ import annotations

import numpy as np

_MASK = (1 << 64) - 1
GOLDEN = 0x9E3779B97F4A7C15
_M1, _M2 = 0xBF58476D1CE4E5B9, 0x94D049BB133111EB


def mix64(z: np.ndarray) -> np.ndarray:
    """The splitmix64 finalizer of every element of a uint64 array (wrapping arithmetic)."""
    z = np.asarray(z, dtype=np.uint64)
    z = z ^ (z >> np.uint64(30))
    z = z * np.uint64(_M1)
    z ^= z >> np.uint64(27)
    z *= np.uint64(_M2)
    z ^= z >> np.uint64(31)
    return z


def mix64_int(x: int) -> int:
    """splitmix64's finalizer of one Python int (taken mod 2**64)."""
    z = x & _MASK
    z = ((z ^ (z >> 30)) * _M1) & _MASK
    z = ((z ^ (z >> 27)) * _M2) & _MASK
    return z ^ (z >> 31)


def key(*words: int) -> int:
    """One 64-bit key from several integers (seed, stream, slot, ...), each mixed in turn."""
    h = 0
    for w in words:
        h = mix64_int(h ^ ((w * GOLDEN) & _MASK))
    return h


def counter_uniform(base: int, counters: np.ndarray) -> np.ndarray:
    """Uniforms in (0, 1), float64: a pure function of (base, counter) for every counter."""
    h = mix64(np.uint64(base) + np.asarray(counters, dtype=np.uint64) * np.uint64(GOLDEN))
    return ((h >> np.uint64(11)).astype(np.float64) + 0.5) * (1.0 / (1 << 53))

"""glibc malloc settings that stop numpy's large temporaries from page-faulting.

By default glibc serves blocks over a dynamic threshold (128 KiB at start)
with mmap and gives freed memory back to the kernel, so every training step
re-faults the pages of its ~1 MiB activations and gradients. Keeping such
blocks on the heap and keeping the freed heap cut the MLP step of
bench/engine.py from ~13 ms to ~9 ms here, for the engine and for plain numpy
alike (what jemalloc/tcmalloc are recommended for in other frameworks).

Applied once when shoal.kernels is imported; set SHOAL_MALLOC_TUNE=0 to keep
the C library's defaults. A no-op where libc has no mallopt (musl, macOS).
"""
from __future__ import annotations

import ctypes
import ctypes.util
import mmap
import os

import numpy as np

_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3

MMAP_THRESHOLD = 32 << 20   # blocks below 32 MiB come from the heap (glibc's maximum)
TRIM_THRESHOLD = 512 << 20  # give memory back only when 512 MiB lie free at the heap top
TOP_PAD = 16 << 20          # grow the heap 16 MiB at a time


def _libc():
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        return ctypes.CDLL(name)
    except OSError:
        return None


def mapped_zeros(shape: tuple, dtype) -> np.ndarray:
    """Zeros in an anonymous mapping of their own (large arrays; small ones come from numpy).

    Pages become resident only when written, and when the array is dropped the
    mapping goes back to the kernel at once: for arrays that grow by copying
    (table arenas), which the tuned heap would otherwise keep resident.
    """
    nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
    if nbytes < (1 << 20):
        return np.zeros(shape, dtype)
    return np.frombuffer(mmap.mmap(-1, nbytes), dtype).reshape(shape)


def tune_for_server() -> bool:
    """A server's settings: blocks of 1 MiB and more are mmapped and given back when freed,
    and free heap above 64 MiB is trimmed. A server's big temporaries (a GEO delta, a large
    pull) come in bursts, and its resident size is what a cluster plans for."""
    libc = _libc()
    mallopt = getattr(libc, "mallopt", None) if libc is not None else None
    if mallopt is None or os.environ.get("SHOAL_MALLOC_TUNE", "1") == "0":
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    return all(mallopt(opt, value) == 1 for opt, value in (
        (_M_MMAP_THRESHOLD, 1 << 20), (_M_TRIM_THRESHOLD, 64 << 20), (_M_TOP_PAD, 1 << 20)))


def release_free_memory() -> bool:
    """Give the heap's free memory back to the kernel now (glibc's malloc_trim).

    The tuned heap keeps freed blocks for the next step's temporaries; after a
    one-off burst (loading a dataset, a big pull) call this so the process
    does not stay at its peak. True if the C library has malloc_trim.
    """
    libc = _libc()
    trim = getattr(libc, "malloc_trim", None) if libc is not None else None
    if trim is None:
        return False
    trim.argtypes = [ctypes.c_size_t]
    trim(0)
    return True


def tune_allocator() -> bool:
    """Apply the settings above; True if the C library took all of them."""
    if os.environ.get("SHOAL_MALLOC_TUNE", "1") == "0":
        return False
    libc = _libc()
    mallopt = getattr(libc, "mallopt", None) if libc is not None else None
    if mallopt is None:
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    return all(mallopt(opt, value) == 1 for opt, value in (
        (_M_MMAP_THRESHOLD, MMAP_THRESHOLD), (_M_TRIM_THRESHOLD, TRIM_THRESHOLD),
        (_M_TOP_PAD, TOP_PAD)))

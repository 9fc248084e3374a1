"""InMemoryDataset: load this worker's files into memory, shuffle them (locally or across workers), batch."""
from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Sequence

import numpy as np

from shoal.kernels import release_free_memory
from shoal.worker.data._hash import key, mix64
from shoal.worker.data.batch import Batch
from shoal.worker.data.dataset import DatasetBase
from shoal.worker.data.errors import DataError

Exchange = Callable[[list[Batch]], Sequence[Batch]]


def _seed(seed: int | None) -> int:
    if seed is None:
        return int(np.random.SeedSequence().generate_state(1, np.uint64)[0])
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise DataError(f"seed={seed!r}: expected an int >= 0 or None")
    return int(seed)


def shuffle_destinations(seed: int, worker_index: int, n_samples: int, worker_num: int) -> np.ndarray:
    """int64 [n_samples]: the worker each local sample goes to in a global shuffle.

    A hash of (seed, worker_index, local position): deterministic, about
    uniform, and independent of every other worker's data.
    """
    pos = np.arange(n_samples, dtype=np.uint64)
    return (mix64(np.uint64(key(seed, worker_index, 0x5348)) ^ pos) % np.uint64(worker_num)).astype(np.int64)


class InMemoryDataset(DatasetBase):
    """Paddle's InMemoryDataset: this worker's files in memory as one sample block.

    Example:
        >>> ds = InMemoryDataset()
        >>> ds.init(batch_size=512, thread_num=4, use_var=SlotList.ctr())
        >>> ds.set_filelist(files, worker_index=rank, worker_num=n_workers)
        >>> ds.load_into_memory()
        >>> ds.global_shuffle(exchange=all_to_all, seed=epoch)   # or ds.local_shuffle(seed=epoch)
        >>> for batch in ds:                                     # Batch objects of 512 samples
        ...     train(batch)
        >>> ds.release_memory()

    Thread-safety: not thread-safe; one thread configures, loads and shuffles.
    A running iteration keeps the block it started with, so a shuffle during
    it does not change what it yields.
    """

    def __init__(self, **settings):
        super().__init__(**settings)
        self._block: Batch | None = None
        self._order: np.ndarray | None = None  # a local shuffle not applied to the columns yet
        self._shuffle_size = 0
        self._preload: threading.Thread | None = None
        self._preload_error: BaseException | None = None

    # ---- loading ----

    def load_into_memory(self) -> None:
        """Read all of this worker's files (in order) into memory, replacing what was there.

        Raises:
            DataError: no slots or files set, a file cannot be read;
            BadLineError, PipeCommandError: see `MultiSlotReader`.
        """
        self._wait_preload()
        self._block, self._order = None, None
        reader = self._new_reader()
        self._block = reader.read_files(self._files)
        self._shuffle_size = 0
        release_free_memory()  # the parser's chunk buffers are gone: do not keep them resident

    def preload_into_memory(self) -> None:
        """Start `load_into_memory` on a background thread; `wait_preload_done()` waits for it."""
        self._wait_preload()
        self._new_reader()  # settings errors surface here, in the caller's thread
        self._preload_error = None

        def run():
            try:
                self.load_into_memory()
            except BaseException as e:  # handed to wait_preload_done
                self._preload_error = e

        # not a daemon: a daemon thread inside the native parser at interpreter exit is unwound by
        # pthread_exit through C++ frames (std::terminate); exit waits for the parse instead
        self._preload = threading.Thread(target=run, name="shoal-preload", daemon=False)
        self._preload.start()

    def wait_preload_done(self) -> None:
        """Wait for `preload_into_memory`; re-raise its error, if any."""
        t, self._preload = self._preload, None
        if t is not None:
            t.join()
        err, self._preload_error = self._preload_error, None
        if err is not None:
            raise err

    def _wait_preload(self) -> None:
        if self._preload is not None and self._preload is not threading.current_thread():
            self.wait_preload_done()

    def release_memory(self) -> None:
        """Drop the samples held in memory (load again before iterating)."""
        self._wait_preload()
        self._block, self._order = None, None
        self._shuffle_size = 0
        release_free_memory()

    @property
    def block(self) -> Batch:
        """All samples in memory, as one Batch (do not modify it in place)."""
        return self._require_block()

    def _loaded(self) -> Batch:
        """The samples in memory, in load order or after the last applied shuffle."""
        self._wait_preload()
        if self._block is None:
            raise DataError("InMemoryDataset has no data in memory: call load_into_memory() first "
                            "(or again after release_memory())")
        return self._block

    def _require_block(self) -> Batch:
        """The samples in memory in their shuffled order (applying a pending local shuffle)."""
        block = self._loaded()
        if self._order is not None:
            order, self._order = self._order, None
            self._block = None
            self._block = block = block.take(order, consume=True)
            release_free_memory()
        return block

    @property
    def sparse_slots(self) -> list[str]:
        """The names of the sparse slots in memory, sorted."""
        return sorted(self._loaded().sparse)

    def slot_values(self, names: Sequence[str], start: int = 0, stop: int | None = None) -> np.ndarray:
        """The ids of sparse slots `names` in samples [start, stop) of the order `batches()`
        yields (a pending shuffle included, without applying it), as one uint64 array in no
        particular order. Pass mode scans a pass's keys with it."""
        block, order = self._loaded(), self._order
        missing = [n for n in names if n not in block.sparse]
        if missing:
            raise DataError(f"slot_values: {missing} are not sparse slots of this dataset (its "
                            f"sparse slots: {sorted(block.sparse)})")
        stop = block.size if stop is None else min(stop, block.size)
        start = max(0, min(start, stop))
        whole = start == 0 and stop == block.size  # every sample: the order does not matter
        idx = None if whole else (order[start:stop] if order is not None else None)
        parts = []
        for name in names:
            r = block.sparse[name]
            if whole:
                parts.append(r.values)
            elif idx is None:
                parts.append(r.slice(start, stop).values)
            else:
                parts.append(r.take(idx).values)
        return np.concatenate(parts).astype(np.uint64, copy=False) if parts else np.zeros(0, np.uint64)

    def get_memory_data_size(self) -> int:
        """Samples held in memory by this worker (0 before loading)."""
        return 0 if self._block is None else self._block.size

    def get_shuffle_data_size(self) -> int:
        """Samples this worker holds after its last local or global shuffle (0 if none since loading)."""
        return self._shuffle_size

    def __len__(self) -> int:
        return self.get_memory_data_size()

    # ---- shuffling ----

    def local_shuffle(self, seed: int | None = None) -> None:
        """Permute the samples in memory (seeded: the same seed gives the same order).

        Returns at once: the permutation is kept, and `batches()` gathers each
        batch's samples as it goes (no second copy of the data, no pause before
        the first batch); `block` applies it to the columns when asked.
        """
        block = self._loaded()
        perm = np.random.default_rng(_seed(seed)).permutation(block.size)
        self._order = perm if self._order is None else self._order[perm]
        self._shuffle_size = block.size

    def global_shuffle(self, exchange: Exchange | None = None, seed: int | None = None, *,
                       worker_index: int | None = None, worker_num: int | None = None) -> None:
        """Shuffle samples across all workers, then locally.

        Every sample goes to the worker given by `shuffle_destinations` (a
        hash of seed, this worker's index and the sample's position), through
        `exchange`, then each worker permutes what it received (seeded by
        seed and its index). Every sample ends on exactly one worker.

        Args:
            exchange: ``all_to_all(parts) -> received``: parts[j] goes to
                worker j; returns the blocks every worker sent to this one,
                in rank order (its own part included): ``fleet.all_to_all``,
                or the fleet module itself (Paddle's ``global_shuffle(fleet)``).
                None (or one worker): a local shuffle.
            seed: every worker must pass the same seed for a reproducible
                shuffle; None draws one (this worker's order is then random).
            worker_index, worker_num: default to those of `set_filelist`.

        Blocking: as long as `exchange` blocks (a collective: all workers
        must call it).

        Raises:
            DataError: nothing loaded, a worker count unknown for an exchange,
                or an exchange that returns the wrong number or kind of blocks.
        """
        block = self._require_block()
        if hasattr(exchange, "all_to_all"):  # Paddle's spelling: dataset.global_shuffle(fleet)
            fleet = exchange
            worker_index = fleet.worker_index() if worker_index is None else worker_index
            worker_num = fleet.worker_num() if worker_num is None else worker_num
            exchange = fleet.all_to_all
        rank = self.worker_index if worker_index is None else worker_index
        n = self.worker_num if worker_num is None else worker_num
        if isinstance(n, bool) or not isinstance(n, int) or n < 1 or not 0 <= rank < n:
            raise DataError(f"global_shuffle: worker_index={rank!r}, worker_num={n!r}: expected 0 <= index < num")
        seed = _seed(seed)
        if exchange is None or n == 1:
            self.local_shuffle(key(seed, rank))
            return
        dest = shuffle_destinations(seed, rank, block.size, n)
        order = np.argsort(dest, kind="stable")
        bounds = np.zeros(n + 1, dtype=np.int64)
        np.cumsum(np.bincount(dest, minlength=n), out=bounds[1:])
        grouped = block.take(order)
        parts = [grouped.slice(int(bounds[j]), int(bounds[j + 1])) for j in range(n)]
        received = list(exchange(parts))
        if len(received) != n or not all(isinstance(b, Batch) for b in received):
            raise DataError(f"global_shuffle: exchange returned {len(received)} item(s) "
                            f"({sorted({type(b).__name__ for b in received})}); expected {n} Batch blocks, "
                            "one from every worker in rank order")
        bad = [i for i, b in enumerate(received) if b.slots != block.slots]
        if bad:
            raise DataError(f"global_shuffle: blocks from worker(s) {bad} have other slots than this worker's "
                            f"({block.slots!r}); every worker must read with the same use_var")
        self._block = block = grouped = parts = None
        merged = Batch.concat(received, consume=True)
        del received
        rng = np.random.default_rng(key(seed, rank, 1))
        self._block = merged.take(rng.permutation(merged.size), consume=True)
        self._shuffle_size = self._block.size

    # ---- batches ----

    def num_batches(self, batch_size: int | None = None, drop_last: bool | None = None) -> int:
        """How many batches `batches()` yields from the start."""
        bs, _, drop = self._batch_args(batch_size, 0, drop_last)
        n = self._loaded().size
        return n // bs if drop else -(-n // bs)

    def batches(self, batch_size: int | None = None, skip: int = 0,
                drop_last: bool | None = None) -> Iterator[Batch]:
        """Batches of `batch_size` samples (default: the dataset's), in memory order.

        The last batch is partial unless drop_last. `skip` skips the first
        `skip` batches (resuming from a data offset); past the end yields
        nothing. Batches are views of the block: cheap, read-only by contract.

        Raises:
            DataError: nothing loaded, or bad arguments (raised here, not at the first next()).
        """
        bs, skip, drop = self._batch_args(batch_size, skip, drop_last)
        # a view of the columns of its own: applying a shuffle later (block, global_shuffle)
        # consumes the dataset's block, never what this iteration reads
        block, order = self._loaded(), self._order
        block = block.slice(0, block.size)
        total = block.size // bs if drop else -(-block.size // bs)
        if order is not None:  # a pending local shuffle: each batch gathers its samples
            return (block.take(order[i * bs:(i + 1) * bs]) for i in range(skip, total))
        return (block.slice(i * bs, (i + 1) * bs) for i in range(skip, total))

    def __iter__(self) -> Iterator[Batch]:
        return self.batches()

"""QueueDataset: stream this worker's files in order, parsing ahead on a background thread."""
from __future__ import annotations

import queue
import threading
from collections.abc import Iterator

from shoal.worker.data.batch import Batch
from shoal.worker.data.dataset import DatasetBase
from shoal.worker.data.errors import DataError
from shoal.worker.data.reader import MultiSlotReader

_POLL_S = 0.05  # how often a blocked put/get looks at the stop flag / the producer's liveness
_JOIN_S = 30.0


class _End:
    pass


class _Failure:
    def __init__(self, error: BaseException):
        self.error = error


def _put(q: queue.Queue, item, stop: threading.Event) -> bool:
    while not stop.is_set():
        try:
            q.put(item, timeout=_POLL_S)
            return True
        except queue.Full:
            continue
    return False


def _produce(files: list[str], reader: MultiSlotReader, q: queue.Queue, stop: threading.Event) -> None:
    try:
        for path in files:
            blocks = reader.iter_file(path, stop=stop)
            try:
                for block in blocks:
                    if not _put(q, block, stop):
                        return
            finally:
                blocks.close()
            if stop.is_set():
                return
        _put(q, _End(), stop)
    except BaseException as e:  # handed to the consumer, raised there
        _put(q, _Failure(e), stop)


def _take(q: queue.Queue, thread: threading.Thread):
    while True:
        try:
            return q.get(timeout=_POLL_S)
        except queue.Empty:
            if not thread.is_alive() and q.empty():
                raise DataError("QueueDataset: the reader thread ended without a result") from None


def _batches(q: queue.Queue, thread: threading.Thread, batch_size: int, skip: int,
             drop_last: bool) -> Iterator[Batch]:
    pending: list[Batch] = []
    have = index = 0
    while True:
        item = _take(q, thread)
        if isinstance(item, _End):
            break
        if isinstance(item, _Failure):
            raise item.error
        pending.append(item)
        have += item.size
        if have < batch_size:
            continue
        block = Batch.concat(pending)
        n_full = block.size // batch_size
        for i in range(n_full):
            if index >= skip:
                yield block.slice(i * batch_size, (i + 1) * batch_size)
            index += 1
        rest = block.slice(n_full * batch_size, block.size)
        pending, have = ([rest], rest.size) if rest.size else ([], 0)
    if have and not drop_last and index >= skip:
        yield Batch.concat(pending)


class BatchStream:
    """An iterator of Batches read by a background thread; close it (or exhaust it) to stop the thread.

    `close()` (also called on exhaustion, on an error, by ``with`` and when the
    stream is garbage collected) stops the reader thread, kills a running
    pipe_command and joins the thread. Consumed by one thread.
    """

    def __init__(self, files: list[str], reader: MultiSlotReader, batch_size: int, skip: int, drop_last: bool,
                 queue_blocks: int):
        self._q: queue.Queue = queue.Queue(maxsize=queue_blocks)
        self._stop = threading.Event()
        # The thread holds only the queue, the flag and the reader, never this object, so
        # dropping the last reference to the stream closes it at once.
        self._thread = threading.Thread(target=_produce, args=(files, reader, self._q, self._stop),
                                        name="shoal-queue-dataset", daemon=True)
        self._thread.start()
        self._gen = _batches(self._q, self._thread, batch_size, skip, drop_last)
        self._closed = False

    def __iter__(self) -> "BatchStream":
        return self

    def __next__(self) -> Batch:
        if self._closed:
            raise StopIteration
        try:
            return next(self._gen)
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        """Stop and join the reader thread (idempotent)."""
        if self._closed:
            return
        self._closed = True
        self._stop.set()
        self._gen.close()
        while self._thread.is_alive():  # the producer may be blocked on a full queue: make room
            try:
                while True:
                    self._q.get_nowait()
            except queue.Empty:
                pass
            self._thread.join(_POLL_S)
        self._thread.join(_JOIN_S)

    @property
    def thread(self) -> threading.Thread:
        """The reader thread (for tests and diagnostics)."""
        return self._thread

    def __enter__(self) -> "BatchStream":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):
        if not getattr(self, "_closed", True):
            self.close()


class QueueDataset(DatasetBase):
    """Paddle's QueueDataset: this worker's files streamed in order, never all in memory.

    Iterating starts a reader thread that parses the next pieces of input
    (``chunk_bytes`` each, default 4 MiB; at most ``queue_blocks`` parsed
    pieces wait, default 4) while the consumer trains; it yields Batches of
    batch_size in file order (the last partial one unless drop_last). A bad
    line or a failing pipe_command raises in the consumer's thread. Stopping
    early (break, close(), an exception) joins the thread.

    Example:
        >>> ds = QueueDataset(batch_size=512, use_var=SlotList.ctr())
        >>> ds.set_filelist(files)
        >>> with ds.batches() as stream:
        ...     for batch in stream:
        ...         train(batch)
    """

    _chunk_bytes_default = 4 << 20

    def __init__(self, **settings):
        self.queue_blocks = 4
        super().__init__(**settings)

    def _settings(self) -> tuple[str, ...]:
        return super()._settings() + ("queue_blocks",)

    def _validate_extra(self, new: dict) -> None:
        v = new["queue_blocks"]
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise DataError(f"QueueDataset.init: queue_blocks={v!r}: expected an int >= 1")

    def batches(self, batch_size: int | None = None, skip: int = 0, drop_last: bool | None = None) -> BatchStream:
        """A `BatchStream` over this worker's files (`skip` skips the first batches, e.g. to resume).

        Raises:
            DataError: no slots or files set, bad arguments (here); bad lines and
                pipe failures surface from next().
        """
        bs, skip, drop = self._batch_args(batch_size, skip, drop_last)
        reader = self._new_reader()
        return BatchStream(list(self._files), reader, bs, skip, drop, self.queue_blocks)

    def __iter__(self) -> BatchStream:
        return self.batches()

    def local_shuffle(self, *args, **kwargs) -> None:
        raise DataError("QueueDataset streams its files in order and cannot shuffle; use InMemoryDataset "
                        "(load_into_memory, then local_shuffle / global_shuffle)")

    def global_shuffle(self, *args, **kwargs) -> None:
        self.local_shuffle()

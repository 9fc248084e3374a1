"""The MultiSlot text reader: files (or a pipe_command's output) -> Batches of samples.

The format (Paddle's MultiSlotDataFeed): every line holds, for every slot of
the slot list in order, ``<count> <values...>``, separated by spaces or tabs.
A dense slot's count must equal its dim; a sparse slot's count must be >= 1
(as in Paddle; pad an empty slot with a default id). CRLF line ends, trailing
spaces, blank lines (skipped, still counted for line numbers) and a last line
without newline are all fine. Floats are float32 (finite only: "nan"/"inf"
are bad lines), ids exact uint64.

The parsing itself is native (``_multislot``): a piece of input is split at
newlines into chunks parsed on up to `n_threads` threads with the GIL
released, then concatenated in order.
"""
from __future__ import annotations

import os
import threading
from collections.abc import Iterable, Iterator
from enum import Enum

from shoal.worker.data import _multislot
from shoal.worker.data._source import file_pieces, pipe_pieces
from shoal.worker.data.batch import Batch, Ragged, is_unit_offsets, unit_offsets
from shoal.worker.data.errors import BadLineError, DataError
from shoal.worker.data.slots import Slot, SlotList

_KIND = {("uint64", False): _multislot.SPARSE_UINT64, ("float", False): _multislot.SPARSE_FLOAT,
         ("float", True): _multislot.DENSE_FLOAT}


class OnBadLine(str, Enum):
    """What the reader does with a line that does not fit the slot list."""

    FAIL = "fail"  # raise BadLineError naming file:line, the slot and the problem
    SKIP = "skip"  # drop the line, count it, keep the first few messages


def default_threads() -> int:
    """min(4, usable cores): the default parse threads."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    return max(1, min(4, cores))


def _on_bad_line(value: OnBadLine | str) -> OnBadLine:
    try:
        return OnBadLine(value)
    except ValueError:
        raise DataError(f"on_bad_line={value!r}: expected one of {[m.value for m in OnBadLine]}") from None


class MultiSlotReader:
    """Reads MultiSlot text files into `Batch` blocks.

    Args:
        slots: the slot list (Paddle's ``use_var``), in line order.
        pipe_command: optional shell command that each file is piped through
            (the file on its stdin, its stdout parsed), e.g. "cat" or an awk
            script. Runs with ``shell=True``; its exit status is checked.
        on_bad_line: "fail" (default) raises `BadLineError`; "skip" drops bad
            lines, counting them in ``bad_lines`` and describing the first
            ``max_bad_examples`` in ``bad_line_examples``.
        n_threads: parse threads (default min(4, cores)).
        chunk_bytes: how much input is parsed at once (one Batch per piece
            from `iter_file`).
        min_chunk_bytes: smallest piece given to one thread (below it, fewer
            threads are used).

    Thread-safety: the counters are updated under a lock, so one reader may be
    used from several threads; each call works on its own data.

    Example:
        >>> reader = MultiSlotReader(SlotList.ctr(), on_bad_line="skip")
        >>> block = reader.read_file("part-00000.txt")
        >>> block.dense["label"].shape, block.sparse["C1"].nnz
    """

    def __init__(self, slots: SlotList | Iterable[Slot], *, pipe_command: str | None = None,
                 on_bad_line: OnBadLine | str = OnBadLine.FAIL, n_threads: int | None = None,
                 chunk_bytes: int = 32 << 20, min_chunk_bytes: int = 1 << 20, max_bad_examples: int = 10):
        self.slots = SlotList.of(slots)
        if pipe_command is not None and (not isinstance(pipe_command, str) or not pipe_command.strip()):
            raise DataError(f"pipe_command={pipe_command!r}: expected a non-empty shell command or None")
        self.pipe_command = pipe_command
        self.on_bad_line = _on_bad_line(on_bad_line)
        self.n_threads = default_threads() if n_threads is None else int(n_threads)
        if self.n_threads < 1:
            raise DataError(f"n_threads={n_threads}: expected >= 1")
        if chunk_bytes < 1 or min_chunk_bytes < 1:
            raise DataError(f"chunk_bytes={chunk_bytes}, min_chunk_bytes={min_chunk_bytes}: expected >= 1")
        self.chunk_bytes = int(chunk_bytes)
        self.min_chunk_bytes = int(min_chunk_bytes)
        self.max_bad_examples = int(max_bad_examples)
        self._spec = [(_KIND[(s.dtype, s.dense)], s.dim or 0) for s in self.slots]
        self._lock = threading.Lock()
        self.bad_lines = 0
        self.bad_line_examples: list[str] = []
        self.lines_read = 0
        self.samples_read = 0

    def reset_counts(self) -> None:
        """Zero bad_lines, bad_line_examples, lines_read and samples_read."""
        with self._lock:
            self.bad_lines, self.bad_line_examples, self.lines_read, self.samples_read = 0, [], 0, 0

    def _message(self, source: str, line: int, slot: int, reason: str) -> str:
        where = f"slot {self.slots[slot].name!r}: " if slot >= 0 else ""
        return f"{source}:{line}: {where}{reason}"

    def parse(self, data, source: str = "<bytes>", first_line: int = 1) -> Batch:
        """Parse whole MultiSlot lines from a bytes-like object.

        Args:
            data: bytes, bytearray, memoryview or mmap (the last line may lack its newline).
            source: the name used in messages (a file name).
            first_line: the line number of the first line of `data`.

        Raises:
            BadLineError: a bad line in fail mode.
        """
        return self._parse(data, source, first_line)[0]

    def _parse(self, data, source: str, first_line: int) -> tuple[Batch, int]:
        skip = self.on_bad_line is OnBadLine.SKIP
        r = _multislot.parse(data, self._spec, self.n_threads, skip, max(self.max_bad_examples, 1),
                             self.min_chunk_bytes)
        n, n_lines = r["n_samples"], r["n_lines"]
        if r["n_bad"] and not skip:
            line, slot, reason = r["bad"][0]
            raise BadLineError(source, first_line + line, self.slots[slot].name if slot >= 0 else None, reason)
        with self._lock:
            self.lines_read += n_lines
            self.samples_read += n
            if r["n_bad"]:
                self.bad_lines += r["n_bad"]
                room = self.max_bad_examples - len(self.bad_line_examples)
                self.bad_line_examples += [self._message(source, first_line + ln, s, why)
                                           for ln, s, why in r["bad"][:max(room, 0)]]
        dense, sparse = {}, {}
        for s, values, offsets in zip(self.slots, r["values"], r["offsets"]):
            if s.dense:
                dense[s.name] = values.reshape(n, s.dim)
            else:
                if len(values) == n and is_unit_offsets(offsets):  # share the offsets of single-id slots
                    offsets = unit_offsets(n)
                sparse[s.name] = Ragged(values, offsets, validate=False)
        return Batch(dense, sparse, self.slots, n, validate=False), n_lines

    def _source_name(self, path: str) -> str:
        return path if self.pipe_command is None else f"{path} (through pipe_command {self.pipe_command!r})"

    def iter_file(self, path: str | os.PathLike, chunk_bytes: int | None = None,
                  stop: threading.Event | None = None) -> Iterator[Batch]:
        """The samples of one file, one Batch per piece of about `chunk_bytes` (in file order).

        `stop` (optional) ends a pipe_command read early when set, even while
        the command is silent; the iterator then just ends.

        Raises:
            DataError: the file cannot be read.
            BadLineError: a bad line in fail mode.
            PipeCommandError: the pipe_command failed.

        Closing the iterator early closes the file (and kills the pipe_command).
        """
        path = os.fspath(path)
        size = chunk_bytes or self.chunk_bytes
        pieces = (file_pieces(path, size) if self.pipe_command is None
                  else pipe_pieces(self.pipe_command, path, size, stop))
        source = self._source_name(path)
        line = 1
        try:
            for piece in pieces:
                block, n_lines = self._parse(piece, source, line)
                line += n_lines
                del piece
                if block.size:
                    yield block
        finally:
            pieces.close()

    def read_file(self, path: str | os.PathLike) -> Batch:
        """All samples of one file as one Batch."""
        blocks = list(self.iter_file(path))
        return Batch.concat(blocks) if blocks else Batch.empty(self.slots)

    def read_files(self, paths: Iterable[str | os.PathLike]) -> Batch:
        """All samples of the files, in order, as one Batch."""
        blocks = [b for p in paths for b in self.iter_file(p)]
        return Batch.concat(blocks, consume=True) if blocks else Batch.empty(self.slots)


def parse_multislot(data, slots: SlotList | Iterable[Slot], **reader_kwargs) -> Batch:
    """Parse MultiSlot text held in memory (bytes or str) with a one-off `MultiSlotReader`."""
    if isinstance(data, str):
        data = data.encode()
    return MultiSlotReader(slots, **reader_kwargs).parse(data)


__all__ = ["MultiSlotReader", "OnBadLine", "parse_multislot", "default_threads"]

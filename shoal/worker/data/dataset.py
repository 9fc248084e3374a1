"""What InMemoryDataset and QueueDataset share: Paddle-style settings, the file list and its sharding."""
from __future__ import annotations

import os
from collections.abc import Iterable, Sequence

from shoal.worker.data.errors import DataError
from shoal.worker.data.reader import MultiSlotReader, OnBadLine, _on_bad_line, default_threads
from shoal.worker.data.slots import SlotList


def shard_files(files: Sequence[str], worker_index: int, worker_num: int) -> list[str]:
    """The files of worker `worker_index` out of `worker_num`: files i, i + n, i + 2n, ...

    Round-robin over the list as given (Paddle's file split), so with files
    sorted by name every worker reads a similar share and no two read the
    same file.

    Raises:
        DataError: worker_num < 1, worker_index outside [0, worker_num), or
            fewer files than workers (a worker would get none).

    Example:
        >>> shard_files(["a", "b", "c", "d", "e"], 1, 2)
        ['b', 'd']
    """
    if isinstance(worker_num, bool) or not isinstance(worker_num, int) or worker_num < 1:
        raise DataError(f"worker_num={worker_num!r}: expected an int >= 1")
    if isinstance(worker_index, bool) or not isinstance(worker_index, int) or not 0 <= worker_index < worker_num:
        raise DataError(f"worker_index={worker_index!r}: expected an int in [0, {worker_num})")
    if len(files) < worker_num:
        raise DataError(f"{len(files)} file(s) for {worker_num} workers: worker {worker_index} would get no file; "
                        f"split the data into at least {worker_num} files (one or more per worker)")
    return list(files[worker_index::worker_num])


class DatasetBase:
    """Settings and file list of a dataset (Paddle's ``DatasetBase``).

    Settings, through the constructor or ``init(**settings)`` (Paddle's
    spelling), or ``update_settings``:

    - batch_size (int >= 1, default 1): samples per Batch.
    - thread_num (int >= 1, default min(4, cores)): parse threads.
    - use_var (SlotList or list of Slot): the slots of a line, in order.
    - pipe_command (str or None, default None): shell command each file is
      piped through (Paddle's default "cat" is the same as None, only slower).
    - on_bad_line ("fail" | "skip", default "fail"): see `MultiSlotReader`.
    - drop_last (bool, default False): drop the last, partial batch.
    - chunk_bytes (int): how much of a file is parsed at once.

    Unknown settings raise DataError naming the valid ones.
    """

    _chunk_bytes_default = 32 << 20

    def __init__(self, **settings):
        self.batch_size = 1
        self.thread_num = default_threads()
        self.use_var: SlotList | None = None
        self.pipe_command: str | None = None
        self.on_bad_line = OnBadLine.FAIL
        self.drop_last = False
        self.chunk_bytes = self._chunk_bytes_default
        self.worker_index = 0
        self.worker_num = 1
        self._files: list[str] = []
        self._reader: MultiSlotReader | None = None
        if settings:
            self.init(**settings)

    def _settings(self) -> tuple[str, ...]:
        return ("batch_size", "thread_num", "use_var", "pipe_command", "on_bad_line", "drop_last", "chunk_bytes")

    def init(self, **settings) -> None:
        """Set any of the settings listed in the class docstring (others keep their values).

        Raises:
            DataError: an unknown setting or an invalid value (nothing is changed then).
        """
        valid = self._settings()
        unknown = sorted(set(settings) - set(valid))
        if unknown:
            raise DataError(f"{type(self).__name__}.init: unknown setting(s) {unknown}; the settings are {list(valid)}")
        new = {k: getattr(self, k) for k in valid}
        new.update(settings)
        for key in ("batch_size", "thread_num", "chunk_bytes"):
            v = new[key]
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise DataError(f"{type(self).__name__}.init: {key}={v!r}: expected an int >= 1")
        if new["use_var"] is not None:
            try:
                new["use_var"] = SlotList.of(new["use_var"])
            except TypeError as e:
                raise DataError(f"use_var={new['use_var']!r}: expected a SlotList or a list of Slot") from e
        pipe = new["pipe_command"]
        if pipe is not None and (not isinstance(pipe, str) or not pipe.strip()):
            raise DataError(f"pipe_command={pipe!r}: expected a non-empty shell command or None")
        new["on_bad_line"] = _on_bad_line(new["on_bad_line"])
        new["drop_last"] = bool(new["drop_last"])
        self._validate_extra(new)
        for k, v in new.items():
            setattr(self, k, v)

    update_settings = init

    def _validate_extra(self, new: dict) -> None:
        """Subclasses check their own settings here."""

    def set_filelist(self, files: Iterable[str | os.PathLike], worker_index: int | None = None,
                     worker_num: int | None = None) -> None:
        """The files to read; with worker_index/worker_num, only this worker's share (`shard_files`).

        Raises:
            DataError: `files` is a single string, or a worker would get no file.
        """
        if isinstance(files, (str, bytes, os.PathLike)):
            raise DataError(f"set_filelist({files!r}): expected a list of file names, got one name; "
                            "wrap it in a list")
        files = [os.fspath(f) for f in files]
        if (worker_index is None) != (worker_num is None):
            raise DataError("set_filelist: give worker_index and worker_num together (or neither)")
        if worker_num is not None:
            files = shard_files(files, worker_index, worker_num)
            self.worker_index, self.worker_num = worker_index, worker_num
        self._files = files

    def get_filelist(self) -> list[str]:
        """This worker's files, in reading order."""
        return list(self._files)

    @property
    def filelist(self) -> list[str]:
        return list(self._files)

    def _new_reader(self, chunk_bytes: int | None = None) -> MultiSlotReader:
        if self.use_var is None:
            raise DataError(f"{type(self).__name__}: no slots: call init(use_var=SlotList(...)) first")
        if not self._files:
            raise DataError(f"{type(self).__name__}: no files: call set_filelist([...]) first")
        self._reader = MultiSlotReader(self.use_var, pipe_command=self.pipe_command, on_bad_line=self.on_bad_line,
                                       n_threads=self.thread_num, chunk_bytes=chunk_bytes or self.chunk_bytes)
        return self._reader

    @property
    def bad_lines(self) -> int:
        """Bad lines dropped by the last load or pass (on_bad_line="skip")."""
        return self._reader.bad_lines if self._reader else 0

    @property
    def bad_line_examples(self) -> list[str]:
        """The first few bad lines of the last load or pass, as "file:line: slot 'x': reason"."""
        return list(self._reader.bad_line_examples) if self._reader else []

    def _batch_args(self, batch_size: int | None, skip: int, drop_last: bool | None) -> tuple[int, int, bool]:
        bs = self.batch_size if batch_size is None else batch_size
        if isinstance(bs, bool) or not isinstance(bs, int) or bs < 1:
            raise DataError(f"batch_size={bs!r}: expected an int >= 1")
        if isinstance(skip, bool) or not isinstance(skip, int) or skip < 0:
            raise DataError(f"skip={skip!r}: expected an int >= 0 (batches to skip, for resuming)")
        return bs, skip, self.drop_last if drop_last is None else bool(drop_last)


"""Byte sources for the reader: a file read through mmap, or a pipe_command's stdout.

Both yield pieces that end at a line boundary (only the last piece may lack
its newline), each at most about `chunk_bytes` long unless one line is longer.
"""
from __future__ import annotations

import mmap
import os
import select
import signal
import subprocess
import tempfile
import threading
from collections.abc import Iterator

from shoal.worker.data.errors import DataError, PipeCommandError

_STDERR_TAIL_BYTES = 4000
_STDERR_TAIL_LINES = 12
_POLL_S = 0.1  # how often a blocked pipe read looks at the stop flag
_READ_BYTES = 1 << 20


def file_pieces(path: str, chunk_bytes: int) -> Iterator[memoryview]:
    """Line-aligned zero-copy views of the file at `path` (released as the consumer moves on)."""
    try:
        f = open(path, "rb")
    except OSError as e:
        raise DataError(f"cannot read data file {path}: {e.strerror or e}") from e
    with f:
        size = os.fstat(f.fileno()).st_size
        if size == 0:
            return
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
            if hasattr(mm, "madvise") and hasattr(mmap, "MADV_SEQUENTIAL"):
                mm.madvise(mmap.MADV_SEQUENTIAL)
            pos = 0
            while pos < size:
                end = min(pos + chunk_bytes, size)
                if end < size:
                    nl = mm.rfind(b"\n", pos, end)
                    if nl < 0:  # one line longer than a chunk: take all of it
                        nl = mm.find(b"\n", end)
                    end = size if nl < 0 else nl + 1
                view = memoryview(mm)[pos:end]
                try:
                    yield view
                finally:
                    view.release()
                pos = end


def _stderr_tail(err) -> str:
    err.seek(0, os.SEEK_END)
    size = err.tell()
    err.seek(max(0, size - _STDERR_TAIL_BYTES))
    text = err.read().decode("utf-8", errors="replace")
    return "\n".join(text.strip().splitlines()[-_STDERR_TAIL_LINES:])


def _kill(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        try:  # the command runs in its own session: end the shell and what it started
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            proc.kill()
    proc.wait()


def pipe_pieces(command: str, path: str, chunk_bytes: int,
                stop: threading.Event | None = None) -> Iterator[memoryview]:
    """Line-aligned pieces of what `command` (run by the shell, the file on its stdin) writes to stdout.

    Raises:
        DataError: the file cannot be opened.
        PipeCommandError: the command exits non-zero (checked before the last,
            unterminated line is handed on, so a command that dies mid-line
            is reported as such and not as a bad line).

    The command is killed (with its process group) when the consumer stops
    early or `stop` is set; stdout is polled, so a silent command never
    blocks a stop.
    """
    try:
        stdin = open(path, "rb")
    except OSError as e:
        raise DataError(f"cannot read data file {path} (for pipe_command {command!r}): {e.strerror or e}") from e
    with stdin, tempfile.TemporaryFile() as err:
        try:
            proc = subprocess.Popen(command, shell=True, stdin=stdin, stdout=subprocess.PIPE, stderr=err,
                                    start_new_session=True)
        except OSError as e:
            raise PipeCommandError(command, path, 127, str(e)) from e
        fd = proc.stdout.fileno()
        buf = bytearray()
        try:
            while True:
                if stop is not None and stop.is_set():
                    return
                ready, _, _ = select.select([fd], [], [], _POLL_S)
                if not ready:
                    continue
                data = os.read(fd, _READ_BYTES)
                if not data:
                    break
                buf += data
                if len(buf) < chunk_bytes:
                    continue
                nl = buf.rfind(b"\n")
                if nl < 0:
                    continue
                view = memoryview(buf)[:nl + 1]
                try:
                    yield view
                finally:
                    view.release()
                del buf[:nl + 1]
            rc = proc.wait()
            if rc != 0:
                raise PipeCommandError(command, path, rc, _stderr_tail(err))
            if buf:
                view = memoryview(buf)
                try:
                    yield view
                finally:
                    view.release()
        finally:
            _kill(proc)
            proc.stdout.close()

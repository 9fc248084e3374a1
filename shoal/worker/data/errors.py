"""Errors of the data layer (worker/data): bad input lines, failing pipe commands, misuse."""
from __future__ import annotations

from shoal.errors import ShoalError


class DataError(ShoalError):
    """Base class of the data layer's errors: unreadable input, bad settings, misuse of a dataset."""


class BadLineError(DataError, ValueError):
    """A MultiSlot line that does not fit the slot list (``on_bad_line="fail"``).

    Attributes: ``source`` (file name, or the pipe command and file),
    ``line`` (1-based), ``slot`` (its name, or None when the line as a whole
    is wrong) and ``reason``.
    """

    def __init__(self, source: str, line: int, slot: str | None, reason: str):
        self.source, self.line, self.slot, self.reason = source, line, slot, reason
        where = f"slot {slot!r}: " if slot is not None else ""
        super().__init__(f"{source}:{line}: {where}{reason} (fix the line, or read with on_bad_line='skip' "
                         "to drop and count such lines)")


class PipeCommandError(DataError, RuntimeError):
    """A ``pipe_command`` that could not run or exited non-zero.

    Attributes: ``command``, ``path`` (the file fed to its stdin),
    ``returncode`` and ``stderr_tail`` (its last lines of stderr).
    """

    def __init__(self, command: str, path: str, returncode: int, stderr_tail: str):
        self.command, self.path, self.returncode, self.stderr_tail = command, path, returncode, stderr_tail
        how = f"exited with status {returncode}" if returncode >= 0 else f"was killed by signal {-returncode}"
        hint = " (command not found?)" if returncode == 127 else ""
        tail = f"; its stderr ends with:\n{stderr_tail}" if stderr_tail else "; it wrote nothing to stderr"
        super().__init__(f"pipe_command {command!r} on {path} {how}{hint}{tail}")

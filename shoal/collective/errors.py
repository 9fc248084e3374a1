"""The exceptions of collective/: every one derives from CollectiveError."""
from __future__ import annotations

from shoal.errors import ShoalError


class CollectiveError(ShoalError):
    """Base class of the errors of collective communication."""


class BackendUnavailableError(CollectiveError):
    """A process-group backend was asked for that cannot run here (says what it needs)."""


class NotInitializedError(CollectiveError):
    """A collective call before `init_parallel_env()`."""


class RendezvousError(CollectiveError):
    """The ranks of a group could not find each other (the store, or the connection)."""


class StoreTimeoutError(RendezvousError):
    """A key of the rendezvous store did not appear in time."""


class CollectiveTimeoutError(CollectiveError):
    """A collective did not complete within its timeout.

    `op` is the operation, `missing` the ranks (global) that did not arrive at it, found by a
    diagnosis through the store after the timeout, and `timeout` the seconds waited."""

    def __init__(self, message: str, *, op: str, missing: list[int], timeout: float):
        super().__init__(message)
        self.op, self.missing, self.timeout = op, list(missing), timeout


class PeerFailedError(CollectiveError):
    """A peer of the group failed during a collective (its connection closed)."""


class GroupBrokenError(CollectiveError):
    """A group is unusable after an earlier failure: rendezvous again (a new group)."""


class ReplicaDriftError(CollectiveError):
    """Data-parallel replicas hold different parameters (the drift check found it)."""


class InvalidArgumentError(CollectiveError, ValueError):
    """A collective was called with arguments it cannot use (nothing was sent)."""

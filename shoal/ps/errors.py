"""Errors of the parameter server (ps/)."""
from shoal.errors import ShoalError


class PSError(ShoalError):
    """Base class of errors raised by the parameter server and its client."""


class PSTimeoutError(PSError, TimeoutError):
    """A call to a server did not complete in time (names the endpoint and the op)."""


class WireError(PSError, ValueError):
    """A message that is malformed, too large, or of the wrong dtype or shape."""


class RemoteError(PSError):
    """The server refused a request and said why (an error reply)."""

    def __init__(self, message: str, *, kind: str = "PSError", endpoint: str = "", op: str = ""):
        super().__init__(message)
        self.kind, self.endpoint, self.op = kind, endpoint, op


class AuthError(PSError):
    """A server refused this client's credentials (job token or auth mode differ), or a token is unusable."""


class ConnectionLostError(PSError, ConnectionError):
    """The connection to a server dropped while a call was pending, or a call went to a server known to be gone."""


class ClosedError(PSError):
    """A call on a closed client, a call pending when its client closed, or a request to a stopping server."""


class UnknownOpError(PSError, LookupError):
    """A request named an op the server has no handler for (the message lists the known ones)."""


class TableError(PSError, ValueError):
    """A table spec, key, shape or dtype that does not fit the table addressed."""


class CheckpointError(PSError):
    """A checkpoint directory that is missing, incomplete or inconsistent."""

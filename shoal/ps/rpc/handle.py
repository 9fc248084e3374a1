"""A call in flight: :class:`Handle`, returned by :meth:`RpcClient.call_async <shoal.ps.rpc.client.RpcClient.call_async>`.

ps-lite's pattern: the call returns at once; ``wait()`` blocks for the reply
(or raises what went wrong) and ``done()`` polls. The client completes a
handle exactly once, under its lock; waiting is done by the client's
receiving machinery (see :mod:`shoal.ps.rpc.client`).
"""
from __future__ import annotations

import threading
import time
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from shoal.ps.rpc.client import RpcClient


class Handle:
    """One call in flight. ``wait()`` blocks for its reply; ``done()`` polls.

    Thread-safe: any thread may wait on a handle, several at once. A handle
    completes exactly once (reply, error, timeout or close); later
    ``wait()`` calls return or raise the same outcome.
    """

    __slots__ = ("_client", "server", "endpoint", "op", "rid", "_t0", "_deadline", "_wakeup",
                 "_done", "_result", "_error")

    def __init__(self, client: "RpcClient", server: int, endpoint: str, op: str, rid: int,
                 timeout: float) -> None:
        self._client = client
        self.server, self.endpoint, self.op, self.rid = server, endpoint, op, rid
        self._t0 = time.monotonic()
        self._deadline = self._t0 + timeout
        self._wakeup: threading.Event | None = None  # made when a thread must sleep on it
        self._done = False
        self._result: tuple[dict, list[np.ndarray]] | None = None
        self._error: BaseException | None = None

    def done(self) -> bool:
        """True once the call completed, successfully or not.

        Never blocks (it may take in replies that have already arrived).
        """
        if not self._done:
            self._client._collect()
        return self._done

    def wait(self, timeout: float | None = None) -> tuple[dict, list[np.ndarray]]:
        """Block until the reply arrives; return ``(header, arrays)``.

        Args:
            timeout: seconds to wait at most. None waits until the call's own
                deadline (the client's timeout, counted from the call).
                Either way, when it expires the call is abandoned: it fails
                with PSTimeoutError and a late reply is dropped.

        Returns:
            The reply header (with "op", "rid" and "ok") and its arrays:
            read-only zero-copy views of the received frames (copy one to
            modify it).

        Raises:
            RemoteError, PSTimeoutError, AuthError, ConnectionLostError,
            ClosedError, WireError: see the module docstring.
        """
        if not self._done:
            deadline = self._deadline if timeout is None else time.monotonic() + timeout
            self._client._wait_for(self, deadline)
        if self._error is not None:
            raise self._error.with_traceback(None)
        return self._result

    def _finish(self, result: tuple | None = None, error: BaseException | None = None) -> None:
        # Called once, by whoever removed the handle from the client's pending map, under its lock.
        self._result, self._error = result, error
        self._done = True
        if self._wakeup is not None:
            self._wakeup.set()

    def __repr__(self) -> str:
        state = "done" if self._done else "pending"
        return f"Handle(op={self.op!r}, server={self.server} {self.endpoint}, rid={self.rid}, {state})"


__all__ = ["Handle"]

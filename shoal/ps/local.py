"""Local mode's transport: the RPC client's calls answered in-process by one PSService.

`fleet.init()` with no contract variable set trains the whole job in one
process; its tables sit behind the same seam (PSClient over a transport)
with the same handlers, rules and checkpoints as a real server, only
without sockets. A barrier or reduce of one caller completes at once.
"""
from __future__ import annotations

import itertools
import threading
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from shoal.ps.errors import ClosedError
from shoal.ps.service import PSService

# Ops whose arrays a handler may keep after it returns (queued dense pushes, GEO deltas, reduce
# totals): copied in, as the real server owns the buffers it received.
_KEEPS_ARRAYS = frozenset({"push_dense", "init_dense", "push_delta", "push_pass", "reduce"})


class _Done:
    """A call that already finished: RpcClient's Handle interface."""

    __slots__ = ("_result", "_error")

    def __init__(self, result=None, error: BaseException | None = None):
        self._result, self._error = result, error

    def done(self) -> bool:
        return True

    def wait(self, timeout: float | None = None):
        if self._error is not None:
            raise self._error
        return self._result


class LocalTransport:
    """RpcClient's interface (call_async, call, next_seq, endpoints, close) over one in-process server.

    Thread-safe as the service is: handlers run on the calling thread.
    """

    def __init__(self, service: PSService | None = None, client_id: str = "local") -> None:
        self.service = service or PSService(0, 1)
        self._handlers = self.service.handlers()
        self._seqs = itertools.count(1)
        self._lock = threading.Lock()
        self._closed = False
        self.client_id = client_id

    @property
    def endpoints(self) -> list[str]:
        return ["local"]

    def next_seq(self) -> int:
        with self._lock:
            return next(self._seqs)

    def call_async(self, server: int, op: str, header: Mapping[str, Any] | None = None,
                   arrays: Sequence[np.ndarray] = (), *, timeout: float | None = None) -> _Done:
        if self._closed:
            raise ClosedError(f"the local parameter server is closed; op {op!r} was not run")
        if server != 0:
            raise IndexError(f"server {server} is out of range: local mode has one server")
        header = {**(header or {}), "op": op, "client": self.client_id}
        arrays = [np.array(a) for a in arrays] if op in _KEEPS_ARRAYS else list(arrays)
        try:
            return _Done(result=self._handlers[op](header, arrays))
        except Exception as e:  # the same outcome a remote caller gets, raised at wait()
            return _Done(error=e)

    def call(self, server: int, op: str, header: Mapping[str, Any] | None = None,
             arrays: Sequence[np.ndarray] = (), *, timeout: float | None = None):
        return self.call_async(server, op, header, arrays, timeout=timeout).wait()

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self.service.close()

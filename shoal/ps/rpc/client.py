"""The RPC client: one DEALER socket per server, shared by the calling threads under a lock.

Threading model. A caller encodes its request (:func:`~shoal.ps.rpc.wire.encode`,
no copy of the arrays), registers a :class:`Handle` under a fresh request
id and sends the frames itself, holding the socket lock (zmq sockets are not
thread-safe; a mutex around every call makes sharing one safe). Replies are
received by the waiters: one waiting thread at a time (the "leader") polls
the sockets, receives whatever arrived and completes the matching handles,
whoever they belong to; when it has its own reply it hands the role to
another waiter. A background thread watches the connections (libzmq's
socket monitor: handshakes, refusals, drops), fails calls past their
deadline, and collects replies nobody is waiting for (every 0.25 s).
Routing sends and replies through that thread instead would cost two
thread wake-ups per call (see :mod:`shoal.ps.rpc.server` for the numbers).
Many calls may be in flight per client and per server; replies may come
back in any order.

Failures surface from :meth:`Handle.wait`:

- :class:`~shoal.ps.errors.RemoteError`: the server answered with an error
  (``.kind`` is the server-side exception class name, e.g. "TableError").
- :class:`~shoal.ps.errors.PSTimeoutError`: no reply within the timeout; the
  message names the endpoint, the op and what the connection looked like.
  A late reply is dropped.
- :class:`~shoal.ps.errors.AuthError`: the server refused the handshake
  (the job token or the auth mode differ). Reported as soon as libzmq
  reports it, not at the timeout.
- :class:`~shoal.ps.errors.ConnectionLostError`: the connection dropped with
  the call pending, or the call went to a server whose connection is down
  (the socket reconnects by itself; a later call succeeds once it is back).
  The request may or may not have been applied: retry a push with the same
  ``seq`` so the server applies it once.
- :class:`~shoal.ps.errors.ClosedError`: the client was closed.

Example::

    with RpcClient(["127.0.0.1:6170", "127.0.0.1:6171"], token) as client:
        h = client.call_async(1, "pull", {"table": 0}, [keys])   # returns at once
        header, (rows,) = h.wait()                               # blocks
"""
from __future__ import annotations

import enum
import itertools
import logging
import select
import threading
import time
import uuid
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import zmq
from zmq.utils.monitor import recv_monitor_message

from shoal.ps.errors import (AuthError, ClosedError, ConnectionLostError, PSError, PSTimeoutError,
                             RemoteError, WireError)
from shoal.ps.rpc import wire
from shoal.ps.rpc._io import Waker, normalize_endpoint, recv_frames, send_frames
from shoal.ps.rpc.auth import AuthMode, configure_client_socket, token_bytes
from shoal.ps.rpc.handle import Handle

_log = logging.getLogger("shoal.ps.rpc.client")
_SWEEP_S = 0.25    # how often the background thread fails overdue calls and collects unattended replies
_LEAD_SLICE_S = 1.0
_DROP_GRACE_S = 0.05  # after a disconnect, time for receivers to take in replies already delivered  # the longest a leader sleeps in poll without re-checking (wake-ups normally come sooner)
_CLIENT_KEYS = ("op", "rid", "client")  # header fields the client fills in itself
_MONITOR_EVENTS = (zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_HANDSHAKE_FAILED_AUTH
                   | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
                   | zmq.EVENT_DISCONNECTED)
_EVENTS, _POLLIN, _NOBLOCK = int(zmq.EVENTS), int(zmq.POLLIN), int(zmq.NOBLOCK)
_TOKEN_HINT = "check that SHOAL_JOB_TOKEN and the auth mode (plain/curve) are the same on both sides"


class ConnState(enum.Enum):
    """What the client knows of its connection to one server."""

    CONNECTING = "connecting"  # no handshake has completed yet; calls queue until one does
    READY = "ready"            # handshake done; calls go out at once
    LOST = "lost"              # was ready, then dropped; calls fail at once until it is back
    REFUSED = "refused"        # the server refused the handshake; calls fail at once


class RpcClient:
    """Calls ops on parameter servers; thread-safe, many calls in flight.

    Args:
        endpoints: the servers, ``"host:port"`` or ``"tcp://host:port"``
            (a comma-separated string like PADDLE_PSERVERS_IP_PORT_LIST is
            accepted too); ``server`` arguments index this list.
        token: the job token (SHOAL_JOB_TOKEN).
        auth: ``"plain"`` (default) or ``"curve"``; must match the servers.
        timeout: default seconds a call may take before PSTimeoutError.
        client_id: sent as "client" in every request header, so a server can
            apply a retried push once per (client, seq); default a random
            unique string.
        max_bytes: the largest reply accepted.

    Construction starts the monitor thread and connects (connections
    complete in the background; calls made meanwhile queue). Every method
    is thread-safe. Close the client (or use ``with``) to stop its thread
    and close its sockets.
    """

    def __init__(self, endpoints: Sequence[str] | str, token: str | bytes,
                 auth: AuthMode | str = AuthMode.PLAIN, timeout: float = 30.0,
                 client_id: str | None = None, *, max_bytes: int = wire.DEFAULT_MAX_BYTES) -> None:
        if isinstance(endpoints, str):
            endpoints = [e for e in endpoints.split(",") if e.strip()]
        self._endpoints = [normalize_endpoint(e.strip()) for e in endpoints]
        if not self._endpoints:
            raise PSError("RpcClient needs at least one server endpoint "
                          "(PADDLE_PSERVERS_IP_PORT_LIST is empty?)")
        self._token = token_bytes(token)
        self._auth = AuthMode.parse(auth)
        if not timeout > 0:
            raise PSError(f"timeout={timeout!r} must be a positive number of seconds")
        self.timeout = float(timeout)
        if client_id is not None and (not isinstance(client_id, str) or not client_id):
            raise PSError(f"client_id must be a non-empty string, got {client_id!r}")
        self._client_id = client_id or uuid.uuid4().hex
        self.max_bytes = int(max_bytes)

        self._rids = itertools.count(1)
        self._seqs = itertools.count(1)
        # _lock guards _pending, _waiting, _states, _closed and every Handle._finish.
        self._lock = threading.Lock()
        self._pending: dict[int, Handle] = {}
        self._waiting: set[Handle] = set()
        self._states = [ConnState.CONNECTING] * len(self._endpoints)
        self._refusals = [""] * len(self._endpoints)
        # server -> (when, rids): calls pending when its connection dropped, failed once replies
        # that arrived before the drop have been read (a server that answers, then exits)
        self._dropped: dict[int, tuple[float, set]] = {}
        self._closed = False
        # _sock_lock guards every call on the DEALER sockets; _rx_lock is held by the one
        # thread receiving (a waiting caller, or the monitor thread collecting unattended replies).
        self._sock_lock = threading.Lock()
        self._rx_lock = threading.Lock()
        self._socks: list[zmq.Socket] | None = None
        self._rx_poller = select.poll()  # raw fds only; used by the receiving thread
        self._rx_waker = Waker()   # wakes the receiving thread: input waiting, handles failed, close
        self._io_waker = Waker()   # wakes the monitor thread: close
        self._ctx = zmq.Context()
        self._ready = threading.Event()
        self._start_error: BaseException | None = None
        self._thread = threading.Thread(target=self._io_main, name="shoal-rpc-client-io", daemon=True)
        self._thread.start()
        self._ready.wait()
        if self._start_error is not None:
            self._closed = True
            self._thread.join()
            self._rx_waker.close()
            self._io_waker.close()
            raise self._start_error

    # ---------------------------------------------------------------- public

    @property
    def endpoints(self) -> list[str]:
        """The server endpoints, ``tcp://host:port``, in ``server`` index order."""
        return list(self._endpoints)

    @property
    def client_id(self) -> str:
        return self._client_id

    def next_seq(self) -> int:
        """A fresh sequence number for a request of this client (1, 2, 3, ...).

        Put it in the header as "seq" for requests that must apply once (a
        push), and resend the same header on retry. Thread-safe, never blocks.
        """
        return next(self._seqs)

    def state(self, server: int) -> ConnState:
        """The connection state of ``server`` as last reported by libzmq. Never blocks."""
        return self._states[self._check_server(server)]

    def call_async(self, server: int, op: str, header: Mapping[str, Any] | None = None,
                   arrays: Sequence[np.ndarray] = (), *, timeout: float | None = None) -> Handle:
        """Send ``op`` to ``server`` and return without waiting for the reply.

        Args:
            server: index into :attr:`endpoints`.
            op: the op name the server dispatches on.
            header: extra msgpack-able header fields ("table", "seq", ...);
                "op", "rid", "client" and "arrays" are filled in here.
            arrays: numpy arrays sent as raw frames, without a copy: **do not
                modify them until the handle completes** (ps-lite's rule for
                push values).
            timeout: seconds before the call fails with PSTimeoutError
                (default: the client's timeout).

        Returns:
            A :class:`Handle`; call ``wait()`` on it for the reply. Connection
            and server errors surface from ``wait()``.

        Raises:
            WireError: a dtype that is not sent on the wire, a header that
                msgpack cannot carry, or a reserved header key.
            ClosedError: the client is closed.
            IndexError: ``server`` is out of range.

        Thread-safe. Returns without waiting for the network: it queues the
        message in libzmq (briefly holding the socket lock).
        """
        if type(server) is not int or not 0 <= server < len(self._endpoints):
            server = self._check_server(server)
        if type(op) is not str or not op:
            raise WireError(f"op must be a non-empty string, got {op!r}")
        rid = next(self._rids)
        if header:
            clash = [k for k in _CLIENT_KEYS if k in header]
            if clash:
                raise WireError(f"header keys {clash} are set by the client; remove them from the header")
            header = {**header, "op": op, "rid": rid, "client": self._client_id}
        else:
            header = {"op": op, "rid": rid, "client": self._client_id}
        frames = wire.encode(header, arrays)
        endpoint = self._endpoints[server]
        handle = Handle(self, server, endpoint, op, rid, self.timeout if timeout is None else timeout)
        with self._lock:
            if self._closed:
                raise ClosedError(f"the client is closed; op {op!r} to {endpoint} was not sent")
            state = self._states[server]
            if state is ConnState.LOST or state is ConnState.REFUSED:
                handle._finish(error=self._down_error(server, op, sent=False))
                return handle
            self._pending[rid] = handle
        with self._sock_lock:
            socks = self._socks
            if socks is None:  # closed meanwhile: close() has failed the handle
                return handle
            sock = socks[server]
            try:
                # Never blocks: SNDHWM is unlimited, and before the handshake libzmq queues.
                send_frames(sock, frames, _NOBLOCK)
                error = None
            except zmq.ZMQError as e:
                error = e
            # The send may have consumed the socket's edge-triggered wake-up: tell the receiver.
            input_waiting = sock.getsockopt(_EVENTS) & _POLLIN
        if error is not None:
            with self._lock:
                if self._pending.pop(rid, None) is handle:
                    handle._finish(error=PSError(f"could not send op {op!r} to {endpoint}: {error}"))
        if input_waiting:
            self._rx_waker.wake()
        return handle

    def call(self, server: int, op: str, header: Mapping[str, Any] | None = None,
             arrays: Sequence[np.ndarray] = (), *, timeout: float | None = None
             ) -> tuple[dict, list[np.ndarray]]:
        """``call_async(...).wait()``: send ``op`` and block for its reply (see both). Thread-safe."""
        return self.call_async(server, op, header, arrays, timeout=timeout).wait()

    def close(self) -> None:
        """Fail every pending call with ClosedError, stop the monitor thread and close the sockets.

        Returns promptly (unsent requests are discarded). Idempotent;
        thread-safe.
        """
        with self._lock:
            if self._closed:
                return
            self._closed = True
            pending = list(self._pending.values())
            self._pending.clear()
            for h in pending:
                h._finish(error=ClosedError(f"the client was closed while op {h.op!r} to {h.endpoint} "
                                            "was pending"))
        self._rx_waker.wake()
        self._io_waker.wake()
        if self._thread is not threading.current_thread():
            self._thread.join(10.0)
        self._rx_waker.close()
        self._io_waker.close()

    def __enter__(self) -> "RpcClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return (f"RpcClient({len(self._endpoints)} servers, auth={self._auth.value!r}, "
                f"client_id={self._client_id!r}{', closed' if self._closed else ''})")

    # ------------------------------------------------------ errors, timeouts

    def _check_server(self, server: int) -> int:
        n = len(self._endpoints)
        if isinstance(server, bool) or not isinstance(server, (int, np.integer)) or not 0 <= server < n:
            raise IndexError(f"server={server!r} is out of range: this client has {n} endpoint(s)")
        return int(server)

    def _down_error(self, server: int, op: str, *, sent: bool) -> PSError:
        endpoint = self._endpoints[server]
        if self._states[server] is ConnState.REFUSED:
            return AuthError(f"server {server} ({endpoint}) refused the connection for op {op!r}: "
                             f"{self._refusals[server]}; {_TOKEN_HINT}")
        if sent:
            return ConnectionLostError(
                f"lost the connection to server {server} ({endpoint}) while op {op!r} was pending: "
                "the server stopped or crashed, or the request exceeded its size limit; "
                "the request may or may not have been applied")
        return ConnectionLostError(
            f"server {server} ({endpoint}) is disconnected (it stopped or crashed); op {op!r} was not "
            "sent. The client reconnects by itself if a server comes back at that endpoint")

    def _timeout_error(self, h: Handle) -> PSTimeoutError:
        state = self._states[h.server]
        if state is ConnState.READY:
            why = ("the server is connected but did not answer in time (slow handler, overloaded or "
                   "stuck server); raise the timeout or look at the server's log")
        elif state is ConnState.CONNECTING:
            why = (f"no connection to it was ever established: is a server running at {h.endpoint}? "
                   f"If it is, {_TOKEN_HINT}")
        else:
            why = f"the connection is {state.value}"
        return PSTimeoutError(f"no reply from server {h.server} ({h.endpoint}) to op {h.op!r} "
                              f"(rid {h.rid}) after {time.monotonic() - h._t0:.2f} s: {why}")

    def _expire(self, h: Handle) -> None:
        with self._lock:
            if self._pending.get(h.rid) is h:
                del self._pending[h.rid]
                h._finish(error=self._timeout_error(h))

    def _fail_server(self, server: int) -> bool:
        """Fail the calls pending on ``server`` (caller holds _lock); True if there were any."""
        rids = [rid for rid, h in self._pending.items() if h.server == server]
        for rid in rids:
            h = self._pending.pop(rid)
            h._finish(error=self._down_error(server, h.op, sent=True))
        return bool(rids)

    # ---------------------------------------------------------- receiving

    def _wait_for(self, h: Handle, deadline: float) -> None:
        """Block until ``h`` completes or ``deadline`` passes (then fail it with PSTimeoutError)."""
        if self._rx_lock.acquire(blocking=False):  # the common case: nobody else is receiving
            try:
                self._lead(h, deadline)
            finally:
                self._release_rx(h)
        if h._done:
            return
        with self._lock:
            if h._done:
                return
            if h._wakeup is None:
                h._wakeup = threading.Event()
            self._waiting.add(h)  # before trying the role again: a leader leaving wakes one of these
        try:
            while not h._done:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    self._expire(h)
                    return
                if self._rx_lock.acquire(blocking=False):
                    try:
                        self._lead(h, deadline)
                    finally:
                        self._release_rx(h)
                    continue
                h._wakeup.wait(remaining)
                h._wakeup.clear()  # _done is re-checked after the clear, so no completion is lost
        finally:
            with self._lock:
                self._waiting.discard(h)
                # This waiter may have been handed the receiving role just as it gave up: pass it on.
                self._wake_a_waiter(h)

    def _lead(self, h: Handle, deadline: float) -> None:
        """Receive for everybody until ``h`` completes, ``deadline`` passes or the client closes.

        Polls before draining: input that arrived earlier left the fd readable,
        unless a sender consumed the signal, and then the sender woke _rx_waker.
        """
        poller, wake_fd = self._rx_poller, self._rx_waker.fileno()
        while not h._done and not self._closed:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return
            for fd, _ in poller.poll(max(1, int(min(remaining, _LEAD_SLICE_S) * 1000))):
                if fd == wake_fd:
                    self._rx_waker.clear()
            self._drain()

    def _release_rx(self, me: Handle | None) -> None:
        """Give up the receiving role and wake another waiter to take it."""
        self._rx_lock.release()
        # A waiter registers before trying the role, so one that registers after this check
        # finds the role free; reading the set unlocked first keeps the common case cheap.
        if self._waiting:
            with self._lock:
                self._wake_a_waiter(me)

    def _wake_a_waiter(self, me: Handle | None) -> None:
        """Wake one waiter other than ``me`` so it tries the receiving role (caller holds _lock)."""
        for other in self._waiting:
            if other is not me and not other._done:
                other._wakeup.set()
                return

    def _collect(self) -> None:
        """Take in replies that have arrived, unless another thread is receiving. Never blocks long."""
        if self._rx_lock.acquire(blocking=False):
            try:
                self._drain()
            finally:
                self._release_rx(None)

    def _drain(self) -> None:
        """Receive every reply waiting on any socket and complete its handle (holding _rx_lock)."""
        got = []
        with self._sock_lock:
            socks = self._socks
            if socks is None:
                return
            for server, sock in enumerate(socks):
                while sock.getsockopt(_EVENTS) & _POLLIN:
                    got.append((server, recv_frames(sock)))
        for server, frames in got:
            self._dispatch(server, frames)

    def _dispatch(self, server: int, frames: list) -> None:
        endpoint = self._endpoints[server]
        try:
            header, arrays = wire.decode(frames, self.max_bytes)
        except WireError as e:
            rid = wire.peek_ids(frames[0])[0]
            with self._lock:
                h = self._pop(rid, server)
                if h is not None:
                    h._finish(error=WireError(f"malformed reply from server {server} ({endpoint}) "
                                              f"to op {h.op!r}: {e}"))
            if h is None:
                _log.warning("rpc client: dropped a malformed reply from %s: %s", endpoint, e)
            return
        with self._lock:
            h = self._pop(header["rid"], server)
            if h is None:
                return  # a late reply to a call that timed out or failed: dropped
            if header.get("ok") is True:
                h._finish(result=(header, arrays))
                return
            kind = header.get("kind") if isinstance(header.get("kind"), str) else "PSError"
            h._finish(error=RemoteError(
                f"{kind} from server {server} ({endpoint}) for op {h.op!r}: {header.get('error')}",
                kind=kind, endpoint=endpoint, op=h.op))

    def _pop(self, rid: int, server: int) -> Handle | None:
        """The pending handle ``rid`` if it was sent to ``server`` (caller holds _lock)."""
        h = self._pending.get(rid)
        if h is None or h.server != server:
            return None
        del self._pending[rid]
        return h

    # ------------------------------------------------------ monitor thread

    def _io_main(self) -> None:
        socks, monitors = [], []
        try:
            for ep in self._endpoints:
                s = self._ctx.socket(zmq.DEALER)
                socks.append(s)
                configure_client_socket(s, self._token, self._auth)
                s.linger = 0
                s.sndhwm = 0  # calls are bounded by the callers; never block or drop a request
                s.rcvhwm = 0
                s.maxmsgsize = 2 * self.max_bytes + wire.MAX_HEADER_BYTES
                monitors.append(s.get_monitor_socket(_MONITOR_EVENTS))
                s.ipv6 = ep.startswith("tcp://[")
                s.connect(ep)
        except BaseException as e:
            self._start_error = (e if isinstance(e, PSError) else
                                 PSError(f"cannot set up the client sockets for {self._endpoints}: {e}"))
            self._close_sockets(socks, monitors)
            self._ready.set()
            return
        # Receivers poll the sockets' raw fds: polling a socket would touch it without the lock.
        for s in socks:
            self._rx_poller.register(s.getsockopt(zmq.FD), select.POLLIN)
        self._rx_poller.register(self._rx_waker.fileno(), select.POLLIN)
        self._socks = socks
        self._ready.set()
        try:
            self._io_loop(monitors)
        except BaseException as e:
            _log.exception("rpc client %s: monitor thread failed", self._client_id)
            with self._lock:
                self._closed = True
                for h in list(self._pending.values()):
                    h._finish(error=PSError(f"the client's monitor thread failed ({e!r}) while op "
                                            f"{h.op!r} to {h.endpoint} was pending"))
                self._pending.clear()
        finally:
            # Wait for a receiving waiter to notice the close before its sockets go away.
            self._rx_waker.wake()
            if not self._rx_lock.acquire(timeout=_LEAD_SLICE_S + 5.0):
                _log.error("rpc client %s: a receiving thread did not let go; closing anyway", self._client_id)
            with self._sock_lock:
                self._socks = None
                self._close_sockets(socks, monitors)

    def _close_sockets(self, socks: list, monitors: list) -> None:
        for s in socks:
            try:
                s.disable_monitor()
            except zmq.ZMQError:
                pass
        for s in [*monitors, *socks]:
            s.close(linger=0)
        self._ctx.term()

    def _io_loop(self, monitors: list[zmq.Socket]) -> None:
        poller = zmq.Poller()
        poller.register(self._io_waker.fileno(), zmq.POLLIN)
        mon_index = {m: i for i, m in enumerate(monitors)}
        for m in monitors:
            poller.register(m, zmq.POLLIN)
        next_sweep = time.monotonic() + _SWEEP_S
        while not self._closed:
            wake_at = min([next_sweep] + [when for when, _ in self._dropped.values()])
            timeout_ms = max(0, int((wake_at - time.monotonic()) * 1000)) + 1
            for obj, _ in poller.poll(timeout_ms):
                if obj in mon_index:
                    self._on_monitor(obj, mon_index[obj])
                else:
                    self._io_waker.clear()
            now = time.monotonic()
            if any(when <= now for when, _ in self._dropped.values()):
                self._fail_dropped(now)
            if now >= next_sweep:
                self._collect()  # replies to calls nobody waits on (and late ones, to drop them)
                self._sweep(now)
                next_sweep = now + _SWEEP_S

    def _on_monitor(self, mon: zmq.Socket, server: int) -> None:
        failed = False
        while True:
            try:
                event = recv_monitor_message(mon, zmq.NOBLOCK)
            except zmq.Again:
                break
            kind, value = event["event"], event["value"]
            with self._lock:
                state = self._states[server]
                if kind == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                    self._states[server] = ConnState.READY
                elif kind == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
                    failed |= self._refuse(server, f"it rejected this client's job token (ZAP status {value})")
                elif kind in (zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL, zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL):
                    detail = ("the server's CURVE key derived from this client's token does not match, or "
                              "the server uses another auth mode" if self._auth is AuthMode.CURVE else
                              "the server uses another auth mode (curve?)")
                    failed |= self._refuse(server, f"the {self._auth.value.upper()} handshake failed ({detail})")
                elif kind == zmq.EVENT_DISCONNECTED and state is ConnState.READY:
                    self._states[server] = ConnState.LOST
                    rids = {rid for rid, h in self._pending.items() if h.server == server}
                    if rids:
                        self._dropped[server] = (time.monotonic() + _DROP_GRACE_S, rids)
        self._rx_waker.wake()  # a receiver takes in what arrived; failed calls wake their waiters

    def _fail_dropped(self, now: float) -> None:
        """Fail the calls that were pending when a connection dropped, once the replies that had
        already arrived were taken in (those calls completed normally)."""
        self._collect()
        failed = False
        with self._lock:
            for server in [s for s, (when, _) in self._dropped.items() if when <= now]:
                _, rids = self._dropped.pop(server)
                for rid in rids:
                    h = self._pending.pop(rid, None)
                    if h is not None:
                        h._finish(error=self._down_error(server, h.op, sent=True))
                        failed = True
        if failed:
            self._rx_waker.wake()

    def _refuse(self, server: int, why: str) -> bool:
        """Mark ``server`` refused and fail its calls (caller holds _lock); True if any failed."""
        if self._states[server] is not ConnState.REFUSED:
            _log.warning("rpc client: server %s refused the connection: %s; %s",
                         self._endpoints[server], why, _TOKEN_HINT)
        self._states[server] = ConnState.REFUSED
        self._refusals[server] = why
        return self._fail_server(server)

    def _sweep(self, now: float) -> None:
        with self._lock:
            overdue = [rid for rid, h in self._pending.items() if h._deadline <= now]
            for rid in overdue:
                h = self._pending.pop(rid)
                h._finish(error=self._timeout_error(h))
        if overdue:
            self._rx_waker.wake()


__all__ = ["ConnState", "Handle", "RpcClient"]

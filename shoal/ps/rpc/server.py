"""The RPC server: a zmq ROUTER socket served by a pool of handler threads.

Threading model (what a server author must know):

- ``n_threads`` worker threads share the ROUTER socket under a lock (zmq
  sockets are not thread-safe; a mutex around every call on the socket
  makes sharing one safe). One idle worker at a time, the *leader*, polls
  the socket; when a request arrives it takes it, passes the leader role to
  the next idle worker and runs the handler itself, then sends the reply
  itself. A request thus reaches its handler, and its reply the socket,
  without a hand-off between threads. (The usual design, an I/O thread
  that owns the socket and passes requests and replies to and from a pool
  through queues, costs two thread wake-ups per request; with the client's
  equivalent it held a 1 MiB echo to 0.43 of a bare pyzmq echo's throughput
  on the 2-core machines here, where this design and the client's reach
  about 0.7, see bench/ps_rpc.py.) Because another thread's send can
  consume the socket's edge-triggered wake-up signal, the leader polls the
  socket's ZMQ_FD rather than the socket, and a sender that sees input
  waiting wakes it through an eventfd.
- Handlers run **concurrently**, up to ``n_threads`` at a time, in any
  order: a handler that touches shared state locks it. Requests from one
  client are not serialized. When all workers are busy, requests wait in
  the socket's queue (back-pressure through zmq and TCP); a handler that
  blocks until other requests arrive (a barrier) holds a worker, so
  ``n_threads`` must exceed the number of such handlers waiting at once.
- Worker threads decode the message (:func:`~shoal.ps.rpc.wire.decode`)
  and call ``handlers[op](header, arrays)``; ``header`` holds "op", "rid"
  and the request's other fields ("table", "client", "seq", ...).
- A handler returns ``(header, arrays)``; the server adds ``"ok": True``
  and the request's ``"op"`` and ``"rid"``. To refuse a request, raise: the
  reply becomes ``{"ok": False, "error": str(e), "kind":
  type(e).__name__, "op": ..., "rid": ...}`` (raise a PSError child such as
  TableError for a bad request; any other exception is also caught, and
  logged with its traceback as a likely bug). The server keeps serving
  either way.
- The arrays a handler receives are read-only views of the received frames.
  The arrays it returns are sent without a copy, after the handler has
  returned: return arrays the server will not modify afterwards (a fresh
  result or a copy, never a view into a live table).
- Limits: a request larger than ``max_bytes`` (all frames) gets an error
  reply, so does a header over 1 MiB, more than 4096 arrays or 32
  dimensions (see :mod:`.wire`); a single frame over ``2 * max_bytes + 1
  MiB`` makes libzmq drop the connection (MAXMSGSIZE), a defence against
  memory exhaustion. Replies are never dropped for a full queue (SNDHWM is
  unlimited); a reply to a client that has gone is dropped by ROUTER.

Example::

    def echo(header, arrays):
        return {"n": len(arrays)}, arrays

    with RpcServer(token=token, handlers={"echo": echo}) as server:
        print(server.endpoint)          # tcp://127.0.0.1:41234
        ...                             # serve until told to stop
"""
from __future__ import annotations

import enum
import logging
import queue
import select
import threading
import time
from collections.abc import Callable, Mapping

import numpy as np
import zmq

from shoal.ps.errors import ClosedError, PSError, UnknownOpError, WireError
from shoal.ps.rpc import wire
from shoal.ps.rpc._io import Waker, normalize_endpoint, recv_frames, send_frames
from shoal.ps.rpc.auth import AuthMode, configure_server_socket, start_authenticator, token_bytes

Handler = Callable[[dict, list[np.ndarray]], tuple[dict, list[np.ndarray]]]

_log = logging.getLogger("shoal.ps.rpc.server")
_FLUSH_LINGER_MS = 1000  # at most this long for the last replies to leave after draining
_EVENTS, _POLLIN, _NOBLOCK = int(zmq.EVENTS), int(zmq.POLLIN), int(zmq.NOBLOCK)
_LEAD, _QUIT = "lead", "quit"  # the tokens in the workers' queue


class ServerState(enum.Enum):
    NEW = "new"
    RUNNING = "running"
    STOPPING = "stopping"  # draining: in-flight requests finish, new ones are refused
    STOPPED = "stopped"


def error_reply(rid: int, op: str, exc: BaseException) -> list:
    """The frames of an error reply to request ``rid`` (op ``op``)."""
    try:
        message = str(exc) or type(exc).__name__
    except Exception:  # an exception whose __str__ fails still gets a reply
        message = f"{type(exc).__name__} (its message could not be formatted)"
    return wire.encode({"op": op, "rid": rid, "ok": False, "error": message, "kind": type(exc).__name__})


class RpcServer:
    """Serves ``handlers`` over a ZeroMQ ROUTER socket to clients holding the job token.

    Args:
        endpoint: where to bind: ``"tcp://host:port"`` or ``"host:port"``;
            port 0 or ``*`` binds a free port atomically (read the real one
            from :attr:`endpoint` or the return of :meth:`start`).
        token: the job token (SHOAL_JOB_TOKEN); required.
        auth: ``"plain"`` (default) or ``"curve"`` (see :mod:`.auth`).
        handlers: op name -> ``handler(header, arrays) -> (header, arrays)``.
        max_bytes: the largest request (all frames together) served; larger
            ones get an error reply. A single frame above the hard limit
            ``2 * max_bytes + 1 MiB`` makes libzmq drop the connection instead
            (the client sees ConnectionLostError).
        n_threads: worker threads: the most handlers running at once.
        inline_ops: ops that never block and finish quickly: the thread that
            received one serves it and keeps receiving, without waking another
            worker (a thread switch less per request). Requests that arrive
            meanwhile wait in the socket, so never list an op that can wait on
            other requests (a barrier) or run long.

    Thread-safety: :meth:`start` and :meth:`stop` may be called from any
    thread except a handler's; :attr:`endpoint` and :attr:`state` from any
    thread.
    """

    def __init__(self, endpoint: str = "tcp://127.0.0.1:*", *, token: str | bytes,
                 auth: AuthMode | str = AuthMode.PLAIN, handlers: Mapping[str, Handler],
                 max_bytes: int = wire.DEFAULT_MAX_BYTES, n_threads: int = 4,
                 inline_ops: frozenset[str] | set[str] = frozenset()) -> None:
        self._bind_to = normalize_endpoint(endpoint, bind=True)
        self._token = token_bytes(token)
        self._auth = AuthMode.parse(auth)
        bad = [op for op, fn in handlers.items() if not isinstance(op, str) or not callable(fn)]
        if bad:
            raise PSError(f"handlers must map op names (str) to callables; bad entries: {bad!r}")
        self._handlers = dict(handlers)
        self._inline_ops = frozenset(inline_ops)
        if max_bytes <= 0 or n_threads <= 0:
            raise PSError(f"max_bytes={max_bytes} and n_threads={n_threads} must be positive")
        self.max_bytes = int(max_bytes)
        self.hard_max_bytes = 2 * self.max_bytes + wire.MAX_HEADER_BYTES
        self._n_threads = int(n_threads)

        self._state = ServerState.NEW
        self._state_lock = threading.Lock()
        self._stop_lock = threading.Lock()
        self._endpoint: str | None = None
        self._ctx: zmq.Context | None = None
        self._zap = None
        self._waker: Waker | None = None
        self._poller: select.poll | None = None  # raw fds only; used by the leader only
        self._tokens: queue.SimpleQueue = queue.SimpleQueue()
        self._sock: zmq.Socket | None = None
        # _sock_lock guards every call on the ROUTER socket and the in-flight count.
        self._sock_lock = threading.Lock()
        self._drained = threading.Condition(self._sock_lock)
        self._in_flight = 0  # requests taken by a worker whose reply is not sent yet
        self._closing = False  # set after draining: workers leave, the socket closes
        self._workers: list[threading.Thread] = []

    # ---------------------------------------------------------------- public

    @property
    def endpoint(self) -> str:
        """The bound endpoint, e.g. ``"tcp://127.0.0.1:41234"`` (raises PSError before start)."""
        if self._endpoint is None:
            raise PSError("the server has no endpoint yet: call start() first")
        return self._endpoint

    @property
    def state(self) -> ServerState:
        return self._state

    def start(self) -> str:
        """Bind the socket, start the worker threads and return the real endpoint.

        Blocks until the socket is bound (milliseconds); requests are served
        from then on.

        Raises:
            PSError: already started, or the endpoint cannot be bound (in
                use, bad address); the message names the endpoint.
        """
        with self._state_lock:
            if self._state is not ServerState.NEW:
                raise PSError(f"server already {self._state.value}; create a new RpcServer to serve again")
            self._state = ServerState.RUNNING
        self._ctx = zmq.Context()
        try:
            # The ZAP handler must run before the socket accepts anyone: without one,
            # libzmq lets every PLAIN client in.
            self._zap = start_authenticator(self._ctx, self._token, self._auth)
            self._waker = Waker()
            sock = self._bind()
        except BaseException:
            self._state = ServerState.STOPPED
            self._teardown()
            raise
        self._endpoint = sock.last_endpoint.decode()
        # The raw fd, not the socket: polling the socket would touch it without the lock.
        self._poller = select.poll()
        self._poller.register(sock.getsockopt(zmq.FD), select.POLLIN)
        self._poller.register(self._waker.fileno(), select.POLLIN)
        self._sock = sock  # thread start below publishes it to the workers
        self._tokens.put(_LEAD)
        for i in range(self._n_threads):
            t = threading.Thread(target=self._worker_main, name=f"shoal-rpc-server-{i}", daemon=True)
            t.start()
            self._workers.append(t)
        _log.debug("rpc server on %s (%s auth, %d worker threads)", self._endpoint, self._auth.value,
                   self._n_threads)
        return self._endpoint

    def stop(self, drain_timeout: float = 10.0) -> None:
        """Stop serving: refuse new requests, finish the in-flight ones, send their replies, close.

        New requests arriving meanwhile get an error reply of kind
        ClosedError. Requests still running after ``drain_timeout`` seconds
        lose their reply (logged). Then the socket closes, waiting at most
        1 s for the last replies to leave, and clients see the connection
        drop. Idempotent.

        Blocks up to about ``drain_timeout + 1.5`` seconds. Call it from any
        thread but a handler's (a handler that wants the server stopped
        signals the thread that owns the server).

        Raises:
            PSError: called from inside a handler.
        """
        if threading.current_thread() in self._workers:
            raise PSError("RpcServer.stop() called from a handler would wait for itself; "
                          "signal the thread that owns the server (e.g. set an Event) and stop there")
        with self._stop_lock:
            with self._state_lock:
                if self._state is ServerState.NEW:
                    self._state = ServerState.STOPPED
                if self._state is ServerState.STOPPED:
                    return
                self._state = ServerState.STOPPING
            deadline = time.monotonic() + max(0.0, drain_timeout)
            self._waker.wake()  # the leader switches to refusing
            with self._drained:
                while self._in_flight and time.monotonic() < deadline:
                    self._drained.wait(deadline - time.monotonic())
                left = self._in_flight
                self._closing = True
            if left:
                _log.warning("rpc server %s: %d request(s) still running after drain_timeout=%.1f s; "
                             "their replies are dropped", self._endpoint, left, drain_timeout)
            self._waker.wake()
            for _ in self._workers:
                self._tokens.put(_QUIT)
            for t in self._workers:
                t.join(max(0.1, deadline - time.monotonic()) if left else 1.0)
            with self._sock_lock:
                sock, self._sock = self._sock, None  # workers finishing late drop their replies
                sock.close(linger=0 if left else _FLUSH_LINGER_MS)
            self._teardown()
            self._state = ServerState.STOPPED

    def __enter__(self) -> "RpcServer":
        if self._state is ServerState.NEW:
            self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"RpcServer({self._endpoint or self._bind_to!r}, auth={self._auth.value!r}, {self._state.value})"

    # --------------------------------------------------------------- threads

    def _teardown(self) -> None:
        if self._zap is not None:
            self._zap.stop()
            self._zap = None
        if self._ctx is not None:
            self._ctx.term()  # returns once the last replies left (bounded by LINGER)
            self._ctx = None
        if self._waker is not None:
            self._waker.close()

    def _bind(self) -> zmq.Socket:
        sock = self._ctx.socket(zmq.ROUTER)
        try:
            configure_server_socket(sock, self._token, self._auth)
            sock.maxmsgsize = self.hard_max_bytes
            sock.sndhwm = 0  # a full send queue would make ROUTER drop replies silently
            sock.rcvhwm = 1000
            sock.linger = 0
            sock.ipv6 = self._bind_to.startswith("tcp://[")  # [v6 addr]:port
            sock.bind(self._bind_to)
        except zmq.ZMQError as e:
            sock.close(0)
            raise PSError(f"cannot bind the parameter server to {self._bind_to}: {e}; "
                          "pick another port, or port 0 to let the OS choose") from e
        return sock

    def _worker_main(self) -> None:
        tokens = self._tokens
        while True:
            if tokens.get() is _QUIT:
                return
            while True:
                try:
                    request = self._lead()
                except BaseException:
                    _log.exception("rpc server %s: receiving failed", self._endpoint)
                    request = None
                if request is not None and request[1] and \
                        wire.peek_ids(request[1][0])[1] in self._inline_ops:
                    self._serve_one(*request)  # quick: serve it and stay the leader
                    continue
                tokens.put(_LEAD)  # the next idle worker receives while this one serves
                if request is not None:
                    self._serve_one(*request)
                break

    def _lead(self) -> tuple[zmq.Frame, list] | None:
        """Poll the socket until a request arrives (returned, and counted in flight) or the server closes."""
        poller, waker, wake_fd = self._poller, self._waker, self._waker.fileno()
        while True:
            with self._sock_lock:
                sock = self._sock
                if self._closing or sock is None:
                    return None
                if sock.getsockopt(_EVENTS) & _POLLIN:
                    msg = recv_frames(sock)
                    if self._state is not ServerState.STOPPING:
                        self._in_flight += 1
                        return msg[0], msg[1:]
                    self._refuse(sock, msg)
                    continue
            for fd, _ in poller.poll():
                if fd == wake_fd:
                    waker.clear()

    def _refuse(self, sock: zmq.Socket, msg: list) -> None:
        ident, frames = msg[0], msg[1:]
        rid, op = wire.peek_ids(frames[0]) if frames else (-1, "unknown")
        err = ClosedError(f"server {self._endpoint} is stopping; request refused (not applied)")
        sock.send_multipart([ident, *error_reply(rid, op, err)], _NOBLOCK, copy=False)

    def _serve_one(self, ident: zmq.Frame, frames: list) -> None:
        try:
            reply = self._serve(frames)
        except BaseException as e:  # never leave a request unanswered: the drain counts on it
            _log.exception("rpc server %s: internal error serving a request", self._endpoint)
            reply = error_reply(*(wire.peek_ids(frames[0]) if frames else (-1, "unknown")), e)
        del frames  # release the request's buffers before the next wait
        with self._sock_lock:
            self._in_flight -= 1
            sock = self._sock
            if sock is None:
                return
            try:
                # Never blocks: SNDHWM is unlimited; a vanished client's reply is dropped by ROUTER.
                send_frames(sock, [ident, *reply], _NOBLOCK)
            except zmq.ZMQError as e:
                _log.warning("rpc server %s: could not send a reply: %s", self._endpoint, e)
            # The send may have consumed the socket's edge-triggered wake-up: tell the leader.
            wake = sock.getsockopt(_EVENTS) & _POLLIN
            if self._in_flight == 0 and self._state is ServerState.STOPPING:
                self._drained.notify_all()
        if wake:
            self._waker.wake()

    def _serve(self, frames: list) -> list:
        """Decode, dispatch, encode: every failure becomes an error reply."""
        try:
            header, arrays = wire.decode(frames, self.max_bytes)
        except WireError as e:
            rid, op = wire.peek_ids(frames[0]) if frames else (-1, "unknown")
            _log.debug("rpc server %s: refused a malformed request (rid %d): %s", self._endpoint, rid, e)
            return error_reply(rid, op, e)
        rid, op = header["rid"], header["op"]
        handler = self._handlers.get(op)
        try:
            if handler is None:
                raise UnknownOpError(f"unknown op {op!r}; this server handles {sorted(self._handlers)}")
            result = handler(header, arrays)
            if (type(result) is not tuple or len(result) != 2 or not isinstance(result[0], Mapping)
                    or not isinstance(result[1], (list, tuple))):
                raise TypeError(f"handler for op {op!r} returned {type(result).__name__}; "
                                "expected a tuple (header: dict, arrays: list of numpy arrays)")
            out_header, out_arrays = result
            return wire.encode({**out_header, "op": op, "rid": rid, "ok": True}, out_arrays)
        except PSError as e:
            _log.debug("rpc server %s: op %r (rid %d) refused: %s", self._endpoint, op, rid, e)
            return error_reply(rid, op, e)
        except Exception as e:
            _log.warning("rpc server %s: handler for op %r (rid %d) raised", self._endpoint, op, rid,
                         exc_info=True)
            return error_reply(rid, op, e)


__all__ = ["Handler", "RpcServer", "ServerState"]

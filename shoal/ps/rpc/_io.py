"""Socket plumbing shared by the RPC server and client: endpoint spelling, frame receiving, the waker."""
from __future__ import annotations

import os
import re
import threading

import zmq

from shoal.ps.errors import PSError

_NOBLOCK = int(zmq.NOBLOCK)
_HOST_PORT = re.compile(r"^(\[[0-9a-fA-F:.]+\]|[^:/\s]+):(\d+|\*)$")


def normalize_endpoint(endpoint: str, *, bind: bool = False) -> str:
    """``"host:port"`` or ``"tcp://host:port"`` -> ``"tcp://host:port"``; port 0 becomes ``*`` when binding.

    PADDLE_PSERVERS_IP_PORT_LIST spells endpoints without a scheme, so both
    spellings are accepted. ``ipc://path`` passes through unchanged
    (``inproc://`` cannot work: server and client each own a zmq context).

    Raises:
        PSError: the endpoint is not ``host:port`` with a numeric port (or
            ``*`` when binding).
    """
    if not isinstance(endpoint, str):
        raise PSError(f"endpoint must be a string like 'tcp://127.0.0.1:6170', got {endpoint!r}")
    if endpoint.startswith("ipc://") and len(endpoint) > len("ipc://"):
        return endpoint
    rest = endpoint[len("tcp://"):] if endpoint.startswith("tcp://") else endpoint
    m = _HOST_PORT.match(rest)
    if m is None or (m.group(2) == "*" and not bind):
        want = "host:port (port 0 or * to bind a free port)" if bind else "host:port"
        raise PSError(f"endpoint {endpoint!r} is not {want}, e.g. 'tcp://127.0.0.1:6170'")
    host, port = m.groups()
    if bind and port == "0":
        port = "*"
    return f"tcp://{host}:{port}"


# Below this size a frame is cheaper to copy into libzmq than to hand over by
# reference (pyzmq's zero-copy send tracks the buffer until libzmq frees it).
ZERO_COPY_MIN_BYTES = 64 * 1024
# Plain ints: combining zmq's enum flags per frame costs more than the send itself here.
_SNDMORE, _MORE = int(zmq.SNDMORE), int(zmq.MORE)


def send_frames(sock: zmq.Socket, frames, flags: int = 0) -> None:
    """Send a multipart message: large frames without a copy, small ones copied."""
    last = len(frames) - 1
    flags = int(flags)
    more = flags | _SNDMORE
    for i, frame in enumerate(frames):
        size = frame.nbytes if hasattr(frame, "nbytes") else len(frame)
        sock.send(frame, flags if i == last else more, copy=size < ZERO_COPY_MIN_BYTES)


def recv_frames(sock: zmq.Socket) -> list[zmq.Frame]:
    """``sock.recv_multipart(NOBLOCK, copy=False)`` without its RCVMORE getsockopt per frame.

    Call only when a message is waiting (EVENTS has POLLIN); raises zmq.Again otherwise.
    """
    frame = sock.recv(_NOBLOCK, copy=False)
    frames = [frame]
    while frame.get(_MORE):  # the rest of a multipart message is already there: libzmq delivers it whole
        frame = sock.recv(_NOBLOCK, copy=False)
        frames.append(frame)
    return frames


class Waker:
    """A file descriptor a thread polls beside its sockets' fds; any thread may wake it.

    ``wake()`` is thread-safe and never blocks; ``clear()`` belongs to the
    polling thread. Linux uses an eventfd, elsewhere a pipe.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        if hasattr(os, "eventfd"):
            self._rfd = self._wfd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        else:  # pragma: no cover - non-Linux
            self._rfd, self._wfd = os.pipe()
            os.set_blocking(self._rfd, False)
            os.set_blocking(self._wfd, False)

    def fileno(self) -> int:
        return self._rfd

    def wake(self) -> None:
        # The lock keeps a wake racing close() from writing into a reused fd number.
        with self._lock:
            if self._wfd < 0:
                return
            try:
                os.write(self._wfd, b"\x01\x00\x00\x00\x00\x00\x00\x00")
            except BlockingIOError:  # already signalled (counter or pipe full)
                pass

    def clear(self) -> None:
        try:
            os.read(self._rfd, 4096)
        except OSError:  # nothing to read, or closed meanwhile
            pass

    def close(self) -> None:
        with self._lock:
            fds = {self._rfd, self._wfd} - {-1}
            self._rfd = self._wfd = -1
        for fd in fds:
            os.close(fd)

"""The rendezvous store: a small TCP key-value store over ZeroMQ, served by the launcher or rank 0.

Ranks publish their Gloo addresses (and NCCL's unique id) here, and a timed-out collective asks
it which ranks arrived. Nothing on the data path of a collective touches it.

    server = StoreServer("127.0.0.1", 0, token=t)   # binds a free port itself
    client = StoreClient(server.endpoint, token=t)
    client.set("gen0/rank0", b"...")
    client.get("gen0/rank1", timeout=30)              # blocks until some rank sets it

Values are bytes; `add` keeps a decimal counter. Messages are msgpack maps (never pickle); a
request with the wrong token gets an error reply and changes nothing. The server holds every
blocking `get`/`wait` itself until its key appears or its own deadline passes, so a client never
polls. A StoreClient is thread-safe (one request at a time).
"""
from __future__ import annotations

import hmac
import itertools
import math
import threading
import time

import msgpack
import zmq

from shoal.collective.errors import RendezvousError, StoreTimeoutError

_POLL_MS = 100          # the server thread wakes at least this often to see close()
_MARGIN_S = 2.0         # a client waits this much past the server's deadline for its reply
_MAX_VALUE = 64 << 20   # the store holds addresses and ids, not tensors
_MAX_WAIT_S = 7 * 86400.0


class StoreServer:
    """Serves the store from a background thread of this process until `close()`.

    Args:
        host: the address to bind (127.0.0.1 in tests).
        port: the port to bind; 0 lets the OS choose (read `endpoint` afterwards).
        token: the job's secret; requests without it are refused. None accepts any request.

    Raises RendezvousError when the address cannot be bound (say, a busy --master port)."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0, *, token: str | None = None):
        self._ctx = zmq.Context.instance()
        self._sock = self._ctx.socket(zmq.ROUTER)
        self._sock.setsockopt(zmq.LINGER, 0)
        address = f"[{host}]" if ":" in host else host
        if ":" in host:
            self._sock.setsockopt(zmq.IPV6, 1)
        try:
            self._sock.bind(f"tcp://{address}:{port or '*'}")
        except zmq.ZMQError as e:
            self._sock.close()
            raise RendezvousError(f"the rendezvous store cannot bind {host}:{port}: {e}; choose a "
                                  f"free port (or port 0)") from e
        self.endpoint = self._sock.getsockopt_string(zmq.LAST_ENDPOINT).replace("tcp://", "")
        self._token = token
        self._data: dict[str, bytes] = {}
        self._waiters: list[tuple[float, bytes, int, str, list[str]]] = []  # deadline, peer, id, op, keys
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="shoal-store", daemon=True)
        self._thread.start()

    def close(self) -> None:
        """Stop serving (idempotent); pending waits are left to their clients' deadlines."""
        if not self._stop.is_set():
            self._stop.set()
            self._thread.join(timeout=5)

    def __enter__(self) -> "StoreServer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- the serving thread ------------------------------------------------------
    def _serve(self) -> None:
        try:
            while not self._stop.is_set():
                wait_ms = _POLL_MS
                if self._waiters:
                    soonest = min(w[0] for w in self._waiters)
                    wait_ms = max(0, min(wait_ms, int((soonest - time.monotonic()) * 1000) + 1))
                if self._sock.poll(wait_ms, zmq.POLLIN):
                    while True:
                        try:
                            peer, raw = self._sock.recv_multipart(zmq.NOBLOCK)[:2]
                        except zmq.Again:
                            break
                        except ValueError:  # a message of one frame: nothing to answer
                            continue
                        self._handle(peer, raw)
                self._expire()
        finally:
            self._sock.close()

    def _reply(self, peer: bytes, rid: int, **fields) -> None:
        try:
            self._sock.send_multipart([peer, msgpack.packb({"id": rid, **fields})], zmq.NOBLOCK)
        except zmq.ZMQError:  # the client is gone or not reading: its own deadline tells it
            pass

    def _handle(self, peer: bytes, raw: bytes) -> None:
        try:
            msg = msgpack.unpackb(raw, raw=False)
            rid, op = int(msg["id"]), msg["op"]
        except Exception:  # noqa: BLE001 - a malformed request gets no state change and no reply
            return
        if self._token is not None and not hmac.compare_digest(str(msg.get("token", "")), self._token):
            self._reply(peer, rid, ok=False, error="wrong or missing job token for the rendezvous "
                                                   "store; every rank needs the job's SHOAL_JOB_TOKEN")
            return
        try:
            if op == "set":
                value = msg["value"]
                if not isinstance(value, bytes) or len(value) > _MAX_VALUE:
                    raise ValueError(f"a value must be bytes of at most {_MAX_VALUE} bytes")
                self._data[str(msg["key"])] = value
                self._reply(peer, rid, ok=True)
                self._wake()
            elif op == "add":
                key = str(msg["key"])
                value = int(self._data.get(key, b"0")) + int(msg["delta"])
                self._data[key] = str(value).encode()
                self._reply(peer, rid, ok=True, value=value)
                self._wake()
            elif op == "check":
                self._reply(peer, rid, ok=True, value=all(k in self._data for k in msg["keys"]))
            elif op == "delete_prefix":
                gone = [k for k in self._data if k.startswith(str(msg["prefix"]))]
                for k in gone:
                    del self._data[k]
                self._reply(peer, rid, ok=True, value=len(gone))
            elif op in ("get", "wait"):
                keys = [str(k) for k in (msg["keys"] if op == "wait" else [msg["key"]])]
                wait_ms = float(msg["timeout_ms"])
                if not (math.isfinite(wait_ms) and 0 <= wait_ms <= _MAX_WAIT_S * 1000):
                    raise ValueError(f"timeout_ms {wait_ms!r} must be finite, in [0, "
                                     f"{_MAX_WAIT_S * 1000:g}]")
                deadline = time.monotonic() + wait_ms / 1000
                self._waiters.append((deadline, peer, rid, op, keys))
                self._wake()
            else:
                raise ValueError(f"unknown store op {op!r}")
        except Exception as e:  # noqa: BLE001 - any bad field: an error reply, the server lives on
            self._reply(peer, rid, ok=False, error=f"bad store request {op!r}: {e}")

    def _wake(self) -> None:
        keep = []
        for w in self._waiters:
            _, peer, rid, op, keys = w
            if all(k in self._data for k in keys):
                self._reply(peer, rid, ok=True, value=self._data[keys[0]] if op == "get" else None)
            else:
                keep.append(w)
        self._waiters = keep

    def _expire(self) -> None:
        now, keep = time.monotonic(), []
        for w in self._waiters:
            deadline, peer, rid, op, keys = w
            if deadline <= now:
                missing = [k for k in keys if k not in self._data]
                self._reply(peer, rid, ok=False, timeout=True, error=f"keys {missing} not set")
            else:
                keep.append(w)
        self._waiters = keep


def _seconds(value, op: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or not 0 <= value <= _MAX_WAIT_S:
        raise RendezvousError(f"store {op}: timeout {value!r} must be finite seconds in "
                              f"[0, {_MAX_WAIT_S:g}]")
    return float(value)


class StoreClient:
    """Talks to a StoreServer at `endpoint` ('host:port'); thread-safe, one request at a time.

    Every call has a deadline: a blocking `get`/`wait` raises StoreTimeoutError when its keys did
    not appear within `timeout` seconds; any call raises RendezvousError when the server does not
    answer within the deadline (it is not running, or not reachable)."""

    def __init__(self, endpoint: str, *, token: str | None = None, timeout: float = 30.0):
        self.endpoint, self.timeout = endpoint, timeout
        self._token = token
        self._ctx = zmq.Context.instance()
        self._sock = self._ctx.socket(zmq.DEALER)
        self._sock.setsockopt(zmq.LINGER, 0)
        if endpoint.startswith("["):
            self._sock.setsockopt(zmq.IPV6, 1)
        self._sock.connect(f"tcp://{endpoint}")
        self._ids = itertools.count(1)
        self._lock = threading.Lock()
        self._closed = False

    def close(self) -> None:
        with self._lock:
            if not self._closed:
                self._closed = True
                self._sock.close()

    def _call(self, op: str, wait_s: float | None = None, **fields):
        wait_s = _seconds(self.timeout if wait_s is None else wait_s, op)
        with self._lock:
            if self._closed:
                raise RendezvousError("the store client is closed")
            rid = next(self._ids)
            msg = {"id": rid, "op": op, "token": self._token or "", **fields}
            self._sock.send(msgpack.packb(msg, use_bin_type=True))
            deadline = time.monotonic() + wait_s + _MARGIN_S
            while True:
                left_ms = int((deadline - time.monotonic()) * 1000)
                if left_ms <= 0 or not self._sock.poll(left_ms, zmq.POLLIN):
                    raise RendezvousError(f"the rendezvous store at {self.endpoint} did not answer "
                                          f"{op!r} within {wait_s + _MARGIN_S:.0f}s: is the job's "
                                          f"rank 0 (or its launcher) running and reachable?")
                reply = msgpack.unpackb(self._sock.recv(), raw=False)
                if reply.get("id") == rid:
                    break  # older ids are late replies to calls that already gave up
        if reply.get("ok"):
            return reply.get("value")
        if reply.get("timeout"):
            raise StoreTimeoutError(f"rendezvous store: {reply.get('error')} within {wait_s:g}s")
        raise RendezvousError(f"rendezvous store at {self.endpoint}: {reply.get('error')}")

    def set(self, key: str, value: bytes, timeout: float | None = None) -> None:
        self._call("set", timeout, key=key, value=bytes(value))

    def get(self, key: str, timeout: float | None = None) -> bytes:
        """The value of `key`, waiting up to `timeout` seconds for some rank to set it."""
        t = _seconds(self.timeout if timeout is None else timeout, "get")
        return self._call("get", t, key=key, timeout_ms=int(t * 1000))

    def wait(self, keys: list[str], timeout: float | None = None) -> None:
        """Return once every key is set; StoreTimeoutError after `timeout` seconds."""
        t = _seconds(self.timeout if timeout is None else timeout, "wait")
        self._call("wait", t, keys=list(keys), timeout_ms=int(t * 1000))

    def check(self, keys: list[str], timeout: float | None = None) -> bool:
        """Whether every key is set, without waiting for them (`timeout`: for the answer)."""
        return bool(self._call("check", timeout, keys=list(keys)))

    def add(self, key: str, delta: int = 1) -> int:
        """Add `delta` to the counter `key` (0 when unset) and return the new value."""
        return int(self._call("add", key=key, delta=int(delta)))

    def delete_prefix(self, prefix: str) -> int:
        """Delete every key that starts with `prefix`; returns how many."""
        return int(self._call("delete_prefix", prefix=prefix))


class PrefixStore:
    """A view of a StoreClient whose keys are all prefixed (one rendezvous, one group).

    It is also the store object the Gloo binding calls back into: `set`, `get` and
    `wait(keys, timeout_ms)`."""

    def __init__(self, client: StoreClient, prefix: str):
        self.client, self.prefix = client, prefix

    def set(self, key: str, value: bytes, timeout: float | None = None) -> None:
        self.client.set(self.prefix + key, value, timeout)

    def get(self, key: str, timeout: float | None = None) -> bytes:
        return self.client.get(self.prefix + key, timeout)

    def wait(self, keys: list[str], timeout_ms: int | None = None) -> None:
        self.client.wait([self.prefix + k for k in keys],
                         None if timeout_ms is None else timeout_ms / 1000)

    def check(self, keys: list[str], timeout: float | None = None) -> bool:
        return self.client.check([self.prefix + k for k in keys], timeout)

    def add(self, key: str, delta: int = 1) -> int:
        return self.client.add(self.prefix + key, delta)

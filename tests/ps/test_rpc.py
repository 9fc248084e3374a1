"""The PS transport: wire format, job-token auth, RPC server and client, on 127.0.0.1 only.

Servers run for real (in-process, and in a child process for the cross-process test); every
test has a bounded run time and asserts liveness deadlines with a wide margin, never speed.
"""
from __future__ import annotations

import os
import re
import threading
import time
from pathlib import Path

import msgpack
import numpy as np
import pytest
import zmq

from shoal.ps.errors import (AuthError, ClosedError, ConnectionLostError, PSError, PSTimeoutError,
                             RemoteError, TableError, WireError)
from shoal.ps.rpc import AuthMode, ConnState, RpcClient, RpcServer, ServerState, curve_server_keys
from shoal.ps.rpc import wire
from shoal.ps.rpc.auth import configure_client_socket

pytestmark = pytest.mark.timeout(60)

DTYPES_AND_SHAPES = [
    ("bool", (5,)), ("int8", (2, 3)), ("int16", (4,)), ("int32", ()), ("int64", (3, 1, 2)),
    ("uint8", (0,)), ("uint16", (7,)), ("uint32", (2, 0, 3)), ("uint64", (6,)),
    ("float16", (3, 3)), ("float32", (128, 16)), ("float64", ()),
]


def sample(dtype: str, shape: tuple, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if dtype == "bool":
        return rng.random(shape) < 0.5
    if dtype.startswith("float"):
        return rng.standard_normal(shape).astype(dtype)
    info = np.iinfo(dtype)
    return rng.integers(info.min, info.max, size=shape, dtype=dtype, endpoint=True)


def as_bytes(frames: list) -> list[bytes]:
    """Frames as a receiver sees them: plain bytes."""
    return [f if isinstance(f, bytes) else np.asarray(f).tobytes() for f in frames]


def wait_until(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.01)


# -- handlers (module level: the child-process factory uses them too) --------------------------

def echo(header: dict, arrays: list) -> tuple[dict, list]:
    echoed = {k: header[k] for k in ("tag", "client", "seq", "table") if k in header}
    return {"n": len(arrays), **echoed}, list(arrays)


def slow(header: dict, arrays: list) -> tuple[dict, list]:
    time.sleep(min(float(header.get("seconds", 1.0)), 5.0))
    return {"slept": True}, []


def boom(header: dict, arrays: list) -> tuple[dict, list]:
    raise ValueError("boom: the handler failed on purpose")


def no_table(header: dict, arrays: list) -> tuple[dict, list]:
    raise TableError(f"table {header.get('table')!r} does not exist; create it first")


def bad_return(header: dict, arrays: list):
    return "not a (header, arrays) tuple"


def pid(header: dict, arrays: list) -> tuple[dict, list]:
    return {"pid": os.getpid()}, []


HANDLERS = {"echo": echo, "slow": slow, "boom": boom, "no_table": no_table, "bad_return": bad_return}


def make_echo_server(token: str, auth: str = "plain") -> RpcServer:
    """Factory for the server_process fixture: binds 127.0.0.1 port 0."""
    return RpcServer("tcp://127.0.0.1:0", token=token, auth=auth, handlers={**HANDLERS, "pid": pid})


# -- wire format, no sockets -------------------------------------------------------------------

@pytest.mark.parametrize("dtype,shape", DTYPES_AND_SHAPES)
def test_wire_round_trip_every_dtype_and_shape(dtype, shape):
    a = sample(dtype, shape)
    frames = wire.encode({"op": "x", "rid": 1, "table": "emb"}, [a])
    header, (b,) = wire.decode(as_bytes(frames))
    assert header == {"op": "x", "rid": 1, "table": "emb"}
    assert b.dtype == a.dtype and b.shape == a.shape
    np.testing.assert_array_equal(b, a)
    assert not b.flags.writeable, "decoded arrays are read-only views of the frames"


def test_encode_sends_arrays_without_copies_and_fixes_layout():
    a = np.arange(12, dtype=np.float32)
    frames = wire.encode({"op": "x", "rid": 1}, [a, a.reshape(3, 4).T, np.arange(4, dtype=">i4")])
    assert frames[1] is a, "a contiguous array is sent as is"
    assert frames[2].flags.c_contiguous and frames[3].dtype == np.dtype("<i4")
    header, (x, t, be) = wire.decode(as_bytes(frames))
    np.testing.assert_array_equal(t, a.reshape(3, 4).T)
    np.testing.assert_array_equal(be, np.arange(4))
    assert be.dtype == np.int32


def test_decode_copies_misaligned_buffers_only():
    raw = bytearray(8 * 3 + 1)
    np.frombuffer(raw, dtype=np.float64, count=3, offset=1)[:] = [1.5, 2.5, 3.5]
    header = msgpack.packb({"op": "x", "rid": 1, "arrays": [["float64", [3]]]})
    _, (a,) = wire.decode([header, memoryview(raw)[1:]])
    assert a.flags.aligned and not a.flags.writeable
    np.testing.assert_array_equal(a, [1.5, 2.5, 3.5])


@pytest.mark.parametrize("bad", [np.array([1 + 2j]), np.array(["a"], dtype=object),
                                 np.array(["text"]), np.zeros(2, dtype="datetime64[s]")])
def test_encode_refuses_dtypes_outside_the_whitelist(bad):
    with pytest.raises(WireError, match=r"array 0 has dtype .* not sent on the wire; allowed dtypes"):
        wire.encode({"op": "x", "rid": 1}, [bad])


def test_encode_refuses_reserved_key_and_unpackable_values():
    with pytest.raises(WireError, match="'arrays' is reserved"):
        wire.encode({"op": "x", "rid": 1, "arrays": []})
    with pytest.raises(WireError, match="not msgpack-able"):
        wire.encode({"op": "x", "rid": 1, "obj": object()})
    with pytest.raises(WireError, match="'table' must be an integer or a string, got None"):
        wire.encode({"op": "x", "rid": 1, "table": None})
    frames = wire.encode({"op": "x", "rid": np.int64(3), "lr": np.float32(0.5), "n": np.int64(7)})
    assert wire.decode(frames)[0] == {"op": "x", "rid": 3, "lr": 0.5, "n": 7}


# -- malformed requests: raw frames from a bare DEALER holding the token ------------------------

def _frames(header, *buffers):
    return [msgpack.packb(header), *buffers]


F32x4 = np.arange(4, dtype=np.float32).tobytes()
MALFORMED = [
    # (case, frames, expected message, expected rid in the error reply)
    ("truncated header", [msgpack.packb({"op": "echo", "rid": 5, "table": 1})[:-3]], "not valid msgpack", -1),
    ("empty header frame", [b""], "frame 0\\) is empty", -1),
    ("header not a map", [msgpack.packb([1, 2, 3])], "must be a msgpack map, got a list", -1),
    ("pickle bytes", [b"\x80\x05\x95\x1a\x00\x00\x00\x00\x00\x00\x00}\x94(\x8c\x02op\x94"],
     "bytes after its msgpack value", -1),
    ("op missing", _frames({"rid": 3}), "'op' must be a non-empty string", 3),
    ("rid not an int", _frames({"op": "echo", "rid": "7"}), "'rid' must be an integer", -1),
    ("table of wrong type", _frames({"op": "echo", "rid": 4, "table": [1]}), "'table' must be", 4),
    ("more arrays listed than frames", _frames({"op": "echo", "rid": 6, "arrays": [["float32", [4]]] * 2},
                                               F32x4), "lists 2 arrays but the message has 1", 6),
    ("more frames than arrays listed", _frames({"op": "echo", "rid": 7, "arrays": []}, F32x4),
     "lists 0 arrays but the message has 1", 7),
    ("buffer smaller than its shape", _frames({"op": "echo", "rid": 8, "arrays": [["float32", [4]]]},
                                              F32x4[:-1]), "needs 16 bytes but its frame holds 15", 8),
    ("buffer larger than its shape", _frames({"op": "echo", "rid": 9, "arrays": [["float32", [3]]]},
                                             F32x4), "needs 12 bytes but its frame holds 16", 9),
    ("complex dtype", _frames({"op": "echo", "rid": 10, "arrays": [["complex64", [2]]]}, F32x4),
     "dtype 'complex64', which is not accepted", 10),
    ("object dtype", _frames({"op": "echo", "rid": 11, "arrays": [["object", [2]]]}, F32x4),
     "dtype 'object', which is not accepted", 11),
    ("numpy dtype string", _frames({"op": "echo", "rid": 12, "arrays": [["|O", [2]]]}, F32x4),
     "dtype '\\|O', which is not accepted", 12),
    ("negative dimension", _frames({"op": "echo", "rid": 13, "arrays": [["float32", [-4]]]}, F32x4),
     "expected a list of at most 32 non-negative integers", 13),
    ("oversized message", _frames({"op": "echo", "rid": 14, "arrays": [["uint8", [100_000]]]},
                                  bytes(100_000)), "exceeds the limit of 65536 bytes", 14),
    ("unknown op", _frames({"op": "frobnicate", "rid": 15}), "unknown op 'frobnicate'; this server handles", 15),
]


@pytest.fixture
def raw_dealer(job_token):
    """``connect(endpoint) -> send_and_receive(frames) -> (header, arrays)`` over a bare DEALER."""
    ctx = zmq.Context()
    socks = []

    def connect(endpoint):
        sock = ctx.socket(zmq.DEALER)
        sock.linger = 0
        configure_client_socket(sock, job_token, AuthMode.PLAIN)
        sock.connect(endpoint)
        socks.append(sock)

        def send_and_receive(frames):
            sock.send_multipart(frames)
            assert sock.poll(10_000), "no reply within 10 s"
            return wire.decode(sock.recv_multipart(copy=False))
        return send_and_receive

    yield connect
    for sock in socks:
        sock.close(0)
    ctx.term()


def test_malformed_requests_get_error_replies_and_the_server_keeps_serving(rpc_server, raw_dealer, job_token):
    server = rpc_server(HANDLERS, job_token, max_bytes=64 * 1024)
    exchange = raw_dealer(server.endpoint)
    valid = wire.encode({"op": "echo", "rid": 100, "tag": "ok"}, [np.arange(3, dtype=np.int64)])
    for case, frames, message, rid in MALFORMED:
        header, arrays = exchange(frames)
        assert header["ok"] is False, case
        assert re.search(message, header["error"]), f"{case}: {header['error']!r}"
        assert header["rid"] == rid, case
        assert header["kind"] in ("WireError", "UnknownOpError"), case
        assert arrays == []
        header, (a,) = exchange(valid)  # and the next valid request is served
        assert header["ok"] is True and header["rid"] == 100 and header["tag"] == "ok", case
        np.testing.assert_array_equal(a, [0, 1, 2])


def test_frame_over_the_hard_limit_drops_the_connection_and_the_server_survives(rpc_server, rpc_client, job_token):
    server = rpc_server(HANDLERS, job_token, max_bytes=64 * 1024)
    client = rpc_client([server.endpoint], job_token, timeout=10.0)
    client.call(0, "echo")
    huge = np.zeros(server.hard_max_bytes + 1, np.uint8)  # libzmq refuses it (MAXMSGSIZE)
    t0 = time.monotonic()
    with pytest.raises(ConnectionLostError, match=re.escape(server.endpoint)):
        client.call(0, "echo", {}, [huge])
    assert time.monotonic() - t0 < 5.0
    fresh = rpc_client([server.endpoint], job_token, timeout=10.0)
    assert fresh.call(0, "echo", {"tag": "after"})[0]["tag"] == "after"
    wait_until(lambda: client.state(0) is ConnState.READY, 10.0, "the dropped client to reconnect")
    assert client.call(0, "echo", {"tag": "again"})[0]["tag"] == "again"


# -- round trips through RpcServer / RpcClient -------------------------------------------------

def test_round_trip_every_dtype_and_shape(rpc_server, rpc_client, job_token):
    server = rpc_server(HANDLERS, job_token)
    client = rpc_client([server.endpoint], job_token, timeout=10.0)
    arrays = [sample(dt, shape, seed=i) for i, (dt, shape) in enumerate(DTYPES_AND_SHAPES)]
    arrays.append(np.arange(24, dtype=np.float64).reshape(4, 6)[:, ::2])  # non-contiguous input
    arrays.append(np.zeros((1 << 18,), np.float32) + 3)  # 1 MiB: the zero-copy path
    header, back = client.call(0, "echo", {"tag": "all", "table": 3}, arrays)
    assert header["ok"] is True and header["n"] == len(arrays) and header["tag"] == "all"
    assert header["table"] == 3 and header["client"] == client.client_id and header["op"] == "echo"
    for a, b in zip(arrays, back):
        assert b.dtype == a.dtype and b.shape == a.shape
        np.testing.assert_array_equal(b, a)
        assert not b.flags.writeable


def test_many_concurrent_requests_from_many_threads_are_matched(rpc_server, rpc_client, job_token):
    servers = [rpc_server(HANDLERS, job_token, n_threads=3) for _ in range(2)]
    client = rpc_client([s.endpoint for s in servers], job_token, timeout=20.0)
    errors = []

    def worker(t: int) -> None:
        try:
            for batch in range(5):
                handles = []
                for i in range(8):
                    tag = f"{t}-{batch}-{i}"
                    payload = np.full(1 + (t * 7 + i) % 50, t * 1000 + batch * 10 + i, np.int64)
                    h = client.call_async((t + i) % 2, "echo", {"tag": tag, "seq": client.next_seq()}, [payload])
                    handles.append((tag, payload, h))
                for tag, payload, h in reversed(handles):  # waited out of order on purpose
                    header, (back,) = h.wait()
                    assert header["tag"] == tag, (header["tag"], tag)
                    np.testing.assert_array_equal(back, payload)
        except BaseException as e:  # reported by the main thread
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30.0)
    assert not any(t.is_alive() for t in threads), "worker threads hung"
    assert not errors, errors[0]


def test_waiters_pass_the_receiving_role_on(rpc_server, rpc_client, job_token):
    """One waiting thread receives for all; when it leaves, another takes over (no stall to the timeout)."""
    server = rpc_server(HANDLERS, job_token, n_threads=8)
    client = rpc_client([server.endpoint], job_token, timeout=20.0)
    took, errors = {}, []

    def waiter(name, op, header):
        try:
            t0 = time.monotonic()
            client.call(0, op, header)
            took[name] = time.monotonic() - t0
        except BaseException as e:
            errors.append(e)

    plan = [("fast0", "echo", {}, 0.0), ("slow0.6", "slow", {"seconds": 0.6}, 0.6),
            ("slow0.3", "slow", {"seconds": 0.3}, 0.3), ("fast1", "echo", {}, 0.0),
            ("slow0.9", "slow", {"seconds": 0.9}, 0.9)]
    threads = [threading.Thread(target=waiter, args=p[:3]) for p in plan]
    for t in threads:
        t.start()
        time.sleep(0.01)
    for t in threads:
        t.join(15.0)
    assert not errors, errors[0]
    for name, _, _, seconds in plan:
        assert took[name] < seconds + 3.0, f"{name} took {took[name]:.2f} s"


def test_done_polls_without_waiting(rpc_server, rpc_client, job_token):
    server = rpc_server(HANDLERS, job_token)
    client = rpc_client([server.endpoint], job_token)
    h = client.call_async(0, "echo", {"tag": "poll"})
    wait_until(h.done, 10.0, "done() to turn true")
    assert h.wait(0)[0]["tag"] == "poll"


def test_seq_and_client_id(rpc_server, rpc_client, job_token):
    server = rpc_server(HANDLERS, job_token)
    a = rpc_client([server.endpoint], job_token, client_id="worker-3")
    b = rpc_client([server.endpoint], job_token)
    assert [a.next_seq() for _ in range(3)] == [1, 2, 3]
    header, _ = a.call(0, "echo", {"seq": a.next_seq()})
    assert header["client"] == "worker-3" and header["seq"] == 4
    assert b.client_id != a.client_id and len(b.client_id) >= 16
    with pytest.raises(WireError, match="set by the client"):
        a.call_async(0, "echo", {"rid": 1})


def test_handler_errors_become_remote_errors_and_the_server_keeps_serving(rpc_server, rpc_client, job_token):
    server = rpc_server(HANDLERS, job_token)
    client = rpc_client([server.endpoint], job_token, timeout=10.0)
    cases = [("boom", "ValueError", "boom: the handler failed on purpose"),
             ("no_table", "TableError", "table 7 does not exist"),
             ("bad_return", "TypeError", "expected a tuple"),
             ("nope", "UnknownOpError", "unknown op 'nope'")]
    for op, kind, text in cases:
        with pytest.raises(RemoteError) as info:
            client.call(0, op, {"table": 7})
        e = info.value
        assert e.kind == kind and e.op == op and e.endpoint == server.endpoint
        assert text in str(e) and server.endpoint in str(e)
        assert client.call(0, "echo", {"tag": op})[0]["tag"] == op


def test_timeout_names_endpoint_and_op_and_late_replies_are_dropped(rpc_server, rpc_client, job_token):
    server = rpc_server(HANDLERS, job_token)
    client = rpc_client([server.endpoint], job_token, timeout=10.0)
    t0 = time.monotonic()
    with pytest.raises(PSTimeoutError) as info:
        client.call(0, "slow", {"seconds": 1.0}, timeout=0.3)
    assert time.monotonic() - t0 < 0.9
    assert server.endpoint in str(info.value) and "'slow'" in str(info.value)
    h = client.call_async(0, "slow", {"seconds": 0.5})
    with pytest.raises(PSTimeoutError):
        h.wait(timeout=0.05)
    with pytest.raises(PSTimeoutError):  # the outcome sticks: abandoned, not waited on again
        h.wait()
    time.sleep(1.0)  # both late replies arrive now, and are dropped
    assert client.call(0, "echo", {"tag": "fresh"})[0]["tag"] == "fresh"


def test_server_that_never_answers_times_out_with_a_hint(rpc_server, rpc_client, job_token):
    server = rpc_server(HANDLERS, job_token)
    dead = server.endpoint
    server.stop()  # nothing listens there any more
    client = rpc_client([dead], job_token, timeout=0.5)
    t0 = time.monotonic()
    with pytest.raises(PSTimeoutError, match="no connection to it was ever established: is a server running"):
        client.call(0, "echo")
    assert time.monotonic() - t0 < 3.0


# -- authentication ----------------------------------------------------------------------------

@pytest.mark.parametrize("auth", ["plain", "curve"])
def test_right_token_works_wrong_token_is_refused_promptly(rpc_server, rpc_client, job_token, auth):
    server = rpc_server(HANDLERS, job_token, auth=auth)
    good = rpc_client([server.endpoint], job_token, auth=auth, timeout=10.0)
    assert good.call(0, "echo", {"tag": auth})[0]["tag"] == auth
    bad = rpc_client([server.endpoint], "not-the-job-token", auth=auth, timeout=10.0)
    t0 = time.monotonic()
    with pytest.raises(AuthError) as info:
        bad.call(0, "echo")
    assert time.monotonic() - t0 < 5.0, "refusal must not wait for the call timeout"
    assert server.endpoint in str(info.value) and "SHOAL_JOB_TOKEN" in str(info.value)
    with pytest.raises(AuthError):  # later calls fail at once
        bad.call(0, "echo")
    assert good.call(0, "echo", {"tag": "still"})[0]["tag"] == "still"


def test_auth_mode_mismatch_is_refused_promptly(rpc_server, rpc_client, job_token):
    server = rpc_server(HANDLERS, job_token, auth="plain")
    client = rpc_client([server.endpoint], job_token, auth="curve", timeout=10.0)
    t0 = time.monotonic()
    with pytest.raises(AuthError, match="SHOAL_JOB_TOKEN and the auth mode"):
        client.call(0, "echo")
    assert time.monotonic() - t0 < 5.0


def test_bad_tokens_and_modes_are_refused_up_front(job_token):
    with pytest.raises(AuthError, match="job token is empty"):
        RpcClient(["127.0.0.1:1"], "")
    with pytest.raises(AuthError, match="auth mode 'tls' is not known"):
        RpcServer(token=job_token, auth="tls", handlers={})
    public, secret = curve_server_keys(job_token)
    assert curve_server_keys(job_token) == (public, secret) and zmq.curve_public(secret) == public
    assert curve_server_keys(job_token + "x")[0] != public


# -- lifecycle ---------------------------------------------------------------------------------

def test_graceful_stop_drains_in_flight_requests_then_refuses(rpc_server, rpc_client, job_token):
    started, release = threading.Event(), threading.Event()

    def gate(header, arrays):
        started.set()
        release.wait(10.0)
        return {"drained": True}, [np.arange(3)]

    server = rpc_server({**HANDLERS, "gate": gate}, job_token, n_threads=2)
    client = rpc_client([server.endpoint], job_token, timeout=15.0)
    in_flight = client.call_async(0, "gate")
    assert started.wait(10.0)
    stopper = threading.Thread(target=server.stop, kwargs={"drain_timeout": 10.0})
    stopper.start()
    wait_until(lambda: server.state is ServerState.STOPPING, 5.0, "the server to start draining")
    t0 = time.monotonic()
    with pytest.raises(RemoteError) as info:  # refused while draining, promptly
        client.call(0, "echo")
    assert info.value.kind == "ClosedError" and "stopping" in str(info.value)
    assert time.monotonic() - t0 < 3.0
    release.set()
    header, (a,) = in_flight.wait()  # the in-flight reply still arrives
    assert header["drained"] is True
    np.testing.assert_array_equal(a, [0, 1, 2])
    stopper.join(10.0)
    assert not stopper.is_alive() and server.state is ServerState.STOPPED
    t0 = time.monotonic()
    with pytest.raises(ConnectionLostError, match=re.escape(server.endpoint)):
        client.call(0, "echo")  # after stop: fails promptly, not at the timeout
    assert time.monotonic() - t0 < 3.0


def test_closing_the_client_fails_pending_calls_promptly(rpc_server, rpc_client, job_token):
    server = rpc_server(HANDLERS, job_token)
    client = rpc_client([server.endpoint], job_token, timeout=30.0)
    h = client.call_async(0, "slow", {"seconds": 1.0})
    threading.Timer(0.2, client.close).start()
    t0 = time.monotonic()
    with pytest.raises(ClosedError, match="closed while op 'slow'"):
        h.wait()
    assert time.monotonic() - t0 < 2.0
    with pytest.raises(ClosedError):
        client.call_async(0, "echo")
    client.close()  # idempotent


def test_start_errors_name_the_endpoint(rpc_server, job_token):
    server = rpc_server(HANDLERS, job_token)
    with pytest.raises(PSError, match="already running"):
        server.start()
    taken = RpcServer(server.endpoint, token=job_token, handlers=HANDLERS)
    with pytest.raises(PSError, match=f"cannot bind the parameter server to {re.escape(server.endpoint)}"):
        taken.start()
    taken.stop()
    with pytest.raises(PSError, match="is not host:port"):
        RpcServer("127.0.0.1", token=job_token, handlers=HANDLERS)


def test_server_in_a_separate_process(server_process, rpc_client, job_token):
    endpoint, child_pid = server_process("tests.ps.test_rpc:make_echo_server", token=job_token)
    assert endpoint.startswith("tcp://127.0.0.1:") and not endpoint.endswith(":0")
    client = rpc_client(endpoint.replace("tcp://", ""), job_token, timeout=20.0)  # host:port works too
    assert client.call(0, "pid")[0]["pid"] == child_pid != os.getpid()
    payload = np.random.default_rng(0).standard_normal((512, 64)).astype(np.float32)
    header, (back,) = client.call(0, "echo", {"tag": "x"}, [payload])
    np.testing.assert_array_equal(back, payload)
    with pytest.raises(RemoteError, match="boom"):
        client.call(0, "boom")


def test_no_pickle_in_the_transport():
    sources = sorted((Path(wire.__file__).parent).glob("*.py"))
    assert len(sources) >= 5
    for path in sources:
        text = path.read_text()
        for banned in ("import pickle", "pickle.", "marshal", "eval(", "exec(", "recv_pyobj", "send_pyobj"):
            assert banned not in text, f"{path.name} mentions {banned!r}"


def test_inline_ops_are_served_while_a_slow_op_runs(rpc_server, rpc_client, job_token):
    """An inline op is served on the receiving thread; other ops still get their own worker."""
    server = rpc_server({"echo": echo, "slow": slow}, job_token, n_threads=2, inline_ops={"echo"})
    client = rpc_client([server.endpoint], job_token, timeout=10)
    slow_call = client.call_async(0, "slow", {"seconds": 3.0})
    time.sleep(0.1)
    for i in range(50):
        header, arrays = client.call(0, "echo", {"tag": i}, [np.arange(i, dtype=np.int64)])
        assert header["tag"] == i and arrays[0].tolist() == list(range(i))
    assert not slow_call.done()  # the echoes were not queued behind the 3 s call (wide margin)
    assert slow_call.wait()[0]["slept"] is True

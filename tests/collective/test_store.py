"""The rendezvous store: values, counters, blocking waits with deadlines, the job token."""
import threading
import time

import msgpack
import pytest
import zmq

from shoal.collective import PrefixStore, RendezvousError, StoreClient, StoreServer, StoreTimeoutError


@pytest.fixture
def server():
    with StoreServer("127.0.0.1", 0, token="secret") as s:
        yield s


def test_set_get_add_check_and_prefixes(server):
    c = StoreClient(server.endpoint, token="secret", timeout=5)
    c.set("a", b"\x00\x01")
    assert c.get("a") == b"\x00\x01"
    assert c.add("n", 2) == 2 and c.add("n", 5) == 7
    assert c.check(["a", "n"]) and not c.check(["a", "missing"])
    p = PrefixStore(c, "gen1/")
    p.set("k", b"v")
    assert c.get("gen1/k") == b"v" and p.get("k") == b"v"
    assert c.delete_prefix("gen1/") == 1 and not c.check(["gen1/k"])
    c.close()


def test_get_blocks_until_another_client_sets(server):
    a = StoreClient(server.endpoint, token="secret", timeout=5)
    b = StoreClient(server.endpoint, token="secret", timeout=5)
    threading.Timer(0.3, b.set, ("late", b"1")).start()
    t0 = time.monotonic()
    assert a.get("late") == b"1"
    assert 0.2 < time.monotonic() - t0 < 3
    a.wait(["late"], timeout=1)


def test_a_key_that_never_comes_times_out(server):
    c = StoreClient(server.endpoint, token="secret", timeout=5)
    t0 = time.monotonic()
    with pytest.raises(StoreTimeoutError, match="never"):
        c.get("never", timeout=0.4)
    with pytest.raises(StoreTimeoutError):
        c.wait(["a", "never"], timeout=0.3)
    assert time.monotonic() - t0 < 3


def test_a_wrong_token_is_refused_and_changes_nothing(server):
    bad = StoreClient(server.endpoint, token="wrong", timeout=2)
    with pytest.raises(RendezvousError, match="token"):
        bad.set("k", b"v")
    good = StoreClient(server.endpoint, token="secret", timeout=2)
    assert not good.check(["k"])


def test_malformed_requests_change_nothing(server):
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(f"tcp://{server.endpoint}")
    sock.send(b"\xc1 not msgpack")
    sock.send(msgpack.packb({"id": 1, "op": "explode", "token": "secret"}))
    assert sock.poll(2000)
    reply = msgpack.unpackb(sock.recv())
    assert reply["id"] == 1 and not reply["ok"] and "unknown store op" in reply["error"]
    sock.close()
    c = StoreClient(server.endpoint, token="secret", timeout=2)
    c.set("still", b"works")
    assert c.get("still") == b"works"


def test_no_server_means_a_bounded_wait_and_a_clear_error():
    with StoreServer("127.0.0.1", 0) as s:
        endpoint = s.endpoint
    c = StoreClient(endpoint, timeout=0.5)
    t0 = time.monotonic()
    with pytest.raises(RendezvousError, match="did not answer"):
        c.set("k", b"v")
    assert time.monotonic() - t0 < 5


def test_a_busy_port_is_refused_with_the_address():
    with StoreServer("127.0.0.1", 0) as s:
        port = int(s.endpoint.rsplit(":", 1)[1])
        with pytest.raises(RendezvousError, match=f"cannot bind 127.0.0.1:{port}"):
            StoreServer("127.0.0.1", port)


@pytest.mark.parametrize("timeout_ms", [float("nan"), float("inf"), -5])
def test_a_non_finite_or_negative_wait_is_refused_and_the_server_lives_on(server, timeout_ms):
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(f"tcp://{server.endpoint}")
    sock.send(msgpack.packb({"id": 7, "op": "get", "key": "k", "timeout_ms": timeout_ms,
                             "token": "secret"}))
    assert sock.poll(2000)
    reply = msgpack.unpackb(sock.recv())
    assert not reply["ok"] and "timeout_ms" in reply["error"]
    sock.close()
    c = StoreClient(server.endpoint, token="secret", timeout=2)
    with pytest.raises(RendezvousError, match="finite"):
        c.get("k", timeout=float("inf"))
    c.set("k", b"v")
    assert c.get("k") == b"v"

"""Parameter servers as real processes on 127.0.0.1, driven through PSClient."""
import threading

import msgpack
import numpy as np
import pytest
import zmq

from shoal.ps.client import PSClient
from shoal.ps.errors import PSError, PSTimeoutError, RemoteError, TableError
from shoal.ps.partition import partition
from shoal.ps.rpc.auth import configure_client_socket
from shoal.ps.sparse_table import SparseTable
from shoal.ps.spec import DenseTableSpec, SparseTableSpec
from tests.ps.servers import TOKEN, running_servers

SPEC = SparseTableSpec(name="emb", dim=8, rule="adagrad", nonclk_coeff=1.0, base_threshold=0.0,
                       delta_threshold=0.0)
DENSE = DenseTableSpec(name="w", size=37, rule="adam", learning_rate=0.1)


@pytest.fixture(scope="module")
def two_servers(tmp_path_factory):
    with running_servers(2, tmp_path_factory.mktemp("ps2")) as (endpoints, procs):
        yield endpoints, procs


@pytest.fixture
def client(two_servers):
    c = PSClient(two_servers[0], TOKEN, timeout=20)
    yield c
    c.close()


def _batches(seed, n_batches=5, n=300):
    rng = np.random.default_rng(seed)
    for _ in range(n_batches):
        keys = rng.integers(0, 2000, n).astype(np.uint64)  # many duplicates
        yield keys, rng.normal(size=(n, 8)).astype(np.float32), \
            rng.integers(1, 3, n).astype(np.float32), rng.integers(0, 2, n).astype(np.float32)


def test_pulls_after_pushes_match_an_in_process_table(client):
    client.create_table(SPEC)
    local = SparseTable(SPEC)
    for keys, grads, shows, clicks in _batches(0):
        np.testing.assert_array_equal(client.pull_sparse("emb", keys), local.pull(keys))
        client.push_sparse("emb", keys, grads, shows, clicks)
        local.push(keys, grads, shows, clicks)
    keys = np.arange(2000, dtype=np.uint64)
    np.testing.assert_allclose(client.pull_sparse("emb", keys, training=False),
                               local.pull(keys, training=False), rtol=1e-6, atol=1e-7)
    rows = sum(s["tables"]["emb"]["rows"] for s in client.stats())
    assert rows == len(local)


def test_read_only_pull_creates_no_row(client):
    client.create_table(SparseTableSpec(name="ro", dim=2))
    out = client.pull_sparse("ro", np.arange(100, dtype=np.uint64), training=False)
    assert np.all(out == 0)
    assert sum(s["tables"]["ro"]["rows"] for s in client.stats()) == 0


def test_dense_table_runs_its_rule_on_the_servers(client):
    client.create_table(DENSE)
    values = np.linspace(-1, 1, 37).astype(np.float32)
    client.init_dense("w", values)
    grad = np.full(37, 0.5, np.float32)
    client.push_dense("w", grad)
    # adam's first step moves every value by lr (bias-corrected m/sqrt(v) = 1)
    np.testing.assert_allclose(client.pull_dense("w"), values - 0.1, rtol=1e-5, atol=1e-6)


def test_create_table_is_idempotent_and_refuses_a_conflict(client):
    spec = SparseTableSpec(name="same", dim=3)
    client.create_table(spec)
    client.create_table(spec)
    with pytest.raises(RemoteError, match="exists with a different spec") as e:
        client.create_table(SparseTableSpec(name="same", dim=4))
    assert e.value.kind == "TableError"


def test_a_retried_push_is_applied_once(client):
    client.create_table(SparseTableSpec(name="once", dim=2, rule="naive", scale_by_show=False,
                                        initial_range=0.0))
    key = np.array([7], np.uint64)
    client.pull_sparse("once", key)
    server = int(partition(key, client.n)[0])
    header = {"table": "once", "seq": client.rpc.next_seq()}
    arrays = [key, np.array([[1.0, 1.0, 1.0, 0.0]], np.float32)]  # [grads | show | click]
    first = client.rpc.call(server, "push_sparse", header, arrays)[0]
    again = client.rpc.call(server, "push_sparse", header, arrays)[0]
    assert first["applied"] is True and again["applied"] is False
    np.testing.assert_allclose(client.pull_sparse("once", key, training=False), [[-0.05, -0.05]])


def test_barrier_and_reduce_gather_every_caller(two_servers):
    clients = [PSClient(two_servers[0], TOKEN, timeout=20) for _ in range(3)]
    results, errors = [None] * 3, []

    def work(i):
        try:
            clients[i].barrier("start", 3, timeout=20)
            results[i] = clients[i].reduce("sum", np.full(4, i + 1.0), 3, timeout=20)
        except Exception as e:  # surfaced below
            errors.append(e)
    threads = [threading.Thread(target=work, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    for c in clients:
        c.close()
    assert not errors
    for r in results:
        np.testing.assert_array_equal(r, np.full(4, 6.0))


def test_a_barrier_nobody_else_reaches_times_out(client):
    with pytest.raises(RemoteError, match=r"1 of 2 participants arrived") as e:
        client.barrier("lonely", 2, timeout=0.5)
    assert e.value.kind == "PSTimeoutError"


def test_save_on_two_servers_loads_onto_three(client, tmp_path):
    spec = SparseTableSpec(name="ck", dim=4, rule="adam")
    client.create_table(spec)
    keys = np.arange(1, 400, dtype=np.uint64)
    client.pull_sparse("ck", keys)
    client.push_sparse("ck", keys, np.ones((len(keys), 4), np.float32))
    before = client.pull_sparse("ck", keys, training=False)
    client.save(str(tmp_path / "ckpt"), mode=0)
    with running_servers(3, tmp_path) as (endpoints, _):
        with PSClient(endpoints, TOKEN, timeout=20) as other:
            other.load(str(tmp_path / "ckpt"))
            other.register_table(spec)
            np.testing.assert_array_equal(other.pull_sparse("ck", keys, training=False), before)
            assert sum(s["tables"]["ck"]["rows"] for s in other.stats()) == len(keys)
            # optimizer state moved too: the same push on both sides stays equal
            client.push_sparse("ck", keys, np.ones((len(keys), 4), np.float32))
            other.push_sparse("ck", keys, np.ones((len(keys), 4), np.float32))
            np.testing.assert_array_equal(other.pull_sparse("ck", keys, training=False),
                                          client.pull_sparse("ck", keys, training=False))


# -- bad input against a live server ---------------------------------------------------------
def _checksum(client, table):
    return [s["tables"][table]["checksum"] for s in client.stats()]


@pytest.fixture
def filled(client):
    client.create_table(SparseTableSpec(name="bad", dim=4))
    keys = np.arange(50, dtype=np.uint64)
    client.pull_sparse("bad", keys)
    return client, _checksum(client, "bad")


@pytest.mark.parametrize("op,header,arrays,match", [
    ("push_sparse", {"table": "bad"},
     [np.arange(2, dtype=np.uint64), np.ones((2, 7), np.float32)],
     r"must be float32 of shape \(2, 6\)"),
    ("push_sparse", {"table": "bad"},
     [np.arange(2, dtype=np.uint64), np.ones((2, 6), np.float64)], "must be float32"),
    ("push_sparse", {"table": "bad"},
     [np.arange(2, dtype=np.int64), np.ones((2, 6), np.float32)], "keys must be a 1-D uint64"),
    ("push_sparse", {"table": "bad"},
     [np.arange(2, dtype=np.uint64), np.full((2, 6), np.inf, np.float32)], "NaN or inf"),
    ("push_sparse", {"table": "nope"}, [], "unknown table 'nope'"),
    ("push_sparse", {"table": "bad"}, [np.arange(2, dtype=np.uint64)], "expected 2 arrays"),
    ("pull_sparse", {"table": "bad", "training": "yes"}, [np.arange(2, dtype=np.uint64)],
     "'training' and 'unique' must be true or false"),
    ("frobnicate", {}, [], "frobnicate"),
])
def test_bad_requests_get_an_error_reply_and_change_nothing(filled, op, header, arrays, match):
    client, before = filled
    with pytest.raises(RemoteError, match=match):
        client.rpc.call(0, op, header, arrays)
    assert _checksum(client, "bad") == before
    assert client.pull_sparse("bad", np.arange(3, dtype=np.uint64), training=False).shape == (3, 4)


def test_malformed_frames_get_error_replies(filled, two_servers):
    client, before = filled
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    configure_client_socket(sock, TOKEN, "plain")
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.RCVTIMEO, 10000)
    sock.connect(two_servers[0][0])
    try:
        for frames, match in [
            ([b"\xc1not msgpack"], None),
            ([msgpack.packb({"op": "pull_sparse", "rid": 5, "table": "bad", "training": True,
                             "arrays": [["uint64", [4]]]}), b"\x00" * 8], None),  # truncated buffer
            ([msgpack.packb({"op": "pull_sparse", "rid": 6, "table": "bad"})], None),
        ]:
            sock.send_multipart(frames)
            reply = msgpack.unpackb(sock.recv_multipart()[0])
            assert reply["ok"] is False and reply["error"]
    finally:
        sock.close()
        ctx.term()
    assert _checksum(client, "bad") == before
    assert client.stats()[0]["index"] == 0


def test_a_wrong_token_is_refused(two_servers):
    with PSClient(two_servers[0], "not-the-token", timeout=3, retries=0) as bad:
        with pytest.raises(PSError):
            bad.stats()


def test_an_oversized_request_is_refused(tmp_path):
    with running_servers(1, tmp_path, extra_args=("--max-bytes", "100000")) as (endpoints, _):
        with PSClient(endpoints, TOKEN, timeout=20) as c:
            c.create_table(SparseTableSpec(name="t", dim=16))
            keys = np.arange(20000, dtype=np.uint64)  # 160 kB of keys in one request
            with pytest.raises(RemoteError, match="bytes"):
                c.pull_sparse("t", keys)
            assert c.stats()[0]["tables"]["t"]["rows"] == 0
            c.pull_sparse("t", keys[:10])
            assert c.stats()[0]["tables"]["t"]["rows"] == 10


def test_stop_makes_every_server_exit(tmp_path):
    with running_servers(2, tmp_path) as (endpoints, procs):
        with PSClient(endpoints, TOKEN, timeout=20) as c:
            c.stop_servers()
        for p in procs:
            assert p.wait(timeout=15) == 0


def test_table_error_reaches_the_caller_before_any_call(client):
    with pytest.raises(TableError, match="unknown to this client"):
        client.pull_sparse("never-created", np.arange(3, dtype=np.uint64))
    with pytest.raises(TableError, match="1-D uint64"):
        client.register_table(SparseTableSpec(name="k", dim=2))
        client.pull_sparse("k", np.arange(3))


def test_timeouts_name_the_server_and_op(tmp_path):
    with running_servers(1, tmp_path) as (endpoints, procs):
        procs[0].send_signal(19)  # SIGSTOP: the server stops answering
        try:
            with PSClient(endpoints, TOKEN, timeout=1, retries=0) as c:
                with pytest.raises(PSTimeoutError, match=r"stats.*127\.0\.0\.1|127\.0\.0\.1.*stats"):
                    c.stats()
        finally:
            procs[0].send_signal(18)  # SIGCONT, so the fixture can stop it

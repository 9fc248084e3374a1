"""Pass mode's pieces: the servers' record pull and merge, the worker's PassTable, the communicator."""
from __future__ import annotations

import time

import numpy as np
import pytest

from shoal.kernels import get_backend
from shoal.ps.client import PSClient
from shoal.ps.communicator import CommunicatorError, PassTable, make_communicator
from shoal.ps.errors import RemoteError, TableError
from shoal.ps.sparse_table import SparseTable
from shoal.ps.spec import SparseTableSpec
from tests.ps.servers import TOKEN, running_servers

NP = get_backend("numpy")


def _batches(rng, universe: np.ndarray, dim: int, n: int = 6, size: int = 40):
    out = []
    for _ in range(n):
        keys = np.unique(rng.choice(universe, size))
        shows = rng.integers(1, 4, len(keys)).astype(np.float32)
        clicks = np.minimum(shows, rng.integers(0, 2, len(keys))).astype(np.float32)
        out.append((keys, rng.normal(0, 0.5, (len(keys), dim)).astype(np.float32), shows, clicks))
    return out


def _rows(table: SparseTable) -> dict:
    data = table.export(0)
    order = np.argsort(data["keys"])
    return {k: v[order] for k, v in data.items()}


def _assert_tables_equal(a: SparseTable, b: SparseTable, atol=2e-6) -> None:
    ra, rb = _rows(a), _rows(b)
    np.testing.assert_array_equal(ra["keys"], rb["keys"])
    for name in ra:
        np.testing.assert_allclose(ra[name], rb[name], atol=atol, rtol=1e-5, err_msg=name)


def _pass(spec, batches, backend=NP, pass_spec=None):
    """Train `batches` once per step on a server table and once as a pass (PassTable, then
    merge_pass into another table, of `pass_spec` if given): returns (per-step, pass table)."""
    step_table, pass_table = SparseTable(spec), SparseTable(pass_spec or spec)
    universe = np.unique(np.concatenate([b[0] for b in batches]))
    step_table.pull(universe, training=True)
    local = PassTable(spec, backend)
    found, records = pass_table.pull_records(universe)
    local.load(universe, found, records)
    for keys, grads, shows, clicks in batches:
        np.testing.assert_allclose(local.pull(keys), step_table.pull(keys, training=True), atol=2e-6)
        local.push(keys, grads, shows, clicks)
        step_table.push(keys, grads, shows, clicks)
    pass_table.merge_pass(*local.write_back())
    return step_table, pass_table


@pytest.mark.parametrize("rule", ["naive", "adagrad", "std_adagrad", "adam"])
@pytest.mark.parametrize("split", [False, True])
def test_a_pass_equals_the_same_pushes_applied_step_by_step(rule, split):
    spec = SparseTableSpec(name="t", dim=5, rule=rule, shards=2,
                           embedx_threshold=2.0 if split else None)
    rng = np.random.default_rng(1)
    step_table, pass_table = _pass(spec, _batches(rng, np.arange(1, 120, dtype=np.uint64) * 7919, 5))
    if split:  # some rows grew embedx during the pass, some did not
        flags = _rows(pass_table)["has_embedx"]
        assert flags.any() and not flags.all()
    _assert_tables_equal(pass_table, step_table)


def test_two_write_backs_move_a_row_by_the_shows_weighted_mean_and_add_the_statistics():
    spec = SparseTableSpec(name="t", dim=3, rule="naive", learning_rate=1.0, scale_by_show=False)
    table = SparseTable(spec)
    keys = np.array([5, 9], np.uint64)
    _, rec = table.pull_records(keys)
    base = _rows(table)
    copies = []
    for grad, shows in ((1.0, [1, 0]), (-0.5, [3, 2])):
        local = PassTable(spec, NP)
        local.load(keys, np.ones(2, bool), rec)
        sent = np.array(shows, np.float32) > 0
        local.push(keys[sent], np.full((int(sent.sum()), 3), grad, np.float32),
                   np.array(shows, np.float32)[sent], np.zeros(int(sent.sum()), np.float32))
        copies.append(local.write_back())
    table.merge_pass(np.concatenate([k for k, _ in copies]), np.concatenate([p for _, p in copies]))
    after = _rows(table)
    # key 5: shows 1 and 3, moves -1 and +0.5 -> (1 * -1 + 3 * 0.5) / 4; key 9: only the second
    np.testing.assert_allclose(after["emb"] - base["emb"], [[0.125] * 3, [0.5] * 3], atol=1e-6)
    np.testing.assert_allclose(after["stat.show"] - base["stat.show"], [4, 2])
    assert (after["stat.unseen_days"] == 0).all()


def test_keys_the_entry_refused_read_zeros_train_nothing_and_count_their_shows():
    spec = SparseTableSpec(name="t", dim=4, entry="show_click", entry_threshold=1.0)
    table = SparseTable(spec)
    keys = np.array([1, 2], np.uint64)
    found, rec = table.pull_records(keys)
    assert not found.any() and not rec.any() and len(table) == 0
    local = PassTable(spec, NP)
    local.load(keys, found, rec)
    assert not local.pull(keys).any()
    local.push(keys, np.ones((2, 4), np.float32), np.array([3, 1], np.float32), np.array([1, 0], np.float32))
    assert not local.pull(keys).any()
    table.merge_pass(*local.write_back())
    assert len(table) == 0 and table.stats()["pending"] == 2
    found, _ = table.pull_records(keys)  # key 1: score 2 * 0.1 + 1 = 1.2 >= 1.0 now; key 2: 0.1
    assert found.tolist() == [True, False]


def test_pull_records_of_a_tiered_table_promote_cold_rows(tmp_path):
    spec = SparseTableSpec(name="t", dim=4, shards=1, storage="ssd", memory_budget_mb=0.001,
                           ssd_path=str(tmp_path))
    table, ref = SparseTable(spec), SparseTable(SparseTableSpec(name="t", dim=4, shards=1))
    try:
        keys = np.arange(1, 200, dtype=np.uint64)
        for t in (table, ref):
            t.pull(keys, training=True)
            t.push(keys, np.ones((len(keys), 4), np.float32))
        assert table.stats()["tiers"]["cold.ssd"]["rows"] > 100
        got, want = table.pull_records(keys), ref.pull_records(keys)
        assert got[0].all()
        np.testing.assert_array_equal(got[1], want[1])
    finally:
        table.close()


def test_a_pass_over_a_tiered_table_equals_the_same_pushes_step_by_step(tmp_path):
    spec, other = (SparseTableSpec(name="t", dim=4, storage="ssd", memory_budget_mb=0.002,
                                   ssd_path=str(tmp_path / d)) for d in ("step", "pass"))
    rng = np.random.default_rng(6)
    step_table, pass_table = _pass(spec, _batches(rng, np.arange(1, 400, dtype=np.uint64), 4, size=120),
                                   pass_spec=other)
    try:
        assert pass_table.stats()["tiers"]["cold.ssd"]["rows"] > 0
        _assert_tables_equal(pass_table, step_table)
    finally:
        step_table.close()
        pass_table.close()


@pytest.mark.parametrize("bad,match", [
    ("narrow", r"float32 of shape \(2, 1\d\)"),
    ("nan", "NaN or inf"),
    ("negative show", "must be >= 0"),
    ("negative weight", "must be >= 0"),
])
def test_a_bad_write_back_is_refused_and_changes_nothing(bad, match):
    table = SparseTable(SparseTableSpec(name="t", dim=4))
    keys = np.array([3, 4], np.uint64)
    table.pull_records(keys)
    before = table.checksum()
    packed = np.zeros((2, table.pass_width), np.float32)
    sh = table.shards[0]
    if bad == "narrow":
        packed = packed[:, :5]
    elif bad == "nan":
        packed[1, 0] = np.nan
    elif bad == "negative show":
        packed[0, sh.show] = -1
    else:
        packed[0, sh.width] = -1
    with pytest.raises(TableError, match=match):
        table.merge_pass(keys, packed)
    assert table.checksum() == before


def test_a_push_of_keys_never_pulled_or_of_bad_values_is_refused():
    spec = SparseTableSpec(name="t", dim=2, entry="count_filter", entry_count=5)
    local = PassTable(spec, NP)
    local.load(np.array([1], np.uint64), np.zeros(1, bool), np.zeros((1, local.width + 1), np.float32))
    ones, zeros = np.ones(2, np.float32), np.zeros(2, np.float32)
    with pytest.raises(CommunicatorError, match="1 keys were never pulled"):
        local.check(np.array([1, 2], np.uint64), np.ones((2, 2), np.float32), ones, zeros)
    with pytest.raises(CommunicatorError, match="NaN or inf"):
        local.check(np.array([1], np.uint64), np.full((1, 2), np.nan, np.float32), ones[:1], zeros[:1])
    with pytest.raises(CommunicatorError, match="do not fit 1 keys of dim 2"):
        local.check(np.array([1], np.uint64), np.ones((1, 3), np.float32), ones[:1], zeros[:1])
    with pytest.raises(CommunicatorError, match=">= 0"):
        local.check(np.array([1], np.uint64), np.ones((1, 2), np.float32), -ones[:1], zeros[:1])


def test_a_key_one_worker_could_not_train_takes_the_full_move_of_the_one_that_did():
    """count_filter(2): worker A's pull is the key's first sighting (not admitted), worker B's the
    second (admitted). Only B trains it: the row moves by B's move, not by a mean diluted by A's
    shows, and both workers' shows are counted."""
    spec = SparseTableSpec(name="t", dim=3, rule="naive", learning_rate=1.0, scale_by_show=False,
                           entry="count_filter", entry_count=2)
    table = SparseTable(spec)
    key = np.array([42], np.uint64)
    copies = []
    for _ in range(2):
        local = PassTable(spec, NP)
        local.load(key, *table.pull_records(key))
        copies.append(local)
    a, b = copies
    assert len(a.absent) == 1 and len(b.map) == 1
    start = b.pull(key).copy()
    a.push(key, np.ones((1, 3), np.float32), np.array([3], np.float32), np.zeros(1, np.float32))
    b.push(key, np.ones((1, 3), np.float32), np.array([1], np.float32), np.zeros(1, np.float32))
    parts = [c.write_back() for c in copies]
    table.merge_pass(np.concatenate([k for k, _ in parts]), np.concatenate([p for _, p in parts]))
    np.testing.assert_allclose(table.pull(key, training=False), start - 1.0, atol=1e-6)
    assert _rows(table)["stat.show"][0] == 4


def test_a_pass_still_trains_a_key_shown_more_than_two_to_the_24_times():
    """float32 cannot tell 3e7 + 1 from 3e7: the weights are the pass's own show counts, not a
    difference of the row's show statistic."""
    spec = SparseTableSpec(name="t", dim=2, rule="naive", learning_rate=1.0, scale_by_show=False)
    step_table, pass_table = SparseTable(spec), SparseTable(spec)
    key = np.array([7], np.uint64)
    for t in (step_table, pass_table):
        t.pull(key, training=True)
        sh = t.shards[0] if len(t.shards) == 1 else next(s for s in t.shards if len(s.map))
        sh.values[sh.map.lookup(key), sh.show] = 3e7
    local = PassTable(spec, NP)
    local.load(key, *pass_table.pull_records(key))
    grad = np.ones((1, 2), np.float32)
    local.push(key, grad, np.ones(1, np.float32), np.zeros(1, np.float32))
    step_table.push(key, grad)
    pass_table.merge_pass(*local.write_back())
    np.testing.assert_allclose(pass_table.pull(key, training=False),
                               step_table.pull(key, training=False), atol=1e-6)
    assert np.abs(step_table.pull(key, training=False)).max() > 0.5


def test_a_pass_over_a_tiered_table_keeps_the_arena_within_its_budget(tmp_path):
    spec = SparseTableSpec(name="t", dim=4, shards=1, storage="ssd", memory_budget_mb=0.01,
                           ssd_path=str(tmp_path))
    table = SparseTable(spec)
    try:
        shard = table.shards[0]
        budget = shard.cold.budget_rows
        keys = np.arange(1, 10 * budget, dtype=np.uint64)
        found, records = table.pull_records(keys)
        assert found.all() and len(table) == len(keys)
        assert shard.cap <= 1.5 * budget + 1 and len(shard.map) <= budget
        packed = np.zeros((len(keys), table.pass_width), np.float32)
        packed[:, shard.show] = 1
        table.merge_pass(keys, packed)
        assert shard.cap <= 1.5 * budget + 1 and len(shard.map) <= budget
        assert _rows(table)["stat.show"].sum() == len(keys)
    finally:
        table.close()


@pytest.fixture
def server(tmp_path):
    with running_servers(2, tmp_path) as (endpoints, _):
        with PSClient(endpoints, TOKEN, timeout=20) as client:
            client.create_table(SparseTableSpec(name="emb", dim=3, rule="adagrad"))
            yield client


def test_a_pass_sends_nothing_until_it_ends_then_the_servers_hold_the_copy(server):
    comm = make_communicator("pass", server, timeout=20)
    keys = np.arange(10, 60, dtype=np.uint64)
    comm.begin_pass({"emb": np.concatenate([keys, keys[:5]])})  # duplicates are fine
    with pytest.raises(CommunicatorError, match="pass 0 is still open"):
        comm.begin_pass({"emb": keys})
    before = [t["tables"]["emb"]["checksum"] for t in server.stats()]
    for step in range(4):
        k = keys[step::4]
        comm.pull("emb", k, training=True)
        comm.push("emb", k, np.full((len(k), 3), 0.3, np.float32), shows=np.ones(len(k), np.float32),
                  clicks=np.zeros(len(k), np.float32))
        comm.step(None, 0.0)
    assert [t["tables"]["emb"]["checksum"] for t in server.stats()] == before
    assert comm.misses == 0
    local = comm._tables["emb"].pull(keys)
    # evaluation during the pass reads the pass's values for its keys
    np.testing.assert_array_equal(comm.pull("emb", keys, training=False), local)
    # a key outside the pass is fetched when first pulled
    comm.pull("emb", np.array([999], np.uint64), training=True)
    assert comm.misses == 1
    comm.end_pass()
    assert not comm.in_pass and comm.passes == 1
    np.testing.assert_allclose(server.pull_sparse("emb", keys, training=False), local, atol=1e-6)
    assert sum(t["tables"]["emb"]["rows"] for t in server.stats()) == 51
    comm.stop()


def test_two_pushes_to_a_table_in_one_step_are_one_rule_step_as_in_sync_mode(server, monkeypatch):
    """Two layers sharing a table push the same keys in one backward: the servers of sync mode
    merge them into one update; so does a pass (adagrad would differ otherwise). Small chunks:
    the write-back and the pull go in several messages per server."""
    monkeypatch.setattr(PSClient, "PASS_CHUNK_KEYS", 7)
    ref = SparseTable(SparseTableSpec(name="emb", dim=3, rule="adagrad"))
    comm = make_communicator("pass", server, timeout=20)
    keys = np.arange(100, 140, dtype=np.uint64)
    comm.begin_pass({"emb": keys})
    ref.pull(keys, training=True)
    rng = np.random.default_rng(0)
    for _ in range(3):
        comm.pull("emb", keys, training=True)
        g1, g2 = (rng.normal(size=(40, 3)).astype(np.float32) for _ in range(2))
        ones, zeros = np.ones(40, np.float32), np.zeros(40, np.float32)
        comm.push("emb", keys, g1, shows=ones, clicks=zeros)
        comm.push("emb", keys, g2, shows=ones, clicks=zeros)
        comm.step(None, 0.0)
        ref.push(np.concatenate([keys, keys]), np.concatenate([g1, g2]), np.r_[ones, ones],
                 np.r_[zeros, zeros])
    comm.end_pass()
    np.testing.assert_allclose(server.pull_sparse("emb", keys, training=False),
                               ref.pull(keys, training=False), atol=1e-6)
    comm.stop()


def test_a_bad_push_is_refused_at_once_and_the_pass_still_ends_cleanly(server):
    comm = make_communicator("pass", server, timeout=20)
    keys = np.arange(1, 30, dtype=np.uint64)
    comm.begin_pass({"emb": keys})
    comm.pull("emb", keys, training=True)
    grads = np.ones((29, 3), np.float32)
    grads[5] = np.nan
    with pytest.raises(CommunicatorError, match="NaN or inf"):
        comm.push("emb", keys, grads, shows=np.ones(29, np.float32), clicks=np.zeros(29, np.float32))
    before = server.pull_sparse("emb", keys, training=False)
    comm.step(None, 0.0)
    comm.end_pass()
    np.testing.assert_array_equal(server.pull_sparse("emb", keys, training=False), before)
    comm.stop()


def test_workers_whose_passes_differ_by_more_than_the_rpc_timeout_still_meet(server):
    """The end of a pass waits in rounds of the RPC timeout (1 s here) up to pass_timeout: a
    worker 2.5 s slower than the other is waited for, and both see the merged pass."""
    import threading
    clients = [PSClient(server.rpc.endpoints, TOKEN, timeout=1.0) for _ in range(2)]
    for c in clients:
        c.register_table(server.specs["emb"])
    comms = [make_communicator("pass", c, worker_index=w, worker_num=2, timeout=1.0,
                               pass_timeout=30) for w, c in enumerate(clients)]
    keys = np.arange(500, 520, dtype=np.uint64)
    errors, passes = [], [None, None]

    def work(w):
        try:
            comm = comms[w]
            comm.begin_pass({"emb": keys})
            comm.pull("emb", keys, training=True)
            comm.push("emb", keys, np.full((20, 3), 1.0 + w, np.float32),
                      shows=np.ones(20, np.float32), clicks=np.zeros(20, np.float32))
            comm.step(None, 0.0)
            if w == 1:
                time.sleep(2.5)
            comm.end_pass()
            passes[w] = comm.passes
            comm.stop()  # ends one more (empty) pass: a collective too
        except BaseException as e:  # reported below
            errors.append(e)
    threads = [threading.Thread(target=work, args=(w,)) for w in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    try:
        assert not errors, errors
        assert passes == [1, 1]
        moved = []
        for w in range(2):  # rows start as a function of (seed, key): a fresh table reproduces them
            ref = SparseTable(server.specs["emb"])
            ref.pull(keys, training=True)
            ref.push(keys, np.full((20, 3), 1.0 + w, np.float32))
            moved.append(ref.pull(keys, training=False))
        np.testing.assert_allclose(server.pull_sparse("emb", keys, training=False),
                                   (moved[0] + moved[1]) / 2, atol=1e-6)
    finally:
        for c in clients:
            c.close()


def test_begin_pass_refuses_bad_keys_and_unknown_tables(server):
    comm = make_communicator("pass", server, timeout=20)
    with pytest.raises(CommunicatorError, match="1-D uint64"):
        comm.begin_pass({"emb": np.arange(3)})
    with pytest.raises(CommunicatorError, match="unknown sparse table 'nope'"):
        comm.begin_pass({"nope": np.arange(3, dtype=np.uint64)})
    assert not comm.in_pass
    comm.stop()


def test_a_write_back_without_its_pass_number_is_refused(server):
    with pytest.raises(RemoteError, match="'sync'"):
        server._wait_all([server._push(0, "push_pass", {"table": "emb"},
                                       [np.zeros(0, np.uint64), np.zeros((0, 8), np.float32)])])


@pytest.mark.requires_gpu
@pytest.mark.parametrize("rule", ["adagrad", "adam"])
def test_a_pass_on_the_gpu_equals_the_numpy_pass(rule):
    spec = SparseTableSpec(name="t", dim=8, rule=rule)
    rng = np.random.default_rng(5)
    batches = _batches(rng, np.arange(1, 300, dtype=np.uint64), 8)
    _, on_gpu = _pass(spec, batches, get_backend("cupy"))
    _, on_cpu = _pass(spec, batches)
    _assert_tables_equal(on_gpu, on_cpu, atol=1e-5)


@pytest.mark.requires_gpu
def test_the_split_layout_trains_on_the_host_when_the_pass_is_on_the_gpu():
    table = PassTable(SparseTableSpec(name="t", dim=4, embedx_threshold=1.0), get_backend("cupy"))
    assert table.be.name == "numpy"
    assert PassTable(SparseTableSpec(name="t", dim=4), get_backend("cupy")).be.name == "cupy"

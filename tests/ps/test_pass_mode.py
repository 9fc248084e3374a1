"""Pass mode's pieces: the servers' record pull and merge, the worker's PassTable, the communicator."""
from __future__ import annotations

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
    sh = table.shards[0]
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
    assert sh.show != sh.click


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


@pytest.mark.parametrize("packed,match", [
    (np.zeros((2, 5), np.float32), r"float32 of shape \(2, 1\d\)"),
    (np.full((2, 15), np.nan, np.float32), "NaN or inf"),
])
def test_a_bad_write_back_is_refused_and_changes_nothing(packed, match):
    spec = SparseTableSpec(name="t", dim=4)
    table = SparseTable(spec)
    keys = np.array([3, 4], np.uint64)
    table.pull_records(keys)
    before = table.checksum()
    if packed.shape[1] == 15:
        packed = np.full((2, table.record_width), np.nan, np.float32)
    with pytest.raises(TableError, match=match):
        table.merge_pass(keys, packed)
    negative = np.zeros((2, table.record_width), np.float32)
    negative[0, table.shards[0].show] = -1
    with pytest.raises(TableError, match="must be >= 0"):
        table.merge_pass(keys, negative)
    assert table.checksum() == before


def test_a_push_of_keys_never_pulled_is_refused_and_changes_nothing():
    spec = SparseTableSpec(name="t", dim=2, entry="count_filter", entry_count=5)
    local = PassTable(spec, NP)
    local.load(np.array([1], np.uint64), np.zeros(1, bool), np.zeros((1, local.width + 1), np.float32))
    with pytest.raises(CommunicatorError, match="1 keys were never pulled"):
        local.push(np.array([1, 2], np.uint64), np.ones((2, 2), np.float32), np.ones(2, np.float32),
                   np.zeros(2, np.float32))
    _, packed = local.write_back()
    assert not packed.any()


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

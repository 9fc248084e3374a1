"""Tiered sparse tables: a RAM budget of about a tenth of the rows, the rest in the memory or ssd
(RocksDB) tier, must answer bit for bit like the all-RAM table."""
import contextlib
import dataclasses
import shutil
import tempfile

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shoal.configs import DistributedStrategy, StrategyError
from shoal.ps.errors import TableError
from shoal.ps.sparse_table import SparseTable
from shoal.ps.spec import SparseTableSpec
from shoal.ps.tiers import MemoryTier, make_tier, tier_names
from shoal.ps.tiers import ssd as ssd_tier
from shoal.ps.tiers.tiered import _order_key, _smallest, budget_rows
from tests.ps.table_reference import random_push

N_KEYS = 240
UNIVERSE = (np.arange(N_KEYS, dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15)) ^ np.uint64(12345)
DIM = 3
EXACT = dict(nonclk_coeff=0.25, click_coeff=1.0, show_click_decay_rate=0.5, delete_threshold=0.75,
             base_threshold=1.5, delta_threshold=0.5, delta_keep_days=2,
             delete_after_unseen_days=3, learning_rate=0.1, initial_range=0.5)


def _budget_mb(spec: SparseTableSpec, rows: int) -> float:
    """The smallest budget (to 1%) under which the shards of `spec` keep `rows` hot rows in all."""
    row_bytes = 4 * SparseTable(spec).shards[0].width + 8 + 1
    per_shard, budget = -(-rows // spec.shards), 1
    while budget_rows(budget, row_bytes) < per_shard:  # a test helper: a few hundred steps
        budget = int(budget * 1.01) + 1
    return budget * spec.shards / 2 ** 20


@contextlib.contextmanager
def tiered_pair(storage="ssd", eviction="unseen_days", budget_rows=N_KEYS // 10, **fields):
    """(all-RAM table, tiered table of the same spec); the RocksDB directory is removed after."""
    base = SparseTableSpec(name="t", dim=DIM, **{**EXACT, **fields})
    path = tempfile.mkdtemp(prefix="shoal-tiers-")
    spec = dataclasses.replace(base, storage=storage, eviction=eviction, ssd_path=path,
                               memory_budget_mb=_budget_mb(base, budget_rows))
    ram, tiered = SparseTable(base), SparseTable(spec)
    try:
        yield ram, tiered
    finally:
        tiered.close()
        shutil.rmtree(path, ignore_errors=True)


def _pushed(idx, seed):
    return random_push(UNIVERSE[idx], DIM, seed)


def _sorted_export(table, mode):
    data = table.export(mode)
    order = np.argsort(data["keys"])
    return {k: v[order] for k, v in data.items()}


def _assert_exports_equal(a, b):
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def _cold_rows(table):
    return table.stats()["tiers"][f"cold.{table.spec.storage}"]["rows"]


def _assert_within_budget(table):
    for shard in table.shards:
        assert len(shard.map) <= shard.cold.budget_rows


key_lists = st.lists(st.integers(0, N_KEYS - 1), min_size=1, max_size=80)
ops = st.lists(st.one_of(
    st.tuples(st.just("pull"), key_lists, st.booleans()),
    st.tuples(st.just("push"), key_lists, st.integers(0, 2 ** 31)),
    st.tuples(st.just("push"), key_lists, st.integers(0, 2 ** 31)),
    st.tuples(st.just("delta"), key_lists, st.integers(0, 2 ** 31)),
    st.tuples(st.just("shrink")),
    st.tuples(st.just("tick")),
    st.tuples(st.just("save"), st.sampled_from([0, 1, 2])),
), min_size=1, max_size=20)


@settings(max_examples=60, deadline=None)
@given(storage=st.sampled_from(["ssd", "memory"]), eviction=st.sampled_from(["unseen_days", "lfu"]),
       rule=st.sampled_from(["naive", "adagrad", "adam"]),
       entry=st.sampled_from(["none", "count_filter", "probability"]), split=st.booleans(),
       shards=st.sampled_from([1, 3]), program=ops)
def test_a_tenth_in_ram_answers_bit_for_bit_like_all_in_ram(storage, eviction, rule, entry, split,
                                                            shards, program):
    with tiered_pair(storage, eviction, rule=rule, entry=entry, entry_count=2, entry_probability=0.5,
                     embedx_threshold=2.0 if split else None, shards=shards) as (ram, tiered):
        for _ in range(3):  # admits every key under count_filter, most under probability
            ram.pull(UNIVERSE, training=True)
            tiered.pull(UNIVERSE, training=True)
        warm = _pushed(list(range(N_KEYS)), 0)  # cold rows with statistics (and some embedx)
        ram.push(*warm)
        tiered.push(*warm)
        was_cold = _cold_rows(tiered) > 0
        for op in program:
            if op[0] == "pull":
                keys = UNIVERSE[op[1]]
                np.testing.assert_array_equal(tiered.pull(keys, training=op[2]),
                                              ram.pull(keys, training=op[2]))
            elif op[0] == "push":
                args = _pushed(op[1], op[2])
                ram.push(*args)
                tiered.push(*args)
            elif op[0] == "delta":
                keys, grads, shows, clicks = _pushed(op[1], op[2])
                packed = np.concatenate([grads, shows[:, None], clicks[:, None]], axis=1)
                ram.add_delta(keys, packed)
                tiered.add_delta(keys, packed)
            elif op[0] == "shrink":
                assert tiered.shrink() == ram.shrink()
            elif op[0] == "tick":
                ram.day_tick()
                tiered.day_tick()
            else:
                _assert_exports_equal(_sorted_export(tiered, op[1]), _sorted_export(ram, op[1]))
            assert len(tiered) == len(ram)
            _assert_within_budget(tiered)
            was_cold |= _cold_rows(tiered) > 0
        np.testing.assert_array_equal(tiered.pull(UNIVERSE, training=False),
                                      ram.pull(UNIVERSE, training=False))
        _assert_exports_equal(_sorted_export(tiered, 0), _sorted_export(ram, 0))
        assert was_cold, "the budget never spilled a row: the test tests nothing"
        if len(ram) > sum(s.cold.budget_rows for s in tiered.shards):
            assert _cold_rows(tiered) > 0


@pytest.mark.parametrize("split", [False, True])
@pytest.mark.parametrize("storage", ["ssd", "memory"])
def test_days_of_training_with_shrinks_equal_the_all_ram_table(storage, split):
    """Rows with statistics and embedx cycle through both tiers over many days."""
    with tiered_pair(storage, embedx_threshold=2.0 if split else None, shards=2,
                     delete_threshold=0.3) as (ram, tiered):
        rng = np.random.default_rng(5)
        for day in range(6):
            for step in range(5):
                idx = rng.choice(N_KEYS, 60, replace=False)
                keys = UNIVERSE[idx]
                np.testing.assert_array_equal(tiered.pull(keys, True), ram.pull(keys, True))
                args = _pushed(idx, day * 10 + step)
                ram.push(*args)
                tiered.push(*args)
            assert _cold_rows(tiered) > 0
            ram.day_tick()
            tiered.day_tick()
            assert tiered.shrink() == ram.shrink()
            _assert_exports_equal(_sorted_export(tiered, 0), _sorted_export(ram, 0))
        assert not split or ram.export(0)["has_embedx"].any()


def _cold_and_hot(table):
    shard = table.shards[0]
    cold = UNIVERSE[shard.map.lookup(UNIVERSE) < 0]
    hot = np.setdiff1d(UNIVERSE, cold)
    return shard, cold, hot


@pytest.mark.parametrize("storage", ["ssd", "memory"])
def test_a_training_pull_promotes_a_cold_key_and_a_read_only_pull_does_not(storage):
    with tiered_pair(storage, shards=1) as (ram, tiered):
        for t in (ram, tiered):
            t.pull(UNIVERSE, training=True)
            t.push(*_pushed(list(range(N_KEYS)), 1))
        shard, cold, hot = _cold_and_hot(tiered)
        assert len(cold) >= N_KEYS - shard.cold.budget_rows and len(hot) <= shard.cold.budget_rows
        before = tiered.stats()
        np.testing.assert_array_equal(tiered.pull(cold[:5], training=False),
                                      ram.pull(cold[:5], training=False))
        assert tiered.stats() == before
        assert np.all(shard.map.lookup(cold[:5]) < 0)
        assert shard.cold.tier.get(cold[:5])[0].all()
        absent = np.array([1, 2, 3], np.uint64)  # in no tier: read as zeros, create nothing
        assert np.all(tiered.pull(absent, training=False) == 0) and len(tiered) == N_KEYS

        np.testing.assert_array_equal(tiered.pull(cold[:5], training=True),
                                      ram.pull(cold[:5], training=True))
        assert np.all(shard.map.lookup(cold[:5]) >= 0)
        assert not shard.cold.tier.get(cold[:5])[0].any()
        assert len(tiered) == N_KEYS
        _assert_exports_equal(_sorted_export(tiered, 0), _sorted_export(ram, 0))


def test_a_push_to_a_cold_key_promotes_and_updates_it():
    with tiered_pair("ssd", shards=1) as (ram, tiered):
        for t in (ram, tiered):
            t.pull(UNIVERSE, training=True)
        shard, cold, _ = _cold_and_hot(tiered)
        args = _pushed(np.flatnonzero(np.isin(UNIVERSE, cold[:4])), 7)
        ram.push(*args)
        tiered.push(*args)
        assert np.all(shard.map.lookup(cold[:4]) >= 0)
        _assert_exports_equal(_sorted_export(tiered, 0), _sorted_export(ram, 0))


@pytest.mark.parametrize("mode", [0, 1, 2])
@pytest.mark.parametrize("storage", ["ssd", "memory"])
def test_export_and_load_across_tiers_equal_the_all_ram_tables(mode, storage):
    with tiered_pair(storage) as (ram, tiered), tiered_pair(storage) as (ram2, tiered2):
        for t in (ram, tiered):
            t.pull(UNIVERSE, training=True)
            for step in range(4):
                t.push(*_pushed(list(range(step * 20, N_KEYS, 3)), step))
            t.day_tick()
        assert _cold_rows(tiered) > 0
        got, want = _sorted_export(tiered, mode), _sorted_export(ram, mode)
        _assert_exports_equal(got, want)
        if mode == 1:  # the delta save reset the written rows' delta score in both tiers
            _assert_exports_equal(_sorted_export(tiered, 0), _sorted_export(ram, 0))
        ram2.load_rows(want)
        tiered2.load_rows(got)
        assert len(tiered2) == len(ram2) == len(want["keys"])
        _assert_within_budget(tiered2)
        _assert_exports_equal(_sorted_export(tiered2, 0), _sorted_export(ram2, 0))
        tiered2.load_rows(got)  # loading again overwrites: each key still in exactly one tier
        assert len(tiered2) == len(want["keys"])
        _assert_exports_equal(_sorted_export(tiered2, 0), _sorted_export(ram2, 0))


def _tier_contents(tier):
    parts = list(tier.batches(1000))
    if not parts:
        return np.zeros(0, np.uint64), np.zeros((0, tier.width), np.float32)
    keys = np.concatenate([k for k, _ in parts])
    records = np.concatenate([r for _, r in parts])
    order = np.argsort(keys)
    return keys[order], records[order]


def test_a_new_table_on_the_directory_of_a_dead_one_starts_empty():
    with tiered_pair("ssd", shards=2) as (_, tiered):
        tiered.pull(UNIVERSE, training=True)
        tiered.push(*_pushed(list(range(N_KEYS)), 3))
        spec = tiered.spec
        before = [_tier_contents(s.cold.tier) for s in tiered.shards]
        assert sum(len(k) for k, _ in before) == _cold_rows(tiered) > 0
        tiered.close()

        # a new table (a restarted server) drops what the dead one left, in both tiers
        again = SparseTable(spec)
        try:
            assert len(again) == 0 and again.stats()["tiers"]["cold.ssd"]["rows"] == 0
            assert all(len(_tier_contents(s.cold.tier)[0]) == 0 for s in again.shards)
            assert np.all(again.pull(UNIVERSE, training=False) == 0) and len(again) == 0
            fresh = SparseTable(dataclasses.replace(spec, storage="memory", memory_budget_mb=None,
                                                    ssd_path=None))
            np.testing.assert_array_equal(again.pull(UNIVERSE, training=True),
                                          fresh.pull(UNIVERSE, training=True))
            assert _cold_rows(again) > 0
        finally:
            again.close()
        # another layout over the same directory starts empty too, instead of failing
        other = SparseTable(dataclasses.replace(spec, dim=DIM + 1))
        try:
            assert len(other) == 0
            other.pull(UNIVERSE, training=True)
            assert len(other) == N_KEYS and _cold_rows(other) > 0
        finally:
            other.close()


@contextlib.contextmanager
def _ssd_tier(width=5):
    path = tempfile.mkdtemp(prefix="shoal-tiers-")
    tier = make_tier("ssd", width=width, table="t", shard=0, server=0, path=path)
    try:
        yield tier
    finally:
        tier.close()
        shutil.rmtree(path, ignore_errors=True)


def _segments(tier):
    """Segment ids stored in RocksDB (read straight from the column family)."""
    return sorted(int.from_bytes(k, "big") for k in tier._cf.keys(read_opt=ssd_tier._total_order()))


def test_the_ssd_tier_equals_the_memory_tier_and_reclaims_dead_segments():
    rng = np.random.default_rng(5)
    universe = rng.integers(0, 2 ** 64, 30_000, dtype=np.uint64)
    with _ssd_tier() as ssd:
        mem = MemoryTier(ssd.width)
        live_most = 0
        for step in range(60):
            keys = np.unique(rng.choice(universe, int(rng.integers(1, 3000))))
            op = step % 4
            if op in (0, 1):  # new and stored keys together: a stored key's record is replaced
                records = rng.normal(size=(len(keys), ssd.width)).astype(np.float32)
                ssd.put(keys, records)
                mem.put(keys, records)
            elif op == 2:
                (found, records), want = ssd.take(keys), mem.take(keys)
                np.testing.assert_array_equal(found, want[0])
                np.testing.assert_array_equal(records, want[1])
            else:
                ssd.delete(keys)
                mem.delete(keys)
            assert len(ssd) == len(mem)
            np.testing.assert_array_equal(ssd.contains(universe), mem.contains(universe))
            found, records = ssd.get(universe)
            want_found, want = mem.get(universe)
            np.testing.assert_array_equal(found, want_found)
            np.testing.assert_array_equal(records, want)
            live_most = max(live_most, len(ssd))
            ssd._compact()  # what the next put, take or delete does first
            # dead slots are reclaimed: never more than about twice the live records on disk,
            # besides the segments a take emptied (stale until the next put or delete)
            stale = set(ssd._stale_ids().tolist())
            assert (op == 2) or not stale, step
            assert stale <= set(_segments(ssd)), step
            on_disk = (len(_segments(ssd)) - len(stale)) * ssd_tier.SEGMENT_ROWS
            assert on_disk <= 2 * len(ssd) + ssd_tier._GC_FLOOR + 2 * ssd_tier.SEGMENT_ROWS, step
            np.testing.assert_array_equal(_tier_contents(ssd)[0], _tier_contents(mem)[0])
        assert live_most > 5000
        ssd.delete(universe)
        assert len(ssd) == 0 and _segments(ssd) == []  # empty segments leave RocksDB
        mem.close()


def test_an_iteration_sees_its_snapshot_while_the_caller_rewrites():
    rng = np.random.default_rng(6)
    keys = np.unique(rng.integers(0, 2 ** 64, 20_000, dtype=np.uint64))
    with _ssd_tier(width=2) as ssd:
        ssd.put(keys, np.zeros((len(keys), 2), np.float32))
        ssd.delete(keys[::3])  # dead slots: a rewrite may reuse ids and trigger no compaction
        seen = []
        for k, rec in ssd.batches(1000):  # what day_tick does: +1 to every row once
            rec[:, 0] += 1.0
            ssd.put(k, rec)
            seen.append(k)
        seen = np.concatenate(seen)
        assert len(seen) == len(np.unique(seen)) == len(ssd)
        _, records = ssd.get(np.sort(seen))
        np.testing.assert_array_equal(records[:, 0], 1.0)


def test_an_iteration_skips_the_segments_a_promotion_left_stale():
    """A stale segment (emptied by a take, still on disk) is in the snapshot with an old copy of
    a key in a dead slot; a put during the pass that reuses its id and puts that key back in the
    same slot must not make the old copy pass for live (shrink would yield the key twice)."""
    keys = lambda *a: np.array(a, np.uint64)  # noqa: E731
    with _ssd_tier() as ssd:
        rec = lambda n, v: np.full((n, ssd.width), v, np.float32)  # noqa: E731
        ssd.put(keys(100), rec(1, 0.0))           # segment 0
        ssd.put(keys(200, 300), rec(2, 1.0))      # segment 1: 200 in slot 0
        ssd.delete(keys(100))                     # segment 0 freed
        ssd.put(keys(200, 400), rec(2, 2.0))      # 200 moves to segment 0; its old copy stays
        ssd.take(keys(300))                       # segment 1: stale, on disk
        assert len(ssd._stale_ids()) == 1
        seen = []
        for k, r in ssd.batches(ssd_tier.SEGMENT_ROWS):  # what shrink does: keep 200, drop 400
            seen += k.tolist()
            keep = k == 200
            ssd.put(k[keep], r[keep] * 0.5)       # reuses the stale id, 200 in slot 0 again
            ssd.delete(k[k == 400])
        assert sorted(seen) == [200, 400]
        found, records = ssd.get(keys(200))
        assert found.all() and np.all(records == 1.0)


class _FailingWrites:
    """The tier's database with every write after the first `ok` refused (as a full disk does)."""

    def __init__(self, db, ok=0):
        self.db, self.ok = db, ok

    def write(self, batch, *args):
        if self.ok == 0:
            raise OSError("No space left on device")
        self.ok -= 1
        return self.db.write(batch, *args)

    def __getattr__(self, name):
        return getattr(self.db, name)


@pytest.mark.parametrize("n_new,ok", [(1000, 0), (9 * 8192 * ssd_tier.SEGMENT_ROWS // 8, 1)])
def test_a_failed_rocksdb_write_changes_nothing_in_the_tier(monkeypatch, n_new, ok):
    """Writes that fail: at once, or (a put of more than one batch) after its first batch landed;
    the stored rows are rewritten by the put, so their segments must survive the failure."""
    rng = np.random.default_rng(7)
    keys = np.unique(rng.integers(0, 2 ** 64, n_new + 600, dtype=np.uint64))
    with _ssd_tier() as ssd:
        ssd.put(keys[:500], np.ones((500, ssd.width), np.float32))
        ssd.delete(keys[:500:3])  # partly live segments: a rewrite of the rest empties them
        before = (len(ssd), _tier_contents(ssd), ssd.contains(keys))
        monkeypatch.setattr(ssd._db, "db", _FailingWrites(ssd._db.db, ok))
        with pytest.raises(TableError, match="No space left on device.*restart the server"):
            ssd.put(keys, np.zeros((len(keys), ssd.width), np.float32))
        monkeypatch.setattr(ssd._db.db, "ok", 0)
        rest = np.setdiff1d(keys[:500], keys[:500:3])  # empties every segment: deletes to write
        with pytest.raises(TableError, match="No space left on device"):
            ssd.delete(rest)
        monkeypatch.undo()
        assert len(ssd) == before[0]
        np.testing.assert_array_equal(ssd.contains(keys), before[2])
        for got, want in zip(_tier_contents(ssd), before[1]):
            np.testing.assert_array_equal(got, want)
        found, records = ssd.get(keys)
        np.testing.assert_array_equal(found, before[2])
        np.testing.assert_array_equal(records[found], 1.0)

        # a take writes nothing (the segments it empties wait, stale, for the next put or delete),
        # so it works on a full disk; a failed put keeps them stale, the next put deletes them
        monkeypatch.setattr(ssd._db, "db", _FailingWrites(ssd._db.db, 0))
        found, records = ssd.take(rest)
        assert found.all() and np.all(records == 1.0) and len(ssd._stale_ids()) > 0
        stale = ssd._stale_ids().copy()
        with pytest.raises(TableError, match="No space left on device"):
            ssd.put(keys[500:510], np.zeros((10, ssd.width), np.float32))
        np.testing.assert_array_equal(ssd._stale_ids(), stale)
        assert not ssd.contains(keys[500:510]).any()
        monkeypatch.undo()
        ssd.put(keys[500:510], np.zeros((10, ssd.width), np.float32))
        # what the first batch of a failed put of several wrote was stale too: gone now
        on_disk = _segments(ssd)
        assert len(ssd._stale_ids()) == 0 and max(on_disk) < len(ssd._live)
        assert all(ssd._live[on_disk] > 0)


def test_a_failed_compaction_leaves_the_operation_that_needed_it_undone(monkeypatch):
    keys = np.unique(np.random.default_rng(9).integers(0, 2 ** 64, 20_000, dtype=np.uint64))
    with _ssd_tier() as ssd:
        ssd.put(keys, np.ones((len(keys), ssd.width), np.float32))
        kept = keys[::8]
        ssd.delete(np.setdiff1d(keys, kept))  # 7 dead slots in 8: the next operation compacts
        before = _tier_contents(ssd)
        monkeypatch.setattr(ssd._db, "db", _FailingWrites(ssd._db.db))
        with pytest.raises(TableError, match="No space left on device"):
            ssd.take(kept[:10])
        monkeypatch.undo()
        assert ssd.contains(kept).all() and len(ssd) == len(kept)  # nothing taken, nothing lost
        for got, want in zip(_tier_contents(ssd), before):
            np.testing.assert_array_equal(got, want)
        found, records = ssd.take(kept[:10])  # it compacts now, then takes
        assert found.all() and np.all(records == 1.0) and len(ssd) == len(kept) - 10
        assert len(_segments(ssd)) * ssd_tier.SEGMENT_ROWS < 2 * len(keys) // 8 + 64


def test_a_damaged_cold_tier_is_reported_not_read_as_rows():
    keys = np.arange(1, 20, dtype=np.uint64)
    with _ssd_tier() as ssd:
        ssd.put(keys, np.ones((len(keys), ssd.width), np.float32))
        first = int(ssd._where[ssd._index.lookup(keys[:1])][0]) // ssd_tier.SEGMENT_ROWS
        ssd._cf.delete(first.to_bytes(8, "big"))  # a segment lost behind the index's back
        with pytest.raises(TableError, match="lacks segments its index places rows in"):
            ssd.get(keys)
        assert ssd.contains(keys).all()  # the failed take put its keys back
        with pytest.raises(TableError, match="damaged"):
            ssd.take(keys)
        assert ssd.contains(keys).all()


def test_one_process_refuses_a_second_table_on_the_same_column_families():
    with tiered_pair("ssd", shards=2) as (ram, tiered):
        tiered.pull(UNIVERSE, training=True)
        with pytest.raises(TableError, match="already open in this process"):
            SparseTable(tiered.spec)
        # the first table is untouched by the refused one
        assert len(tiered) == N_KEYS and _cold_rows(tiered) > 0
        ram.pull(UNIVERSE, training=True)
        np.testing.assert_array_equal(tiered.pull(UNIVERSE, training=False),
                                      ram.pull(UNIVERSE, training=False))


def test_the_coldest_rows_are_found_without_a_sort():
    rng = np.random.default_rng(3)
    for _ in range(50):
        n = int(rng.integers(1, 300))
        first = rng.integers(-3, 3, n).astype(np.float32)  # many ties
        second = rng.normal(0, 1, n).astype(np.float32)
        last = rng.random(n) < rng.random()
        live = rng.random(n) < 0.9  # free rows of the arena: never picked
        k = int(rng.integers(0, live.sum() + 1))
        pick = _smallest(_order_key(first, second), live, last, k)
        want = np.flatnonzero(live)[np.lexsort((second[live], first[live], last[live]))[:k]]
        assert len(pick) == len(np.unique(pick)) == k and live[pick].all()
        got = sorted(zip(last[pick], first[pick], second[pick]))
        assert got == sorted(zip(last[want], first[want], second[want]))


def test_a_spill_of_tied_rows_leaves_the_map_spread_over_its_slots():
    """All new rows tie; the spill takes them in row order, which is unrelated to the slot order
    of the linear-probing map: the erased slots cover the table evenly, no region stays full."""
    keys = np.unique(np.random.default_rng(8).integers(0, 2 ** 64, 40_000, dtype=np.uint64))
    spec = SparseTableSpec(name="t", dim=DIM, shards=1, storage="memory", eviction="lfu",
                           memory_budget_mb=_budget_mb(SparseTableSpec(name="t", dim=DIM, shards=1),
                                                       len(keys) + 1000))
    table = SparseTable(spec)
    try:
        shard = table.shards[0]
        table.pull(keys, training=True)  # one show each: every row ties
        assert len(shard.map) == len(keys)
        in_slot_order = shard.map.keys()
        shard.cold.budget_rows, shard.cold.low_rows = len(keys) // 2, len(keys) // 4  # over it
        assert shard.cold.spill(np.zeros(0, np.int64)) == len(keys) - len(keys) // 4
        erased = np.flatnonzero(shard.map.lookup(in_slot_order) < 0)
        assert len(erased) == len(keys) - len(keys) // 4
        counts = np.histogram(erased, bins=10, range=(0, len(keys)))[0]
        expected = len(erased) / 10  # a run of slots would leave most bins empty
        assert np.all(np.abs(counts - expected) <= 0.1 * expected), counts
    finally:
        table.close()


def test_stats_report_rows_and_bytes_per_tier():
    with tiered_pair("ssd") as (ram, tiered):
        tiered.pull(UNIVERSE, training=True)
        s = tiered.stats()
        hot, cold = s["tiers"]["arena"], s["tiers"]["cold.ssd"]
        assert hot["rows"] + cold["rows"] == s["rows"] == N_KEYS
        assert 0 < hot["rows"] <= s["budget_rows"] and cold["rows"] > 0
        assert cold["bytes"] == cold["rows"] * (4 * (tiered.shards[0].width + 1) + 8)
        index = sum(16 * sh.cold.tier._index.capacity for sh in tiered.shards)
        assert index < cold["ram_bytes"] < index + 64 * cold["rows"]  # the key index, reported
        assert "tiers" not in ram.stats()
        assert all(shard.cold is None for shard in ram.shards)  # no budget: the plain arena


def test_servers_of_one_process_get_their_own_rocksdb():
    path = tempfile.mkdtemp(prefix="shoal-tiers-")
    spec = SparseTableSpec(name="t", dim=DIM, storage="ssd", ssd_path=path, memory_budget_mb=1e-3,
                           shards=1)
    a, b = SparseTable(spec, server=0), SparseTable(spec, server=1)
    try:
        a.pull(UNIVERSE[:100], training=True)
        b.pull(UNIVERSE[100:], training=True)
        assert len(a) == 100 and len(b) == N_KEYS - 100 and _cold_rows(a) > 0
        assert np.all(b.pull(UNIVERSE[:100], training=False) == 0)
    finally:
        a.close()
        b.close()
        shutil.rmtree(path, ignore_errors=True)


@pytest.mark.parametrize("fields,match", [
    (dict(storage="disk"), "storage='disk' is invalid; choose one of \\['memory', 'ssd'\\]"),
    (dict(memory_budget_mb=0), "memory_budget_mb=0 is invalid"),
    (dict(memory_budget_mb=-1.0), "memory_budget_mb=-1.0 is invalid"),
    (dict(storage="ssd", memory_budget_mb=1.0), "needs a directory for RocksDB"),
    (dict(storage="ssd", ssd_path="/tmp/x"), "set memory_budget_mb"),
    (dict(eviction="lru"), "choose one of \\['unseen_days', 'lfu'\\]"),
    (dict(ssd_path=""), "ssd_path='' is invalid"),
])
def test_bad_tier_specs_say_what_and_how_to_fix(fields, match):
    with pytest.raises(TableError, match=match):
        SparseTableSpec(name="t", dim=4, **fields)


def test_an_unknown_tier_lists_the_known_ones():
    assert tier_names() == ("memory", "ssd")
    with pytest.raises(TableError, match=r"'nvme' is not registered; known tiers: \['memory', 'ssd'\]"):
        make_tier("nvme", width=4, table="t", shard=0, server=0, path=None)
    assert isinstance(make_tier("memory", width=4, table="t", shard=0, server=0, path=None),
                      MemoryTier)


def test_the_strategy_tier_group_becomes_the_spec():
    s = DistributedStrategy.from_dict({"sparse_table": {
        "default": {"tier": {"memory_budget_mb": 8}},
        "tables": {"user": {"tier": {"storage": "ssd", "ssd_path": "/data/ssd", "eviction": "lfu"}}}}})
    spec = SparseTableSpec(name="user", dim=8, **s.table_config("user").spec_fields())
    assert (spec.storage, spec.memory_budget_mb, spec.ssd_path, spec.eviction) == \
        ("ssd", 8.0, "/data/ssd", "lfu")
    other = SparseTableSpec(name="item", dim=8, **s.table_config("item").spec_fields())
    assert (other.storage, other.memory_budget_mb, other.ssd_path) == ("memory", 8.0, None)


@pytest.mark.parametrize("tier,match", [
    ({"storage": "ssd", "memory_budget_mb": 8}, "needs tier.ssd_path"),
    ({"storage": "ssd", "ssd_path": "/x"}, "set tier.memory_budget_mb"),
    ({"memory_budget_mb": 0}, "greater than 0"),
    ({"storage": "hdd"}, "choose one of 'memory', 'ssd'"),
    ({"budget": 8}, "unknown key 'budget'; valid keys of TierConfig are: storage, memory_budget_mb"),
])
def test_bad_tier_settings_in_the_strategy_are_refused(tier, match):
    with pytest.raises(StrategyError, match=match):
        DistributedStrategy.from_dict({"sparse_table": {"default": {"tier": tier}}})

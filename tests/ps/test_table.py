"""The sparse table against the dict reference model, driven by hypothesis, plus edge cases."""
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shoal.ps.errors import TableError
from shoal.ps.sparse_table import SparseTable
from shoal.ps.spec import SparseTableSpec
from tests.ps.table_reference import RefTable, random_push

UNIVERSE = np.array([0, 1, 2, 3, 17, 42, 1 << 32, (1 << 63) + 5, 2 ** 64 - 1, 999, 12345, 7],
                    dtype=np.uint64)
DIM = 3

# binary-exact coefficients keep float32 (table) and float64 (reference) decisions identical
EXACT = dict(nonclk_coeff=0.25, click_coeff=1.0, show_click_decay_rate=0.5, delete_threshold=0.75,
             base_threshold=1.5, delta_threshold=0.5, delta_keep_days=2,
             delete_after_unseen_days=3, learning_rate=0.1, initial_range=0.5)

specs = st.builds(
    lambda rule, entry, split, scale, shards, count, thr: SparseTableSpec(
        name="t", dim=DIM, rule=rule, entry=entry, scale_by_show=scale, shards=shards,
        embedx_threshold=(2.0 if split else None), entry_count=count, entry_threshold=thr, **EXACT),
    st.sampled_from(["naive", "adagrad", "std_adagrad", "adam"]),
    st.sampled_from(["none", "count_filter", "show_click"]),
    st.booleans(), st.booleans(), st.sampled_from([1, 3]), st.integers(1, 3),
    st.sampled_from([0.0, 1.0, 2.5]))

key_lists = st.lists(st.sampled_from(list(range(len(UNIVERSE)))), min_size=1, max_size=8)
ops = st.lists(st.one_of(
    st.tuples(st.just("pull"), key_lists, st.booleans()),
    st.tuples(st.just("push"), key_lists, st.integers(0, 2 ** 31)),
    st.tuples(st.just("push"), key_lists, st.integers(0, 2 ** 31)),
    st.tuples(st.just("shrink")),
    st.tuples(st.just("tick")),
    st.tuples(st.just("save_load"), st.sampled_from([0, 1, 2])),
), min_size=1, max_size=25)


def _pushed(idx, seed):
    return random_push(UNIVERSE[idx], DIM, seed)


def _assert_same(table, ref):
    assert len(table) == len(ref.rows)
    got = table.pull(UNIVERSE, training=False)
    want = np.array([ref.rows[int(k)]["emb"] if int(k) in ref.rows else np.zeros(DIM) for k in UNIVERSE])
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


@settings(max_examples=300, deadline=None)
@given(spec=specs, program=ops, warm=st.booleans())
def test_table_matches_the_reference_model(spec, program, warm):
    table, ref = SparseTable(spec), RefTable(spec)
    if warm:  # half the programs start with rows for every key, so pushes land on rows
        table.pull(UNIVERSE, training=True)
        ref.pull(UNIVERSE, training=True)
    for op in program:
        if op[0] == "pull":
            keys = UNIVERSE[op[1]]
            got = table.pull(keys, training=op[2])
            want = ref.pull(keys, training=op[2])
            np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
        elif op[0] == "push":
            args = _pushed(op[1], op[2])
            table.push(*args)
            ref.push(*args)
        elif op[0] == "shrink":
            table.shrink()
            ref.shrink()
        elif op[0] == "tick":
            table.day_tick()
            ref.day_tick()
        else:
            data = table.export(op[1])
            assert sorted(int(k) for k in data["keys"]) == ref.saved_keys(op[1])
            fresh = SparseTable(spec)
            fresh.load_rows(data)
            got = fresh.pull(data["keys"], training=False)
            np.testing.assert_allclose(got, table.pull(data["keys"], training=False))
        _assert_same(table, ref)


@pytest.mark.parametrize("rule", ["naive", "adagrad", "std_adagrad", "adam"])
@pytest.mark.parametrize("split", [False, True])
def test_every_rule_matches_the_reference_over_many_pushes(rule, split):
    spec = SparseTableSpec(name="t", dim=DIM, rule=rule, embedx_threshold=2.0 if split else None,
                           **EXACT)
    table, ref = SparseTable(spec), RefTable(spec)
    idx = list(range(len(UNIVERSE)))
    table.pull(UNIVERSE, training=True)
    ref.pull(UNIVERSE, training=True)
    for step in range(6):
        args = _pushed(idx[step % 3:], step)
        table.push(*args)
        ref.push(*args)
        _assert_same(table, ref)
    assert any(r["embedx"] for r in ref.rows.values()) or not split


def test_read_only_pull_creates_nothing_and_touches_no_statistic():
    table = SparseTable(SparseTableSpec(name="t", dim=4))
    keys = np.array([5, 6], np.uint64)
    table.pull(keys, training=True)
    table.push(keys, np.ones((2, 4), np.float32), np.ones(2, np.float32), np.zeros(2, np.float32))
    table.day_tick()
    before = table.export(0)
    out = table.pull(np.array([5, 7, 8], np.uint64), training=False)
    after = table.export(0)
    assert len(table) == 2
    assert np.all(out[1:] == 0)
    for k in before:
        np.testing.assert_array_equal(before[k], after[k])
    assert after["stat.unseen_days"].tolist() == [1.0, 1.0]


def test_rows_start_as_a_function_of_seed_and_key():
    a = SparseTable(SparseTableSpec(name="t", dim=8, seed=3, shards=1))
    b = SparseTable(SparseTableSpec(name="t", dim=8, seed=3, shards=5))
    c = SparseTable(SparseTableSpec(name="t", dim=8, seed=4))
    keys = np.arange(100, dtype=np.uint64)
    ra = a.pull(keys)
    rb = b.pull(keys[::-1])[::-1]
    np.testing.assert_array_equal(ra, rb)
    assert not np.allclose(ra, c.pull(keys))
    assert np.abs(ra).max() <= 1e-4 and len(np.unique(ra)) > 700


def test_freed_rows_are_reused():
    spec = SparseTableSpec(name="t", dim=2, delete_threshold=100.0, shards=1)
    table = SparseTable(spec)
    table.pull(np.arange(1000, dtype=np.uint64))
    cap = table.shards[0].cap
    table.shrink()  # every row scores below 100: all deleted
    assert len(table) == 0
    table.pull(np.arange(5000, 6000, dtype=np.uint64))
    assert len(table) == 1000 and table.shards[0].cap == cap


def test_probability_entry_admits_a_fraction_and_stores_nothing_else():
    table = SparseTable(SparseTableSpec(name="t", dim=2, entry="probability", entry_probability=0.3))
    keys = np.arange(20000, dtype=np.uint64)
    rows = table.pull(keys)
    n = len(table)
    assert 5000 < n < 7000
    assert int((np.abs(rows).sum(axis=1) > 0).sum()) == n  # admitted keys have non-zero rows
    assert table.stats()["pending"] == 0


def test_count_filter_admits_at_the_nth_sighting():
    table = SparseTable(SparseTableSpec(name="t", dim=2, entry="count_filter", entry_count=3))
    k = np.array([11, 11, 12], np.uint64)  # duplicates in one pull count once
    table.pull(k)
    table.pull(k)
    assert len(table) == 0 and table.stats()["pending"] == 2
    table.pull(np.array([11], np.uint64))
    assert len(table) == 1 and table.stats()["pending"] == 1


def test_embedx_is_created_only_past_the_threshold():
    spec = SparseTableSpec(name="t", dim=4, embedx_threshold=3.0, scale_by_show=False)
    table = SparseTable(spec)
    k = np.array([9], np.uint64)
    row = table.pull(k)
    assert np.all(row == 0)
    g = np.ones((1, 4), np.float32)
    table.push(k, g, np.array([1.0], np.float32), np.array([1.0], np.float32))  # score 1
    row = table.pull(k, training=False)
    assert row[0, 0] != 0 and np.all(row[0, 1:] == 0)
    table.push(k, g, np.array([2.0], np.float32), np.array([2.0], np.float32))  # score 3
    row = table.pull(k, training=False)
    assert np.all(row[0, 1:] != 0)


@pytest.mark.parametrize("bad", [
    dict(keys=np.array([1, 2], np.int64)),
    dict(keys=np.array([[1, 2]], np.uint64)),
    dict(grads=np.ones((2, 3), np.float64)),
    dict(grads=np.ones((2, 5), np.float32)),
    dict(shows=np.ones(3, np.float32)),
    dict(grads=np.array([[np.nan, 0, 0], [0, 0, 0]], np.float32)),
])
def test_bad_push_is_refused_and_changes_nothing(bad):
    table = SparseTable(SparseTableSpec(name="t", dim=3))
    keys = np.array([1, 2], np.uint64)
    table.pull(keys)
    before = table.checksum()
    args = dict(keys=keys, grads=np.ones((2, 3), np.float32), shows=np.ones(2, np.float32),
                clicks=np.zeros(2, np.float32))
    args.update(bad)
    with pytest.raises(TableError, match="push_sparse on table 't'"):
        table.push(**args)
    assert table.checksum() == before


@pytest.mark.parametrize("field,value,match", [
    ("dim", 0, "dim=0"), ("rule", "sgdx", "choose one of"), ("entry", "often", "choose one of"),
    ("weight_bounds", (1.0, -1.0), "min < max"), ("beta1", 1.0, r"\[0, 1\)"),
    ("embedx_threshold", 1.0, "dim >= 2"),
])
def test_bad_spec_names_the_field(field, value, match):
    kw = dict(name="t", dim=1 if field == "embedx_threshold" else 4)
    kw[field] = value
    with pytest.raises(TableError, match=match):
        SparseTableSpec(**kw)


def test_spec_from_dict_rejects_unknown_fields():
    with pytest.raises(TableError, match="unknown field.*'dimm'.*valid fields"):
        SparseTableSpec.from_dict({"name": "t", "dimm": 4})
    spec = SparseTableSpec(name="t", dim=4, weight_bounds=(-1.0, 1.0))
    assert SparseTableSpec.from_dict(spec.to_dict()) == spec


def test_pull_marked_unique_answers_duplicates_correctly_anyway():
    a = SparseTable(SparseTableSpec(name="t", dim=3, entry="count_filter", entry_count=1))
    b = SparseTable(SparseTableSpec(name="t", dim=3, entry="count_filter", entry_count=1))
    keys = np.array([4, 9, 4, 4, 2], np.uint64)
    np.testing.assert_array_equal(a.pull(keys, unique=True), b.pull(keys))
    assert len(a) == len(b) == 3
    packed = np.ones((5, 5), np.float32)
    a.push_packed(keys, packed)
    b.push(keys, packed[:, :3], packed[:, 3].copy(), packed[:, 4].copy())
    np.testing.assert_array_equal(a.pull(keys, training=False), b.pull(keys, training=False))

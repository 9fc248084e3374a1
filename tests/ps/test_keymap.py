"""The native uint64 -> row hash map (shoal.ps._keymap) against a dict model.

The model predicts rows exactly: a new key takes the most recently freed row,
else row_bound; insert_with_rows appends the ids it uncovers to the free list
high to low, after dropping the ids it claims.
"""
import numpy as np
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule, run_state_machine_as_test

from shoal.ps._keymap import KeyMap

U64_MAX = 2**64 - 1


def _splitmix_finalizer(x: np.ndarray) -> np.ndarray:
    x = x.copy()
    x ^= x >> np.uint64(30)
    x *= np.uint64(0xBF58476D1CE4E5B9)
    x ^= x >> np.uint64(27)
    x *= np.uint64(0x94D049BB133111EB)
    x ^= x >> np.uint64(31)
    return x


def _colliding_keys(n: int) -> list[int]:
    """Keys whose slot hash agrees in the low 10 bits: one home slot for every capacity <= 1024."""
    cand = np.arange(1 << 20, dtype=np.uint64)
    with np.errstate(over="ignore"):
        hit = cand[(_splitmix_finalizer(cand) & np.uint64(1023)) == 0]
    return [int(k) for k in hit[:n]]


COLLIDING = _colliding_keys(12)
# Keys that an identity hash would pile into one slot after masking.
MASK_ALIKE = [5, 5 + 2**32, 5 + 2**63, 5 + 2**40, 2**63, 2**32]
POOL = sorted(set([0, 1, 2, 3, U64_MAX, U64_MAX - 1] + COLLIDING + MASK_ALIKE + list(range(1000, 1024))))


def u64(keys) -> np.ndarray:
    return np.array(keys, dtype=np.uint64)


class Model:
    """The dict reference: key -> row, a LIFO free list and the row bound."""

    def __init__(self):
        self.d: dict[int, int] = {}
        self.free: list[int] = []
        self.bound = 0

    def alloc(self) -> int:
        if self.free:
            return self.free.pop()
        self.bound += 1
        return self.bound - 1

    def get_or_insert(self, keys, admit):
        inserted = set()
        for k, a in zip(keys, admit):
            if k not in self.d and a:
                self.d[k] = self.alloc()
                inserted.add(k)
        rows = [self.d.get(k, -1) for k in keys]
        is_new, seen = [], set()
        for k in keys:
            is_new.append(k in inserted and k not in seen)
            seen.add(k)
        return rows, is_new

    def erase(self, keys):
        out = []
        for k in keys:
            r = self.d.pop(k, -1)
            if r >= 0:
                self.free.append(r)
            out.append(r)
        return out

    def insert_with_rows(self, keys, rows):
        claimed = set(rows)
        new_bound = max([self.bound] + [r + 1 for r in rows])
        self.free = [r for r in self.free if r not in claimed]
        self.free += [r for r in range(new_bound - 1, self.bound - 1, -1) if r not in claimed]
        self.bound = new_bound
        self.d.update(zip(keys, rows))


def check_same(m: KeyMap, model: Model):
    assert len(m) == m.size == len(model.d)
    assert m.row_bound == model.bound
    assert m.free_rows == len(model.free) == model.bound - len(model.d)
    keys, rows = m.items()
    assert keys.dtype == np.uint64 and rows.dtype == np.int64
    assert dict(zip(keys.tolist(), rows.tolist())) == model.d
    assert len(np.unique(rows)) == len(rows), "two keys share a row"
    assert np.array_equal(m.keys(), keys)
    in_use = m.in_use()
    assert in_use.dtype == np.bool_ and len(in_use) == model.bound
    assert np.flatnonzero(in_use).tolist() == sorted(model.d.values())
    assert m.capacity >= 16 and m.capacity & (m.capacity - 1) == 0
    assert len(m) <= 0.7 * m.capacity


key_lists = st.lists(st.sampled_from(POOL) | st.integers(0, U64_MAX), max_size=40)


class KeyMapMachine(RuleBasedStateMachine):
    def __init__(self):
        super().__init__()
        self.m = KeyMap(0)
        self.model = Model()

    @rule(keys=key_lists, data=st.data())
    def get_or_insert(self, keys, data):
        if data.draw(st.booleans(), label="use_admit"):
            admit = data.draw(st.lists(st.booleans(), min_size=len(keys), max_size=len(keys)), label="admit")
            rows, is_new = self.m.get_or_insert(u64(keys), np.array(admit, dtype=bool))
        else:
            admit = [True] * len(keys)
            rows, is_new = self.m.get_or_insert(u64(keys))
        exp_rows, exp_new = self.model.get_or_insert(keys, admit)
        assert rows.dtype == np.int64 and is_new.dtype == np.bool_
        assert rows.tolist() == exp_rows
        assert is_new.tolist() == exp_new

    @rule(keys=key_lists)
    def lookup(self, keys):
        assert self.m.lookup(u64(keys)).tolist() == [self.model.d.get(k, -1) for k in keys]

    @rule(keys=key_lists, data=st.data())
    def erase(self, keys, data):
        present = sorted(self.model.d)
        if present:
            keys = keys + data.draw(st.lists(st.sampled_from(present), max_size=10), label="present")
        assert self.m.erase(u64(keys)).tolist() == self.model.erase(keys)

    @rule(data=st.data())
    def insert_with_rows(self, data):
        candidates = [k for k in POOL if k not in self.model.d]
        if not candidates:
            return
        keys = data.draw(st.lists(st.sampled_from(candidates), unique=True, max_size=8), label="keys")
        free_ids = list(self.model.free)
        fresh_ids = list(range(self.model.bound, self.model.bound + 20))
        rows = data.draw(
            st.lists(st.sampled_from(free_ids + fresh_ids), unique=True, min_size=len(keys), max_size=len(keys)),
            label="rows",
        )
        self.m.insert_with_rows(u64(keys), np.array(rows, dtype=np.int64))
        self.model.insert_with_rows(keys, rows)

    @precondition(lambda self: len(self.model.d) > 0)
    @rule(data=st.data())
    def insert_with_rows_rejects(self, data):
        """A present key or a held row fails and changes nothing."""
        key, row = data.draw(st.sampled_from(sorted(self.model.d.items())), label="held")
        fresh_key = data.draw(st.integers(0, U64_MAX).filter(lambda k: k not in self.model.d), label="fresh")
        with pytest.raises(ValueError, match="already in the map"):
            self.m.insert_with_rows(u64([fresh_key, key]), np.array([self.model.bound, self.model.bound + 1]))
        with pytest.raises(ValueError, match="already held"):
            self.m.insert_with_rows(u64([fresh_key]), np.array([row]))
        check_same(self.m, self.model)

    @rule(n=st.integers(0, 300))
    def reserve(self, n):
        self.m.reserve(n)
        assert self.m.capacity * 0.7 >= n

    @rule()
    def clear(self):
        cap = self.m.capacity
        self.m.clear()
        self.model = Model()
        assert self.m.capacity == cap

    @invariant()
    def agrees_with_model(self):
        check_same(self.m, self.model)


def test_keymap_matches_dict_model():
    run_state_machine_as_test(
        KeyMapMachine,
        settings=settings(
            max_examples=150, stateful_step_count=40, deadline=None, suppress_health_check=[HealthCheck.too_slow]
        ),
    )


def test_colliding_keys_share_a_home_slot_and_survive_deletion_in_any_order():
    m = KeyMap(16)
    model = Model()
    rng = np.random.default_rng(1)
    keys = COLLIDING + [0, U64_MAX]
    model.get_or_insert(keys, [True] * len(keys))
    m.get_or_insert(u64(keys))
    for order in (rng.permutation(len(keys)) for _ in range(5)):
        for i in order[: len(keys) // 2]:
            assert m.erase(u64([keys[i]])).tolist() == model.erase([keys[i]])
            assert m.lookup(u64(keys)).tolist() == [model.d.get(k, -1) for k in keys]
        rows, _ = m.get_or_insert(u64(keys))
        assert rows.tolist() == model.get_or_insert(keys, [True] * len(keys))[0]
    check_same(m, model)


def test_growth_through_many_rehashes_200k_keys():
    rng = np.random.default_rng(0)
    special = u64([0, U64_MAX, 2**63])
    randoms = np.setdiff1d(rng.integers(0, 2**64, size=210_000, dtype=np.uint64), special)
    keys = rng.permutation(np.concatenate([special, rng.permutation(randoms)[: 200_000 - 3]]))
    m = KeyMap(16)
    caps = set()
    for batch in np.array_split(keys, 400):
        rows, is_new = m.get_or_insert(batch)
        assert is_new.all()
        caps.add(m.capacity)
    assert len(caps) >= 10, f"expected many rehashes, saw capacities {sorted(caps)}"
    assert len(m) == m.row_bound == 200_000 and m.free_rows == 0
    assert np.all(m.lookup(special) >= 0)
    rows = m.lookup(keys)
    assert np.array_equal(rows, np.arange(200_000)), "fresh rows are handed out 0, 1, 2, ... in insertion order"
    k, r = m.items()
    assert np.array_equal(np.sort(r), np.arange(200_000))
    assert np.array_equal(m.lookup(k), r)

    gone = keys[::2]
    freed = m.erase(gone)
    assert np.array_equal(freed, rows[::2])
    assert np.all(m.lookup(gone) == -1)
    assert np.array_equal(m.lookup(keys[1::2]), rows[1::2])
    assert m.free_rows == 100_000 and m.row_bound == 200_000

    fresh = np.arange(1, 100_001, dtype=np.uint64) * np.uint64(2**20)  # equal low bits: a bad identity hash
    new_rows, is_new = m.get_or_insert(fresh)
    assert is_new.all()
    assert np.array_equal(new_rows, freed[::-1]), "freed rows come back most recently freed first"
    assert m.row_bound == 200_000 and m.free_rows == 0
    absent = np.setdiff1d(rng.integers(0, 2**64, size=1000, dtype=np.uint64), np.concatenate([keys, fresh]))
    assert np.all(m.lookup(absent) == -1)


def test_checkpoint_roundtrip_with_insert_with_rows():
    m = KeyMap()
    keys = u64(range(100, 1100))
    m.get_or_insert(keys)
    m.erase(keys[::3])
    saved_keys, saved_rows = m.items()

    loaded = KeyMap()
    loaded.reserve(len(saved_keys))
    half = len(saved_keys) // 2
    loaded.insert_with_rows(saved_keys[half:], saved_rows[half:])  # shards load in any order
    loaded.insert_with_rows(saved_keys[:half], saved_rows[:half])
    assert np.array_equal(loaded.lookup(keys), m.lookup(keys))
    # The bound follows the highest row loaded (the original's top rows may have been freed).
    bound = int(saved_rows.max()) + 1
    assert loaded.row_bound == bound and loaded.free_rows == bound - len(saved_keys)
    # The loaded map hands out exactly the unheld ids, each once, then fresh ones.
    a, _ = loaded.get_or_insert(u64(range(5000, 5000 + loaded.free_rows + 2)))
    assert set(a[:-2].tolist()) == set(range(bound)) - set(saved_rows.tolist())
    assert a[-2:].tolist() == [bound, bound + 1]


def test_insert_with_rows_validates_before_changing_anything():
    m = KeyMap()
    m.get_or_insert(u64([1, 2, 3]))
    before = m.items(), m.row_bound, m.free_rows
    bad = [
        (u64([10, 10]), np.array([5, 6]), "key 10 appears more than once"),
        (u64([10, 11]), np.array([5, 5]), "row 5 appears more than once"),
        (u64([10, 2]), np.array([5, 6]), "key 2 .* already in the map"),
        (u64([10, 11]), np.array([5, 1]), "row 1 .* already held"),
        (u64([10]), np.array([-1]), "must be in"),
        (u64([10]), np.array([2**62]), "must be in"),
        (u64([10, 11]), np.array([5]), "keys has length 2 but rows has length 1"),
    ]
    for keys, rows, match in bad:
        with pytest.raises(ValueError, match=match):
            m.insert_with_rows(keys, rows)
    with pytest.raises(TypeError, match="rows must have dtype int64"):
        m.insert_with_rows(u64([10]), np.array([5], dtype=np.int32))
    after = m.items(), m.row_bound, m.free_rows
    assert np.array_equal(before[0][0], after[0][0]) and np.array_equal(before[0][1], after[0][1])
    assert before[1:] == after[1:]


def test_admit_mask_semantics():
    m = KeyMap()
    m.get_or_insert(u64([7]))
    keys = u64([7, 8, 9, 9, 10, 10, 10])
    admit = np.array([False, False, True, False, False, True, False])
    rows, is_new = m.get_or_insert(keys, admit)
    # 7 present (admit ignored); 8 rejected; 9 admitted at first sight; 10 admitted at its second occurrence,
    # so all of its occurrences share the row and the first one is the new one.
    assert rows.tolist() == [0, -1, 1, 1, 2, 2, 2]
    assert is_new.tolist() == [False, False, True, False, True, False, False]
    assert m.lookup(u64([8])).tolist() == [-1] and m.row_bound == 3
    rows, is_new = m.get_or_insert(u64([11, 12]), np.zeros(2, dtype=bool))
    assert rows.tolist() == [-1, -1] and not is_new.any() and len(m) == 3


@pytest.mark.parametrize("method", ["lookup", "erase", "get_or_insert"])
@pytest.mark.parametrize(
    "keys, error, match",
    [
        (np.array([1.0, 2.0]), TypeError, "dtype uint64, got float64"),
        (np.array([1, 2], dtype=np.int64), TypeError, "dtype uint64, got int64"),
        (np.array([1, 2], dtype=np.uint32), TypeError, "dtype uint64, got uint32"),
        (np.array([1, 2], dtype=">u8"), TypeError, "dtype uint64"),
        (np.zeros((2, 2), dtype=np.uint64), ValueError, "must be 1-D"),
        (np.uint64(3), TypeError, "numpy array"),
        (np.array(3, dtype=np.uint64), ValueError, "must be 1-D"),
        ([1, 2], TypeError, "got list"),
    ],
)
def test_bad_keys_raise(method, keys, error, match):
    m = KeyMap()
    with pytest.raises(error, match=match):
        getattr(m, method)(keys)
    assert len(m) == 0 and m.row_bound == 0


def test_bad_admit_and_constructor_args_raise():
    m = KeyMap()
    keys = u64([1, 2, 3])
    with pytest.raises(ValueError, match="admit has length 2 but keys has length 3"):
        m.get_or_insert(keys, np.ones(2, dtype=bool))
    with pytest.raises(TypeError, match="admit must have dtype bool, got int64"):
        m.get_or_insert(keys, np.ones(3, dtype=np.int64))
    with pytest.raises(ValueError, match="must be 1-D"):
        m.get_or_insert(keys, np.ones((3, 1), dtype=bool))
    with pytest.raises(TypeError, match="admit must be"):
        m.get_or_insert(keys, [True, True, True])
    assert len(m) == 0
    with pytest.raises(ValueError, match="capacity must be >= 0"):
        KeyMap(-1)
    with pytest.raises(ValueError, match="n must be >= 0"):
        m.reserve(-5)


def test_strided_and_readonly_inputs_and_outputs_do_not_alias_the_table():
    m = KeyMap(16)
    base = u64(range(100))
    base.flags.writeable = False
    rows, _ = m.get_or_insert(base[::2])
    assert rows.tolist() == list(range(50))
    keys_before, rows_before = m.items()
    snapshot = rows.copy()
    m.get_or_insert(u64(range(1000, 5000)))  # several rehashes
    m.erase(base[::2])
    assert np.array_equal(rows, snapshot) and len(keys_before) == 50 and len(rows_before) == 50
    assert m.lookup(base[1::2]).tolist() == [-1] * 50
    empty_rows, empty_new = m.get_or_insert(u64([]))
    assert empty_rows.shape == (0,) and empty_new.shape == (0,)


def test_reserve_and_capacity():
    m = KeyMap(1000)
    assert m.capacity == 1024
    assert KeyMap(0).capacity == 16
    m.reserve(10_000)
    cap = m.capacity
    assert cap * 0.7 >= 10_000
    m.get_or_insert(u64(range(10_000)))
    assert m.capacity == cap, "reserve(n) makes room for n keys without another rehash"
    m.reserve(10)
    assert m.capacity == cap, "reserve never shrinks"
    m.clear()
    assert len(m) == m.row_bound == m.free_rows == 0 and m.capacity == cap
    assert m.get_or_insert(u64([42]))[0].tolist() == [0]



def test_segment_slots_copies_records_and_refuses_damaged_segments():
    from shoal.ps._keymap import segment_slots
    rows, width = 4, 3
    recs = np.arange(2 * rows * width, dtype=np.float32).reshape(2, rows, width)
    keys = np.array([[10, 11, 12, 13], [20, 21, 22, 23]], np.uint64)
    values = [recs[i].tobytes() + keys[i].tobytes() for i in range(2)]
    which, slot = np.array([1, 0, 1], np.int64), np.array([2, 3, 0], np.int64)
    at = np.array([4, 0, 2], np.int64)
    out = np.zeros((5, width), np.float32)
    assert segment_slots(values, which, slot, u64([22, 13, 20]), at, out, rows) == 0
    want = np.zeros((5, width), np.float32)
    want[[4, 0, 2]] = recs[which, slot]
    np.testing.assert_array_equal(out, want)

    out[:] = -1.0  # a refused call writes nothing
    assert segment_slots(values, which, slot, u64([22, 13, 21]), at, out, rows) == 2  # other key
    assert segment_slots([values[0], None], which, slot, u64([22, 13, 20]), at, out, rows) == 1
    assert segment_slots([values[0], values[1][:-8]], which, slot, u64([22, 13, 20]), at, out,
                         rows) == 1
    assert (out == -1.0).all()
    with pytest.raises(ValueError, match="out of range"):
        segment_slots(values, np.array([2], np.int64), slot[:1], u64([22]), at[:1], out, rows)
    with pytest.raises(ValueError, match="out of range"):
        segment_slots(values, which[:1], slot[:1], u64([22]), np.array([5], np.int64), out, rows)
    with pytest.raises(ValueError, match="one entry each"):
        segment_slots(values, which, slot[:2], u64([22, 13, 20]), at, out, rows)
    with pytest.raises(TypeError, match="C-contiguous float32"):
        segment_slots(values, which, slot, u64([22, 13, 20]), at, out[:, :2], rows)
    with pytest.raises(TypeError, match="C-contiguous float32"):
        segment_slots(values, which, slot, u64([22, 13, 20]), at, out.astype(np.float64), rows)

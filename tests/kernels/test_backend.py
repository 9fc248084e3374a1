"""The backend registry and the row kernels of the numpy backend against plain references."""
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from shoal import kernels
from shoal.kernels import (Backend, BackendError, KernelShapeError, backend_of, get_backend,
                           register_backend, registered_backends)
from shoal.kernels import _registry

NP = get_backend("numpy")
SETTINGS = settings(max_examples=60, deadline=None)


# -- the registry ---------------------------------------------------------------------------------
def test_get_backend_numpy_is_the_default_and_a_singleton():
    be = get_backend("numpy")
    assert isinstance(be, Backend)
    assert be.name == "numpy"
    assert be.xp is np
    assert get_backend() is be
    assert kernels.default_backend() is be
    assert get_backend("numpy") is be


def test_unknown_backend_raises_backend_error_listing_registered_names():
    with pytest.raises(BackendError) as err:
        get_backend("tpu9000")
    msg = str(err.value)
    assert "'tpu9000'" in msg
    for name in registered_backends():
        assert repr(name) in msg
    assert "numpy" in registered_backends() and "cupy" in registered_backends()
    assert isinstance(err.value, ValueError)  # BackendError is a ValueError too


@pytest.mark.skipif("cupy" in kernels.available_backends(), reason="cupy is usable here")
def test_cupy_without_a_gpu_raises_saying_what_it_needs():
    with pytest.raises(BackendError) as err:
        get_backend("cupy")
    msg = str(err.value)
    assert "'cupy'" in msg
    assert "CUDA" in msg and "pip install" in msg and "gpu" in msg
    with pytest.raises(BackendError):
        kernels.set_default_backend("cupy")
    assert kernels.default_backend() is NP  # a failed switch leaves the default alone


def test_registered_but_unusable_backend_raises_with_its_requirement(monkeypatch):
    monkeypatch.setattr(_registry, "_CLASSES", dict(_registry._CLASSES))

    class Never(type(NP)):
        name = "never"
        requirement = "It needs a flux capacitor."

        @classmethod
        def available(cls):
            return False

    register_backend("never", Never)
    assert "never" in registered_backends()
    assert "never" not in kernels.available_backends()
    with pytest.raises(BackendError, match="flux capacitor"):
        get_backend("never")


def test_register_backend_rejects_what_is_not_a_backend_class(monkeypatch):
    monkeypatch.setattr(_registry, "_CLASSES", dict(_registry._CLASSES))
    before = registered_backends()

    class NotABackend:
        pass

    for bad in (NotABackend, NotABackend(), NP, "numpy"):
        with pytest.raises(BackendError, match="not a subclass of Backend"):
            register_backend("bad", bad)
    assert registered_backends() == before


def test_backend_of_host_data_is_numpy():
    assert backend_of(np.zeros(3)) is NP
    assert backend_of(np.float32(1.0)) is NP
    assert backend_of([1, 2, 3]) is NP


# -- segment_sum against a dict-accumulation reference --------------------------------------------
def _segment_sum_reference(keys, rows):
    acc = {}
    for k, r in zip(keys.tolist(), rows):
        acc[k] = acc[k] + r if k in acc else r.copy()
    uniq = sorted(acc)
    out = np.array([acc[k] for k in uniq], dtype=rows.dtype).reshape((len(uniq),) + rows.shape[1:])
    return np.array(uniq, dtype=keys.dtype), out


_KEY_RANGE = {np.uint64: (0, 2 ** 64 - 1), np.int64: (-2 ** 63, 2 ** 63 - 1)}


@st.composite
def keys_and_rows(draw, dtype):
    n = draw(st.integers(0, 40))
    lo, hi = _KEY_RANGE[dtype]
    # a small pool of keys (so duplicates are common) drawn from the whole range of the dtype
    pool = draw(st.lists(st.integers(lo, hi), min_size=1, max_size=6, unique=True))
    keys = np.array([draw(st.sampled_from(pool)) for _ in range(n)], dtype=dtype)
    trailing = draw(st.sampled_from([(), (1,), (3,)]))
    # integer-valued floats: every sum is exact, whatever the order of additions
    rows = draw(hnp.arrays(np.float64, (n,) + trailing, elements=st.integers(-1000, 1000)))
    return keys, rows


@pytest.mark.parametrize("dtype", [np.uint64, np.int64])
def test_segment_sum_equals_dict_accumulation(dtype):
    @SETTINGS
    @given(keys_and_rows(dtype))
    def check(kr):
        keys, rows = kr
        keys_before, rows_before = keys.copy(), rows.copy()
        uniq, summed = NP.segment_sum(keys, rows)
        ref_keys, ref_rows = _segment_sum_reference(keys, rows)
        assert uniq.dtype == keys.dtype
        assert summed.dtype == rows.dtype
        np.testing.assert_array_equal(uniq, ref_keys)
        assert summed.shape == ref_rows.shape
        np.testing.assert_array_equal(summed, ref_rows)
        np.testing.assert_array_equal(keys, keys_before)  # inputs untouched
        np.testing.assert_array_equal(rows, rows_before)

    check()


@pytest.mark.parametrize("dtype", [np.uint64, np.int64])
@pytest.mark.parametrize("trailing", [(), (4,)])
def test_segment_sum_empty_input(dtype, trailing):
    keys = np.zeros(0, dtype=dtype)
    rows = np.zeros((0,) + trailing, dtype=np.float32)
    uniq, summed = NP.segment_sum(keys, rows)
    assert uniq.shape == (0,) and uniq.dtype == dtype
    assert summed.shape == (0,) + trailing and summed.dtype == np.float32


@pytest.mark.parametrize("dtype", [np.uint64, np.int64])
def test_segment_sum_all_duplicates(dtype):
    keys = np.full(7, 2 ** 62 + 5, dtype=dtype)
    rows = np.arange(21, dtype=np.float32).reshape(7, 3)
    uniq, summed = NP.segment_sum(keys, rows)
    np.testing.assert_array_equal(uniq, [2 ** 62 + 5])
    np.testing.assert_array_equal(summed, rows.sum(axis=0, keepdims=True))


def test_segment_sum_uint64_keys_above_int64_range_stay_exact():
    keys = np.array([2 ** 64 - 1, 2 ** 63, 2 ** 64 - 1, 0], dtype=np.uint64)
    rows = np.array([1.0, 2.0, 4.0, 8.0])
    uniq, summed = NP.segment_sum(keys, rows)
    assert uniq.tolist() == [0, 2 ** 63, 2 ** 64 - 1]
    np.testing.assert_array_equal(summed, [8.0, 2.0, 5.0])


@pytest.mark.parametrize("keys_shape, rows_shape", [
    ((2, 3), (6, 4)),   # keys not 1-D
    ((2, 3), (2, 3)),
    ((5,), (4, 2)),     # one key per row
    ((5,), (6,)),
    ((3,), ()),         # rows without a row axis
])
def test_segment_sum_bad_shapes_raise_naming_them(keys_shape, rows_shape):
    keys = np.zeros(keys_shape, dtype=np.int64)
    rows = np.zeros(rows_shape, dtype=np.float32)
    with pytest.raises(KernelShapeError) as err:
        NP.segment_sum(keys, rows)
    msg = str(err.value)
    assert "segment_sum" in msg
    assert str(keys_shape) in msg and str(rows_shape) in msg


# -- gather / scatter / index_add / unique --------------------------------------------------------
@SETTINGS
@given(st.data())
def test_gather_rows_equals_fancy_indexing(data):
    n_rows = data.draw(st.integers(1, 12))
    table = data.draw(hnp.arrays(np.float32, (n_rows, 3),
                                 elements=st.floats(-1e3, 1e3, width=32)))
    idx_shape = data.draw(hnp.array_shapes(min_dims=1, max_dims=2, min_side=0, max_side=5))
    idx = data.draw(hnp.arrays(np.int64, idx_shape, elements=st.integers(0, n_rows - 1)))
    out = NP.gather_rows(table, idx)
    np.testing.assert_array_equal(out, table[idx])
    assert out.shape == idx.shape + (3,)
    if out.size:  # a new array, not a view into the table
        before = table.copy()
        out[...] = 12345.0
        np.testing.assert_array_equal(table, before)


@SETTINGS
@given(st.data())
def test_scatter_add_rows_with_duplicates_equals_add_at(data):
    n_rows = data.draw(st.integers(1, 8))
    trailing = data.draw(st.sampled_from([(), (2,), (2, 3)]))
    table = data.draw(hnp.arrays(np.float64, (n_rows,) + trailing, elements=st.integers(-50, 50)))
    idx_shape = data.draw(st.sampled_from([(0,), (1,), (6,), (2, 3)]))
    idx = data.draw(hnp.arrays(np.int64, idx_shape, elements=st.integers(0, n_rows - 1)))
    rows = data.draw(hnp.arrays(np.float64, idx_shape + trailing, elements=st.integers(-50, 50)))
    expected = table.copy()
    np.add.at(expected, idx, rows)
    out = table  # in place
    assert NP.scatter_add_rows(out, idx, rows) is None
    np.testing.assert_array_equal(out, expected)


def test_scatter_add_rows_counts_every_duplicate():
    table = np.zeros((4, 2), dtype=np.float32)
    NP.scatter_add_rows(table, np.array([3, 3, 3, 0]), np.ones((4, 2), dtype=np.float32))
    np.testing.assert_array_equal(table, [[1, 1], [0, 0], [0, 0], [3, 3]])
    assert table.dtype == np.float32


@SETTINGS
@given(st.data())
def test_index_add_equals_add_at(data):
    target = data.draw(hnp.arrays(np.float64, (5, 4), elements=st.integers(-9, 9)))
    n = data.draw(st.integers(0, 10))
    rows = np.array(data.draw(st.lists(st.integers(0, 4), min_size=n, max_size=n)), dtype=np.int64)
    cols = np.array(data.draw(st.lists(st.integers(0, 3), min_size=n, max_size=n)), dtype=np.int64)
    values = np.array(data.draw(st.lists(st.integers(-9, 9), min_size=n, max_size=n)),
                      dtype=np.float64)
    for index, vals in (((rows, cols), values),                      # element-wise, 2-D index
                        (rows, np.repeat(values[:, None], 4, 1))):   # whole rows
        expected = target.copy()
        np.add.at(expected, index, vals)
        got = target.copy()
        assert NP.index_add_(got, index, vals) is None
        np.testing.assert_array_equal(got, expected)


def test_index_add_adds_duplicates():
    target = np.zeros(3)
    NP.index_add_(target, np.array([1, 1, 1, 2]), np.array([1.0, 2.0, 3.0, 4.0]))
    np.testing.assert_array_equal(target, [0.0, 6.0, 4.0])


@pytest.mark.parametrize("dtype", [np.uint64, np.int64])
def test_unique_sorted_with_inverse(dtype):
    @SETTINGS
    @given(keys_and_rows(dtype))
    def check(kr):
        keys, _ = kr
        uniq, inverse = NP.unique(keys)
        assert uniq.dtype == keys.dtype
        assert uniq.tolist() == sorted(set(keys.tolist()))
        np.testing.assert_array_equal(uniq[inverse.reshape(-1)], keys)

    check()

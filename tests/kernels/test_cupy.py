"""Every kernel of the cupy backend gives what the numpy backend gives (needs a CUDA GPU)."""
import numpy as np
import pytest

from shoal.kernels import KernelShapeError, backend_of, get_backend
from tests.kernels.test_optimizer_kernels import CASES, STEPS, _hparams

pytestmark = pytest.mark.requires_gpu

NP = get_backend("numpy")
RTOL, ATOL = 1e-5, 1e-6


@pytest.fixture
def cp():
    import cupy
    return cupy


@pytest.fixture
def CP():
    return get_backend("cupy")


def _close(got, want, exact=False):
    got = get_backend("cupy").to_numpy(got)
    assert got.dtype == want.dtype
    assert got.shape == want.shape
    if exact:
        np.testing.assert_array_equal(got, want)
    else:
        np.testing.assert_allclose(got, want, rtol=RTOL, atol=ATOL)


def test_cupy_backend_identity(cp, CP):
    assert CP.name == "cupy"
    assert CP.xp is cp
    a = cp.zeros(3)
    assert backend_of(a) is CP
    assert backend_of(np.zeros(3)) is NP
    assert isinstance(CP.to_numpy(a), np.ndarray)


# -- row kernels ----------------------------------------------------------------------------------
def _keys(dtype, n, rng, pool_size=5):
    info = np.iinfo(dtype)
    pool = rng.integers(info.min, info.max, size=pool_size, dtype=dtype, endpoint=True)
    return rng.choice(pool, size=n)


@pytest.mark.parametrize("dtype", [np.uint64, np.int64])
@pytest.mark.parametrize("trailing", [(), (1,), (3,)])
@pytest.mark.parametrize("n", [0, 1, 7, 200])
def test_segment_sum_matches_numpy(cp, CP, dtype, trailing, n):
    rng = np.random.default_rng(n)
    keys = _keys(dtype, n, rng)
    rows = rng.integers(-1000, 1000, size=(n,) + trailing).astype(np.float32)  # exact sums
    want_keys, want_rows = NP.segment_sum(keys, rows)
    got_keys, got_rows = CP.segment_sum(cp.asarray(keys), cp.asarray(rows))
    _close(got_keys, want_keys, exact=True)
    _close(got_rows, want_rows, exact=True)


@pytest.mark.parametrize("dtype", [np.uint64, np.int64])
def test_segment_sum_all_duplicates_matches_numpy(cp, CP, dtype):
    keys = np.full(9, 12345, dtype=dtype)
    rows = np.arange(27, dtype=np.float32).reshape(9, 3)
    want_keys, want_rows = NP.segment_sum(keys, rows)
    got_keys, got_rows = CP.segment_sum(cp.asarray(keys), cp.asarray(rows))
    _close(got_keys, want_keys, exact=True)
    _close(got_rows, want_rows, exact=True)


def test_segment_sum_bad_shapes_raise(cp, CP):
    with pytest.raises(KernelShapeError, match=r"\(2, 3\).*\(6, 4\)"):
        CP.segment_sum(cp.zeros((2, 3), dtype=cp.int64), cp.zeros((6, 4), dtype=cp.float32))
    with pytest.raises(KernelShapeError, match=r"\(5,\).*\(4, 2\)"):
        CP.segment_sum(cp.zeros(5, dtype=cp.int64), cp.zeros((4, 2), dtype=cp.float32))


@pytest.mark.parametrize("idx_shape", [(0,), (5,), (2, 3)])
def test_gather_rows_matches_numpy(cp, CP, idx_shape):
    rng = np.random.default_rng(0)
    table = rng.normal(size=(8, 3)).astype(np.float32)
    idx = rng.integers(0, 8, size=idx_shape)
    _close(CP.gather_rows(cp.asarray(table), cp.asarray(idx)), NP.gather_rows(table, idx),
           exact=True)


@pytest.mark.parametrize("idx_shape", [(0,), (6,), (2, 3)])
@pytest.mark.parametrize("trailing", [(), (4,)])
def test_scatter_add_rows_matches_numpy(cp, CP, idx_shape, trailing):
    rng = np.random.default_rng(1)
    table = rng.integers(-9, 9, size=(4,) + trailing).astype(np.float32)
    idx = rng.integers(0, 4, size=idx_shape)  # duplicates
    rows = rng.integers(-9, 9, size=idx_shape + trailing).astype(np.float32)
    want = table.copy()
    NP.scatter_add_rows(want, idx, rows)
    got = cp.asarray(table)
    CP.scatter_add_rows(got, cp.asarray(idx), cp.asarray(rows))
    _close(got, want, exact=True)


def test_index_add_matches_numpy(cp, CP):
    rng = np.random.default_rng(2)
    target = rng.integers(-9, 9, size=(5, 4)).astype(np.float32)
    rows, cols = rng.integers(0, 5, size=12), rng.integers(0, 4, size=12)
    values = rng.integers(-9, 9, size=12).astype(np.float32)
    want = target.copy()
    NP.index_add_(want, (rows, cols), values)
    got = cp.asarray(target)
    CP.index_add_(got, (cp.asarray(rows), cp.asarray(cols)), cp.asarray(values))
    _close(got, want, exact=True)


@pytest.mark.parametrize("dtype", [np.uint64, np.int64])
def test_unique_matches_numpy(cp, CP, dtype):
    keys = _keys(dtype, 50, np.random.default_rng(3))
    want_u, want_inv = NP.unique(keys)
    got_u, got_inv = CP.unique(cp.asarray(keys))
    _close(got_u, want_u, exact=True)
    np.testing.assert_array_equal(CP.to_numpy(got_inv).reshape(-1), want_inv.reshape(-1))


# -- optimizer kernels ----------------------------------------------------------------------------
def _float32_problem(n_states, shape=(6, 5), seed=0):
    rng = np.random.default_rng(seed)
    p = rng.normal(size=shape).astype(np.float32)
    grads = [rng.normal(size=shape).astype(np.float32) for _ in range(STEPS)]
    states = [np.zeros(shape, dtype=np.float32) for _ in range(n_states)]
    return p, grads, states


@pytest.mark.parametrize("case", sorted(CASES))
def test_update_kernel_matches_numpy(cp, CP, case):
    kernel, n_states, hp = CASES[case]
    p0, grads, states0 = _float32_problem(n_states)
    want_p, want_s = p0.copy(), [s.copy() for s in states0]
    got_p, got_s = cp.asarray(p0), [cp.asarray(s) for s in states0]
    for step, g in enumerate(grads, start=1):
        kw = _hparams(kernel, hp, step)
        getattr(NP, kernel)(want_p, g, *want_s, **kw)
        getattr(CP, kernel)(got_p, cp.asarray(g), *got_s, **kw)
    _close(got_p, want_p)
    for got, want in zip(got_s, want_s):
        _close(got, want)


@pytest.mark.parametrize("kernel, n_states, hp", [
    ("lamb_", 2, dict(lr=0.1, beta1=0.9, beta2=0.999, eps=1e-6, weight_decay=0.01)),
    ("lars_", 1, dict(lr=0.1, momentum=0.9, lars_coeff=0.001, weight_decay=0.0005, eps=0.0)),
])
def test_zero_norm_trust_ratio_matches_numpy(cp, CP, kernel, n_states, hp):
    g = np.array([[0.5, -1.0], [2.0, 0.25]], dtype=np.float32)
    want_p = np.zeros((2, 2), np.float32)
    want_s = [np.zeros((2, 2), np.float32) for _ in range(n_states)]
    got_p, got_s = cp.zeros((2, 2), cp.float32), [cp.zeros((2, 2), cp.float32)
                                                  for _ in range(n_states)]
    kw = _hparams(kernel, hp, 1)
    getattr(NP, kernel)(want_p, g, *want_s, **kw)
    getattr(CP, kernel)(got_p, cp.asarray(g), *got_s, **kw)
    _close(got_p, want_p)
    assert np.all(np.isfinite(CP.to_numpy(got_p)))


@pytest.mark.parametrize("case", sorted(CASES))
def test_rows_update_matches_numpy(cp, CP, case):
    kernel, n_states, hp = CASES[case]
    rng = np.random.default_rng(4)
    param = rng.normal(size=(9, 4)).astype(np.float32)
    states = [rng.uniform(0.1, 1.0, size=(9, 4)).astype(np.float32) for _ in range(n_states)]
    ids = np.array([7, 2, 4])
    want_p, want_s = param.copy(), [s.copy() for s in states]
    got_p, got_s = cp.asarray(param), [cp.asarray(s) for s in states]
    for step in (1, 2, 3):
        rows = rng.normal(size=(3, 4)).astype(np.float32)
        kw = _hparams(kernel, hp, step)
        NP.rows_update_(kernel, want_p, ids, rows, *want_s, **kw)
        CP.rows_update_(kernel, got_p, cp.asarray(ids), cp.asarray(rows), *got_s, **kw)
    _close(got_p, want_p)
    for got, want in zip(got_s, want_s):
        _close(got, want)
    others = [0, 1, 3, 5, 6, 8]
    np.testing.assert_array_equal(CP.to_numpy(got_p)[others], param[others])


@pytest.mark.parametrize("rule", ["naive", "adagrad", "std_adagrad", "adam"])
def test_ctr_push_and_pull_on_the_gpu_equal_the_native_kernels(cp, CP, rule):
    from shoal.ps.sparse_table import SparseShard
    from shoal.ps.spec import SparseTableSpec
    shard = SparseShard(SparseTableSpec(name="t", dim=8, rule=rule), 0)
    rng = np.random.default_rng(4)
    values = rng.normal(0, 0.03, (40, shard.width)).astype(np.float32)
    rows = np.array([5, 0, 39, 12], np.int64)
    grads = rng.normal(size=(4, 8)).astype(np.float32)
    shows = np.array([1, 2, 0, 4], np.float32)
    clicks = np.array([0, 1, 0, 2], np.float32)
    dev = cp.asarray(values)
    NP.ctr_push(values, rows, grads, shows, clicks, *shard._native)
    CP.ctr_push(dev, cp.asarray(rows), cp.asarray(grads), cp.asarray(shows), cp.asarray(clicks),
                *shard._native)
    _close(dev, values)
    _close(CP.ctr_pull(dev, cp.asarray(np.array([0, -1, 5])), 8, shard.unseen),
           NP.ctr_pull(values, np.array([0, -1, 5]), 8, shard.unseen))

"""The native row kernels: unique_inverse, gather_add_rows_, ctr_push, ctr_pull (vs numpy)."""
import numpy as np
import pytest

from shoal.kernels import ctr_pull, ctr_push, get_backend
from shoal.ps.accessor import make_rule
from shoal.ps.spec import SparseTableSpec

be = get_backend("numpy")


def test_unique_inverse_rebuilds_the_keys_in_first_occurrence_order():
    keys = np.random.default_rng(0).integers(0, 50, 500).astype(np.uint64)
    uniq, inv = be.unique_inverse(keys)
    np.testing.assert_array_equal(uniq[inv], keys)
    assert len(uniq) == len(set(keys.tolist()))
    _, first = np.unique(keys, return_index=True)
    np.testing.assert_array_equal(uniq, keys[np.sort(first)])


def test_gather_add_rows_matches_numpy_add_at():
    rng = np.random.default_rng(1)
    src = rng.normal(size=(7, 3)).astype(np.float32)
    out_idx, src_idx = rng.integers(0, 5, 40), rng.integers(0, 7, 40)
    scale = rng.random(40).astype(np.float32)
    got = np.zeros((5, 3), np.float32)
    be.gather_add_rows_(got, out_idx, src, src_idx, scale)
    want = np.zeros((5, 3), np.float32)
    np.add.at(want, out_idx, src[src_idx] * scale[:, None])
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_gather_add_rows_checks_indices_before_writing():
    out = np.zeros((2, 2), np.float32)
    with pytest.raises(IndexError):
        be.gather_add_rows_(out, np.array([0, 5]), np.ones((2, 2), np.float32))
    assert not out.any()


@pytest.mark.parametrize("rule", ["naive", "adagrad", "std_adagrad", "adam"])
@pytest.mark.parametrize("scale_by_show", [True, False])
def test_ctr_push_matches_the_numpy_rule(rule, scale_by_show):
    dim = 5
    spec = SparseTableSpec(name="t", dim=dim, rule=rule, scale_by_show=scale_by_show,
                           weight_bounds=(-0.05, 0.05))
    r = make_rule(spec)
    widths = r.state_widths(dim)
    width = dim + sum(widths.values()) + 4
    rng = np.random.default_rng(2)
    values = rng.normal(0, 0.03, (20, width)).astype(np.float32)
    cols, c = {}, dim
    for name, k in widths.items():
        cols[name] = c
        values[:, c:c + k] = r.init_state(name, 20, k) + (rng.random((20, k)) if name in ("g2sum", "v") else 0)
        c += k
    show, click, delta, unseen = c, c + 1, c + 2, c + 3
    rows = np.array([3, 7, 0, 19], np.int64)
    grads = rng.normal(size=(4, dim)).astype(np.float32)
    shows = np.array([1, 3, 0, 2], np.float32)
    clicks = np.array([0, 1, 0, 2], np.float32)
    want = values.copy()
    block = want[rows]
    block[:, show] += shows
    block[:, click] += clicks
    block[:, delta] += spec.score(shows, clicks)
    block[:, unseen] = 0
    g = grads / np.maximum(shows, 1.0)[:, None] if scale_by_show else grads
    r.update(block[:, :dim], {n: block[:, cols[n]:cols[n] + k] for n, k in widths.items()}, g)
    want[rows] = block
    from shoal.ps.sparse_table import _NATIVE_RULES
    kernel, names = _NATIVE_RULES[rule]
    ctr_push(values, rows, grads, shows, clicks, kernel, dim, [cols[n] for n in names],
             [show, click, delta, unseen], spec.learning_rate, spec.initial_g2sum, -0.05, 0.05,
             spec.nonclk_coeff, spec.click_coeff, scale_by_show, spec.beta1, spec.beta2, spec.epsilon)
    np.testing.assert_allclose(values, want, rtol=1e-5, atol=1e-7)


def test_ctr_push_refuses_a_row_out_of_range_and_changes_nothing():
    values = np.zeros((4, 6), np.float32)
    with pytest.raises(IndexError):
        ctr_push(values, np.array([1, 9]), np.ones((2, 2), np.float32), np.ones(2, np.float32),
                 np.zeros(2, np.float32), 0, 2, [], [2, 3, 4, 5], 0.1, 3.0, -10, 10, 0.1, 1.0, True,
                 0.9, 0.999, 1e-8)
    assert not values.any()


def test_ctr_pull_gathers_at_positions_and_resets_unseen_days():
    values = np.arange(12, dtype=np.float32).reshape(4, 3)
    out = np.full((3, 2), -1, np.float32)
    ctr_pull(values, np.array([2, -1, 0]), out, np.array([1, 0, 2]), 2, 2)
    np.testing.assert_array_equal(out, [[0, 0], [6, 7], [0, 1]])
    assert values[2, 2] == 0 and values[0, 2] == 0 and values[1, 2] == 5


@pytest.mark.parametrize("rule", ["naive", "adagrad", "std_adagrad", "adam"])
@pytest.mark.parametrize("scale_by_show", [True, False])
def test_the_generic_ctr_kernels_equal_the_native_ones(rule, scale_by_show):
    """Backend's xp bodies of ctr_push / ctr_pull (what the cupy backend runs) against the native
    kernels the numpy backend runs, on the same records."""
    from shoal.kernels import Backend
    from shoal.ps.sparse_table import SparseShard
    shard = SparseShard(SparseTableSpec(name="t", dim=6, rule=rule, scale_by_show=scale_by_show,
                                        weight_bounds=(-0.05, 0.05)), 0)
    rng = np.random.default_rng(3)
    values = rng.normal(0, 0.03, (30, shard.width)).astype(np.float32)
    for name, (start, k) in shard.cols.items():
        if name.startswith("state."):
            values[:, start:start + k] = rng.random((30, k)) * (0.9 if "pow" in name else 2.0)
    rows = np.array([4, 0, 29, 11, 7], np.int64)
    grads = rng.normal(size=(5, 6)).astype(np.float32)
    shows = np.array([1, 3, 0, 2, 5], np.float32)
    clicks = np.array([0, 1, 0, 2, 1], np.float32)
    native, generic = values.copy(), values.copy()
    be.ctr_push(native, rows, grads, shows, clicks, *shard._native)
    Backend.ctr_push(be, generic, rows, grads, shows, clicks, *shard._native)
    assert not np.array_equal(native, values)
    np.testing.assert_allclose(generic, native, rtol=2e-6, atol=1e-8)
    pull_rows = np.array([3, -1, 29], np.int64)
    want = be.ctr_pull(native, pull_rows, 6, shard.unseen)
    got = Backend.ctr_pull(be, generic, pull_rows, 6, shard.unseen)
    np.testing.assert_allclose(got, want, rtol=2e-6)
    assert not got[1].any() and generic[3, shard.unseen] == 0 == native[3, shard.unseen]

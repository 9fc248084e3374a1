"""Metrics: AUC against an exact rank AUC and Paddle's loop, state merging, one-call global reduce."""
import math
import threading

import numpy as np
import pytest

import shoal
from shoal.worker.errors import EngineError
from shoal.worker.metrics import (Accuracy, Auc, LogLoss, Mean, MetricError, all_reduce_metrics,
                                  bucket_auc)


def rank_auc(p, y):
    """Exact ROC AUC (Mann-Whitney), tied predictions sharing their average rank."""
    p, y = np.asarray(p, np.float64), np.asarray(y)
    order = np.argsort(p, kind="mergesort")
    ranks = np.empty(p.size)
    ranks[order] = np.arange(1, p.size + 1)
    _, inv, counts = np.unique(p, return_inverse=True, return_counts=True)
    ranks = (np.bincount(inv, weights=ranks) / counts)[inv]
    n_pos = int(y.sum())
    n_neg = p.size - n_pos
    return (ranks[y == 1].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)


def paddle_loop_auc(stat_pos, stat_neg):
    """paddle.distributed.fleet.metrics.auc's loop, transliterated."""
    area = pos = neg = 0.0
    total = 0
    for index in range(len(stat_pos) - 1, -1, -1):
        new_pos, new_neg = pos + stat_pos[index], neg + stat_neg[index]
        total += stat_pos[index] + stat_neg[index]
        area += (new_neg - neg) * (pos + new_pos) / 2
        pos, neg = new_pos, new_neg
    return 0.5 if pos * neg == 0 or total == 0 else area / (pos * neg)


def data(n, seed=0):
    rng = np.random.default_rng(seed)
    p = rng.random(n)
    y = (rng.random(n) < p).astype(np.int64)
    return p, y


# -- Auc ----------------------------------------------------------------------------
def test_auc_matches_rank_auc_within_bucket_error():
    p, y = data(20000)
    auc = Auc()
    auc.update(p, y)
    assert auc.stat_pos.shape == auc.stat_neg.shape == (4096,)
    assert auc.stat_pos.dtype == np.int64
    assert auc.stat_pos.sum() == y.sum() and auc.stat_neg.sum() == (1 - y).sum()
    assert abs(auc.accumulate() - rank_auc(p, y)) < 1e-3


def test_auc_is_exact_when_predictions_sit_in_bucket_middles():
    rng = np.random.default_rng(1)
    k = rng.integers(0, 64, size=5000)
    p = (k + 0.5) / 64  # 64 thresholds: every prediction in the middle of its bucket
    y = (rng.random(5000) < p).astype(np.int64)
    auc = Auc(num_thresholds=64)
    auc.update(p, y)
    assert auc.accumulate() == pytest.approx(rank_auc(p, y), abs=1e-12)


def test_auc_equals_paddles_loop_bit_for_bit():
    p, y = data(30000, seed=2)
    auc = Auc()
    auc.update(p, y)
    assert auc.accumulate() == paddle_loop_auc(auc.stat_pos.tolist(), auc.stat_neg.tolist())
    assert bucket_auc(auc.stat_pos[None, :], auc.stat_neg[None, :]) == auc.accumulate()  # [1, B]


def test_auc_bins_as_paddles_kernel():
    auc = Auc(num_thresholds=10)
    auc.update(np.array([0.0, 0.05, 0.1, 0.55, 0.99, 1.0]), np.array([1, 1, 1, 0, 0, 0]))
    expect = (np.float32([0.0, 0.05, 0.1, 0.55, 0.99, 1.0]) * np.float32(10)).astype(np.int64)
    assert np.array_equal(np.flatnonzero(auc.stat_pos), np.unique(expect[:3]))
    assert auc.stat_neg[10] == 1 and auc.stat_neg[9] == 1 and auc.stat_neg[5] == 1


def test_auc_edge_cases():
    perfect, inverse, constant = Auc(), Auc(), Auc()
    y = np.array([0, 0, 1, 1])
    perfect.update(np.array([0.1, 0.2, 0.8, 0.9]), y)
    inverse.update(np.array([0.9, 0.8, 0.2, 0.1]), y)
    constant.update(np.full(4, 0.3), y)
    assert perfect.accumulate() == 1.0
    assert inverse.accumulate() == 0.0
    assert constant.accumulate() == 0.5
    # no data, or one class only: 0.5, as paddle.distributed.fleet.metrics.auc
    assert Auc().accumulate() == 0.5
    only_pos = Auc()
    only_pos.update(np.array([0.2, 0.7]), np.array([1, 1]))
    assert only_pos.accumulate() == 0.5
    empty = Auc()
    empty.update(np.zeros(0), np.zeros(0, np.int64))  # an empty batch counts nothing
    assert empty.stat_pos.sum() == 0 and empty.accumulate() == 0.5


def test_auc_input_shapes_and_kinds():
    p, y = data(1000, seed=3)
    ref = Auc()
    ref.update(p, y)
    two_col, col, tensor = Auc(), Auc(), Auc()
    two_col.update(np.stack([1 - p, p], axis=1), y[:, None])  # Paddle's [N, 2]: column 1
    col.update(p[:, None].astype(np.float32), y.astype(np.float32))
    tensor.update(shoal.Tensor(p.astype(np.float32)), shoal.Tensor(y.astype(np.float32)))
    for m in (two_col, col, tensor):
        assert np.array_equal(m.stat_pos, ref.stat_pos) and np.array_equal(m.stat_neg, ref.stat_neg)
    bools = Auc()
    bools.update(p, y.astype(bool))
    assert np.array_equal(bools.stat_pos, ref.stat_pos)


def test_auc_stats_are_read_only_and_reset_clears():
    auc = Auc(num_thresholds=8)
    auc.update(np.array([0.1, 0.9]), np.array([0, 1]))
    with pytest.raises(ValueError):
        auc.stat_pos[0] = 5
    auc.reset()
    assert auc.stat_pos.sum() == 0 and auc.stat_neg.sum() == 0


@pytest.mark.parametrize("preds, labels, words", [
    (np.array([0.1, 1.2]), np.array([0, 1]), ["[0, 1]", "preds[1] = 1.2", "sigmoid"]),
    (np.array([0.1, np.nan]), np.array([0, 1]), ["NaN", "preds[1]"]),
    (np.array([-0.1, 0.5]), np.array([0, 1]), ["preds[0]"]),
    (np.array([0.1, 0.5]), np.array([0, 2]), ["0 or 1", "labels[1] = 2"]),
    (np.array([0.1, 0.5]), np.array([0.0, 0.5]), ["labels[1] = 0.5"]),
    (np.array([0.1, 0.5]), np.array([-1, 1]), ["labels[0] = -1"]),
    (np.array([0.1, 0.5, 0.7]), np.array([0, 1]), ["2 labels for 3 predictions"]),
    (np.zeros((2, 3)), np.array([0, 1]), ["[2, 3]", "[N, 2]"]),
    (np.array([0.1, 0.5]), np.zeros((2, 2)), ["[2, 2]", "one-hot"]),
    (np.array(["a", "b"]), np.array([0, 1]), ["dtype"]),
])
def test_bad_input_raises_and_leaves_state_unchanged(preds, labels, words):
    auc = Auc()
    p, y = data(100)
    auc.update(p, y)
    before = auc.state()
    with pytest.raises(MetricError) as e:
        auc.update(preds, labels)
    assert isinstance(e.value, EngineError) and isinstance(e.value, ValueError)
    assert "Auc.update" in str(e.value)
    for w in words:
        assert w in str(e.value)
    after = auc.state()
    assert all(np.array_equal(before[k], after[k]) for k in before)


def test_bad_num_thresholds():
    for bad in (0, -3, 2.5, True, 2 ** 31):
        with pytest.raises(MetricError, match="num_thresholds"):
            Auc(num_thresholds=bad)


# -- states ------------------------------------------------------------------------
def test_merging_halves_equals_the_whole():
    p, y = data(4001, seed=4)
    whole, a, b = Auc(), Auc(), Auc()
    whole.update(p, y)
    a.update(p[:2000], y[:2000])
    b.update(p[2000:], y[2000:])
    a.merge(b.state())
    assert all(np.array_equal(a.state()[k], whole.state()[k]) for k in whole.state())
    assert a.accumulate() == whole.accumulate()
    for cls in (Accuracy, LogLoss):
        whole, a, b = cls(), cls(), cls()
        whole.update(p, y)
        a.update(p[:1500], y[:1500])
        b.update(p[1500:], y[1500:])
        a.merge(b.state())
        assert a.accumulate() == pytest.approx(whole.accumulate(), rel=1e-12)


def test_state_is_a_copy_and_load_state_round_trips():
    p, y = data(300, seed=5)
    auc = Auc()
    auc.update(p, y)
    s = auc.state()
    s["stat_pos"][:] = 0
    assert auc.stat_pos.sum() == y.sum()
    other = Auc()
    other.load_state(auc.state())
    assert other.accumulate() == auc.accumulate()
    # float arrays holding integral counts are accepted (they come back from a float64 reduce)
    other.load_state({k: v.astype(np.float64) for k, v in auc.state().items()})
    assert other.stat_pos.dtype == np.int64 and other.accumulate() == auc.accumulate()


@pytest.mark.parametrize("state, word", [
    ({"stat_pos": np.zeros(4096, np.int64)}, "entries"),
    ({"stat_pos": np.zeros(10, np.int64), "stat_neg": np.zeros(10, np.int64)}, "num_thresholds"),
    ({"stat_pos": np.full(4096, 0.5), "stat_neg": np.zeros(4096)}, "non-integer"),
    ({"stat_pos": np.full(4096, np.nan), "stat_neg": np.zeros(4096)}, "non-finite"),
])
def test_bad_state_is_refused_and_changes_nothing(state, word):
    auc = Auc()
    auc.update(*data(50))
    before = auc.state()
    for op in (auc.load_state, auc.merge):
        with pytest.raises(MetricError, match=word):
            op(state)
    assert all(np.array_equal(before[k], auc.state()[k]) for k in before)


# -- global aggregation --------------------------------------------------------------
def make_metrics():
    return {"auc": Auc(), "acc": Accuracy(), "logloss": LogLoss(), "loss": Mean()}


def feed(metrics, p, y):
    metrics["auc"].update(p, y)
    metrics["acc"].update(p, y)
    metrics["logloss"].update(p, y)
    metrics["loss"].update(p * 2, weights=np.ones_like(p))


def test_all_reduce_over_three_workers_equals_the_concatenated_data():
    p, y = data(9000, seed=6)
    shards = np.array_split(np.arange(9000), 3)
    workers = []
    for idx in shards:
        m = make_metrics()
        feed(m, p[idx], y[idx])
        workers.append(m)
    # a fake server-side reduce: each worker (a thread) deposits its array, all get the sum
    arrived, calls, results = {}, [], {}
    barrier = threading.Barrier(3, timeout=10)

    def reduce_for(rank):
        def reduce(name, packed):
            calls.append((rank, name, packed.dtype, packed.shape))
            arrived[rank] = packed.copy()
            barrier.wait()
            return sum(arrived.values())
        return reduce

    def run(rank):
        results[rank] = all_reduce_metrics(workers[rank], reduce=reduce_for(rank))

    threads = [threading.Thread(target=run, args=(r,)) for r in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    whole = make_metrics()
    feed(whole, p, y)
    expect = all_reduce_metrics(whole)
    assert sorted(results) == [0, 1, 2]
    for got in results.values():
        assert list(got) == list(expect)
        assert got["auc"] == expect["auc"]
        assert got["acc"] == expect["acc"]
        assert got["logloss"] == pytest.approx(expect["logloss"], rel=1e-12)
        assert got["loss"] == pytest.approx(expect["loss"], rel=1e-12)
    assert sorted(c[0] for c in calls) == [0, 1, 2]  # exactly one reduce per worker
    assert all(c[1] == "metrics" and c[2] == np.float64 for c in calls)
    assert len({c[3] for c in calls}) == 1
    # the local states were not replaced by the global ones
    assert workers[0]["acc"].state()["total"][0] == len(shards[0])


def test_all_reduce_local_and_layout_independent_of_dict_order():
    p, y = data(500, seed=7)
    m = make_metrics()
    feed(m, p, y)
    local = all_reduce_metrics(m)
    assert local == {k: v.accumulate() for k, v in m.items()}
    seen = []

    def identity(name, packed):
        seen.append(packed.copy())
        return packed

    reordered = dict(reversed(list(m.items())))
    assert all_reduce_metrics(m, identity, name="eval") == local
    assert all_reduce_metrics(reordered, identity) == {k: local[k] for k in reordered}
    assert np.array_equal(seen[0], seen[1])
    assert all_reduce_metrics({}, identity) == {} and len(seen) == 2


def test_all_reduce_refuses_a_wrong_reduce_result_and_non_metrics():
    m = make_metrics()
    feed(m, *data(100))
    with pytest.raises(MetricError, match="elementwise sum"):
        all_reduce_metrics(m, lambda name, packed: packed[:-1])
    with pytest.raises(MetricError, match="not a Metric"):
        all_reduce_metrics({"x": 0.5}, lambda name, packed: packed)


def test_global_state_of_one_metric():
    auc = Auc(num_thresholds=16)
    auc.update(*data(200))
    doubled = auc.global_state(lambda name, packed: packed * 2)
    assert np.array_equal(doubled["stat_pos"], auc.stat_pos * 2)
    assert doubled["stat_pos"].dtype == np.int64
    assert np.array_equal(auc.global_state(None)["stat_neg"], auc.stat_neg)


def test_counts_too_large_for_float64_are_refused():
    auc = Auc(num_thresholds=4)
    auc.load_state({"stat_pos": np.array([2 ** 53, 0, 0, 0, 0]), "stat_neg": np.ones(5, np.int64)})
    with pytest.raises(MetricError, match="2\\*\\*53"):
        all_reduce_metrics({"auc": auc}, lambda name, packed: packed)


# -- Accuracy, LogLoss, Mean ------------------------------------------------------------
def test_accuracy_against_numpy():
    rng = np.random.default_rng(8)
    logits = rng.normal(size=(1000, 2))
    y = rng.integers(0, 2, 1000)
    acc = Accuracy()
    acc.update(logits, y)
    assert acc.accumulate() == np.mean(np.argmax(logits, 1) == y)
    p = rng.random(1000)
    probs = Accuracy()
    probs.update(p[:, None], y[:, None])
    assert probs.accumulate() == np.mean((p > 0.5) == y)
    multi = Accuracy()
    scores = rng.normal(size=(500, 5))
    labels = rng.integers(0, 5, 500)
    multi.update(scores, labels)
    assert multi.accumulate() == np.mean(np.argmax(scores, 1) == labels)
    assert Accuracy().accumulate() == 0.0  # paddle.metric.Accuracy reports 0 before any data
    with pytest.raises(MetricError, match="integers in \\[0, 5\\)"):
        multi.update(scores[:2], np.array([0, 5]))
    with pytest.raises(MetricError, match="NaN"):
        acc.update(np.array([[0.0, np.nan]]), np.array([1]))
    with pytest.raises(MetricError, match="\\[0, 1\\]"):
        probs.update(np.array([2.0]), np.array([1]))  # logits passed as probabilities


def test_logloss_against_numpy():
    p, y = data(2000, seed=9)
    p[:3] = [0.0, 1.0, 1.0]
    y[:3] = [1, 0, 1]
    ll = LogLoss()
    ll.update(np.stack([1 - p, p], 1), y)
    q = np.clip(p, 1e-7, 1 - 1e-7)
    assert ll.accumulate() == pytest.approx(-np.mean(y * np.log(q) + (1 - y) * np.log(1 - q)), rel=1e-12)
    assert math.isfinite(ll.accumulate())
    assert math.isnan(LogLoss().accumulate())
    with pytest.raises(MetricError, match="eps"):
        LogLoss(eps=0.0)


def test_mean_weighted_and_validated():
    m = Mean()
    m.update(2.0, weights=10)
    m.update(np.array([1.0, 3.0]))
    m.update(shoal.Tensor(np.array([4.0], np.float32)), weights=np.array([2.0]))
    assert m.accumulate() == pytest.approx((20 + 4 + 8) / 14)
    assert math.isnan(Mean().accumulate())
    before = m.state()
    for values, weights in ((np.array([np.inf]), None), (np.array([1.0, 2.0]), np.array([1.0])),
                            (np.array([1.0]), np.array([-1.0]))):
        with pytest.raises(MetricError):
            m.update(values, weights=weights)
    assert all(np.array_equal(before[k], m.state()[k]) for k in before)

"""The dense table: rules, written-behind pushes that every read sees, validation."""
import threading

import numpy as np
import pytest

from shoal.ps.dense_table import DenseTable
from shoal.ps.errors import TableError
from shoal.ps.spec import DenseTableSpec


@pytest.mark.parametrize("rule", ["sgd", "adam", "sum"])
def test_every_acknowledged_push_is_visible_to_the_next_read(rule):
    spec = DenseTableSpec(name="d", size=1000, rule=rule, learning_rate=0.1)
    table = DenseTable(spec, 0, 1, max_pending=2)
    ref = np.linspace(-1, 1, 1000).astype(np.float32)
    table.init(ref.copy())
    m, v = np.zeros(1000), np.zeros(1000)
    ref = ref.astype(np.float64)
    rng = np.random.default_rng(0)
    for step in range(1, 21):  # more pushes than max_pending: the sender is held back, nothing lost
        g = rng.normal(size=1000).astype(np.float32)
        table.push(g)
        if rule == "sum":
            ref += g
        elif rule == "sgd":
            ref -= 0.1 * g
        else:
            m = 0.9 * m + 0.1 * g
            v = 0.999 * v + 0.001 * g.astype(np.float64) ** 2
            ref -= 0.1 * (m / (1 - 0.9 ** step)) / (np.sqrt(v / (1 - 0.999 ** step)) + 1e-8)
    np.testing.assert_allclose(table.pull(), ref, rtol=1e-4, atol=1e-4)
    assert table.export()["step"][0] == (20 if rule == "adam" else 0)
    table.close()


def test_concurrent_pushes_are_all_applied():
    table = DenseTable(DenseTableSpec(name="d", size=64, rule="sum"), 0, 1)
    table.init(np.zeros(64, np.float32))
    threads = [threading.Thread(target=lambda: [table.push(np.ones(64, np.float32))
                                                for _ in range(50)]) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    np.testing.assert_array_equal(table.pull(), np.full(64, 200.0))
    table.close()


@pytest.mark.parametrize("bad,match", [
    (np.ones(10, np.float64), "expected float32"),
    (np.ones(9, np.float32), r"shape \(10,\)"),
    (np.array([np.nan] + [0.0] * 9, np.float32), "NaN or inf"),
])
def test_bad_pushes_are_refused_before_queueing(bad, match):
    table = DenseTable(DenseTableSpec(name="d", size=10, rule="adam"), 0, 1)
    table.init(np.arange(10, dtype=np.float32))
    with pytest.raises(TableError, match=match):
        table.push(bad)
    np.testing.assert_array_equal(table.pull(), np.arange(10, dtype=np.float32))
    assert table.export()["step"][0] == 0
    table.close()


def test_slices_split_the_vector_evenly():
    spec = DenseTableSpec(name="d", size=10)
    bounds = [spec.bounds(i, 3) for i in range(3)]
    assert bounds == [(0, 4), (4, 7), (7, 10)]


def test_close_applies_what_is_queued_and_refuses_more():
    table = DenseTable(DenseTableSpec(name="d", size=8, rule="sum"), 0, 1)
    for _ in range(3):
        table.push(np.ones(8, np.float32))
    table.close()
    np.testing.assert_array_equal(table.values, np.full(8, 3.0))
    with pytest.raises(Exception, match="closed"):
        table.push(np.ones(8, np.float32))

"""Sparse layers (SparseEmbedding, EmbeddingBag) over an in-test dict backend.

The backend is the reference model of a parameter-server table: a dict of rows
keyed by int key, rows made deterministically from the key on a training pull,
read-only pulls returning zeros, and a log of every pull and push. Forward
values, pushed gradients, shows and clicks are checked against numpy reference
loops written here (and the gradients once more by finite differences on the
dict's rows).
"""
from __future__ import annotations

import copy
import math
from collections import defaultdict

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import shoal
from shoal import nn
from shoal.worker.errors import DTypeError, ShapeError
from shoal.worker.nn.sparse import (EmbeddingBag, NoSparseBackendError, SparseBackend,
                                    SparseEmbedding, bind_sparse_backend, sparse_layers)

DIM = 4
POOLINGS = ("sum", "mean", "sqrtn")
# small ids and ids past int64 (the layer must keep them uint64 end to end)
KEY_SPACE = (0, 1, 2, 7, 2**40 + 3, 2**63 + 5, 2**64 - 1)


def initial_row(key: int, dim: int) -> np.ndarray:
    """The row a training pull creates for `key`: fixed by the key alone, float64."""
    return np.random.default_rng(int(key) % 2**63 + 17).uniform(-1.0, 1.0, dim)


class DictBackend:
    """A SparseBackend over one dict of float64 rows per table; records every call."""

    def __init__(self, dim: int = DIM):
        self.dim = dim
        self.tables: dict[str, dict[int, np.ndarray]] = defaultdict(dict)
        self.pulls: list[tuple[str, np.ndarray, bool]] = []
        self.pushes: list[dict] = []

    def pull(self, table, keys, *, training):
        keys = np.asarray(keys)
        self.pulls.append((table, keys.copy(), training))
        rows = self.tables[table]
        out = np.zeros((len(keys), self.dim), np.float32)
        for i, k in enumerate(keys.tolist()):
            if k not in rows and training:
                rows[k] = initial_row(k, self.dim)
            if k in rows:
                out[i] = rows[k]
        return out

    def push(self, table, keys, grads, *, shows, clicks):
        self.pushes.append(dict(table=table, keys=np.array(keys), grads=np.array(grads),
                                shows=np.array(shows), clicks=np.array(clicks)))


class RaggedObj:
    """A Ragged-like slot: an object with .values and .offsets."""

    def __init__(self, values, offsets):
        self.values, self.offsets = values, offsets


def rag(bags) -> tuple[np.ndarray, np.ndarray]:
    """(values uint64, offsets int64) of a list of bags (lists of int keys)."""
    values = np.array([k for b in bags for k in b], dtype=np.uint64)
    offsets = np.concatenate([[0], np.cumsum([len(b) for b in bags])]).astype(np.int64)
    return values, offsets


def bound(layer, backend=None):
    backend = backend if backend is not None else DictBackend(layer.dim)
    bind_sparse_backend(layer, backend)
    return layer, backend


def pool_factor(pooling: str, n: int) -> float:
    return {"sum": 1.0, "mean": 1.0 / n, "sqrtn": 1.0 / math.sqrt(n)}[pooling]


def ref_bags(row_of, slots_bags, pooling, dim=DIM) -> np.ndarray:
    """[B, S, dim]: the pooled reference rows; `row_of(key)` gives a key's row."""
    b, s = len(slots_bags[0]), len(slots_bags)
    out = np.zeros((b, s, dim))
    for j, bags in enumerate(slots_bags):
        for i, ids in enumerate(bags):
            for k in ids:
                out[i, j] += pool_factor(pooling, len(ids)) * row_of(k)
    return out


def ref_push(slots_bags, w, pooling, labels, dim=DIM):
    """(keys, grads, shows, clicks) of loss = sum(out * w), w [B, S, dim]."""
    grads = defaultdict(lambda: np.zeros(dim))
    shows, clicks = defaultdict(float), defaultdict(float)
    for j, bags in enumerate(slots_bags):
        for i, ids in enumerate(bags):
            for k in ids:
                grads[k] += pool_factor(pooling, len(ids)) * w[i, j]
                shows[k] += 1.0
                clicks[k] += 0.0 if labels is None else float(labels[i])
    keys = sorted(grads)
    return (np.array(keys, np.uint64), np.array([grads[k] for k in keys]).reshape(-1, dim),
            np.array([shows[k] for k in keys]), np.array([clicks[k] for k in keys]))


def backward_with(out, w):
    """loss = sum(out * w) with a constant float32 w; backward; returns the loss value."""
    loss = (out * shoal.Tensor(np.asarray(w, np.float32))).sum()
    loss.backward()
    return float(loss.numpy())


def sorted_push(push) -> dict:
    """The push with its rows ordered by key (the layer's key order is the dedup's, not sorted)."""
    order = np.argsort(push["keys"], kind="stable")
    return {k: (v if k == "table" else v[order]) for k, v in push.items()}


def assert_unique(keys):
    assert keys.dtype == np.uint64 and keys.ndim == 1
    assert len(np.unique(keys)) == len(keys), f"keys {keys} are not unique"


def assert_push(push, table, keys, grads, shows, clicks, atol=1e-5):
    """`push` against reference data ordered by key."""
    assert push["table"] == table
    assert_unique(push["keys"])
    assert push["grads"].shape == (len(keys), DIM)
    assert push["shows"].dtype == np.float32 and push["clicks"].dtype == np.float32
    assert push["shows"].shape == push["clicks"].shape == (len(keys),)
    push = sorted_push(push)
    np.testing.assert_array_equal(push["keys"], np.asarray(keys, np.uint64))
    np.testing.assert_allclose(push["grads"], grads, rtol=1e-5, atol=atol)
    np.testing.assert_array_equal(push["shows"], shows)
    np.testing.assert_allclose(push["clicks"], clicks, rtol=1e-6)


def grad_of(push, key) -> np.ndarray:
    (i,) = np.flatnonzero(push["keys"] == np.uint64(key))
    return push["grads"][i]


def rng_w(shape, seed=0):
    return np.random.default_rng(seed).uniform(-1.0, 1.0, shape)


# -- the backend itself ---------------------------------------------------------------------------
def test_dict_backend_satisfies_the_protocol_and_reads_without_creating():
    be = DictBackend()
    assert isinstance(be, SparseBackend)
    np.testing.assert_array_equal(be.pull("t", np.array([3], np.uint64), training=False), 0)
    assert be.tables["t"] == {}
    row = be.pull("t", np.array([3], np.uint64), training=True)
    np.testing.assert_allclose(row[0], initial_row(3, DIM), rtol=1e-6)
    assert not np.allclose(initial_row(3, DIM), initial_row(4, DIM))


# -- SparseEmbedding forward ----------------------------------------------------------------------
@pytest.mark.parametrize("shape", [(), (5,), (3, 4), (2, 2, 3)])
def test_sparse_embedding_gathers_the_dict_rows(shape):
    layer, be = bound(SparseEmbedding("emb", DIM))
    rng = np.random.default_rng(1)
    ids = rng.choice(np.array(KEY_SPACE, np.uint64), size=shape)
    out = layer(ids)
    assert out.shape == shape + (DIM,)
    assert out.dtype == np.float32
    expect = np.array([initial_row(k, DIM) for k in ids.reshape(-1).tolist()])
    expect = expect.reshape(shape + (DIM,))
    np.testing.assert_allclose(out.numpy(), expect, rtol=1e-6, atol=1e-7)
    # one training pull of the unique keys on the layer's table
    assert len(be.pulls) == 1
    table, keys, training = be.pulls[0]
    assert table == "emb" and training is True
    assert_unique(keys)
    np.testing.assert_array_equal(np.sort(keys), np.unique(ids))
    assert set(be.tables["emb"]) == set(ids.reshape(-1).tolist())


# -- SparseEmbedding backward ---------------------------------------------------------------------
def test_sparse_embedding_push_grads_shows_clicks_with_repeats():
    layer, be = bound(SparseEmbedding("emb", DIM))
    ids = np.array([[1, 7, 1], [7, 7, 2], [0, 1, 2**64 - 1]], np.uint64)
    labels = np.array([1.0, 0.0, 1.0])
    w = rng_w((3, 3, DIM), seed=2)
    out = layer(ids, labels=labels)
    assert be.pushes == []  # nothing before backward
    backward_with(out, w)
    assert len(be.pushes) == 1
    keys = np.unique(ids)
    grads = np.array([w[ids == k].sum(axis=0) for k in keys])
    shows = np.array([(ids == k).sum() for k in keys])
    # one click per occurrence in a positive sample
    clicks = np.array([((ids == k) * labels[:, None]).sum() for k in keys])
    np.testing.assert_array_equal(shows, [1, 3, 1, 3, 1])
    np.testing.assert_array_equal(clicks, [1, 3, 0, 1, 1])
    assert_push(be.pushes[0], "emb", keys, grads, shows, clicks)


@pytest.mark.parametrize("shape", [(5,), (3, 2), (2, 2, 3)])
def test_sparse_embedding_labels_follow_the_first_axis(shape):
    layer, be = bound(SparseEmbedding("emb", DIM))
    rng = np.random.default_rng(10)
    ids = rng.choice(np.array(KEY_SPACE[:4], np.uint64), size=shape)
    labels = rng.integers(0, 2, shape[0]).astype(np.float64)
    labels[0] = 1.0
    w = rng_w(shape + (DIM,), seed=11)
    backward_with(layer(ids, labels=labels), w)
    keys = np.unique(ids)
    per_sample = ids.reshape(shape[0], -1)
    clicks = [float(((per_sample == k) * labels[:, None]).sum()) for k in keys]
    grads = [w[ids == k].sum(axis=0) for k in keys]
    assert_push(be.pushes[0], "emb", keys, grads, [(ids == k).sum() for k in keys], clicks)


def test_sparse_embedding_clicks_are_zero_without_labels_and_labels_may_be_a_tensor():
    layer, be = bound(SparseEmbedding("emb", DIM))
    ids = np.array([3, 3, 5], np.uint64)
    backward_with(layer(ids), np.ones((3, DIM)))
    np.testing.assert_array_equal(be.pushes[0]["clicks"], [0, 0])
    np.testing.assert_array_equal(be.pushes[0]["shows"], [2, 1])
    backward_with(layer(ids, labels=shoal.to_tensor(np.array([0.0, 1.0, 1.0], np.float32))),
                  np.ones((3, DIM)))
    np.testing.assert_array_equal(be.pushes[1]["clicks"], [1, 1])


def test_sparse_embedding_grads_match_finite_differences_on_the_dict_rows():
    layer, be = bound(SparseEmbedding("emb", DIM))
    ids = np.array([[4, 9], [9, 9], [2**63 + 5, 4]], np.uint64)
    w = rng_w((3, 2, DIM), seed=3)
    backward_with(layer(ids), w)
    push = be.pushes[0]
    rows = be.tables["emb"]

    def loss():
        with shoal.no_grad():
            return float(np.sum(layer(ids).numpy().astype(np.float64) * w))

    eps = 0.05  # the loss is linear in the rows: a wide step only shrinks the float32 noise
    numeric = np.zeros((len(push["keys"]), DIM))
    for i, k in enumerate(push["keys"].tolist()):
        for d in range(DIM):
            rows[k][d] += eps
            plus = loss()
            rows[k][d] -= 2 * eps
            minus = loss()
            rows[k][d] += eps
            numeric[i, d] = (plus - minus) / (2 * eps)
    np.testing.assert_allclose(push["grads"], numeric, atol=1e-4)
    assert len(be.pushes) == 1  # the no_grad forwards pushed nothing


def test_one_push_per_forward_even_when_the_output_is_used_twice():
    layer, be = bound(SparseEmbedding("emb", DIM))
    ids = np.array([1, 2, 1], np.uint64)
    out = layer(ids)
    w = rng_w((3, DIM), seed=4)
    loss = (out * shoal.Tensor(w.astype(np.float32))).sum() + out.sum()
    loss.backward()
    assert len(be.pushes) == 1
    grads = np.array([w[[0, 2]].sum(0) + 2.0, w[1] + 1.0])
    assert_push(be.pushes[0], "emb", np.array([1, 2], np.uint64), grads, [2, 1], [0, 0])
    # two forwards into one loss: two pulls and two pushes
    a, b = layer(ids), layer(np.array([5], np.uint64))
    (a.sum() + b.sum()).backward()
    assert len(be.pulls) == 3 and len(be.pushes) == 3
    assert sorted(sorted(p["keys"].tolist()) for p in be.pushes[1:]) == [[1, 2], [5]]


# -- EmbeddingBag forward -------------------------------------------------------------------------
@pytest.mark.parametrize("pooling", POOLINGS)
@pytest.mark.parametrize("form", ["tuple", "object"])
def test_embedding_bag_one_slot_pools_like_the_reference(pooling, form):
    layer, be = bound(EmbeddingBag("bag", DIM, pooling=pooling))
    bags = [[1, 2, 7], [], [7], [2**64 - 1, 1], [], [0, 0, 0, 1]]
    values, offsets = rag(bags)
    slot = (values, offsets) if form == "tuple" else RaggedObj(values, offsets)
    out = layer(slot)
    assert out.shape == (len(bags), DIM) and out.dtype == np.float32
    expect = ref_bags(lambda k: initial_row(k, DIM), [bags], pooling)[:, 0]
    np.testing.assert_allclose(out.numpy(), expect, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(out.numpy()[[1, 4]], 0.0)  # empty bags
    assert len(be.pulls) == 1
    assert_unique(be.pulls[0][1])
    np.testing.assert_array_equal(np.sort(be.pulls[0][1]), np.unique(values))


@pytest.mark.parametrize("container", [list, tuple])
def test_embedding_bag_list_of_slots_gives_batch_slot_dim(container):
    layer, be = bound(EmbeddingBag("bag", DIM, pooling="mean"))
    slots_bags = [[[1], [2, 3], []], [[3, 3], [], [9]], [[], [1, 9], [2]]]
    slots = container(RaggedObj(*rag(b)) if i == 1 else rag(b) for i, b in enumerate(slots_bags))
    out = layer(slots)
    assert out.shape == (3, 3, DIM)
    expect = ref_bags(lambda k: initial_row(k, DIM), slots_bags, "mean")
    np.testing.assert_allclose(out.numpy(), expect, rtol=1e-5, atol=1e-6)
    assert len(be.pulls) == 1  # all slots in one request


@pytest.mark.parametrize("pooling", POOLINGS)
def test_all_single_id_fast_path_equals_the_general_path(pooling):
    """Bags of exactly one id take a gather-only path; one 2-id bag forces the general one."""
    slots_single = [[[5], [1], [7], [1]], [[2], [5], [5], [2**63 + 5]]]
    labels = np.array([1.0, 0.0, 1.0, 1.0])
    w = rng_w((4, 2, DIM), seed=5)
    fast, be_fast = bound(EmbeddingBag("bag", DIM, pooling=pooling))
    out_fast = fast([rag(b) for b in slots_single], labels=labels)
    backward_with(out_fast, w)

    # the same batch plus a fifth sample with a 2-id bag: the first four rows must not change
    slots_general = [b + [extra] for b, extra in zip(slots_single, [[1, 2], [7]])]
    general, be_general = bound(EmbeddingBag("bag", DIM, pooling=pooling))
    out_general = general([rag(b) for b in slots_general], labels=np.r_[labels, 0.0])
    w_general = np.concatenate([w, np.zeros((1, 2, DIM))])
    backward_with(out_general, w_general)

    np.testing.assert_allclose(out_fast.numpy(), out_general.numpy()[:4], rtol=1e-6)
    expect = ref_bags(lambda k: initial_row(k, DIM), slots_single, pooling)
    np.testing.assert_allclose(out_fast.numpy(), expect, rtol=1e-5, atol=1e-6)
    # fast path: shows/clicks follow each id's own sample although slots are interleaved
    keys, grads, shows, clicks = ref_push(slots_single, w, pooling, labels)
    assert_push(be_fast.pushes[0], "bag", keys, grads, shows, clicks)
    keys, grads, shows, clicks = ref_push(slots_general, w_general, pooling, np.r_[labels, 0.0])
    assert_push(be_general.pushes[0], "bag", keys, grads, shows, clicks)


# -- EmbeddingBag backward ------------------------------------------------------------------------
@pytest.mark.parametrize("pooling", POOLINGS)
def test_embedding_bag_push_matches_the_reference(pooling):
    layer, be = bound(EmbeddingBag("bag", DIM, pooling=pooling))
    bags = [[1, 2, 7], [], [7], [2**64 - 1, 1], [0, 0, 0, 1]]
    labels = np.array([1.0, 1.0, 0.0, 1.0, 0.0])
    w = rng_w((5, DIM), seed=6)
    backward_with(layer(rag(bags), labels=labels), w)
    assert len(be.pushes) == 1
    keys, grads, shows, clicks = ref_push([bags], w[:, None], pooling, labels)
    np.testing.assert_array_equal(shows, [3, 3, 1, 2, 1])  # keys 0, 1, 2, 7, 2**64-1
    assert_push(be.pushes[0], "bag", keys, grads, shows, clicks)
    if pooling != "sum":  # the scale reaches the gradient: key 0 sits only in a 4-id bag
        np.testing.assert_allclose(grad_of(be.pushes[0], 0), 3 * pool_factor(pooling, 4) * w[4],
                                   rtol=1e-5)


def test_embedding_bag_grads_match_finite_differences_on_the_dict_rows():
    layer, be = bound(EmbeddingBag("bag", DIM, pooling="sqrtn"))
    slots_bags = [[[3, 8], [8], []], [[3], [3, 3, 11], [8, 11]]]
    slots = [rag(b) for b in slots_bags]
    w = rng_w((3, 2, DIM), seed=7)
    backward_with(layer(slots), w)
    push, rows = be.pushes[0], be.tables["bag"]

    def loss():
        with shoal.no_grad():
            return float(np.sum(layer(slots).numpy().astype(np.float64) * w))

    eps = 0.05
    numeric = np.zeros((len(push["keys"]), DIM))
    for i, k in enumerate(push["keys"].tolist()):
        for d in range(DIM):
            rows[k][d] += eps
            plus = loss()
            rows[k][d] -= 2 * eps
            minus = loss()
            rows[k][d] += eps
            numeric[i, d] = (plus - minus) / (2 * eps)
    np.testing.assert_allclose(push["grads"], numeric, atol=1e-4)


def test_slots_sharing_a_table_pull_a_shared_key_once_and_merge_its_gradient():
    layer, be = bound(EmbeddingBag("shared", DIM))
    slot_a, slot_b = [[42], [1, 42]], [[42, 5], []]
    labels = np.array([1.0, 0.0])
    w = rng_w((2, 2, DIM), seed=8)
    backward_with(layer([rag(slot_a), rag(slot_b)], labels=labels), w)
    assert len(be.pulls) == 1
    keys = be.pulls[0][1]
    assert_unique(keys)
    np.testing.assert_array_equal(np.sort(keys), [1, 5, 42])
    assert len(be.pushes) == 1
    # key 42: slot a sample 0, slot a sample 1, slot b sample 0 -> one merged row
    np.testing.assert_allclose(grad_of(be.pushes[0], 42), w[0, 0] + w[1, 0] + w[0, 1], rtol=1e-5)
    assert_push(be.pushes[0], "shared", [1, 5, 42],
                np.array([w[1, 0], w[0, 1], w[0, 0] + w[1, 0] + w[0, 1]]),
                shows=[1, 1, 3], clicks=[0, 1, 2])


def test_layers_on_different_tables_push_to_their_own_table():
    be = DictBackend()
    user, _ = bound(EmbeddingBag("user", DIM), be)
    item, _ = bound(SparseEmbedding("item", DIM), be)
    out = user(rag([[1], [2, 3]])) + item(np.array([1, 1], np.uint64))
    out.sum().backward()
    assert sorted(p["table"] for p in be.pushes) == ["item", "user"]
    assert set(be.tables) == {"user", "item"}
    assert set(be.tables["user"]) == {1, 2, 3} and set(be.tables["item"]) == {1}


# -- random ragged batches ------------------------------------------------------------------------
@st.composite
def ragged_batches(draw):
    b = draw(st.integers(1, 4))
    s = draw(st.integers(1, 3))
    # all-single-id batches take the layer's gather-only path: draw them often
    size = (1, 1) if draw(st.booleans()) else (0, 3)
    bag = st.lists(st.sampled_from(KEY_SPACE), min_size=size[0], max_size=size[1])
    slots_bags = [[draw(bag) for _ in range(b)] for _ in range(s)]
    labels = draw(st.none() | st.lists(st.sampled_from([0.0, 1.0]), min_size=b, max_size=b))
    pooling = draw(st.sampled_from(POOLINGS))
    form = draw(st.sampled_from(["tuple", "object"]))
    single = s == 1 and draw(st.booleans())
    return slots_bags, labels, pooling, form, single


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ragged_batches(), st.integers(0, 2**32 - 1))
def test_random_ragged_batches_forward_and_push_match_the_reference(batch, seed):
    slots_bags, labels, pooling, form, single = batch
    layer, be = bound(EmbeddingBag("bag", DIM, pooling=pooling))
    make = rag if form == "tuple" else (lambda bags: RaggedObj(*rag(bags)))
    slots = make(slots_bags[0]) if single else [make(b) for b in slots_bags]
    b, s = len(slots_bags[0]), len(slots_bags)
    out = layer(slots, labels=labels)
    assert out.shape == ((b, DIM) if single else (b, s, DIM))
    expect = ref_bags(lambda k: initial_row(k, DIM), slots_bags, pooling)
    np.testing.assert_allclose(out.numpy().reshape(b, s, DIM), expect, rtol=1e-5, atol=1e-6)

    all_keys = np.unique(np.array([k for bags in slots_bags for ids in bags for k in ids],
                                  np.uint64))
    assert len(be.pulls) == 1
    assert_unique(be.pulls[0][1])
    np.testing.assert_array_equal(np.sort(be.pulls[0][1]), all_keys)
    np.testing.assert_array_equal(layer.unique_keys(slots), be.pulls[0][1])

    w = rng_w((b, s, DIM), seed=seed)
    backward_with(out, w.reshape(b, DIM) if single else w)
    assert len(be.pushes) == 1
    assert_push(be.pushes[0], "bag", *ref_push(slots_bags, w, pooling, labels))


# -- eval mode and no_grad ------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["embedding", "bag"])
@pytest.mark.parametrize("how", ["eval", "no_grad"])
def test_read_only_pulls_push_nothing_and_create_no_row(kind, how):
    layer, be = bound(SparseEmbedding("t", DIM) if kind == "embedding" else EmbeddingBag("t", DIM))
    seen = np.array([1, 2], np.uint64)
    inputs = (lambda ids: ids) if kind == "embedding" else (lambda ids: rag([[k] for k in ids]))
    backward_with(layer(inputs(seen)), np.ones((2, DIM)))  # train once: rows 1 and 2 exist
    assert len(be.pushes) == 1
    before = {k: v.copy() for k, v in be.tables["t"].items()}

    ids = np.array([1, 99, 2], np.uint64)  # 99 was never seen
    w_param = shoal.Tensor(np.ones((3, DIM), np.float32), requires_grad=True)
    if how == "eval":
        layer.eval()
        out = layer(inputs(ids), labels=np.ones(3))
        assert out.requires_grad is False
        (out * w_param).sum().backward()  # a dense parameter still trains; the table does not
        np.testing.assert_allclose(w_param.grad.numpy(), out.numpy())
    else:
        with shoal.no_grad():
            out = layer(inputs(ids), labels=np.ones(3))
        assert out.requires_grad is False
    table, keys, training = be.pulls[-1]
    assert training is False
    assert_unique(keys)
    np.testing.assert_array_equal(np.sort(keys), [1, 2, 99])
    np.testing.assert_allclose(out.numpy()[[0, 2]], np.array([before[1], before[2]]), rtol=1e-6)
    np.testing.assert_array_equal(out.numpy()[1], 0.0)
    assert len(be.pushes) == 1
    assert set(be.tables["t"]) == {1, 2}
    for k in before:
        np.testing.assert_array_equal(be.tables["t"][k], before[k])
    if how == "eval":  # back to training: pulls create and backward pushes again
        layer.train()
        backward_with(layer(inputs(ids)), np.ones((3, DIM)))
        assert be.pulls[-1][2] is True and len(be.pushes) == 2 and 99 in be.tables["t"]


# -- errors ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("layer,arg", [(SparseEmbedding("t", DIM), np.array([1], np.uint64)),
                                       (EmbeddingBag("t", DIM), rag([[1]]))])
def test_no_backend_names_fleet_init_worker(layer, arg):
    with pytest.raises(NoSparseBackendError, match=r"fleet\.init_worker"):
        layer(arg)


@pytest.mark.parametrize("ids", [np.array([1.0, 2.0]), np.array([1, 2], np.int64),
                                 np.array([[1.5]], np.float32)])
def test_sparse_embedding_rejects_non_uint64_ids(ids):
    layer, be = bound(SparseEmbedding("t", DIM))
    with pytest.raises(DTypeError, match="uint64"):
        layer(ids)
    assert be.pulls == []


@pytest.mark.parametrize("values", [np.array([1.0, 2.0]), np.array([1, 2], np.int64),
                                    np.array([[1, 2]], np.uint64)])
def test_embedding_bag_rejects_non_uint64_or_2d_values(values):
    layer, be = bound(EmbeddingBag("t", DIM))
    with pytest.raises(DTypeError, match="uint64"):
        layer((values, np.array([0, 2], np.int64)))
    assert be.pulls == []


@pytest.mark.parametrize("offsets", [[1, 2, 3], [0, 2, 1, 3], [0, 1, 2], [0, 1, 4], [],
                                     [[0, 3]], [0.0, 3.0]],
                         ids=["not-from-0", "decreasing", "short-of-len", "past-len", "empty",
                              "2d", "float"])
def test_embedding_bag_rejects_bad_offsets(offsets):
    layer, be = bound(EmbeddingBag("t", DIM))
    values = np.array([1, 2, 3], np.uint64)
    with pytest.raises(ShapeError, match="offsets"):
        layer((values, np.array(offsets)))
    with pytest.raises(ShapeError, match="offsets"):
        layer([rag([[1]]), RaggedObj(values, np.array(offsets))])
    assert be.pulls == []


def test_embedding_bag_rejects_what_is_not_a_slot():
    layer, _ = bound(EmbeddingBag("t", DIM))
    with pytest.raises(DTypeError, match="Ragged"):
        layer([np.array([1, 2], np.uint64)])
    with pytest.raises(ShapeError, match="empty list"):
        layer([])


def test_slots_of_different_batch_sizes():
    layer, be = bound(EmbeddingBag("t", DIM))
    with pytest.raises(ShapeError, match=r"different batch sizes \[2, 3\]"):
        layer([rag([[1], [2]]), rag([[1], [2], [3]])])
    assert be.pulls == []


@pytest.mark.parametrize("labels", [np.ones(2), np.ones(4), np.ones((3, 2))])
def test_labels_of_the_wrong_length(labels):
    emb, be = bound(SparseEmbedding("t", DIM))
    with pytest.raises(ShapeError, match="labels"):
        emb(np.array([[1, 2], [3, 4], [5, 6]], np.uint64), labels=labels)
    bag, _ = bound(EmbeddingBag("t", DIM), be)
    with pytest.raises(ShapeError, match="labels"):
        bag(rag([[1], [2, 3], []]), labels=labels)
    assert be.pulls == [] and be.pushes == []


@pytest.mark.parametrize("make", [
    lambda: EmbeddingBag("t", DIM, pooling="max"),
    lambda: EmbeddingBag("t", DIM, pooling="SUM"),
    lambda: SparseEmbedding("", DIM),
    lambda: SparseEmbedding("a/b", DIM),
    lambda: EmbeddingBag(3, DIM),
    lambda: SparseEmbedding("t", 0),
    lambda: SparseEmbedding("t", -2),
    lambda: EmbeddingBag("t", 4.0),
    lambda: SparseEmbedding("t", True),
])
def test_bad_constructor_arguments(make):
    with pytest.raises(ValueError):
        make()


def test_bad_pooling_lists_the_choices():
    with pytest.raises(ValueError, match=r"'max'.*\['sum', 'mean', 'sqrtn'\]"):
        EmbeddingBag("t", DIM, pooling="max")


class WrongShapeBackend(DictBackend):
    def __init__(self, extra_rows=0, extra_cols=0):
        super().__init__()
        self.extra_rows, self.extra_cols = extra_rows, extra_cols

    def pull(self, table, keys, *, training):
        self.pulls.append((table, np.asarray(keys).copy(), training))
        return np.zeros((len(keys) + self.extra_rows, self.dim + self.extra_cols), np.float32)


@pytest.mark.parametrize("extra_rows,extra_cols", [(1, 0), (-1, 0), (0, 1), (0, -1)])
def test_backend_returning_the_wrong_row_shape(extra_rows, extra_cols):
    be = WrongShapeBackend(extra_rows, extra_cols)
    emb, _ = bound(SparseEmbedding("t", DIM), be)
    with pytest.raises(ShapeError, match="backend returned rows"):
        emb(np.array([1, 2], np.uint64))
    bag, _ = bound(EmbeddingBag("t", DIM), be)
    with pytest.raises(ShapeError, match="backend returned rows"):
        bag(rag([[1, 2], [3]]))


# -- binding --------------------------------------------------------------------------------------
class Tower(nn.Layer):
    def __init__(self):
        super().__init__()
        self.user = EmbeddingBag("user", DIM, pooling="mean")
        self.fc = nn.Linear(DIM, 2)
        self.item = SparseEmbedding("item", DIM)

    def forward(self, user_slot, item_ids):
        return self.fc(self.user(user_slot) + self.item(item_ids))


def test_bind_reaches_every_sparse_layer_of_a_nested_model_and_none_unbinds():
    tower = Tower()
    tail = EmbeddingBag("tail", DIM)
    model = nn.Sequential(tower, nn.ReLU(), tail)
    be = DictBackend()
    layers = bind_sparse_backend(model, be)
    assert [id(x) for x in layers] == [id(tower.user), id(tower.item), id(tail)]
    assert [id(x) for x in sparse_layers(model)] == [id(x) for x in layers]
    assert all(x.sparse_backend is be for x in layers)
    out = tower(rag([[1, 2], [3]]), np.array([4, 5], np.uint64))
    out.sum().backward()
    assert {p["table"] for p in be.pushes} == {"user", "item"}
    assert tower.fc.weight.grad is not None

    assert [id(x) for x in bind_sparse_backend(model, None)] == [id(x) for x in layers]
    assert all(x.sparse_backend is None for x in layers)
    with pytest.raises(NoSparseBackendError):
        tower(rag([[1]]), np.array([4], np.uint64))


def test_bind_on_a_sparse_layer_itself_and_on_a_model_without_one():
    layer = SparseEmbedding("t", DIM)
    be = DictBackend()
    assert bind_sparse_backend(layer, be) == [layer]
    assert layer.sparse_backend is be
    assert bind_sparse_backend(nn.Sequential(nn.Linear(2, 2)), be) == []


def test_a_shared_sparse_layer_is_bound_and_listed_once():
    shared = EmbeddingBag("t", DIM)
    model = nn.Sequential(shared, nn.Sequential(shared))
    assert len(bind_sparse_backend(model, DictBackend())) == 1


def test_bind_rejects_an_object_without_pull_and_push():
    layer = SparseEmbedding("t", DIM)
    with pytest.raises(TypeError, match="pull/push"):
        bind_sparse_backend(layer, object())
    assert layer.sparse_backend is None


def test_deepcopy_shares_the_backend_and_copies_the_rest():
    be = DictBackend()
    model = nn.Sequential(Tower(), EmbeddingBag("tail", DIM))
    bind_sparse_backend(model, be)
    clone = copy.deepcopy(model)
    clone_layers, orig_layers = sparse_layers(clone), sparse_layers(model)
    assert len(clone_layers) == 3
    for c, o in zip(clone_layers, orig_layers):
        assert c is not o
        assert c.sparse_backend is be
        assert (c.table, c.dim) == (o.table, o.dim)
    assert clone[0].fc.weight is not model[0].fc.weight
    np.testing.assert_array_equal(clone[0].fc.weight.numpy(), model[0].fc.weight.numpy())
    single = copy.deepcopy(orig_layers[2])
    assert single.sparse_backend is be and single is not orig_layers[2]
    backward_with(clone_layers[2](rag([[1]])), np.ones((1, DIM)))
    assert be.pushes[-1]["table"] == "tail"
    unbound = copy.deepcopy(SparseEmbedding("t", DIM))
    assert unbound.sparse_backend is None


# -- unique_keys ----------------------------------------------------------------------------------
def test_unique_keys_equals_the_pulled_keys():
    layer, be = bound(EmbeddingBag("t", DIM))
    one = rag([[9, 3], [], [3, 2**64 - 1]])
    many = [one, RaggedObj(*rag([[0], [9], [9, 5]]))]
    for slots in (one, RaggedObj(*one), many):
        keys = layer.unique_keys(slots)
        layer(slots)
        assert keys.dtype == np.uint64
        np.testing.assert_array_equal(keys, be.pulls[-1][1])
    np.testing.assert_array_equal(np.sort(layer.unique_keys(many)), [0, 3, 5, 9, 2**64 - 1])


# -- empty lookups ---------------------------------------------------------------------------------
@pytest.mark.parametrize("multi", [False, True])
def test_a_batch_of_only_empty_bags_gives_zeros_and_pushes_nothing_useful(multi):
    layer, be = bound(EmbeddingBag("t", DIM, pooling="mean"))
    empty = rag([[], [], []])
    out = layer([empty, empty] if multi else empty, labels=np.ones(3))
    assert out.shape == ((3, 2, DIM) if multi else (3, DIM))
    np.testing.assert_array_equal(out.numpy(), 0.0)
    out.sum().backward()
    # nothing to push, or one push of nothing
    assert len(be.pushes) <= 1
    assert all(len(p["keys"]) == 0 and p["grads"].shape == (0, DIM) for p in be.pushes)
    assert be.tables["t"] == {}


@pytest.mark.parametrize("kind", ["embedding", "bag"])
def test_backward_of_an_empty_batch(kind):
    layer, be = bound(SparseEmbedding("t", DIM) if kind == "embedding" else EmbeddingBag("t", DIM))
    out = layer(np.zeros((0,), np.uint64) if kind == "embedding" else rag([]), labels=np.zeros(0))
    assert out.shape == (0, DIM)
    out.sum().backward()
    assert len(be.pushes) <= 1
    assert all(len(p["keys"]) == 0 and p["grads"].shape == (0, DIM) for p in be.pushes)


def test_non_contiguous_ids_and_values():
    """Strided views (a column of a batch, every other id) must not be read as contiguous memory."""
    emb, be = bound(SparseEmbedding("t", DIM))
    ids = np.array([[5, 1], [9, 1], [5, 2]], np.uint64)
    w = rng_w((3, DIM), seed=9)
    out = emb(ids[:, 0])
    np.testing.assert_allclose(out.numpy(), [initial_row(k, DIM) for k in (5, 9, 5)], rtol=1e-6)
    backward_with(out, w)
    assert_push(be.pushes[0], "t", [5, 9], [w[0] + w[2], w[1]], [2, 1], [0, 0])
    bag, _ = bound(EmbeddingBag("t", DIM), be)
    values = np.array([3, 0, 4, 0, 3, 0, 8, 0], np.uint64)[::2]  # 3, 4, 3, 8
    out = bag((values, np.array([0, 2, 2, 4])))
    expect = ref_bags(lambda k: initial_row(k, DIM), [[[3, 4], [], [3, 8]]], "sum")[:, 0]
    np.testing.assert_allclose(out.numpy(), expect, rtol=1e-5)


# -- a tuple of slots is several slots everywhere -------------------------------------------------
@pytest.mark.parametrize("n_slots", [2, 3])
def test_unique_keys_of_a_tuple_of_slots(n_slots):
    layer, be = bound(EmbeddingBag("t", DIM))
    slots = tuple(rag([[i + 1], [10 * i]]) for i in range(n_slots))
    layer(slots)
    np.testing.assert_array_equal(layer.unique_keys(slots), be.pulls[-1][1])

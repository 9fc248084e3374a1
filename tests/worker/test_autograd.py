"""Autograd semantics: accumulation, freed graphs, grad mode, detach/clone, dtypes, repr, deep graphs."""
from __future__ import annotations

import threading

import numpy as np
import pytest

import shoal
import shoal.nn.functional as F


def _param(values, dtype="float32"):
    return shoal.Tensor(np.asarray(values, dtype=np.float64), dtype=dtype, requires_grad=True)


def _loss(w, x):
    return ((w * x) ** 2).sum()


# -- accumulation ---------------------------------------------------------------------------------------
def test_gradients_accumulate_across_backward_calls():
    w = _param([1.0, -2.0, 0.5])
    x = shoal.Tensor([0.3, 1.1, -2.0])
    _loss(w, x).backward()
    once = w.grad.numpy().copy()
    assert np.all(once != 0)
    _loss(w, x).backward()
    np.testing.assert_array_equal(w.grad.numpy(), 2 * once)
    _loss(w, x).backward()
    np.testing.assert_array_equal(w.grad.numpy(), 3 * once)


def test_tensor_clear_grad_starts_over():
    w = _param([1.0, -2.0])
    x = shoal.Tensor([3.0, 4.0])
    _loss(w, x).backward()
    once = w.grad.numpy().copy()
    _loss(w, x).backward()
    w.clear_grad()
    assert w.grad is None
    _loss(w, x).backward()
    np.testing.assert_array_equal(w.grad.numpy(), once)


def test_optimizer_clear_grad_starts_over():
    layer = shoal.nn.Linear(3, 2)
    opt = shoal.optimizer.SGD(learning_rate=0.1, parameters=layer.parameters())
    x = shoal.Tensor(np.arange(6.0).reshape(2, 3))

    def step():
        (layer(x) ** 2).mean().backward()

    step()
    once = [p.grad.numpy().copy() for p in layer.parameters()]
    step()
    for p, g in zip(layer.parameters(), once):
        np.testing.assert_allclose(p.grad.numpy(), 2 * g, rtol=1e-6)
    opt.clear_grad()
    assert all(p.grad is None for p in layer.parameters())
    step()
    for p, g in zip(layer.parameters(), once):
        np.testing.assert_array_equal(p.grad.numpy(), g)


def test_sparse_gradients_accumulate_too():
    w = _param(np.arange(12.0).reshape(6, 2))
    ids = shoal.Tensor([1, 4, 1])
    for _ in range(2):
        (F.embedding(ids, w) * shoal.Tensor([[1.0, 2.0]])).sum().backward()
    g = w.grad
    assert isinstance(g, shoal.SparseGrad)
    dense = g.numpy()
    np.testing.assert_array_equal(dense[1], [4.0, 8.0])
    np.testing.assert_array_equal(dense[4], [2.0, 4.0])
    assert np.count_nonzero(dense) == 4
    w.clear_grad()
    assert w.grad is None


def test_a_held_gradient_is_not_changed_by_later_backward():
    w = _param([1.0, 2.0])
    (w * 3.0).sum().backward()
    first = w.grad
    (w * 3.0).sum().backward()
    np.testing.assert_array_equal(first.numpy(), [3.0, 3.0])
    np.testing.assert_array_equal(w.grad.numpy(), [6.0, 6.0])


# -- freed graphs and retain_graph ---------------------------------------------------------------------
def test_backward_twice_on_the_same_graph_raises():
    w = _param([1.0, 2.0])
    loss = (w * w).sum()
    loss.backward()
    with pytest.raises(shoal.GradError, match="retain_graph"):
        loss.backward()


def test_backward_twice_through_a_shared_subgraph_raises():
    w = _param([1.0, 2.0])
    h = w * w
    h.sum().backward()
    with pytest.raises(shoal.GradError):
        (h * 2.0).sum().backward()


def test_retain_graph_allows_a_second_backward_and_grads_add():
    w = _param([1.0, -3.0])
    loss = (w * w).sum()
    loss.backward(retain_graph=True)
    np.testing.assert_array_equal(w.grad.numpy(), [2.0, -6.0])
    loss.backward(retain_graph=True)
    np.testing.assert_array_equal(w.grad.numpy(), [4.0, -12.0])
    loss.backward()  # frees the graph
    np.testing.assert_array_equal(w.grad.numpy(), [6.0, -18.0])
    with pytest.raises(shoal.GradError):
        loss.backward()


# -- backward() arguments -------------------------------------------------------------------------------
def test_backward_on_non_scalar_without_grad_names_the_shape():
    w = _param(np.ones((2, 3)))
    with pytest.raises(shoal.GradError) as info:
        (w * 2.0).backward()
    assert "(2, 3)" in str(info.value)


def test_backward_with_explicit_grad():
    w = _param([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    y = w * w
    g = np.array([[1.0, 0.0, -1.0], [2.0, 0.5, 0.0]])
    y.backward(grad=g)
    np.testing.assert_array_equal(w.grad.numpy(), 2 * w.numpy() * g)


def test_backward_with_one_element_non_0d_tensor():
    w = _param([2.0])
    (w * w).backward()
    np.testing.assert_array_equal(w.grad.numpy(), [4.0])


def test_backward_with_wrong_shape_grad_names_both_shapes():
    w = _param(np.ones((2, 3)))
    y = w * 2.0
    with pytest.raises(shoal.ShapeError) as info:
        y.backward(grad=np.ones((3, 2)))
    msg = str(info.value)
    assert "(3, 2)" in msg and "(2, 3)" in msg


def test_backward_on_tensor_without_grad_raises():
    x = shoal.Tensor([1.0, 2.0])
    with pytest.raises(shoal.GradError):
        (x * 2.0).sum().backward()


def test_only_leaves_keep_gradients():
    w = _param([1.0, 2.0])
    c = shoal.Tensor([5.0, 7.0])
    h = w * c
    h.sum().backward()
    assert h.grad is None
    assert c.grad is None
    np.testing.assert_array_equal(w.grad.numpy(), [5.0, 7.0])


def test_requires_grad_needs_a_float_tensor():
    with pytest.raises(shoal.DTypeError):
        shoal.Tensor([1, 2], requires_grad=True)


# -- grad mode ---------------------------------------------------------------------------------------------
def test_no_grad_context_manager():
    w = _param([1.0, 2.0])
    assert shoal.is_grad_enabled()
    with shoal.no_grad():
        assert not shoal.is_grad_enabled()
        y = w * 2.0
    assert shoal.is_grad_enabled()
    assert not y.requires_grad and y.is_leaf
    np.testing.assert_array_equal(y.numpy(), [2.0, 4.0])
    with pytest.raises(shoal.GradError):
        y.sum().backward()


def test_no_grad_decorator():
    w = _param([1.0, 2.0])

    @shoal.no_grad()
    def double(t):
        assert not shoal.is_grad_enabled()
        return t * 2.0

    assert shoal.is_grad_enabled()  # decorating changes nothing by itself
    y = double(w)
    assert not y.requires_grad
    assert shoal.is_grad_enabled()
    assert double.__name__ == "double"


def test_no_grad_restores_the_mode_after_an_exception():
    with pytest.raises(KeyError):
        with shoal.no_grad():
            raise KeyError("boom")
    assert shoal.is_grad_enabled()

    @shoal.no_grad()
    def fails():
        raise KeyError("boom")

    with pytest.raises(KeyError):
        fails()
    assert shoal.is_grad_enabled()


def test_enable_grad_inside_no_grad():
    w = _param([1.0])
    with shoal.no_grad():
        with shoal.enable_grad():
            y = w * 2.0
        assert not shoal.is_grad_enabled()
        z = w * 2.0
    assert shoal.is_grad_enabled()
    assert y.requires_grad and not z.requires_grad


def test_nested_no_grad_restores_outer_state():
    with shoal.no_grad():
        with shoal.no_grad():
            pass
        assert not shoal.is_grad_enabled()
    assert shoal.is_grad_enabled()


def test_set_grad_enabled_call_and_context():
    try:
        shoal.set_grad_enabled(False)
        assert not shoal.is_grad_enabled()
    finally:
        shoal.set_grad_enabled(True)
    assert shoal.is_grad_enabled()
    with shoal.set_grad_enabled(False):
        assert not shoal.is_grad_enabled()
    assert shoal.is_grad_enabled()


def test_grad_mode_is_per_thread():
    seen = []
    with shoal.no_grad():
        t = threading.Thread(target=lambda: seen.append(shoal.is_grad_enabled()))
        t.start()
        t.join(timeout=10)
    assert seen == [True]


# -- detach / clone -----------------------------------------------------------------------------------------
def test_detach_cuts_the_graph():
    w = _param([1.0, 2.0])
    d = w.detach()
    assert not d.requires_grad and d.is_leaf
    np.testing.assert_array_equal(d.numpy(), w.numpy())
    (w * 3.0 + d * 5.0).sum().backward()
    np.testing.assert_array_equal(w.grad.numpy(), [3.0, 3.0])
    assert d.grad is None


def test_detach_of_an_intermediate():
    w = _param([1.0, 2.0])
    h = (w * w).detach()
    (w * h).sum().backward()
    np.testing.assert_array_equal(w.grad.numpy(), [1.0, 4.0])  # h is a constant


def test_clone_stays_in_the_graph_and_copies_the_data():
    w = _param([1.0, 2.0])
    c = w.clone()
    assert c.requires_grad and not c.is_leaf
    with shoal.no_grad():
        c[0] = 100.0
    np.testing.assert_array_equal(w.numpy(), [1.0, 2.0])
    (w.clone() * 4.0).sum().backward()
    np.testing.assert_array_equal(w.grad.numpy(), [4.0, 4.0])


# -- in-place assignment ---------------------------------------------------------------------------------
def test_leaf_requiring_grad_cannot_be_assigned_in_place_under_grad_mode():
    w = _param([1.0, 2.0, 3.0])
    with pytest.raises(shoal.GradError):
        w[0] = 5.0
    np.testing.assert_array_equal(w.numpy(), [1.0, 2.0, 3.0])


def test_leaf_requiring_grad_can_be_assigned_under_no_grad():
    w = _param([1.0, 2.0, 3.0])
    with shoal.no_grad():
        w[0] = 5.0
        w[1:] = shoal.Tensor([7.0, 8.0])
    np.testing.assert_array_equal(w.numpy(), [5.0, 7.0, 8.0])
    assert w.requires_grad and w.is_leaf
    (w * 2.0).sum().backward()
    np.testing.assert_array_equal(w.grad.numpy(), [2.0, 2.0, 2.0])


def test_tensor_without_grad_can_be_assigned_in_place():
    x = shoal.Tensor([1.0, 2.0, 3.0])
    x[1] = 9.0
    np.testing.assert_array_equal(x.numpy(), [1.0, 9.0, 3.0])
    assert not x.requires_grad


# -- dtypes ---------------------------------------------------------------------------------------------------
def test_float32_is_the_default():
    assert shoal.get_default_dtype() == np.float32
    assert shoal.Tensor(np.array([1.0, 2.0], dtype=np.float64)).dtype == np.float32
    assert shoal.Tensor(1.5).dtype == np.float32
    assert shoal.Tensor([1.5, 2.5]).dtype == np.float32
    assert shoal.to_tensor([[0.5]]).dtype == np.float32
    assert shoal.zeros((2,)).dtype == np.float32
    assert shoal.randn((2,)).dtype == np.float32
    assert shoal.Tensor([1, 2]).dtype.kind == "i"  # integers stay integers
    assert shoal.Tensor(np.array([1.0]), dtype="float64").dtype == np.float64


def test_set_default_dtype_changes_it():
    shoal.set_default_dtype("float64")
    assert shoal.get_default_dtype() == np.float64
    assert shoal.Tensor(1.5).dtype == np.float64
    assert shoal.Tensor(np.array([1.0], dtype=np.float32)).dtype == np.float64
    assert shoal.ones((2,)).dtype == np.float64
    assert shoal.rand((2,)).dtype == np.float64


def test_set_default_dtype_rejects_non_floats():
    with pytest.raises(shoal.DTypeError, match="int32"):
        shoal.set_default_dtype("int32")
    assert shoal.get_default_dtype() == np.float32


@pytest.mark.parametrize("expr", ["x * 2.0", "2.0 * x", "x + 1", "x - 0.5", "x / 3", "3.0 / x",
                                  "x ** 2.0", "x ** 2", "np.float64(2.0) * x", "x * np.float64(2)"])
def test_python_scalars_keep_float32(expr):
    x = shoal.Tensor([1.0, 2.0])
    y = eval(expr, {"x": x, "np": np})
    assert isinstance(y, shoal.Tensor)
    assert y.dtype == np.float32


def test_python_scalars_keep_float32_when_default_is_float64():
    x = shoal.Tensor([1.0, 2.0])
    shoal.set_default_dtype("float64")
    assert (x * 2.0).dtype == np.float32


def test_int_tensor_plus_python_float_is_float32():
    i = shoal.Tensor([1, 2, 3])
    y = i + 1.5
    assert y.dtype == np.float32
    np.testing.assert_array_equal(y.numpy(), [2.5, 3.5, 4.5])
    z = 0.5 * i
    assert z.dtype == np.float32
    np.testing.assert_array_equal(z.numpy(), [0.5, 1.0, 1.5])


def test_int_tensor_with_python_int_stays_int():
    i = shoal.Tensor([1, 2, 3])
    y = i * 2
    assert y.dtype == i.dtype
    np.testing.assert_array_equal(y.numpy(), [2, 4, 6])


@pytest.mark.parametrize("op", ["add", "sub", "mul", "div", "maximum", "matmul"])
def test_mixing_float32_and_float64_raises(op):
    a = shoal.Tensor(np.ones((2, 2)), dtype="float32")
    b = shoal.Tensor(np.ones((2, 2)), dtype="float64")
    with pytest.raises(shoal.DTypeError) as info:
        getattr(shoal, op)(a, b)
    msg = str(info.value)
    assert "float32" in msg and "float64" in msg
    with pytest.raises(shoal.DTypeError):
        getattr(shoal, op)(b, a)


def test_mixing_dtypes_with_operators_raises():
    a = shoal.Tensor([1.0, 2.0])
    b = shoal.Tensor([1.0, 2.0], dtype="float64")
    with pytest.raises(shoal.DTypeError, match="float64"):
        a + b


# -- repr --------------------------------------------------------------------------------------------------------
def test_repr_shows_shape_dtype_and_values():
    t = shoal.Tensor([[1.0, 2.5], [3.0, -4.0]])
    r = repr(t)
    assert "[2, 2]" in r
    assert "float32" in r
    assert "[[ 1. ,  2.5]," in r and "[ 3. , -4. ]]" in r
    assert "requires_grad" not in r
    r2 = repr(shoal.Tensor([1.0, 2.0], dtype="float64", requires_grad=True))
    assert "float64" in r2 and "requires_grad=True" in r2 and "[1., 2.]" in r2


# -- graph shapes ---------------------------------------------------------------------------------------
def test_diamond_graph_accumulates():
    x = _param([1.0, 2.0, 3.0], dtype="float64")
    y = x * 2.0
    a = y * y          # 4x^2
    b = y * 3.0        # 6x
    z = (a + b + y).sum()   # 4x^2 + 8x
    z.backward()
    np.testing.assert_allclose(x.grad.numpy(), 8 * x.numpy() + 8)


def test_tensor_used_twice_in_one_op():
    x = _param([1.5, -2.0], dtype="float64")
    (x * x).sum().backward()
    np.testing.assert_array_equal(x.grad.numpy(), [3.0, -4.0])
    x.clear_grad()
    (x + x + x).sum().backward()
    np.testing.assert_array_equal(x.grad.numpy(), [3.0, 3.0])


def test_deep_chain_backprops_without_recursion_error():
    x = _param(1.0, dtype="float64")
    y = x
    for i in range(5000):
        y = y * 1.0001 if i % 2 else y + 0.5
    y.backward()
    np.testing.assert_allclose(x.grad.numpy(), 1.0001 ** 2500, rtol=1e-9)


def test_deep_chain_can_be_dropped_without_backward():
    x = _param([1.0, 2.0])
    y = x
    for _ in range(5000):
        y = y + 1.0
    np.testing.assert_array_equal(y.numpy(), [5001.0, 5002.0])
    del y  # freeing a 5000-node graph must not overflow the C stack


def test_a_tensor_used_twice_gets_both_gradients_before_passing_its_own():
    import shoal
    import shoal.nn as nn
    leaf = shoal.to_tensor(np.ones(3, np.float32), stop_gradient=False)
    (leaf + leaf * 2).sum().backward()
    np.testing.assert_array_equal(leaf.grad.numpy(), [3, 3, 3])
    x = shoal.to_tensor(np.ones(3, np.float32), stop_gradient=False)
    h = x * 1
    (h + h * 2).sum().backward()   # an intermediate used twice (a diamond)
    np.testing.assert_array_equal(x.grad.numpy(), [3, 3, 3])
    # a residual block against finite differences
    shoal.seed(3)
    fc1, fc2 = nn.Linear(3, 4), nn.Linear(4, 4)
    xs = shoal.to_tensor(np.random.default_rng(0).normal(size=(2, 3)), dtype="float64")
    fc1.to(dtype="float64")
    fc2.to(dtype="float64")

    def loss():
        h = fc1(xs)
        return ((h + fc2(shoal.tanh(h))) ** 2).sum()
    loss().backward()
    w, eps = fc1.weight.data, 1e-6
    numeric = np.zeros_like(w)
    for idx in np.ndindex(w.shape):
        old = w[idx]
        w[idx] = old + eps
        up = float(loss().numpy())
        w[idx] = old - eps
        down = float(loss().numpy())
        w[idx] = old
        numeric[idx] = (up - down) / (2 * eps)
    np.testing.assert_allclose(fc1.weight.grad.numpy(), numeric, rtol=1e-5, atol=1e-7)


def test_parameters_get_their_gradients_as_soon_as_their_layer_is_done():
    """The last layer's parameters are final while the layers below still run backward (data
    parallel all-reduces them meanwhile): hooks fire in reverse layer order, each before the
    next lower layer's backward."""
    import shoal.nn as nn
    events = []

    class Probe(shoal.Function):   # marks when backward reaches the point between two layers
        def forward(self, a, name=""):
            self.name = name
            return a.copy()

        def backward(self, g):
            events.append(f"backward below {self.name}")
            return g
    layers = [nn.Linear(4, 4) for _ in range(3)]
    for i, layer in enumerate(layers):
        for p in layer.parameters():
            p.register_post_accumulate_grad_hook(lambda p, i=i: events.append(f"grad fc{i}"))
    x = shoal.to_tensor(np.ones((2, 4), np.float32))
    for i, layer in enumerate(layers):
        x = layer(Probe.apply(x, name=f"fc{i}") if i else x)
    x.sum().backward()
    got = [e for i, e in enumerate(events) if i == 0 or e != events[i - 1]]
    assert got == ["grad fc2", "backward below fc2", "grad fc1", "backward below fc1",
                   "grad fc0"], events


def test_a_grad_mode_block_restores_the_mode_of_its_entry_not_of_its_construction():
    from shoal.worker.autograd import enable_grad, is_grad_enabled, no_grad, set_grad_enabled
    eg = enable_grad()                       # built while recording
    with no_grad():
        with eg:
            assert is_grad_enabled()
        assert not is_grad_enabled()         # back to the no_grad it was entered in
    ng = no_grad()
    with ng:
        with ng:                             # nested entries of one object
            assert not is_grad_enabled()
        assert not is_grad_enabled()
    assert is_grad_enabled()
    with set_grad_enabled(False):
        assert not is_grad_enabled()
    assert is_grad_enabled()
    set_grad_enabled(False)                  # the call form switches at once
    assert not is_grad_enabled()
    set_grad_enabled(True)
    assert is_grad_enabled()

    @no_grad()
    def f():
        return is_grad_enabled()
    assert not f() and is_grad_enabled()

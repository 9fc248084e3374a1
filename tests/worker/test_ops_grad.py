"""Every differentiable op: forward against numpy, backward against finite differences (float64)."""
from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import shoal
import shoal.nn.functional as F

from .gradcheck import check_grad

HYPO = settings(max_examples=25, deadline=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture])


def _rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


def _signed(rng, shape, lo=0.3, hi=2.0):
    """Values with |v| in [lo, hi] and random signs: away from the kinks of abs/relu."""
    return rng.uniform(lo, hi, size=shape) * rng.choice([-1.0, 1.0], size=shape)


def _distinct(rng, shape, step=0.1):
    """Values at least `step` apart (no ties for max)."""
    n = int(np.prod(shape))
    return (rng.permutation(n).astype(np.float64) * step - n * step / 2).reshape(shape)


def _t(a, requires_grad=False):
    return shoal.Tensor(np.asarray(a, dtype=np.float64), dtype="float64",
                        requires_grad=requires_grad)


# -- elementwise binary ops with broadcasting (hypothesis) -------------------------------------
_ANY = st.floats(-2.0, 2.0, allow_nan=False, allow_infinity=False)
_NONZERO = st.one_of(st.floats(-2.0, -0.3), st.floats(0.3, 2.0))
_POSITIVE = st.floats(0.3, 2.0)
# a and b drawn from interleaved sets at least 0.1 apart: both orders occur, never a tie
_MAX_A = st.one_of(st.floats(-2.0, -1.1), st.floats(0.1, 1.0))
_MAX_B = st.one_of(st.floats(-1.0, 0.0), st.floats(1.2, 2.0))

BINARY = {
    "add": (shoal.add, np.add, _ANY, _ANY),
    "sub": (shoal.sub, np.subtract, _ANY, _ANY),
    "mul": (shoal.mul, np.multiply, _ANY, _ANY),
    "div": (shoal.div, np.divide, _ANY, _NONZERO),
    "pow": (shoal.pow, np.power, _POSITIVE, _ANY),
    "maximum": (shoal.maximum, np.maximum, _MAX_A, _MAX_B),
    "minimum": (shoal.minimum, np.minimum, _MAX_A, _MAX_B),
}


@pytest.mark.parametrize("name", sorted(BINARY))
@HYPO
@given(data=st.data())
def test_binary_op_broadcasting(name, data):
    fn, ref, elems_a, elems_b = BINARY[name]
    shapes = data.draw(hnp.mutually_broadcastable_shapes(num_shapes=2, min_dims=0, max_dims=3,
                                                         max_side=3), label="shapes")
    a = data.draw(hnp.arrays(np.float64, shapes.input_shapes[0], elements=elems_a), label="a")
    b = data.draw(hnp.arrays(np.float64, shapes.input_shapes[1], elements=elems_b), label="b")
    (out,), _, _ = check_grad(fn, a, b)
    assert out.shape == shapes.result_shape
    np.testing.assert_allclose(out.numpy(), ref(a, b), rtol=1e-12, atol=0)


OPERATORS = {
    "a + b": (lambda a, b: a + b, np.add),
    "a - b": (lambda a, b: a - b, np.subtract),
    "a * b": (lambda a, b: a * b, np.multiply),
    "a / b": (lambda a, b: a / b, np.divide),
    "a ** b": (lambda a, b: a ** b, np.power),
    "a @ b": (lambda a, b: a @ b, np.matmul),
}


@pytest.mark.parametrize("expr", sorted(OPERATORS))
def test_operator_forms(expr):
    fn, ref = OPERATORS[expr]
    rng = _rng(1)
    a = rng.uniform(0.5, 2.0, size=(3, 3))
    b = rng.uniform(0.5, 2.0, size=(3, 3))
    (out,), _, _ = check_grad(fn, a, b)
    np.testing.assert_allclose(out.numpy(), ref(a, b), rtol=1e-12)


SCALAR_FORMS = {
    "x + 1.5": (lambda x: x + 1.5, lambda x: x + 1.5),
    "1.5 + x": (lambda x: 1.5 + x, lambda x: 1.5 + x),
    "x - 0.5": (lambda x: x - 0.5, lambda x: x - 0.5),
    "2.0 - x": (lambda x: 2.0 - x, lambda x: 2.0 - x),
    "x * 3": (lambda x: x * 3, lambda x: x * 3),
    "-2.5 * x": (lambda x: -2.5 * x, lambda x: -2.5 * x),
    "x / 4.0": (lambda x: x / 4.0, lambda x: x / 4.0),
    "3.0 / x": (lambda x: 3.0 / x, lambda x: 3.0 / x),
    "x ** 2": (lambda x: x ** 2, lambda x: x ** 2),
    "x ** 2.5": (lambda x: x ** 2.5, lambda x: x ** 2.5),
    "x ** -1.5": (lambda x: x ** -1.5, lambda x: x ** -1.5),
    "2.0 ** x": (lambda x: 2.0 ** x, lambda x: 2.0 ** x),
    "pow(x, 3.0)": (lambda x: shoal.pow(x, 3.0), lambda x: x ** 3.0),
    "-x": (lambda x: -x, lambda x: -x),
}


@pytest.mark.parametrize("expr", sorted(SCALAR_FORMS))
def test_scalar_operand_forms(expr):
    fn, ref = SCALAR_FORMS[expr]
    x = _rng(2).uniform(0.5, 2.0, size=(2, 3))
    (out,), _, _ = check_grad(fn, x)
    assert out.dtype == np.float64
    np.testing.assert_allclose(out.numpy(), ref(x), rtol=1e-12)


# -- elementwise unary ops ------------------------------------------------------------------------
def _np_sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


UNARY = {
    "neg": (shoal.neg, np.negative, _ANY),
    "exp": (shoal.exp, np.exp, _ANY),
    "log": (shoal.log, np.log, _POSITIVE),
    "sqrt": (shoal.sqrt, np.sqrt, _POSITIVE),
    "abs": (shoal.abs, np.abs, _NONZERO),
    "tanh": (shoal.tanh, np.tanh, _ANY),
    "sigmoid": (shoal.sigmoid, _np_sigmoid, _ANY),
    "relu": (shoal.relu, lambda x: np.maximum(x, 0.0), _NONZERO),
}


@pytest.mark.parametrize("name", sorted(UNARY))
@HYPO
@given(data=st.data())
def test_unary_op(name, data):
    fn, ref, elems = UNARY[name]
    shape = data.draw(hnp.array_shapes(min_dims=0, max_dims=3, min_side=1, max_side=3))
    x = data.draw(hnp.arrays(np.float64, shape, elements=elems))
    (out,), _, _ = check_grad(fn, x)
    assert out.shape == x.shape
    np.testing.assert_allclose(out.numpy(), ref(x), rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("name", ["exp", "log", "sqrt", "abs", "tanh", "sigmoid", "relu"])
def test_unary_method_forms(name):
    fn_ref = UNARY[name][1]
    x = _rng(3).uniform(0.5, 1.5, size=(2, 3))
    (out,), _, _ = check_grad(lambda t: getattr(t, name)(), x)
    np.testing.assert_allclose(out.numpy(), fn_ref(x), rtol=1e-12)


def test_sigmoid_is_finite_for_large_inputs():
    x = _t([-800.0, -50.0, 0.0, 50.0, 800.0], requires_grad=True)
    y = shoal.sigmoid(x)
    y.sum().backward()
    np.testing.assert_allclose(y.numpy(), [0.0, _np_sigmoid(-50.0), 0.5, _np_sigmoid(50.0), 1.0],
                               atol=1e-15)
    assert np.all(np.isfinite(x.grad.numpy()))


# -- gelu ---------------------------------------------------------------------------------------------
def _gelu_ref(x, approximate):
    if approximate:
        return 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3)))
    erf = np.vectorize(math.erf)
    return 0.5 * x * (1 + erf(x / math.sqrt(2)))


@pytest.mark.parametrize("approximate", [False, True])
@pytest.mark.parametrize("shape", [(7,), (2, 3, 2)])
def test_gelu(approximate, shape):
    x = _rng(4).uniform(-3.0, 3.0, size=shape)
    (out,), _, _ = check_grad(lambda t: F.gelu(t, approximate=approximate), x, atol=1e-6)
    np.testing.assert_allclose(out.numpy(), _gelu_ref(x, approximate), atol=1e-7)


def test_gelu_forms_differ():
    x = _t(np.linspace(-3, 3, 13))
    exact, approx = F.gelu(x).numpy(), F.gelu(x, approximate=True).numpy()
    assert not np.allclose(exact, approx, atol=1e-6, rtol=0)
    np.testing.assert_allclose(exact, approx, atol=1e-2)


# -- matmul -------------------------------------------------------------------------------------------
MATMUL_CASES = [
    # (shape of x, shape of y, transpose_x, transpose_y)
    ((2, 3), (3, 4), False, False),
    ((2, 2, 3), (2, 3, 4), False, False),
    ((2, 1, 2, 3), (3, 3, 2), False, False),   # batch dims broadcast: (2,1) with (3,)
    ((3, 2, 3), (3, 2), False, False),           # batched x 2-D
    ((3,), (3, 4), False, False),                # 1-D x 2-D
    ((2, 3), (3,), False, False),                # 2-D x 1-D
    ((4,), (4,), False, False),                  # 1-D x 1-D
    ((3,), (2, 3, 4), False, False),             # 1-D x batched
    ((2, 2, 3), (3,), False, False),             # batched x 1-D
    ((3, 2), (3, 4), True, False),
    ((2, 3), (4, 3), False, True),
    ((3, 2), (4, 3), True, True),
    ((2, 3, 2), (1, 4, 3), True, True),
]


def _np_matmul(a, b, tx, ty):
    if tx:
        a = np.swapaxes(a, -1, -2)
    if ty:
        b = np.swapaxes(b, -1, -2)
    return np.matmul(a, b)


@pytest.mark.parametrize("sa,sb,tx,ty", MATMUL_CASES, ids=[f"{c[0]}@{c[1]}-t{int(c[2])}{int(c[3])}"
                                                            for c in MATMUL_CASES])
def test_matmul(sa, sb, tx, ty):
    rng = _rng(5)
    a, b = rng.normal(size=sa), rng.normal(size=sb)
    (out,), _, _ = check_grad(lambda x, y: shoal.matmul(x, y, transpose_x=tx, transpose_y=ty), a, b)
    want = _np_matmul(a, b, tx, ty)
    assert out.shape == want.shape
    np.testing.assert_allclose(out.numpy(), want, rtol=1e-12, atol=1e-12)


# -- reductions ---------------------------------------------------------------------------------------
AXES = [None, 0, 1, -1, (0, 2), (-1, 0), (0, 1, 2)]


@pytest.mark.parametrize("keepdim", [False, True])
@pytest.mark.parametrize("axis", AXES, ids=str)
@pytest.mark.parametrize("op", ["sum", "mean"])
def test_sum_mean(op, axis, keepdim):
    x = _rng(6).normal(size=(2, 3, 4))
    fn = getattr(shoal, op)
    (out,), _, _ = check_grad(lambda t: fn(t, axis=axis, keepdim=keepdim), x)
    want = getattr(np, op)(x, axis=axis, keepdims=keepdim)
    assert out.shape == np.shape(want)
    np.testing.assert_allclose(out.numpy(), want, rtol=1e-12, atol=1e-14)


def test_sum_mean_method_forms():
    x = _rng(7).normal(size=(3, 4))
    (out,), _, _ = check_grad(lambda t: t.sum(axis=1) + t.mean(axis=1), x)
    np.testing.assert_allclose(out.numpy(), x.sum(1) + x.mean(1), rtol=1e-12)


@pytest.mark.parametrize("keepdim", [False, True])
@pytest.mark.parametrize("axis", [None, 0, 1, -1, (0, 2)], ids=str)
def test_max(axis, keepdim):
    x = _distinct(_rng(8), (2, 3, 4))
    (out,), _, _ = check_grad(lambda t: shoal.max(t, axis=axis, keepdim=keepdim), x)
    want = np.max(x, axis=axis, keepdims=keepdim)
    assert out.shape == np.shape(want)
    np.testing.assert_array_equal(out.numpy(), want)


def test_max_ties_share_the_gradient_equally():
    x = _t([[1.0, 3.0, 3.0, 0.0], [2.0, 2.0, 2.0, 2.0], [5.0, 1.0, 0.0, 1.0]], requires_grad=True)
    m = shoal.max(x, axis=1)
    np.testing.assert_array_equal(m.numpy(), [3.0, 2.0, 5.0])
    (m * _t([1.0, 2.0, 3.0])).sum().backward()
    np.testing.assert_allclose(x.grad.numpy(), [[0.0, 0.5, 0.5, 0.0],
                                                [0.5, 0.5, 0.5, 0.5],
                                                [3.0, 0.0, 0.0, 0.0]])


def test_max_over_all_with_ties():
    x = _t([[4.0, 1.0], [4.0, 4.0]], requires_grad=True)
    m = x.max()
    assert m.shape == () and m.item() == 4.0
    m.backward()
    np.testing.assert_allclose(x.grad.numpy(), [[1 / 3, 0.0], [1 / 3, 1 / 3]])


# -- shapes -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", [(4, 6), (24,), (-1, 2), (2, -1, 3), (1, 24, 1)], ids=str)
def test_reshape(shape):
    x = _rng(9).normal(size=(2, 3, 4))
    (out,), _, _ = check_grad(lambda t: shoal.reshape(t, shape) * shoal.reshape(t, shape), x)
    np.testing.assert_array_equal(out.numpy(), x.reshape(shape) ** 2)


PERMS = [(1, 0, 2), (2, 0, 1), (0, 2, 1), (2, 1, 0), (0, -1, 1), (-1, -3, -2)]


@pytest.mark.parametrize("perm", PERMS, ids=str)
def test_transpose(perm):
    x = _rng(10).normal(size=(2, 3, 4))
    (out,), _, _ = check_grad(lambda t: shoal.transpose(t, perm), x)
    np.testing.assert_array_equal(out.numpy(), np.transpose(x, perm))


@pytest.mark.parametrize("perm", [(1, 0), (-1, 0), (-1, -2)], ids=str)
def test_transpose_2d_negative_axes(perm):
    x = _rng(11).normal(size=(2, 3))
    (out,), _, _ = check_grad(lambda t: shoal.transpose(t, perm), x)
    np.testing.assert_array_equal(out.numpy(), np.transpose(x, perm))


def test_transpose_T_property():
    x = _rng(12).normal(size=(2, 3, 4))
    (out,), _, _ = check_grad(lambda t: t.T, x)
    np.testing.assert_array_equal(out.numpy(), x.T)


@pytest.mark.parametrize("start,stop", [(0, -1), (1, -1), (0, 1), (1, 2), (-2, -1)])
def test_flatten(start, stop):
    x = _rng(13).normal(size=(2, 3, 2))
    (out,), _, _ = check_grad(lambda t: shoal.flatten(t, start, stop), x)
    s, e = start % 3, stop % 3
    want_shape = x.shape[:s] + (int(np.prod(x.shape[s:e + 1])),) + x.shape[e + 1:]
    np.testing.assert_array_equal(out.numpy(), x.reshape(want_shape))


@pytest.mark.parametrize("axis", [0, 1, 2, -1, -3])
def test_unsqueeze(axis):
    x = _rng(14).normal(size=(2, 3))
    (out,), _, _ = check_grad(lambda t: shoal.unsqueeze(t, axis), x)
    np.testing.assert_array_equal(out.numpy(), np.expand_dims(x, axis))


@pytest.mark.parametrize("axis", [None, 0, 2, -1, (0, 2)], ids=str)
def test_squeeze(axis):
    x = _rng(15).normal(size=(1, 3, 1))
    (out,), _, _ = check_grad(lambda t: shoal.squeeze(t, axis), x)
    np.testing.assert_array_equal(out.numpy(), np.squeeze(x, axis))


@pytest.mark.parametrize("axis", [0, 1, -1])
def test_concat(axis):
    rng = _rng(16)
    shapes = [[2, 3, 2], [2, 3, 2], [2, 3, 2]]
    for i, extra in enumerate((1, 2, 3)):
        shapes[i][axis] = extra
    xs = [rng.normal(size=s) for s in shapes]
    (out,), _, _ = check_grad(lambda *ts: shoal.concat(list(ts), axis=axis), *xs)
    np.testing.assert_array_equal(out.numpy(), np.concatenate(xs, axis=axis))


@pytest.mark.parametrize("axis", [0, 1, 2, -1])
def test_stack(axis):
    rng = _rng(17)
    xs = [rng.normal(size=(2, 3)) for _ in range(3)]
    (out,), _, _ = check_grad(lambda *ts: shoal.stack(list(ts), axis=axis), *xs)
    np.testing.assert_array_equal(out.numpy(), np.stack(xs, axis=axis))


@pytest.mark.parametrize("sections,axis", [([1, 3], 1), ([2, 0, 2], 1), (2, 0), (4, -1), (1, 0)],
                         ids=str)
def test_split(sections, axis):
    x = _rng(18).normal(size=(2, 4))
    outs, _, _ = check_grad(lambda t: shoal.split(t, sections, axis=axis), x)
    n = x.shape[axis]
    cuts = (np.cumsum(sections)[:-1] if isinstance(sections, list)
            else [n // sections * i for i in range(1, sections)])
    want = np.split(x, cuts, axis=axis)
    assert len(outs) == len(want)
    for o, w in zip(outs, want):
        np.testing.assert_array_equal(o.numpy(), w)


def test_split_piece_unused_gets_zero_gradient():
    x = _t(np.arange(8.0).reshape(2, 4), requires_grad=True)
    first, _ = shoal.split(x, 2, axis=1)
    (first * 3.0).sum().backward()
    np.testing.assert_array_equal(x.grad.numpy(), [[3, 3, 0, 0], [3, 3, 0, 0]])


# -- indexing -----------------------------------------------------------------------------------------
INDEXES = {
    "int": 1,
    "negative int": -1,
    "slice": slice(1, 3),
    "slices with step": (slice(None, None, 2), slice(3, 0, -1)),
    "int and slice": (1, slice(1, None)),
    "ellipsis": (Ellipsis, 2),
    "newaxis": (None, slice(0, 2)),
    "int array with duplicates": np.array([0, 2, 0, 0, 3]),
    "int list with duplicates": [2, 2, 1],
    "two int arrays with duplicate pairs": (np.array([0, 1, 0, 0]), np.array([2, 3, 2, 2])),
    "int array and slice": (np.array([3, 3, 1]), slice(1, 3)),
    "slice and int array": (slice(None), np.array([0, 0, 2])),
    "negative int array": np.array([-1, 0, -1]),
    "bool mask rows": np.array([True, False, True, True]),
    "bool mask elements": "mask",
}


@pytest.mark.parametrize("name", list(INDEXES))
def test_getitem(name):
    x = _rng(19).normal(size=(4, 4))
    index = x > 0.1 if name == "bool mask elements" else INDEXES[name]
    np_index = np.asarray(index) if isinstance(index, list) else index
    (out,), _, _ = check_grad(lambda t: t[index], x)
    np.testing.assert_array_equal(out.numpy(), x[np_index])


def test_getitem_duplicate_indices_add_up():
    x = _t(np.ones((3, 2)), requires_grad=True)
    x[shoal.Tensor([0, 2, 0, 0])].sum().backward()
    np.testing.assert_array_equal(x.grad.numpy(), [[3, 3], [0, 0], [1, 1]])


def test_getitem_with_bool_tensor_mask():
    xs = np.array([[-1.0, 2.0], [3.0, -4.0]])
    x = _t(xs, requires_grad=True)
    picked = x[x > 0]
    np.testing.assert_array_equal(picked.numpy(), [2.0, 3.0])
    (picked * _t([10.0, 20.0])).sum().backward()
    np.testing.assert_array_equal(x.grad.numpy(), [[0, 10], [20, 0]])


@pytest.mark.parametrize("axis,index", [(0, [2, 0, 2, 1]), (1, [3, 3, 0]), (0, [-1, 0]),
                                         (-1, [1, -4, 1])], ids=str)
def test_gather(axis, index):
    x = _rng(20).normal(size=(3, 4))
    (out,), _, _ = check_grad(lambda t: shoal.gather(t, shoal.Tensor(index), axis=axis), x)
    np.testing.assert_array_equal(out.numpy(), np.take(x, index, axis=axis))


def test_gather_3d_middle_axis():
    x = _rng(21).normal(size=(2, 3, 2))
    index = np.array([2, 0, 2])
    (out,), _, _ = check_grad(lambda t: t.gather(index, axis=1), x)
    np.testing.assert_array_equal(out.numpy(), np.take(x, index, axis=1))


def test_gather_duplicate_indices_add_up():
    x = _t(np.zeros((2, 3)), requires_grad=True)
    shoal.gather(x, shoal.Tensor([1, 1, 1, 0]), axis=1).sum().backward()
    np.testing.assert_array_equal(x.grad.numpy(), [[1, 3, 0], [1, 3, 0]])


# -- softmax ---------------------------------------------------------------------------------------------
def _np_log_softmax(x, axis):
    s = x - x.max(axis=axis, keepdims=True)
    return s - np.log(np.exp(s).sum(axis=axis, keepdims=True))


@pytest.mark.parametrize("axis", [0, 1, 2, -1, -2])
@pytest.mark.parametrize("log", [False, True])
def test_softmax_and_log_softmax(axis, log):
    x = _rng(22).normal(size=(2, 3, 4)) * 2
    fn = F.log_softmax if log else F.softmax
    (out,), _, _ = check_grad(lambda t: fn(t, axis=axis), x)
    want = _np_log_softmax(x, axis)
    np.testing.assert_allclose(out.numpy(), want if log else np.exp(want), rtol=1e-12, atol=1e-14)


def test_softmax_is_stable_for_large_logits():
    y = F.softmax(_t([[1000.0, 1000.0, -1000.0]])).numpy()
    np.testing.assert_allclose(y, [[0.5, 0.5, 0.0]])
    ly = F.log_softmax(_t([[1000.0, 0.0]])).numpy()
    np.testing.assert_allclose(ly, [[0.0, -1000.0]])


# -- dropout ---------------------------------------------------------------------------------------------
def test_dropout_gradient_is_the_scaled_mask():
    p = 0.3
    xs = _rng(23).uniform(0.5, 1.5, size=(20, 30))  # nonzero: a zero output means dropped
    x = _t(xs, requires_grad=True)
    shoal.seed(7)
    out = F.dropout(x, p=p)
    keep = out.numpy() != 0
    assert 0.6 < keep.mean() < 0.8
    np.testing.assert_allclose(out.numpy(), xs * keep / (1 - p), rtol=1e-12)
    r = _rng(24).normal(size=xs.shape)
    (out * _t(r)).sum().backward()
    np.testing.assert_allclose(x.grad.numpy(), r * keep / (1 - p), rtol=1e-12)
    # the same seed draws the same mask
    shoal.seed(7)
    again = F.dropout(_t(xs), p=p).numpy() != 0
    np.testing.assert_array_equal(again, keep)


def test_dropout_finite_differences_with_fixed_seed():
    def fn(t):
        shoal.seed(11)
        return F.dropout(t, p=0.5)
    x = _rng(25).uniform(0.5, 1.5, size=(3, 4))
    (out,), (g,), _ = check_grad(fn, x)
    keep = out.numpy() != 0
    assert keep.any() and not keep.all()
    np.testing.assert_array_equal(g == 0, ~keep)


@pytest.mark.parametrize("case", ["p=0", "eval", "layer eval"])
def test_dropout_identity_cases(case):
    xs = _rng(26).normal(size=(3, 4))
    x = _t(xs, requires_grad=True)
    if case == "p=0":
        out = F.dropout(x, p=0.0)
    elif case == "eval":
        out = F.dropout(x, p=0.7, training=False)
    else:
        layer = shoal.nn.Dropout(0.7)
        layer.eval()
        out = layer(x)
    np.testing.assert_array_equal(out.numpy(), xs)
    r = _rng(27).normal(size=xs.shape)
    (out * _t(r)).sum().backward()
    np.testing.assert_array_equal(x.grad.numpy(), r)


def test_dropout_p_one_zeroes_everything():
    x = _t(np.ones((2, 3)), requires_grad=True)
    out = F.dropout(x, p=1.0)
    np.testing.assert_array_equal(out.numpy(), np.zeros((2, 3)))
    out.sum().backward()
    np.testing.assert_array_equal(x.grad.numpy(), np.zeros((2, 3)))


def test_dropout_layer_train_mode_drops():
    layer = shoal.nn.Dropout(0.5)
    out = layer(_t(np.ones((10, 10)))).numpy()
    assert set(np.unique(out)) <= {0.0, 2.0}
    assert 0 < (out == 0).sum() < 100


# -- layer norm ------------------------------------------------------------------------------------------
def _np_layer_norm(x, naxes, w=None, b=None, eps=1e-5):
    axes = tuple(range(x.ndim - naxes, x.ndim))
    mu = x.mean(axis=axes, keepdims=True)
    var = ((x - mu) ** 2).mean(axis=axes, keepdims=True)
    y = (x - mu) / np.sqrt(var + eps)
    if w is not None:
        y = y * w
    if b is not None:
        y = y + b
    return y


LN_CASES = [((3, 4), 1), ((2, 3, 4), 1), ((2, 3, 4), 2), ((5,), 1)]


@pytest.mark.parametrize("params", ["none", "weight", "weight+bias"])
@pytest.mark.parametrize("shape,naxes", LN_CASES, ids=str)
def test_layer_norm(shape, naxes, params):
    rng = _rng(28)
    x = rng.normal(size=shape) * 2 + 1
    nshape = shape[len(shape) - naxes:]
    norm_arg = nshape[0] if naxes == 1 else list(nshape)
    extra = []
    if params != "none":
        extra.append(rng.normal(size=nshape))
    if params == "weight+bias":
        extra.append(rng.normal(size=nshape))

    def fn(t, *wb):
        return F.layer_norm(t, norm_arg, *wb)
    (out,), _, _ = check_grad(fn, x, *extra, atol=1e-6, rtol=1e-5)
    np.testing.assert_allclose(out.numpy(), _np_layer_norm(x, naxes, *extra), rtol=1e-10,
                               atol=1e-12)


def test_layer_norm_epsilon():
    x = _rng(29).normal(size=(2, 3)) * 0.01
    out = F.layer_norm(_t(x), 3, epsilon=1e-2)
    np.testing.assert_allclose(out.numpy(), _np_layer_norm(x, 1, eps=1e-2), rtol=1e-10)


# -- linear ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("xshape", [(3, 4), (2, 3, 4), (4,)], ids=str)
def test_linear(xshape, bias):
    rng = _rng(30)
    x, w = rng.normal(size=xshape), rng.normal(size=(4, 5))
    args = [x, w] + ([rng.normal(size=(5,))] if bias else [])
    (out,), _, _ = check_grad(lambda *ts: F.linear(*ts), *args)
    want = x @ w + (args[2] if bias else 0.0)
    assert out.shape == xshape[:-1] + (5,)
    np.testing.assert_allclose(out.numpy(), want, rtol=1e-12, atol=1e-12)


# -- embedding ------------------------------------------------------------------------------------------
VOCAB, DIM = 40, 3


@pytest.mark.parametrize("ids", [[[1, 3, 1], [7, 3, 0]], [5], [[2, 2], [2, 2]], [39, 0, 17, 0]],
                         ids=str)
def test_embedding_gradient_is_row_sparse(ids):
    ids = np.array(ids)
    w = _rng(31).normal(size=(VOCAB, DIM))
    (out,), _, (raw,) = check_grad(lambda t: F.embedding(ids, t), w)
    np.testing.assert_array_equal(out.numpy(), w[ids])
    assert out.shape == ids.shape + (DIM,)
    assert isinstance(raw, shoal.SparseGrad)
    assert raw.rows.shape == (len(np.unique(ids)), DIM)
    assert raw.shape == (VOCAB, DIM)
    np.testing.assert_array_equal(np.sort(np.asarray(raw.ids)), np.unique(ids))


def test_embedding_duplicate_ids_sum_their_gradients():
    w = _t(np.zeros((6, 2)), requires_grad=True)
    F.embedding(shoal.Tensor([4, 1, 4, 4]), w).sum().backward()
    g = w.grad
    assert isinstance(g, shoal.SparseGrad) and g.rows.shape[0] == 2
    dense = g.numpy()
    np.testing.assert_array_equal(dense[4], [3, 3])
    np.testing.assert_array_equal(dense[1], [1, 1])
    assert np.count_nonzero(dense) == 4


@pytest.mark.parametrize("padding_idx", [3, -37])  # -37 % 40 == 3
def test_embedding_padding_idx(padding_idx):
    ids = np.array([[1, 3, 1], [7, 3, 0]])
    w = _rng(32).normal(size=(VOCAB, DIM))
    (out,), (g,), (raw,) = check_grad(lambda t: F.embedding(ids, t, padding_idx=padding_idx), w)
    want = w[ids]
    want[ids == 3] = 0.0
    np.testing.assert_array_equal(out.numpy(), want)
    assert isinstance(raw, shoal.SparseGrad)
    assert raw.rows.shape[0] == 3  # unique ids 0, 1, 7: the padding row is not sent
    np.testing.assert_array_equal(g[3], np.zeros(DIM))
    assert np.all(g[[0, 1, 7]] != 0)


def test_embedding_layer_gradient_is_sparse():
    layer = shoal.nn.Embedding(1000, 4)
    out = layer(shoal.Tensor([[3, 999], [3, 5]]))
    assert out.shape == (2, 2, 4)
    out.sum().backward()
    g = layer.weight.grad
    assert isinstance(g, shoal.SparseGrad)
    assert g.rows.shape == (3, 4)


# -- clone and cast ------------------------------------------------------------------------------------
def test_clone():
    x = _rng(33).normal(size=(2, 3))
    (out,), _, _ = check_grad(lambda t: t.clone() * t + shoal.clone(t), x)
    np.testing.assert_allclose(out.numpy(), x * x + x, rtol=1e-12)


def test_cast_float64_float32_float64_path():
    x = _t([[0.5, -1.25], [2.0, 3.5]], requires_grad=True)
    mid = x.astype("float32")
    assert mid.dtype == np.float32 and mid.requires_grad
    back = (mid * 3.0).cast("float64")
    assert back.dtype == np.float64
    np.testing.assert_array_equal(back.numpy(), x.numpy() * 3)
    (back * back).sum().backward()
    assert x.grad.dtype == np.float64
    np.testing.assert_allclose(x.grad.numpy(), 18 * x.numpy(), rtol=1e-6)


def test_cast_round_trip_finite_differences():
    # the float32 detour limits precision: a large step on a quadratic is still exact
    x = _rng(34).uniform(-2, 2, size=(2, 3))
    (out,), _, _ = check_grad(lambda t: shoal.cast(shoal.cast(t, "float32") ** 2, "float64"), x,
                              eps=1e-2, atol=1e-4, rtol=1e-4)
    assert out.dtype == np.float64


def test_cast_to_int_leaves_the_graph():
    x = _t([1.7, -2.2], requires_grad=True)
    y = x.astype("int64")
    assert y.dtype == np.int64 and not y.requires_grad
    np.testing.assert_array_equal(y.numpy(), [1, -2])


# -- setitem inside the graph --------------------------------------------------------------------------
@pytest.mark.parametrize("index,yshape", [(slice(1, 3), (2, 4)), (slice(1, 3), (1, 4)),
                                          ((slice(None), 2), (4,)), ((0, slice(1, 3)), ())],
                         ids=str)
def test_setitem_in_graph(index, yshape):
    rng = _rng(35)
    xs, ys = rng.normal(size=(4, 4)), rng.normal(size=yshape)

    def fn(x, y):
        x2 = x * 1.0
        x2[index] = y
        return x2 * x2

    (out,), _, _ = check_grad(fn, xs, ys)
    want = xs.copy()
    want[index] = ys
    np.testing.assert_allclose(out.numpy(), want * want, rtol=1e-12)


def test_setitem_gradients_to_both_sides():
    x = _t(np.ones((4, 2)), requires_grad=True)
    y = _t(np.full((2, 2), 5.0), requires_grad=True)
    x2 = x * 1.0
    x2[1:3] = y
    (x2 * _t(np.arange(8.0).reshape(4, 2))).sum().backward()
    np.testing.assert_array_equal(x.grad.numpy(), [[0, 1], [0, 0], [0, 0], [6, 7]])
    np.testing.assert_array_equal(y.grad.numpy(), [[2, 3], [4, 5]])


def test_setitem_with_scalar_value():
    xs = _rng(36).normal(size=(3, 3))

    def fn(x):
        x2 = x * 2.0
        x2[1] = 0.5
        return x2

    (out,), (g,), _ = check_grad(fn, xs)
    np.testing.assert_array_equal(g[1], np.zeros(3))
    assert out.numpy()[1].tolist() == [0.5] * 3


def test_setitem_does_not_change_the_gradient_of_earlier_uses():
    # z used x2 before the assignment: its forward and backward see the old values
    x = _t(np.ones(4), requires_grad=True)
    x2 = x * 1.0
    z = x2 * 3.0
    x2[1:3] = _t(np.zeros(2))
    np.testing.assert_array_equal(z.numpy(), [3, 3, 3, 3])
    z.sum().backward()
    np.testing.assert_array_equal(x.grad.numpy(), [3, 3, 3, 3])


# -- losses: cross entropy -------------------------------------------------------------------------------
def _np_ce_hard(logits, labels, ignore_index=-100):
    logp = _np_log_softmax(logits, -1)
    valid = labels != ignore_index
    safe = np.where(valid, labels, 0)
    return -np.take_along_axis(logp, safe[..., None], axis=-1)[..., 0] * valid, valid


def _np_reduce(loss, reduction, count=None):
    if reduction == "none":
        return loss
    if reduction == "sum":
        return loss.sum()
    return loss.sum() / (loss.size if count is None else max(count, 1))


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("label_shape", ["[N]", "[N,1]"])
def test_cross_entropy_hard_labels(label_shape, reduction):
    rng = _rng(37)
    logits = rng.normal(size=(5, 4)) * 2
    labels = np.array([0, 3, 1, 3, 2])
    lab = labels[:, None] if label_shape == "[N,1]" else labels
    (out,), _, _ = check_grad(lambda t: F.cross_entropy(t, shoal.Tensor(lab), reduction=reduction),
                              logits)
    loss, _ = _np_ce_hard(logits, labels)
    np.testing.assert_allclose(out.numpy(), _np_reduce(loss, reduction), rtol=1e-12)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("ignore_index", [-100, 2])
def test_cross_entropy_ignore_index(ignore_index, reduction):
    rng = _rng(38)
    logits = rng.normal(size=(6, 4))
    labels = np.array([0, ignore_index, 1, 3, ignore_index, 2 if ignore_index != 2 else 1])
    (out,), (g,), _ = check_grad(
        lambda t: F.cross_entropy(t, labels, reduction=reduction, ignore_index=ignore_index),
        logits)
    loss, valid = _np_ce_hard(logits, labels, ignore_index)
    assert valid.sum() == 4
    np.testing.assert_allclose(out.numpy(), _np_reduce(loss, reduction, int(valid.sum())),
                               rtol=1e-12)
    np.testing.assert_array_equal(g[~valid], 0.0)


def test_cross_entropy_all_ignored_is_zero():
    logits = _t(np.ones((2, 3)), requires_grad=True)
    loss = F.cross_entropy(logits, shoal.Tensor([-100, -100]))
    assert loss.item() == 0.0
    loss.backward()
    np.testing.assert_array_equal(logits.grad.numpy(), np.zeros((2, 3)))


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_cross_entropy_soft_labels(reduction):
    rng = _rng(39)
    logits = rng.normal(size=(3, 4))
    soft = rng.uniform(0.1, 1.0, size=(3, 4))
    soft /= soft.sum(axis=1, keepdims=True)
    (out,), _, _ = check_grad(
        lambda t, y: F.cross_entropy(t, y, soft_label=True, reduction=reduction), logits, soft)
    loss = -(soft * _np_log_softmax(logits, -1)).sum(-1)
    np.testing.assert_allclose(out.numpy(), _np_reduce(loss, reduction), rtol=1e-12)


def test_cross_entropy_soft_labels_not_normalized():
    # labels that do not sum to one still get the exact gradient of -sum(y * log_softmax(x))
    rng = _rng(40)
    logits, soft = rng.normal(size=(2, 3)), rng.uniform(0, 2, size=(2, 3))
    check_grad(lambda t: F.cross_entropy(t, shoal.Tensor(soft, dtype="float64"), soft_label=True),
               logits)


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_cross_entropy_hard_labels_axis_1(reduction):
    rng = _rng(41)
    logits = rng.normal(size=(2, 4, 3))           # classes on axis 1
    labels = np.array([[0, 3, 1], [2, 2, 0]])     # [N, L]
    (out,), _, _ = check_grad(
        lambda t: F.cross_entropy(t, labels, axis=1, reduction=reduction), logits)
    loss, _ = _np_ce_hard(np.moveaxis(logits, 1, -1), labels)
    np.testing.assert_allclose(out.numpy(), _np_reduce(loss, reduction), rtol=1e-12)


def test_cross_entropy_axis_0_two_dim():
    rng = _rng(42)
    logits = rng.normal(size=(4, 3))              # [C, N]
    labels = np.array([3, 0, 1])
    (out,), _, _ = check_grad(lambda t: F.cross_entropy(t, labels, axis=0), logits)
    loss, _ = _np_ce_hard(logits.T, labels)
    np.testing.assert_allclose(out.numpy(), loss.mean(), rtol=1e-12)


def test_cross_entropy_soft_labels_axis_1():
    rng = _rng(43)
    logits = rng.normal(size=(2, 4, 3))
    soft = rng.uniform(0.1, 1.0, size=(2, 4, 3))
    soft /= soft.sum(axis=1, keepdims=True)
    (out,), _, _ = check_grad(
        lambda t, y: F.cross_entropy(t, y, soft_label=True, axis=1, reduction="sum"), logits, soft)
    loss = -(soft * _np_log_softmax(logits, 1)).sum(1)
    np.testing.assert_allclose(out.numpy(), loss.sum(), rtol=1e-12)


def test_cross_entropy_stable_for_large_logits():
    logits = _t([[1000.0, 0.0, -1000.0]], requires_grad=True)
    loss = F.cross_entropy(logits, shoal.Tensor([1]))
    np.testing.assert_allclose(loss.item(), 1000.0)
    loss.backward()
    np.testing.assert_allclose(logits.grad.numpy(), [[1.0, -1.0, 0.0]], atol=1e-12)


# -- losses: binary cross entropy with logits ---------------------------------------------------------
def _np_bce(x, y, weight=None, pos_weight=None):
    log_sig = -np.logaddexp(0.0, -x)
    log_one_minus = -np.logaddexp(0.0, x)
    pw = 1.0 if pos_weight is None else pos_weight
    loss = -(pw * y * log_sig + (1 - y) * log_one_minus)
    return loss if weight is None else loss * weight


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("weighting", ["none", "weight", "pos_weight", "both", "full weight"])
def test_bce_with_logits(weighting, reduction):
    rng = _rng(44)
    x = rng.normal(size=(3, 4)) * 3
    y = rng.integers(0, 2, size=(3, 4)).astype(np.float64)
    y[0, :2] = [0.25, 0.8]  # soft targets are allowed
    w = rng.uniform(0.5, 2.0, size=(4,)) if weighting in ("weight", "both") else None
    if weighting == "full weight":
        w = rng.uniform(0.5, 2.0, size=(3, 4))
    pw = rng.uniform(0.5, 3.0, size=(4,)) if weighting in ("pos_weight", "both") else None
    kwargs = {"reduction": reduction}
    if w is not None:
        kwargs["weight"] = shoal.Tensor(w, dtype="float64")
    if pw is not None:
        kwargs["pos_weight"] = shoal.Tensor(pw, dtype="float64")
    (out,), _, _ = check_grad(
        lambda t: F.binary_cross_entropy_with_logits(t, shoal.Tensor(y, dtype="float64"),
                                                     **kwargs), x)
    np.testing.assert_allclose(out.numpy(), _np_reduce(_np_bce(x, y, w, pw), reduction),
                               rtol=1e-12)


def test_bce_with_logits_is_stable_for_large_logits():
    x = _t([[-500.0, 500.0, 40.0]], requires_grad=True)
    loss = F.binary_cross_entropy_with_logits(x, _t([[1.0, 0.0, 1.0]]), reduction="none")
    np.testing.assert_allclose(loss.numpy(), [[500.0, 500.0, np.log1p(np.exp(-40.0))]])
    loss.sum().backward()
    np.testing.assert_allclose(x.grad.numpy(), [[-1.0, 1.0, -_np_sigmoid(-40.0)]], atol=1e-15)


def test_bce_with_integer_labels():
    x = _rng(45).normal(size=(2, 3))
    y = np.array([[1, 0, 1], [0, 0, 1]])
    (out,), _, _ = check_grad(lambda t: F.binary_cross_entropy_with_logits(t, shoal.Tensor(y)), x)
    np.testing.assert_allclose(out.numpy(), _np_bce(x, y).mean(), rtol=1e-12)


# -- losses: mean squared error ----------------------------------------------------------------------------
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("shape", [(5,), (2, 3)], ids=str)
def test_mse_loss(shape, reduction):
    rng = _rng(46)
    a, b = rng.normal(size=shape), rng.normal(size=shape)
    (out,), _, _ = check_grad(lambda x, y: F.mse_loss(x, y, reduction=reduction), a, b)
    np.testing.assert_allclose(out.numpy(), _np_reduce((a - b) ** 2, reduction), rtol=1e-12)


# -- the checker itself -------------------------------------------------------------------------------------
class _WrongTranspose(shoal.Function):
    """x.T whose backward forgets to transpose back (square inputs keep the shapes right)."""

    def forward(self, x):
        return x.T.copy()

    def backward(self, g):
        return g


class _WrongScale(shoal.Function):
    def forward(self, x):
        return x * 2.0

    def backward(self, g):
        return g * 2.0001


@pytest.mark.parametrize("fn", [_WrongTranspose, _WrongScale], ids=lambda f: f.__name__)
def test_check_grad_catches_a_wrong_backward(fn):
    x = _rng(47).normal(size=(3, 3))
    with pytest.raises(AssertionError, match="gradient of input 0"):
        check_grad(lambda t: fn.apply(t), x)

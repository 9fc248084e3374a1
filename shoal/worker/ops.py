"""Differentiable tensor math: elementwise, reductions, shapes, indexing, matmul.

Ops that share a structure share one Function driven by a table (unary and
binary elementwise ops); the rest are a few lines each.
"""
from __future__ import annotations

import builtins

import numpy as np

from shoal.kernels import backend_of
from shoal.worker.amp._autocast import amp_inputs
from shoal.worker.autograd import Function
from shoal.worker.errors import DTypeError, IndexRangeError, ShapeError
from shoal.worker.tensor import Tensor, get_default_dtype


# -- helpers -----------------------------------------------------------------
def _xp(a):
    return backend_of(a).xp


def lift(x, like: Tensor | None = None) -> Tensor:
    """`x` as a Tensor; a Python number takes the dtype of `like` (weak scalar promotion)."""
    if isinstance(x, Tensor):
        return x
    if isinstance(x, (bool, int, float)) and like is not None:
        dt = like.dtype
        if isinstance(x, float) and dt.kind != "f":
            dt = get_default_dtype()
        return Tensor._make(backend_of(like.data).xp.asarray(x, dtype=dt))
    if like is None:
        return Tensor(x)
    kind = getattr(getattr(x, "dtype", None), "kind", None)
    dtype = like.dtype if kind == "f" and like.dtype.kind == "f" else None
    return Tensor(x, dtype=dtype, backend=like.backend.name)


def _pair(op: str, a, b) -> tuple[Tensor, Tensor]:
    a = lift(a, b if isinstance(b, Tensor) else None)
    a, b = amp_inputs(op, a, lift(b, a))   # auto_cast: matmul in float16, mixed dtypes promoted
    if a.dtype != b.dtype:
        if a.dtype.kind != "f" and b.dtype.kind == "f" and _is_constant_scalar(b):
            a = cast(a, b.dtype)  # int tensor with a Python float: the float dtype wins
        elif b.dtype.kind != "f" and a.dtype.kind == "f" and _is_constant_scalar(a):
            b = cast(b, a.dtype)
        elif _is_constant_scalar(a):
            a = Tensor._make(a.data.astype(b.dtype))
        elif _is_constant_scalar(b):
            b = Tensor._make(b.data.astype(a.dtype))
        else:
            raise DTypeError(f"{op}: operands have dtypes {a.dtype} and {b.dtype} (shapes "
                             f"{a.shape} and {b.shape}); cast one with .astype('{a.dtype}')")
    return a, b


def _is_constant_scalar(t: Tensor) -> bool:
    return t.ndim == 0 and t._ctx is None and not t.requires_grad


def unbroadcast(g, shape: tuple[int, ...]):
    """Sum `g` down to `shape`, undoing numpy broadcasting."""
    if g.shape == shape:
        return g
    extra = g.ndim - len(shape)
    axes = tuple(range(extra)) + tuple(
        i + extra for i, s in enumerate(shape) if s == 1 and g.shape[i + extra] != 1)
    return g.sum(axis=axes, keepdims=True).reshape(shape)


def raw_index(index):
    """A numpy/cupy index with every Tensor inside replaced by its array."""
    if isinstance(index, Tensor):
        return index.data
    if isinstance(index, tuple):
        return tuple(raw_index(i) for i in index)
    if isinstance(index, list):
        return np.asarray(index)
    return index


def _has_int_array(index) -> bool:
    parts = index if isinstance(index, tuple) else (index,)
    return any(hasattr(p, "dtype") and p.dtype.kind in "iu" for p in parts)


def _norm_axis(axis, ndim: int):
    if axis is None:
        return None
    axes = (axis,) if isinstance(axis, int) else tuple(axis)
    out = []
    for a in axes:
        if not -ndim <= a < builtins.max(ndim, 1):
            raise ShapeError(f"axis {a} is out of range for a tensor of {ndim} dimensions")
        out.append(a % builtins.max(ndim, 1))
    return tuple(out)


def stable_sigmoid(xp, x):
    """1 / (1 + exp(-x)) without overflow, and without flushing tiny values to 0."""
    e = xp.exp(-xp.abs(x))
    return xp.where(x >= 0, 1 / (1 + e), e / (1 + e))


# -- elementwise ---------------------------------------------------------------
_UNARY = {
    # name: (forward(xp, x), backward(xp, x, y, g))
    "neg": (lambda xp, x: -x, lambda xp, x, y, g: -g),
    "exp": (lambda xp, x: xp.exp(x), lambda xp, x, y, g: g * y),
    "log": (lambda xp, x: xp.log(x), lambda xp, x, y, g: g / x),
    "sqrt": (lambda xp, x: xp.sqrt(x), lambda xp, x, y, g: g * 0.5 / y),
    "abs": (lambda xp, x: xp.abs(x), lambda xp, x, y, g: g * xp.sign(x)),
    "tanh": (lambda xp, x: xp.tanh(x), lambda xp, x, y, g: g * (1 - y * y)),
    # 0.5 (1 + tanh(x/2)) is sigmoid without overflow for large |x|
    "sigmoid": (lambda xp, x: stable_sigmoid(xp, x), lambda xp, x, y, g: g * y * (1 - y)),
    "relu": (lambda xp, x: xp.maximum(x, 0), lambda xp, x, y, g: g * (x > 0)),
}


class Unary(Function):
    def forward(self, x, *, op):
        self.fns = _UNARY[op]
        self.x = x
        self.y = self.fns[0](_xp(x), x)
        return self.y

    def backward(self, g):
        return self.fns[1](_xp(g), self.x, self.y, g)


_BINARY = {
    # name: (forward(a, b), grad wrt a, grad wrt b); grads get (xp, a, b, out, g)
    "add": (lambda a, b: a + b, lambda xp, a, b, y, g: g, lambda xp, a, b, y, g: g),
    "sub": (lambda a, b: a - b, lambda xp, a, b, y, g: g, lambda xp, a, b, y, g: -g),
    "mul": (lambda a, b: a * b, lambda xp, a, b, y, g: g * b, lambda xp, a, b, y, g: g * a),
    "div": (lambda a, b: a / b, lambda xp, a, b, y, g: g / b, lambda xp, a, b, y, g: -g * y / b),
    "pow": (lambda a, b: a ** b, lambda xp, a, b, y, g: g * b * a ** (b - 1),
            lambda xp, a, b, y, g: g * y * xp.log(a)),
    "maximum": (lambda a, b: _xp(a).maximum(a, b), lambda xp, a, b, y, g: g * (a >= b),
                lambda xp, a, b, y, g: g * (a < b)),
    "minimum": (lambda a, b: _xp(a).minimum(a, b), lambda xp, a, b, y, g: g * (a <= b),
                lambda xp, a, b, y, g: g * (a > b)),
}


class Binary(Function):
    def forward(self, a, b, *, op):
        self.fns = _BINARY[op]
        self.a, self.b = a, b
        self.y = self.fns[0](a, b)
        return self.y

    def backward(self, g):
        xp = _xp(g)
        ga = gb = None
        if self.needs_grad[0]:
            ga = unbroadcast(self.fns[1](xp, self.a, self.b, self.y, g), self.a.shape)
        if self.needs_grad[1]:
            gb = unbroadcast(self.fns[2](xp, self.a, self.b, self.y, g), self.b.shape)
        return ga, gb


def _unary(op):
    def fn(x: Tensor) -> Tensor:
        return Unary.apply(lift(x), op=op)
    fn.__name__ = op
    fn.__doc__ = f"Elementwise {op}."
    return fn


def _binary(op):
    def fn(a, b) -> Tensor:
        a, b = _pair(op, a, b)
        try:
            return Binary.apply(a, b, op=op)
        except ValueError as e:
            if "broadcast" not in str(e):
                raise
            raise ShapeError(f"{op}: shapes {a.shape} and {b.shape} do not broadcast together "
                             f"(trailing axes must be equal or 1); reshape one operand") from None
    fn.__name__ = op
    fn.__doc__ = f"Elementwise {op} with numpy broadcasting."
    return fn


neg, exp, log, sqrt, abs, tanh, sigmoid, relu = (
    _unary(n) for n in ("neg", "exp", "log", "sqrt", "abs", "tanh", "sigmoid", "relu"))
add, sub, mul, div, pow, maximum, minimum = (
    _binary(n) for n in ("add", "sub", "mul", "div", "pow", "maximum", "minimum"))


def compare(op: str, a, b) -> Tensor:
    """Elementwise comparison (`less`, `equal`, ...): a bool tensor outside the graph."""
    a, b = _pair(op, a, b)
    return Tensor._make(getattr(_xp(a.data), op)(a.data, b.data))


class Cast(Function):
    def forward(self, x, *, dtype):
        self.src = x.dtype
        return x.astype(dtype)

    def backward(self, g):
        return g.astype(self.src)


def cast(x: Tensor, dtype) -> Tensor:
    """`x` in `dtype`; gradients flow through float-to-float casts only."""
    dtype = np.dtype(dtype)
    if dtype.kind != "f" or x.dtype.kind != "f":
        return Tensor._make(x.data.astype(dtype))
    return Cast.apply(x, dtype=dtype)


class Clone(Function):
    def forward(self, x):
        return x.copy()

    def backward(self, g):
        return g


def clone(x: Tensor) -> Tensor:
    return Clone.apply(x)


# -- reductions ----------------------------------------------------------------
class Reduce(Function):
    def forward(self, x, *, axis, keepdim, mean):
        self.shape, self.axis, self.keepdim = x.shape, axis, keepdim
        n = x.size if axis is None else int(np.prod([x.shape[a] for a in axis]))
        self.scale = 1.0 / builtins.max(n, 1) if mean else None
        out = x.sum(axis=axis, keepdims=keepdim)
        return out * self.scale if mean else out

    def backward(self, g):
        if not self.keepdim and self.axis is not None:
            g = _xp(g).expand_dims(g, self.axis)
        if self.scale is not None:
            g = g * self.scale
        return _xp(g).broadcast_to(g, self.shape).copy()


def sum(x: Tensor, axis=None, keepdim: bool = False) -> Tensor:
    """Sum over `axis` (int, tuple or None for all)."""
    x, = amp_inputs("sum", x)
    return Reduce.apply(x, axis=_norm_axis(axis, x.ndim), keepdim=keepdim, mean=False)


def mean(x: Tensor, axis=None, keepdim: bool = False) -> Tensor:
    """Mean over `axis` (int, tuple or None for all)."""
    x, = amp_inputs("mean", x)
    return Reduce.apply(x, axis=_norm_axis(axis, x.ndim), keepdim=keepdim, mean=True)


class Max(Function):
    def forward(self, x, *, axis, keepdim):
        xp = _xp(x)
        m = x.max(axis=axis, keepdims=True)
        self.mask = (x == m).astype(x.dtype)
        self.mask /= self.mask.sum(axis=axis, keepdims=True)  # ties share the gradient
        self.axis, self.keepdim = axis, keepdim
        return m if keepdim else (m.reshape(()) if axis is None else xp.squeeze(m, axis=axis))

    def backward(self, g):
        if not self.keepdim:
            g = g.reshape((1,) * self.mask.ndim) if self.axis is None else \
                _xp(g).expand_dims(g, self.axis)
        return g * self.mask


def max(x: Tensor, axis=None, keepdim: bool = False) -> Tensor:
    """Maximum over `axis`; tied maxima share the gradient equally."""
    if x.size == 0:
        raise ShapeError(f"max() of an empty tensor of shape {x.shape}")
    return Max.apply(x, axis=_norm_axis(axis, x.ndim), keepdim=keepdim)


# -- shapes ------------------------------------------------------------------------
class Reshape(Function):
    def forward(self, x, *, shape):
        self.shape = x.shape
        return x.reshape(shape)

    def backward(self, g):
        return g.reshape(self.shape)


def reshape(x: Tensor, shape) -> Tensor:
    """`x` with a new shape of the same size (one entry may be -1)."""
    shape = tuple(int(s) for s in shape)
    known = int(np.prod([s for s in shape if s != -1]))
    if shape.count(-1) > 1 or (-1 not in shape and known != x.size) or \
            (-1 in shape and (known == 0 or x.size % known)):
        raise ShapeError(f"cannot reshape a tensor of shape {x.shape} ({x.size} elements) "
                         f"into {shape}")
    return Reshape.apply(x, shape=shape)


def flatten(x: Tensor, start_axis: int = 0, stop_axis: int = -1) -> Tensor:
    s, e = start_axis % builtins.max(x.ndim, 1), stop_axis % builtins.max(x.ndim, 1)
    return reshape(x, x.shape[:s] + (-1,) + x.shape[e + 1:])


def unsqueeze(x: Tensor, axis: int) -> Tensor:
    axis = axis % (x.ndim + 1)
    return reshape(x, x.shape[:axis] + (1,) + x.shape[axis:])


def squeeze(x: Tensor, axis=None) -> Tensor:
    axes = range(x.ndim) if axis is None else _norm_axis(axis, x.ndim)
    drop = {a for a in axes if x.shape[a] == 1}
    return reshape(x, tuple(s for i, s in enumerate(x.shape) if i not in drop))


class Transpose(Function):
    def forward(self, x, *, perm):
        self.inverse = tuple(np.argsort(perm))
        return x.transpose(perm)

    def backward(self, g):
        return g.transpose(self.inverse)


def transpose(x: Tensor, perm) -> Tensor:
    """Permute the axes of `x` (Paddle's `transpose(x, perm)`)."""
    given = tuple(int(p) for p in perm)
    perm = tuple(p % builtins.max(x.ndim, 1) if -x.ndim <= p < x.ndim else p for p in given)
    if sorted(perm) != list(range(x.ndim)):
        raise ShapeError(f"transpose: perm {given} is not a permutation of the {x.ndim} axes "
                         f"of a tensor of shape {x.shape}")
    return Transpose.apply(x, perm=perm)


class Concat(Function):
    def forward(self, *xs, axis):
        self.axis = axis
        self.cuts = np.cumsum([x.shape[axis] for x in xs])[:-1]
        return _xp(xs[0]).concatenate(xs, axis=axis)

    def backward(self, g):
        return tuple(_xp(g).split(g, self.cuts, axis=self.axis))


def _check_joinable(op: str, xs, axis: int, same_shape: bool):
    if not xs:
        raise ShapeError(f"{op} of an empty list of tensors")
    xs = [lift(x) for x in xs]
    ref = xs[0]
    for i, x in enumerate(xs):
        if x.dtype != ref.dtype:
            raise DTypeError(f"{op}: tensor {i} has dtype {x.dtype}, tensor 0 has {ref.dtype}")
        other = x.shape if same_shape else x.shape[:axis] + x.shape[axis + 1:]
        want = ref.shape if same_shape else ref.shape[:axis] + ref.shape[axis + 1:]
        if x.ndim != ref.ndim or other != want:
            raise ShapeError(f"{op} along axis {axis}: tensor {i} has shape {x.shape}, "
                             f"tensor 0 has {ref.shape}")
    return xs


def concat(xs, axis: int = 0) -> Tensor:
    """Join tensors along an existing axis."""
    axis = _norm_axis(axis, lift(xs[0]).ndim)[0] if xs else axis
    return Concat.apply(*_check_joinable("concat", xs, axis, False), axis=axis)


class Stack(Function):
    def forward(self, *xs, axis):
        self.axis = axis
        return _xp(xs[0]).stack(xs, axis=axis)

    def backward(self, g):
        xp = _xp(g)
        return tuple(xp.take(g, i, axis=self.axis) for i in range(g.shape[self.axis]))


def stack(xs, axis: int = 0) -> Tensor:
    """Join same-shaped tensors along a new axis."""
    xs = _check_joinable("stack", xs, 0, True)
    return Stack.apply(*xs, axis=axis % (xs[0].ndim + 1))


def split(x: Tensor, num_or_sections, axis: int = 0) -> list[Tensor]:
    """Split `x` into equal parts (an int) or parts of the given sizes (a list)."""
    axis = _norm_axis(axis, x.ndim)[0]
    n = x.shape[axis]
    if isinstance(num_or_sections, int):
        if num_or_sections <= 0 or n % num_or_sections:
            raise ShapeError(f"split: axis {axis} of size {n} does not divide into "
                             f"{num_or_sections} equal parts")
        sizes = [n // num_or_sections] * num_or_sections
    else:
        sizes = list(num_or_sections)
        if builtins.sum(sizes) != n or any(s < 0 for s in sizes):
            raise ShapeError(f"split: sections {sizes} do not add up to size {n} of axis {axis}")
    out, start = [], 0
    for s in sizes:
        index = (slice(None),) * axis + (slice(start, start + s),)
        out.append(getitem(x, index))
        start += s
    return out


# -- indexing ------------------------------------------------------------------------
class GetItem(Function):
    def forward(self, x, *, index):
        self.shape, self.dtype, self.index = x.shape, x.dtype, index
        return x[index]

    def backward(self, g):
        be = backend_of(g)
        out = be.xp.zeros(self.shape, dtype=self.dtype)
        if _has_int_array(self.index):
            be.index_add_(out, self.index, g)  # repeated indices add up
        else:
            out[self.index] = g
        return out


def getitem(x: Tensor, index) -> Tensor:
    """numpy indexing: ints, slices, None, Ellipsis, bool masks and int arrays."""
    index = raw_index(index)
    try:
        return GetItem.apply(x, index=index)
    except IndexError as e:
        raise ShapeError(f"index {index!r} does not fit a tensor of shape {x.shape}: {e}") from e


class SetItem(Function):
    def forward(self, x, value, *, index):
        self.index, self.vshape = index, value.shape
        out = x.copy()  # the old array may be saved by earlier nodes: never write into it
        out[index] = value
        return out

    def backward(self, g):
        gx = gv = None
        if self.needs_grad[0]:
            gx = g.copy()
            gx[self.index] = 0
        if self.needs_grad[1]:
            gv = unbroadcast(g[self.index], self.vshape)
        return gx, gv


def setitem(x: Tensor, index, value) -> Tensor:
    """A new tensor equal to `x` with ``[index] = value`` (used by ``Tensor.__setitem__``)."""
    value = lift(value, x)
    if value.dtype != x.dtype:
        raise DTypeError(f"assigning a {value.dtype} value into a {x.dtype} tensor; "
                         f"cast it with .astype('{x.dtype}')")
    index = raw_index(index)
    try:
        return SetItem.apply(x, value, index=index)
    except (IndexError, ValueError) as e:
        raise ShapeError(f"cannot assign a value of shape {value.shape} to index {index!r} "
                         f"of a tensor of shape {x.shape}: {e}") from e


class Gather(Function):
    def forward(self, x, *, index, axis):
        self.shape, self.dtype, self.index, self.axis = x.shape, x.dtype, index, axis
        return _xp(x).take(x, index, axis=axis)

    def backward(self, g):
        be = backend_of(g)
        xp = be.xp
        out = xp.zeros(self.shape, dtype=self.dtype)
        be.scatter_add_rows(xp.moveaxis(out, self.axis, 0), self.index,
                            xp.moveaxis(g, self.axis, 0))
        return out


def gather(x: Tensor, index, axis: int = 0) -> Tensor:
    """Select entries of `x` along `axis` by a 1-D integer index (Paddle's `gather`)."""
    axis = _norm_axis(axis, x.ndim)[0]
    idx = lift(index).data
    if idx.ndim != 1 or idx.dtype.kind not in "iu":
        raise ShapeError(f"gather: index must be a 1-D integer array, got shape "
                         f"{tuple(idx.shape)} dtype {idx.dtype}")
    if idx.size and (int(idx.min()) < -x.shape[axis] or int(idx.max()) >= x.shape[axis]):
        raise IndexRangeError(f"gather: index values span [{int(idx.min())}, {int(idx.max())}] but "
                         f"axis {axis} of the tensor of shape {x.shape} has {x.shape[axis]} entries")
    return Gather.apply(x, index=idx % x.shape[axis], axis=axis)


# -- matmul ----------------------------------------------------------------------------
class MatMul(Function):
    def forward(self, a, b):
        self.a, self.b = a, b
        return a @ b

    def backward(self, g):
        xp = _xp(g)
        a, b = self.a, self.b
        if b.ndim == 1:
            b, g = b[:, None], g[..., None]
        if a.ndim == 1:
            a, g = a[None, :], xp.expand_dims(g, -2)
        ga = gb = None
        if self.needs_grad[0]:
            ga = unbroadcast(g @ xp.swapaxes(b, -1, -2), a.shape).reshape(self.a.shape)
        if self.needs_grad[1]:
            gb = unbroadcast(xp.swapaxes(a, -1, -2) @ g, b.shape).reshape(self.b.shape)
        return ga, gb


def matmul(a, b, transpose_x: bool = False, transpose_y: bool = False) -> Tensor:
    """Matrix product with numpy's broadcasting of batch dimensions."""
    a, b = _pair("matmul", a, b)
    if transpose_x:
        a = transpose(a, tuple(range(a.ndim - 2)) + (a.ndim - 1, a.ndim - 2))
    if transpose_y:
        b = transpose(b, tuple(range(b.ndim - 2)) + (b.ndim - 1, b.ndim - 2))
    if a.ndim == 0 or b.ndim == 0 or a.shape[-1] != b.shape[-2 if b.ndim > 1 else 0]:
        raise ShapeError(f"matmul: shapes {a.shape} and {b.shape} do not fit "
                         f"(the last axis of x must equal the second-to-last of y)")
    return MatMul.apply(a, b)


_METHODS = dict(
    sum=sum, mean=mean, max=max, reshape=reshape, transpose=transpose, flatten=flatten,
    unsqueeze=unsqueeze, squeeze=squeeze, matmul=matmul, exp=exp, log=log, sqrt=sqrt,
    abs=abs, tanh=tanh, sigmoid=sigmoid, relu=relu, gather=gather, split=split,
    __abs__=abs,
)
for _name, _fn in _METHODS.items():
    setattr(Tensor, _name, _fn)

"""`Tensor`: an n-d array of a numpy or cupy backend with autograd."""
from __future__ import annotations

import copy as _copy

import numpy as np

from shoal.kernels import backend_of, default_backend, get_backend
from shoal.worker import autograd
from shoal.worker.errors import DTypeError, GradError, ShapeError
from shoal.worker.sparse import SparseGrad

_default_float = np.dtype("float32")


def set_default_dtype(dtype) -> None:
    """The dtype that Python floats and float arrays become (float32 unless changed)."""
    global _default_float
    d = np.dtype(dtype)
    if d.kind != "f":
        raise DTypeError(f"set_default_dtype({dtype!r}): the default must be a float dtype "
                         f"such as 'float32' or 'float64'")
    _default_float = d


def get_default_dtype() -> np.dtype:
    return _default_float


def _convert(data, dtype, backend):
    """`data` as a new array of `backend`, floats in the default dtype unless `dtype` says."""
    if isinstance(data, Tensor):
        data = data.data
    src = backend_of(data)
    if isinstance(data, src.array_types()):
        be = get_backend(backend) if backend is not None else src
        if src is not be:
            data = src.to_numpy(data)
    else:
        be = get_backend(backend) if backend is not None else default_backend()
        data = np.asarray(data)
    if data.dtype.kind not in "biuf":
        raise DTypeError(f"cannot make a Tensor from data of dtype {data.dtype}; "
                         f"give numbers or numeric arrays")
    if dtype is None and data.dtype.kind == "f":
        dtype = _default_float
    return be.xp.array(data, dtype=dtype, copy=True)


class Tensor:
    """An array with an optional gradient.

    Args:
        data: a number, nested list, numpy/cupy array or Tensor (copied).
        dtype: the dtype; floats default to `get_default_dtype()` (float32),
            so numpy's float64 never leaks in by accident.
        requires_grad: record ops on this tensor and give it a `.grad`.
        backend: 'numpy' or 'cupy'; the default backend when None.

    Gradients accumulate across `backward()` calls until cleared
    (`optimizer.clear_grad()` or `tensor.clear_grad()`).
    """

    __slots__ = ("data", "requires_grad", "_grad", "_ctx", "name", "__weakref__")
    __array_priority__ = 1000  # numpy scalars and arrays defer to Tensor's operators

    def __init__(self, data, dtype=None, requires_grad: bool = False, backend: str | None = None):
        self.data = _convert(data, dtype, backend)
        if requires_grad and self.data.dtype.kind != "f":
            raise DTypeError(f"only float tensors can require grad, got {self.data.dtype}; "
                             f"pass dtype='float32'")
        self.requires_grad = bool(requires_grad)
        self._grad = None
        self._ctx = None
        self.name = None

    @classmethod
    def _make(cls, data, requires_grad=False, ctx=None):
        t = Tensor.__new__(Tensor)
        t.data, t.requires_grad, t._ctx, t._grad, t.name = data, requires_grad, ctx, None, None
        return t

    # -- array facts ---------------------------------------------------------
    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.data.shape)

    @property
    def dtype(self):
        return self.data.dtype

    @property
    def ndim(self) -> int:
        return self.data.ndim

    @property
    def size(self) -> int:
        return int(self.data.size)

    @property
    def backend(self):
        return backend_of(self.data)

    @property
    def is_leaf(self) -> bool:
        return self._ctx is None

    @property
    def stop_gradient(self) -> bool:
        """Paddle's spelling of ``not requires_grad``."""
        return not self.requires_grad

    @stop_gradient.setter
    def stop_gradient(self, value: bool) -> None:
        self.requires_grad = not value

    def __len__(self) -> int:
        if self.data.ndim == 0:
            raise TypeError("len() of a 0-d tensor")
        return self.data.shape[0]

    def numpy(self) -> np.ndarray:
        """The values as a numpy array (a host copy for device tensors)."""
        return backend_of(self.data).to_numpy(self.data)

    def __array__(self, dtype=None, copy=None):
        a = self.numpy()
        return a.astype(dtype) if dtype is not None else a

    def item(self):
        if self.data.size != 1:
            raise ShapeError(f"item() needs a tensor of one element, got shape {self.shape}")
        return self.data.reshape(-1)[0].item()

    def tolist(self):
        return self.numpy().tolist()

    def __float__(self):
        return float(self.item())

    def __int__(self):
        return int(self.item())

    def __bool__(self):
        return bool(self.item())

    def __repr__(self) -> str:
        body = np.array2string(self.numpy(), separator=", ", prefix="       ")
        grad = ", requires_grad=True" if self.requires_grad else ""
        name = f", name={self.name}" if self.name else ""
        return f"Tensor(shape={list(self.shape)}, dtype={self.dtype}{grad}{name},\n       {body})"

    __hash__ = object.__hash__

    # -- gradients -----------------------------------------------------------
    @property
    def grad(self):
        """The accumulated gradient: a Tensor, a SparseGrad (embedding tables) or None."""
        g = self._grad
        if g is None or isinstance(g, SparseGrad):
            return g
        return Tensor._make(g)

    @grad.setter
    def grad(self, value) -> None:
        if value is None:
            self._grad = None
            return
        g = value if isinstance(value, SparseGrad) else _convert(value, self.dtype, None)
        if tuple(g.shape) != self.shape:
            raise ShapeError(f"grad of shape {tuple(g.shape)} assigned to tensor "
                             f"{self.name or ''} of shape {self.shape}")
        self._grad = g

    def clear_grad(self) -> None:
        self._grad = None

    def _accumulate_grad(self, g) -> None:
        self._grad = autograd.accumulate(self._grad, g)

    def backward(self, grad=None, retain_graph: bool = False) -> None:
        """Accumulate d(self)/d(leaf) into `.grad` of every leaf that requires grad.

        `grad` may be omitted only for a one-element tensor (a loss). The graph
        is freed afterwards unless `retain_graph` is True.
        """
        if not self.requires_grad:
            raise GradError("backward() on a tensor that does not require grad: none of its "
                            "inputs has requires_grad=True (or it was computed under no_grad)")
        if grad is None:
            if self.data.size != 1:
                raise GradError(
                    f"backward() without a gradient needs a one-element tensor (a loss), got "
                    f"shape {self.shape}; reduce it (e.g. .sum() or .mean()) or pass "
                    f"grad= of shape {self.shape}")
            g = self.backend.xp.ones(self.data.shape, dtype=self.dtype)
        else:
            g = _convert(grad, self.dtype, None)
            if tuple(g.shape) != self.shape:
                raise ShapeError(f"backward(grad=...): grad shape {tuple(g.shape)} != "
                                 f"tensor shape {self.shape}")
        autograd.run_backward(self, g, retain_graph)

    def register_post_accumulate_grad_hook(self, hook) -> autograd.HookHandle:
        """Call `hook(self)` after each backward pass has accumulated this leaf's `.grad`."""
        return autograd.register_post_accumulate_grad_hook(self, hook)

    def detach(self) -> Tensor:
        """The same data, cut from the graph."""
        return Tensor._make(self.data)

    def clone(self) -> Tensor:
        """A copy of the data that stays in the graph."""
        return _ops.clone(self)

    def __deepcopy__(self, memo):
        t = type(self).__new__(type(self))
        memo[id(self)] = t
        for cls in type(self).__mro__:
            for slot in getattr(cls, "__slots__", ()):
                if slot == "__weakref__" or not hasattr(self, slot):
                    continue
                setattr(t, slot, _copy.deepcopy(getattr(self, slot), memo))
        t._ctx = None
        t._grad = None if self._grad is None else _copy.deepcopy(self._grad, memo)
        return t

    # -- in place ------------------------------------------------------------
    def __setitem__(self, index, value) -> None:
        """``t[index] = value``. Recorded in the graph when grad mode is on."""
        if not autograd.is_grad_enabled():
            self.data[_ops.raw_index(index)] = value.data if isinstance(value, Tensor) else value
            return
        if self.requires_grad and self._ctx is None:
            raise GradError(
                f"in-place assignment to leaf tensor {self.name or ''} of shape {self.shape} "
                f"that requires grad; do it under shoal.no_grad() or on a .clone()")
        old = Tensor._make(self.data, self.requires_grad, self._ctx)
        new = _ops.setitem(old, index, value)
        self.data, self.requires_grad, self._ctx = new.data, new.requires_grad, new._ctx

    def astype(self, dtype) -> Tensor:
        return _ops.cast(self, dtype)

    cast = astype

    # -- operators -----------------------------------------------------------
    def __add__(self, o): return _ops.add(self, o)
    def __radd__(self, o): return _ops.add(o, self)
    def __sub__(self, o): return _ops.sub(self, o)
    def __rsub__(self, o): return _ops.sub(o, self)
    def __mul__(self, o): return _ops.mul(self, o)
    def __rmul__(self, o): return _ops.mul(o, self)
    def __truediv__(self, o): return _ops.div(self, o)
    def __rtruediv__(self, o): return _ops.div(o, self)
    def __pow__(self, o): return _ops.pow(self, o)
    def __rpow__(self, o): return _ops.pow(o, self)
    def __matmul__(self, o): return _ops.matmul(self, o)
    def __rmatmul__(self, o): return _ops.matmul(o, self)
    def __neg__(self): return _ops.neg(self)
    def __getitem__(self, index): return _ops.getitem(self, index)
    def __lt__(self, o): return _ops.compare("less", self, o)
    def __le__(self, o): return _ops.compare("less_equal", self, o)
    def __gt__(self, o): return _ops.compare("greater", self, o)
    def __ge__(self, o): return _ops.compare("greater_equal", self, o)
    def __eq__(self, o): return _ops.compare("equal", self, o)  # type: ignore[override]
    def __ne__(self, o): return _ops.compare("not_equal", self, o)  # type: ignore[override]

    @property
    def T(self) -> Tensor:
        return _ops.transpose(self, tuple(range(self.ndim))[::-1])

    # Method forms of the ops (tensor.sum(), tensor.exp(), ...) are attached by ops.py.


from shoal.worker import ops as _ops  # noqa: E402  (ops needs Tensor defined first)

"""Fused neural-network ops: linear, activations, softmax, dropout, layer_norm, embedding.

Each is one Function whose backward is written by hand, so a layer costs one
graph node and no more array passes than a hand-written numpy version.
"""
from __future__ import annotations

import math

from shoal.kernels import backend_of
from shoal.worker.amp._autocast import amp_inputs
from shoal.worker.autograd import Function
from shoal.worker.errors import DTypeError, IndexRangeError, ShapeError
from shoal.worker.ops import _UNARY, Unary, lift
from shoal.worker.ops import relu, sigmoid, tanh  # noqa: F401  (re-exported activations)
from shoal.worker.sparse import SparseGrad
from shoal.worker.tensor import Tensor


def _xp(a):
    return backend_of(a).xp


# -- linear ------------------------------------------------------------------------
class Linear(Function):
    def forward(self, x, w, b=None):
        self.x, self.w = x, w
        y = x @ w
        if b is not None:
            y += b
        return y

    def backward(self, g):
        x, w = self.x, self.w
        gx = g @ w.T if self.needs_grad[0] else None
        gw = gb = None
        if self.needs_grad[1]:
            gw = x.reshape(-1, x.shape[-1]).T @ g.reshape(-1, g.shape[-1])
        if len(self.needs_grad) > 2 and self.needs_grad[2]:
            gb = g.reshape(-1, g.shape[-1]).sum(axis=0)
        return gx, gw, gb


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """``x @ weight + bias`` with `weight` of shape [in, out] (Paddle's layout)."""
    if x.ndim < 1 or weight.ndim != 2 or x.shape[-1] != weight.shape[0]:
        raise ShapeError(f"linear: input of shape {x.shape} does not fit weight "
                         f"{weight.name or ''} of shape {weight.shape} (needs input[..., "
                         f"{weight.shape[0] if weight.ndim == 2 else '?'}])")
    x, weight, bias = amp_inputs("linear", x, weight, bias)
    if x.dtype != weight.dtype:
        raise DTypeError(f"linear: input dtype {x.dtype} != weight dtype {weight.dtype}; "
                         f"cast the input with .astype('{weight.dtype}')")
    if bias is None:
        return Linear.apply(x, weight)
    if bias.shape != (weight.shape[1],):
        raise ShapeError(f"linear: bias shape {bias.shape} != ({weight.shape[1]},)")
    return Linear.apply(x, weight, bias)


# -- activations -------------------------------------------------------------------
def _erf(xp, x):
    # Abramowitz & Stegun 7.1.26 refined (W. J. Cody's rational form is overkill for
    # float32): max abs error 1.2e-7, vectorized, no scipy needed.
    t = 1.0 / (1.0 + 0.5 * xp.abs(x))
    y = 1.0 - t * xp.exp(-x * x - 1.26551223 + t * (1.00002368 + t * (0.37409196 + t * (
        0.09678418 + t * (-0.18628806 + t * (0.27886807 + t * (-1.13520398 + t * (
            1.48851587 + t * (-0.82215223 + t * 0.17087277)))))))))
    return xp.where(x >= 0, y, -y)


_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)


def _gelu_tanh_grad(xp, x, y, g):
    inner = _SQRT_2_OVER_PI * (x + 0.044715 * x ** 3)
    t = xp.tanh(inner)
    d_inner = _SQRT_2_OVER_PI * (1 + 3 * 0.044715 * x * x)
    return g * (0.5 * (1 + t) + 0.5 * x * (1 - t * t) * d_inner)


_UNARY.update({
    "gelu": (lambda xp, x: 0.5 * x * (1 + _erf(xp, x * (1 / math.sqrt(2)))),
             lambda xp, x, y, g: g * (0.5 * (1 + _erf(xp, x * (1 / math.sqrt(2))))
                                      + x * _INV_SQRT_2PI * xp.exp(-0.5 * x * x))),
    "gelu_tanh": (lambda xp, x: 0.5 * x * (1 + xp.tanh(_SQRT_2_OVER_PI * (x + 0.044715 * x ** 3))),
                  _gelu_tanh_grad),
})


def gelu(x: Tensor, approximate: bool = False) -> Tensor:
    """GELU: x * Phi(x) (erf form), or its tanh approximation when `approximate`."""
    return Unary.apply(lift(x), op="gelu_tanh" if approximate else "gelu")


# -- softmax -----------------------------------------------------------------------
class Softmax(Function):
    def forward(self, x, *, axis, log):
        xp = _xp(x)
        shifted = x - x.max(axis=axis, keepdims=True)
        if log:
            y = shifted - xp.log(xp.exp(shifted).sum(axis=axis, keepdims=True))
        else:
            y = xp.exp(shifted)
            y /= y.sum(axis=axis, keepdims=True)
        self.y, self.axis, self.log = y, axis, log
        return y

    def backward(self, g):
        y, axis = self.y, self.axis
        if self.log:
            return g - _xp(g).exp(y) * g.sum(axis=axis, keepdims=True)
        return y * (g - (g * y).sum(axis=axis, keepdims=True))


def _axis(x: Tensor, axis: int, op: str) -> int:
    if not -x.ndim <= axis < x.ndim:
        raise ShapeError(f"{op}: axis {axis} out of range for a tensor of shape {x.shape}")
    return axis % x.ndim


def softmax(x: Tensor, axis: int = -1) -> Tensor:
    x, = amp_inputs("softmax", x)
    return Softmax.apply(x, axis=_axis(x, axis, "softmax"), log=False)


def log_softmax(x: Tensor, axis: int = -1) -> Tensor:
    x, = amp_inputs("log_softmax", x)
    return Softmax.apply(x, axis=_axis(x, axis, "log_softmax"), log=True)


# -- dropout -----------------------------------------------------------------------
class Dropout(Function):
    def forward(self, x, *, p):
        keep = backend_of(x).uniform(x.shape, dtype=x.dtype) >= p
        self.mask = keep * x.dtype.type(1.0 / (1.0 - p))
        return x * self.mask

    def backward(self, g):
        return g * self.mask


def dropout(x: Tensor, p: float = 0.5, training: bool = True) -> Tensor:
    """Zero each element with probability `p` and scale the rest by 1/(1-p) (when training)."""
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"dropout: p={p} must lie in [0, 1]")
    if not training or p == 0.0:
        return x
    if p == 1.0:
        return x * 0.0
    return Dropout.apply(x, p=float(p))


# -- layer norm ----------------------------------------------------------------------
class LayerNorm(Function):
    def forward(self, x, w=None, b=None, *, axes, eps):
        xp = _xp(x)
        mu = x.mean(axis=axes, keepdims=True)
        xc = x - mu
        var = (xc * xc).mean(axis=axes, keepdims=True)
        self.rstd = 1.0 / xp.sqrt(var + eps)
        self.xhat = xc * self.rstd
        self.axes, self.w = axes, w
        y = self.xhat
        if w is not None:
            y = y * w
        if b is not None:
            y = y + b
        return y

    def backward(self, g):
        xhat, axes = self.xhat, self.axes
        batch_axes = tuple(range(g.ndim - len(axes)))
        gxhat = g * self.w if self.w is not None else g
        gx = self.rstd * (gxhat - gxhat.mean(axis=axes, keepdims=True)
                          - xhat * (gxhat * xhat).mean(axis=axes, keepdims=True))
        grads = [gx]
        if self.w is not None:
            grads.append((g * xhat).sum(axis=batch_axes))
        if len(self.needs_grad) == len(grads) + 1:
            grads.append(g.sum(axis=batch_axes))
        return tuple(grads)


def layer_norm(x: Tensor, normalized_shape, weight: Tensor | None = None,
               bias: Tensor | None = None, epsilon: float = 1e-5) -> Tensor:
    """Normalize over the trailing `normalized_shape` axes, then scale and shift."""
    x, weight, bias = amp_inputs("layer_norm", x, weight, bias)
    shape = (normalized_shape,) if isinstance(normalized_shape, int) else tuple(normalized_shape)
    if x.shape[x.ndim - len(shape):] != shape:
        raise ShapeError(f"layer_norm: input shape {x.shape} does not end in normalized_shape "
                         f"{shape}")
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None and t.shape != shape:
            raise ShapeError(f"layer_norm: {name} shape {t.shape} != normalized_shape {shape}")
    if weight is None and bias is not None:
        raise ValueError("layer_norm: a bias without a weight is not supported; pass both")
    axes = tuple(range(x.ndim - len(shape), x.ndim))
    parents = [t for t in (x, weight, bias) if t is not None]
    return LayerNorm.apply(*parents, axes=axes, eps=float(epsilon))


# -- embedding -------------------------------------------------------------------------
class Embedding(Function):
    def forward(self, w, *, ids, padding_idx):
        be = backend_of(w)
        self.ids, self.shape, self.padding_idx = ids, w.shape, padding_idx
        out = be.gather_rows(w, ids)
        if padding_idx is not None:
            out[ids == padding_idx] = 0
        return out

    def backward(self, g):
        ids = self.ids.reshape(-1)
        rows = g.reshape(ids.shape[0], -1)
        if self.padding_idx is not None:
            keep = ids != self.padding_idx
            ids, rows = ids[keep], rows[keep]
        uniq, summed = backend_of(g).segment_sum(ids, rows)
        return SparseGrad(uniq, summed, self.shape)


def embedding(ids, weight: Tensor, padding_idx: int | None = None) -> Tensor:
    """Rows of `weight` for integer `ids` (any shape): output shape ids.shape + [dim].

    The gradient of `weight` is row-sparse (a SparseGrad of the batch's unique
    ids), never a vocabulary-sized array. Positions equal to `padding_idx`
    output zeros and send no gradient.
    """
    ids = lift(ids).data
    n = weight.shape[0]
    if ids.dtype.kind not in "iu":
        raise DTypeError(f"embedding: ids must be integers, got dtype {ids.dtype}")
    if ids.size and (int(ids.min()) < 0 or int(ids.max()) >= n):
        bad = int(ids.min()) if int(ids.min()) < 0 else int(ids.max())
        raise IndexRangeError(f"embedding: id {bad} is outside [0, {n}) of table "
                              f"{weight.name or ''} of shape {weight.shape}")
    if padding_idx is not None:
        padding_idx = int(padding_idx) % n
    return Embedding.apply(weight, ids=ids, padding_idx=padding_idx)


from shoal.worker.nn.losses import (binary_cross_entropy_with_logits,  # noqa: E402
                                    cross_entropy, mse_loss)

__all__ = ["linear", "relu", "sigmoid", "tanh", "gelu", "softmax", "log_softmax", "dropout",
           "layer_norm", "embedding", "cross_entropy", "binary_cross_entropy_with_logits",
           "mse_loss"]

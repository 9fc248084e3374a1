"""Losses: softmax cross entropy, binary cross entropy with logits, mean squared error."""
from __future__ import annotations

import numpy as np

from shoal.kernels import backend_of
from shoal.worker.amp._autocast import amp_inputs
from shoal.worker.autograd import Function
from shoal.worker.errors import DTypeError, IndexRangeError, ShapeError
from shoal.worker.ops import lift, stable_sigmoid
from shoal.worker.tensor import Tensor

_REDUCTIONS = ("mean", "sum", "none")


def _check_reduction(reduction: str, op: str) -> None:
    if reduction not in _REDUCTIONS:
        raise ValueError(f"{op}: reduction={reduction!r} is not one of {list(_REDUCTIONS)}")


def _reduce(loss, reduction: str, count=None):
    if reduction == "none":
        return loss
    total = loss.sum()
    if reduction == "sum":
        return total
    n = loss.size if count is None else count
    return total / max(n, 1)


class SoftmaxCrossEntropy(Function):
    def forward(self, logits, label=None, *, hard_label, ignore_index, reduction):
        xp = backend_of(logits).xp
        shifted = logits - logits.max(axis=-1, keepdims=True)
        exp = xp.exp(shifted)
        total = exp.sum(axis=-1, keepdims=True)
        logp = shifted - xp.log(total)
        self.prob = exp / total
        if hard_label is not None:
            valid = hard_label != ignore_index
            safe = xp.where(valid, hard_label, 0)
            loss = -xp.take_along_axis(logp, safe[..., None], axis=-1)[..., 0] * valid
            self.count = int(valid.sum())
            self.valid, self.safe = valid, safe
        else:
            loss = -(label * logp).sum(axis=-1)
            self.count, self.label = loss.size, label
        self.reduction, self.hard = reduction, hard_label is not None
        return _reduce(loss, reduction, self.count)

    def backward(self, g):
        xp = backend_of(g).xp
        if self.reduction == "none":
            scale = g[..., None]
        elif self.reduction == "sum":
            scale = g
        else:
            scale = g / max(self.count, 1)
        if self.hard:
            grad = self.prob.copy()
            xp.put_along_axis(grad, self.safe[..., None],
                              xp.take_along_axis(grad, self.safe[..., None], axis=-1) - 1, axis=-1)
            grad *= self.valid[..., None]
            return grad * scale
        gl = None
        if self.needs_grad[1]:
            gl = -xp.log(self.prob) * scale
        grad = self.prob * self.label.sum(axis=-1, keepdims=True) - self.label
        return grad * scale, gl


def cross_entropy(input: Tensor, label, soft_label: bool = False, reduction: str = "mean",
                  axis: int = -1, ignore_index: int = -100) -> Tensor:
    """Softmax cross entropy of logits `input` against class ids or soft labels.

    Args:
        input: logits [..., C] (softmax over `axis`).
        label: int class ids [...] or [..., 1]; with `soft_label`, probabilities [..., C].
        reduction: 'mean' (over non-ignored entries), 'sum' or 'none'.
        ignore_index: a class id whose entries contribute nothing.
    """
    _check_reduction(reduction, "cross_entropy")
    input, label = amp_inputs("cross_entropy", input, label)
    if input.ndim == 0:
        raise ShapeError("cross_entropy: input must have a class axis, got a 0-d tensor")
    axis = axis % input.ndim
    if axis != input.ndim - 1:
        perm = [i for i in range(input.ndim) if i != axis] + [axis]
        input = input.transpose(perm)
        if soft_label:
            label = lift(label, input).transpose(perm)
    n_class = input.shape[-1]
    if soft_label:
        label = lift(label, input)
        if label.shape != input.shape:
            raise ShapeError(f"cross_entropy: soft label shape {label.shape} != input shape "
                             f"{input.shape}")
        if label.dtype != input.dtype:
            raise DTypeError(f"cross_entropy: soft label dtype {label.dtype} != input dtype "
                             f"{input.dtype}")
        return SoftmaxCrossEntropy.apply(input, label, hard_label=None, ignore_index=ignore_index,
                                         reduction=reduction)
    ids = lift(label).data
    if ids.dtype.kind not in "iu":
        raise DTypeError(f"cross_entropy: hard labels must be integer class ids, got dtype "
                         f"{ids.dtype}; pass soft_label=True for probabilities")
    batch = input.shape[:-1]
    if ids.shape == batch + (1,):
        ids = ids.reshape(batch)
    if ids.shape != batch:
        raise ShapeError(f"cross_entropy: label shape {tuple(lift(label).shape)} does not fit "
                         f"input shape {input.shape}; expected {batch} or {batch + (1,)}")
    valid = ids != ignore_index
    if valid.any() and (int(ids[valid].min()) < 0 or int(ids[valid].max()) >= n_class):
        bad = int(ids[valid].min()) if int(ids[valid].min()) < 0 else int(ids[valid].max())
        raise IndexRangeError(f"cross_entropy: label {bad} is outside [0, {n_class}) classes")
    return SoftmaxCrossEntropy.apply(input, hard_label=ids.astype("int64"),
                                     ignore_index=ignore_index, reduction=reduction)


def _broadcasts_to(shape, target) -> bool:
    try:
        return np.broadcast_shapes(shape, target) == tuple(target)
    except ValueError:
        return False


class BCEWithLogits(Function):
    def forward(self, x, y, *, weight, pos_weight, reduction):
        xp = backend_of(x).xp
        # softplus(-x) = log(1 + exp(-|x|)) + max(-x, 0), stable for any x
        softplus_neg = xp.log1p(xp.exp(-xp.abs(x))) + xp.maximum(-x, 0)
        lw = 1.0 if pos_weight is None else 1.0 + (pos_weight - 1.0) * y
        loss = (1.0 - y) * x + lw * softplus_neg
        if weight is not None:
            loss = loss * weight
        self.x, self.y, self.lw, self.w, self.reduction = x, y, lw, weight, reduction
        self.n = loss.size
        return _reduce(loss, reduction)

    def backward(self, g):
        xp = backend_of(g).xp
        sig = stable_sigmoid(xp, self.x)
        grad = (1.0 - self.y) + self.lw * (sig - 1.0)
        if self.w is not None:
            grad = grad * self.w
        if self.reduction == "mean":
            g = g / max(self.n, 1)
        return grad * g, None


def binary_cross_entropy_with_logits(logit: Tensor, label, weight=None, reduction: str = "mean",
                                     pos_weight=None) -> Tensor:
    """Sigmoid + binary cross entropy in one stable op; `label` has `logit`'s shape."""
    _check_reduction(reduction, "binary_cross_entropy_with_logits")
    logit, label = amp_inputs("binary_cross_entropy_with_logits", logit, label)
    label = lift(label, logit)
    if label.shape != logit.shape:
        raise ShapeError(f"binary_cross_entropy_with_logits: label shape {label.shape} != logit "
                         f"shape {logit.shape}; reshape the label (e.g. label.reshape({list(logit.shape)}))")
    y = label.data.astype(logit.dtype, copy=False)
    extra = {}
    for name, t in (("weight", weight), ("pos_weight", pos_weight)):
        arr = None if t is None else lift(t, logit).data.astype(logit.dtype, copy=False)
        if arr is not None and not _broadcasts_to(arr.shape, logit.shape):
            raise ShapeError(f"binary_cross_entropy_with_logits: {name} shape {arr.shape} does "
                             f"not broadcast to logit shape {logit.shape}")
        extra[name] = arr
    return BCEWithLogits.apply(logit, Tensor._make(y), reduction=reduction, **extra)


def mse_loss(input: Tensor, label, reduction: str = "mean") -> Tensor:
    """(input - label)^2, reduced; the shapes must match exactly (no silent broadcast)."""
    _check_reduction(reduction, "mse_loss")
    input, label = amp_inputs("mse_loss", input, label)
    label = lift(label, input)
    if label.shape != input.shape:
        raise ShapeError(f"mse_loss: label shape {label.shape} != input shape {input.shape}")
    d = input - label
    loss = d * d
    if reduction == "none":
        return loss
    return loss.sum() if reduction == "sum" else loss.mean()

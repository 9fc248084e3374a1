"""Finite-difference gradient checks for the eager engine (tests only: loops over elements).

`check_grad(fn, *inputs)` runs `fn` on float64 Tensors that require grad,
reduces its output(s) with a fixed random projection ``sum(out * R)`` (so a
wrong sign or a transposed gradient cannot cancel out), back-propagates, and
compares every input's ``.grad`` with a central difference of the same
projection computed on perturbed numpy copies.
"""
from __future__ import annotations

import numpy as np

import shoal

PROJECTION_SEED = 20240611


def _as_outputs(out) -> list:
    outs = list(out) if isinstance(out, (list, tuple)) else [out]
    for o in outs:
        if not isinstance(o, shoal.Tensor):
            raise TypeError(f"check_grad: fn returned a {type(o).__name__}, not a Tensor")
    return outs


def _projections(outs) -> list[np.ndarray]:
    rng = np.random.default_rng(PROJECTION_SEED)
    return [rng.uniform(0.5, 1.5, size=o.shape) * rng.choice([-1.0, 1.0], size=o.shape)
            for o in outs]


def _dense(grad, shape) -> np.ndarray:
    if grad is None:
        return np.zeros(shape)
    if isinstance(grad, shoal.SparseGrad):
        return np.asarray(grad.numpy())
    return grad.numpy()


def _projected_value(fn, arrays, projections) -> float:
    with shoal.no_grad():
        outs = _as_outputs(fn(*[shoal.Tensor(a, dtype="float64") for a in arrays]))
    return float(sum(np.sum(o.numpy().astype(np.float64) * r) for o, r in zip(outs, projections)))


def numeric_grads(fn, arrays, projections, eps: float) -> list[np.ndarray]:
    """Central differences of ``sum(fn(*arrays) * R)`` with respect to every array."""
    grads = []
    for i, a in enumerate(arrays):
        g = np.zeros_like(a)
        for j in np.ndindex(a.shape):
            plus = [b.copy() for b in arrays]
            minus = [b.copy() for b in arrays]
            plus[i][j] += eps
            minus[i][j] -= eps
            g[j] = (_projected_value(fn, plus, projections)
                    - _projected_value(fn, minus, projections)) / (2 * eps)
        grads.append(g)
    return grads


def check_grad(fn, *inputs, atol: float = 1e-6, rtol: float = 1e-5, eps: float = 1e-6):
    """Assert that autograd matches finite differences for every input of `fn`.

    Args:
        fn: Tensors -> a Tensor, or a list/tuple of Tensors (each is projected).
        inputs: arrays (or nested lists); each becomes a float64 Tensor with
            requires_grad=True.
    Returns:
        (outputs, analytic grads as numpy arrays, raw `.grad` objects) for
        further assertions.
    """
    arrays = [np.array(x, dtype=np.float64) for x in inputs]
    tensors = [shoal.Tensor(a, dtype="float64", requires_grad=True) for a in arrays]
    outs = _as_outputs(fn(*tensors))
    projections = _projections(outs)
    loss = None
    for o, r in zip(outs, projections):
        term = (o * shoal.Tensor(r, dtype=o.dtype)).sum()
        if term.dtype != np.float64:
            term = term.astype("float64")
        loss = term if loss is None else loss + term
    loss.backward()
    raw = [t.grad for t in tensors]
    analytic = [_dense(g, a.shape) for g, a in zip(raw, arrays)]
    numeric = numeric_grads(fn, arrays, projections, eps)
    for i, (ga, gn, a) in enumerate(zip(analytic, numeric, arrays)):
        assert ga.shape == a.shape, f"input {i}: grad shape {ga.shape} != input shape {a.shape}"
        np.testing.assert_allclose(ga, gn, atol=atol, rtol=rtol,
                                   err_msg=f"gradient of input {i} (shape {a.shape})")
    return outs, analytic, raw

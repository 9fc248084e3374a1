"""Reverse-mode autograd: `Function` nodes, grad mode, and the backward pass.

A `Function` is one differentiable op: `forward(ctx, *arrays, **attrs)` returns
the output array and saves on `ctx` what `backward(ctx, grad)` needs;
`backward` returns one gradient (or None) per tensor input. `backward()` is a
topological sort of the graph plus the chain rule.
"""
from __future__ import annotations

import functools
import threading

import numpy as np

from shoal.worker.errors import GradError, ShapeError
from shoal.worker.sparse import SparseGrad

_mode = threading.local()


def is_grad_enabled() -> bool:
    """Whether ops record the graph in this thread (True unless inside `no_grad`)."""
    return getattr(_mode, "enabled", True)


class set_grad_enabled:
    """Turn graph recording on or off in this thread; also a context manager and decorator."""

    def __init__(self, enabled: bool):
        self.prev = is_grad_enabled()
        self.enabled = enabled
        _mode.enabled = enabled

    def __enter__(self):
        _mode.enabled = self.enabled
        return self

    def __exit__(self, *exc):
        _mode.enabled = self.prev

    def __call__(self, fn):
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            with set_grad_enabled(self.enabled):
                return fn(*args, **kwargs)
        _mode.enabled = self.prev  # the decorator form must not change the mode by itself
        return wrapper


class no_grad(set_grad_enabled):
    """Run without recording the graph: `with no_grad(): ...` or `@no_grad()`."""

    def __init__(self):
        self.prev = is_grad_enabled()
        self.enabled = False


class enable_grad(set_grad_enabled):
    """Record the graph again inside a `no_grad` block."""

    def __init__(self):
        self.prev = is_grad_enabled()
        self.enabled = True


class Function:
    """One differentiable op. Subclasses define `forward` and `backward`.

    `apply(*tensors, **attrs)` runs forward on the tensors' arrays and, when
    grad mode is on and an input requires grad, links the output to this node.
    The node's edges point at its inputs' nodes as they were when it ran (the
    input's Function, or the input itself for a leaf), so an input that is
    later assigned in place keeps its earlier gradient path.
    """

    needs_grad: tuple
    edges: tuple
    out_shape: tuple
    released = False

    def forward(self, *arrays, **attrs):
        raise NotImplementedError

    def backward(self, grad):
        raise NotImplementedError

    @classmethod
    def apply(cls, *parents, **attrs):
        from shoal.worker.tensor import Tensor
        ctx = cls()
        ctx.needs_grad = needs = tuple(p.requires_grad for p in parents)
        out = ctx.forward(*[p.data for p in parents], **attrs)
        if isinstance(out, np.generic):  # numpy reductions return scalars, not 0-d arrays
            out = np.asarray(out)
        if True in needs and is_grad_enabled():
            ctx.edges = tuple(p if p._ctx is None else p._ctx for p in parents)
            ctx.out_shape = tuple(out.shape)
            return Tensor._make(out, True, ctx)
        return Tensor._make(out, False, None)

    def release(self) -> None:
        """Free what forward saved; a later backward through this node raises."""
        vars(self).clear()
        self.released = True

    def __repr__(self) -> str:
        return f"<{type(self).__name__} node>"


def accumulate(a, b):
    """a + b for gradients that may be dense arrays or SparseGrads (never in place)."""
    if a is None:
        return b
    if isinstance(a, SparseGrad) or isinstance(b, SparseGrad):
        return a + b if isinstance(a, SparseGrad) else b + a
    return a + b


def _toposort(start) -> list:
    """Nodes reachable from `start` (Functions and leaf tensors), inputs before users."""
    order, seen = [], {id(start)}
    stack = [(start, False)]
    while stack:
        node, expanded = stack.pop()
        if expanded:
            order.append(node)
            continue
        stack.append((node, True))
        if not isinstance(node, Function):
            continue
        if node.released:
            raise GradError(
                "backward() through a graph that an earlier backward() already freed; "
                "pass retain_graph=True to the first backward() to run it twice")
        for edge, need in zip(node.edges, node.needs_grad):
            if need and id(edge) not in seen:
                seen.add(id(edge))
                stack.append((edge, False))
    return order


def _describe(node) -> str:
    if isinstance(node, Function):
        return f"the output of {type(node).__name__}"
    return f"tensor {node.name or ''}".rstrip()


def run_backward(root, grad, retain_graph: bool) -> None:
    """Propagate `grad` from `root` to every leaf that requires grad (accumulating)."""
    start = root if root._ctx is None else root._ctx
    grads = {id(start): grad}
    for node in reversed(_toposort(start)):
        g = grads.pop(id(node), None)
        if g is None:
            continue
        if not isinstance(node, Function):
            node._accumulate_grad(g)
            continue
        in_grads = node.backward(g)
        if not isinstance(in_grads, tuple):
            in_grads = (in_grads,)
        for edge, pg, need in zip(node.edges, in_grads, node.needs_grad):
            if pg is None or not need:
                continue
            want = edge.out_shape if isinstance(edge, Function) else edge.shape
            if tuple(pg.shape) != want:
                raise ShapeError(
                    f"{type(node).__name__}.backward: grad shape {tuple(pg.shape)} != {want} "
                    f"of its input, {_describe(edge)} (a bug in that op)")
            grads[id(edge)] = accumulate(grads.get(id(edge)), pg)
        if not retain_graph:
            node.release()

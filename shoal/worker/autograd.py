"""Reverse-mode autograd: `Function` nodes, grad mode, and the backward pass.

A `Function` is one differentiable op: `forward(ctx, *arrays, **attrs)` returns
the output array and saves on `ctx` what `backward(ctx, grad)` needs;
`backward` returns one gradient (or None) per tensor input. `backward()` is a
topological sort of the graph plus the chain rule. A Function's backward may run a nested
pass that joins the running one (`run_nested_backward`, used by recompute); `graph_stats`
tells what a graph keeps alive.
"""
from __future__ import annotations

import functools
import itertools
import threading
import weakref

import numpy as np

from shoal.worker.errors import GradError, ShapeError
from shoal.worker.sparse import SparseGrad

_mode = threading.local()


def is_grad_enabled() -> bool:
    """Whether ops record the graph in this thread (True unless inside `no_grad`)."""
    return getattr(_mode, "enabled", True)


class set_grad_enabled:
    """Turn graph recording on or off in this thread; also a context manager and decorator.

    A block restores the mode that was in force when it was entered (so one object may be
    entered again later, or nested)."""

    def __init__(self, enabled: bool):
        self._before_call = is_grad_enabled()   # the call form changes the mode at once
        self.enabled = enabled
        self._outer: list[bool] = []
        _mode.enabled = enabled

    def __enter__(self):
        before, self._before_call = self._before_call, None
        self._outer.append(is_grad_enabled() if before is None else before)
        _mode.enabled = self.enabled
        return self

    def __exit__(self, *exc):
        _mode.enabled = self._outer.pop()

    def __call__(self, fn):
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            with set_grad_enabled(self.enabled):
                return fn(*args, **kwargs)
        if self._before_call is not None:  # the decorator form must not change the mode itself
            _mode.enabled, self._before_call = self._before_call, None
        return wrapper


class no_grad(set_grad_enabled):
    """Run without recording the graph: `with no_grad(): ...` or `@no_grad()`."""

    def __init__(self):
        self._before_call, self.enabled, self._outer = None, False, []


class enable_grad(set_grad_enabled):
    """Record the graph again inside a `no_grad` block."""

    def __init__(self):
        self._before_call, self.enabled, self._outer = None, True, []


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


def _toposort(start) -> tuple[list, set]:
    """Nodes reachable from `start` (Functions and leaf tensors) in the order backward visits
    them, users before their inputs, and the set of their ids.

    A node comes once all of its users have (a tensor used twice, as in a residual block, gets
    both gradients before it passes its own on), and a leaf comes right after its last user:
    the last layer's parameters get their gradients first, while the layers below still run
    backward, so data parallel can all-reduce them meanwhile. Kahn's algorithm over the user
    counts, depth first."""
    users: dict[int, int] = {}
    visited = {id(start)}
    stack = [start]
    while stack:   # count each node's users among the reachable Functions
        node = stack.pop()
        if not isinstance(node, Function):
            continue
        if node.released:
            if any(id(node) in seen for seen in getattr(_mode, "graphs", ())):
                raise _clash(node)
            raise GradError(
                "backward() through a graph that an earlier backward() already freed; "
                "pass retain_graph=True to the first backward() to run it twice")
        for edge, need in zip(node.edges, node.needs_grad):
            if need:
                users[id(edge)] = users.get(id(edge), 0) + 1
                if id(edge) not in visited:
                    visited.add(id(edge))
                    stack.append(edge)
    order, ready = [], [start]
    while ready:
        node = ready.pop()
        order.append(node)
        if not isinstance(node, Function):
            continue
        for edge, need in zip(node.edges, node.needs_grad):
            if need:
                left = users[id(edge)] = users[id(edge)] - 1
                if left == 0:
                    ready.append(edge)
    return order, visited


def _describe(node) -> str:
    if isinstance(node, Function):
        return f"the output of {type(node).__name__}"
    return f"tensor {node.name or ''}".rstrip()


# id(leaf tensor) -> (weak ref to it, hooks run right after a backward pass accumulated its
# gradient); keyed by id because Tensor's == is elementwise (a WeakKeyDictionary would call it)
_post_hooks: dict[int, tuple] = {}


def _hooks_of(tensor) -> list:
    entry = _post_hooks.get(id(tensor))
    return entry[1] if entry is not None and entry[0]() is tensor else []


class HookHandle:
    """Returned by `register_post_accumulate_grad_hook`; `remove()` unregisters the hook."""

    def __init__(self, tensor, hook):
        self._tensor, self._hook = weakref.ref(tensor), hook

    def remove(self) -> None:
        t = self._tensor()
        hooks = _hooks_of(t) if t is not None else []
        if self._hook in hooks:
            hooks.remove(self._hook)


def register_post_accumulate_grad_hook(tensor, hook) -> HookHandle:
    """Call `hook(tensor)` each time a backward pass has accumulated this leaf's gradient.

    A leaf's gradient is accumulated once per backward pass, after every path to it has been
    summed, so the hook sees the pass's final `.grad` (data parallel starts its all-reduce
    there). Hooks run on the thread running backward, in registration order."""
    if tensor._ctx is not None:
        raise GradError("register_post_accumulate_grad_hook: the tensor is not a leaf (it was "
                        "computed from others); register the hook on a parameter")
    key = id(tensor)
    entry = _post_hooks.get(key)
    if entry is None or entry[0]() is not tensor:
        entry = (weakref.ref(tensor, lambda _, k=key: _post_hooks.pop(k, None)), [])
        _post_hooks[key] = entry
    entry[1].append(hook)
    return HookHandle(tensor, hook)


def queue_callback(fn) -> None:
    """Run `fn()` once the backward pass in progress on this thread has finished (from a hook).

    Raises GradError outside a backward pass."""
    pending = getattr(_mode, "callbacks", None)
    if pending is None:
        raise GradError("queue_callback() outside a backward pass: call it from a gradient hook")
    pending.append(fn)


_passes = itertools.count(1)


def backward_pass() -> int | None:
    """The id of the backward pass running on this thread (from a hook), or None outside one.
    Each pass has a new id, so a hook can tell a pass that ended in an error from the next."""
    return getattr(_mode, "pass_id", None)


def run_backward(root, grad, retain_graph: bool) -> None:
    """Propagate `grad` from `root` to every leaf that requires grad (accumulating).

    Callbacks queued during the pass run after it, unless the pass raised."""
    outer, outer_id = getattr(_mode, "callbacks", None), getattr(_mode, "pass_id", None)
    outer_hooked = getattr(_mode, "hooked", None)
    _mode.callbacks, _mode.pass_id, _mode.hooked = callbacks, _, _ = [], next(_passes), set()
    try:
        _run_backward(root if root._ctx is None else root._ctx, grad, retain_graph)
    finally:
        _mode.callbacks, _mode.pass_id, _mode.hooked = outer, outer_id, outer_hooked
    for fn in callbacks:
        fn()


class _Seed(Function):
    """The start of a nested pass: one node whose input gradients are the roots' gradients."""

    def __init__(self, roots, grads):
        self.edges = tuple(r if r._ctx is None else r._ctx for r in roots)
        self.needs_grad = tuple(r.requires_grad and g is not None for r, g in zip(roots, grads))
        self.out_shape = ()
        self.grads = tuple(grads)

    def backward(self, grad):
        return self.grads


def run_nested_backward(roots, grads, capture) -> dict:
    """Backpropagate `grads` from the tensors `roots` as part of the backward pass running on
    this thread: for a Function whose backward runs a backward of its own (recompute).

    The nested pass is the enclosing one as far as anyone can tell: `backward_pass()` returns
    its id, callbacks queued inside run when the enclosing pass ends, and leaves accumulate and
    run their post-accumulate hooks as usual, except the leaves in `capture` (tensors): their
    summed gradients are returned as {id(leaf): gradient} instead, so the caller hands them on
    as its own input gradients and the enclosing pass accumulates them (and runs their hooks)
    once. The graph behind `roots` is freed.

    Args:
        roots: tensors; a root that does not require grad, or whose gradient is None, is skipped.
        grads: one array (or None) per root, of the root's shape.
        capture: leaf tensors whose gradients are returned rather than accumulated.
    Raises GradError outside a backward pass, or when the graph behind `roots` reaches a node of
    an enclosing pass's graph (a tensor computed outside that was not passed in as an input).
    """
    if backward_pass() is None:
        raise GradError("run_nested_backward() outside a backward pass: call it from a "
                        "Function's backward; use Tensor.backward() to start a pass")
    captured: dict = {}
    _run_backward(_Seed(roots, grads), True, False, {id(t) for t in capture}, captured)
    return captured


def _clash(node) -> GradError:
    return GradError(f"a nested backward (recompute) reached {_describe(node)}, a node of the "
                     f"enclosing graph: a tensor computed outside the recomputed function was "
                     f"used inside it without being passed in; pass it as an argument")


def _reaches_enclosing(order) -> Function | None:
    for seen in getattr(_mode, "graphs", ())[:-1]:
        for node in order:
            if isinstance(node, Function) and id(node) in seen:
                return node
    return None


def _run_backward(start, grad, retain_graph: bool, capture=None, captured=None) -> None:
    order, seen = _toposort(start)
    graphs = _mode.__dict__.setdefault("graphs", [])
    graphs.append(seen)  # every node of every running pass's graph stays referenced, ids unique
    try:
        if capture is not None:
            clash = _reaches_enclosing(order)
            if clash is not None:
                raise _clash(clash)
        _propagate(start, order, grad, retain_graph, capture, captured)
    finally:
        graphs.pop()


def _propagate(start, order, grad, retain_graph, capture, captured) -> None:
    grads = {id(start): grad}
    for node in order:
        g = grads.pop(id(node), None)
        if g is None:
            continue
        if not isinstance(node, Function):
            if capture is not None and id(node) in capture:
                captured[id(node)] = g
                continue
            node._accumulate_grad(g)
            if _post_hooks:
                _run_hooks(node)
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


def _run_hooks(leaf) -> None:
    hooks = _hooks_of(leaf)
    if not hooks:
        return
    done = _mode.hooked
    if id(leaf) in done:
        # only a nested pass can get here (recompute of a plain callable): hooks promise the
        # pass's final gradient, and data parallel would all-reduce a partial one
        raise GradError(
            f"{_describe(leaf)} got a second gradient accumulation in one backward pass, after "
            f"its post-accumulate hooks (data parallel's all-reduce) already ran: a recomputed "
            f"plain callable uses it and so does another path; recompute a Layer (or a bound "
            f"method of one) so its parameters join the outer pass as inputs")
    done.add(id(leaf))
    for hook in hooks:
        hook(leaf)


_BOOKKEEPING = frozenset(("edges", "needs_grad", "out_shape"))


def _is_array(v) -> bool:
    return isinstance(v, np.ndarray) or hasattr(type(v), "__cuda_array_interface__")


def _owner(a):
    """The array whose memory `a` views (`a` itself when it owns its memory)."""
    while _is_array(getattr(a, "base", None)):
        a = a.base
    return a


def graph_stats(tensor) -> dict:
    """What the graph behind `tensor` keeps alive, without running backward.

    Returns {"nodes": Function nodes, "saved_arrays": distinct numpy/cupy arrays held in the
    nodes' attributes (inside tuples and lists too; the edges, needs_grad and out_shape
    bookkeeping excluded), "saved_bytes": their bytes, each memory block counted once however
    many views of it are held}. Arrays that are a leaf's own data (parameters, inputs) are not
    counted: they live as long as their tensors anyway. A freed graph (after backward) counts
    its nodes and no arrays.

        >>> graph_stats(loss)   # e.g. with and without recompute
        {'nodes': 12, 'saved_arrays': 9, 'saved_bytes': 73728}
    """
    if tensor._ctx is None:
        return {"nodes": 0, "saved_arrays": 0, "saved_bytes": 0}
    nodes, seen, leaves, arrays = [], {id(tensor._ctx)}, set(), {}
    stack = [tensor._ctx]
    while stack:
        node = stack.pop()
        nodes.append(node)
        for edge in getattr(node, "edges", ()):
            if not isinstance(edge, Function):
                leaves.add(id(edge.data))
            elif id(edge) not in seen:
                seen.add(id(edge))
                stack.append(edge)
    for node in nodes:
        values = [v for k, v in vars(node).items() if k not in _BOOKKEEPING]
        while values:
            v = values.pop()
            if isinstance(v, (tuple, list)):
                values.extend(v)
            elif _is_array(v) and id(v) not in leaves:
                arrays[id(v)] = v
    owners = {id(o): o for o in map(_owner, arrays.values())}
    return {"nodes": len(nodes), "saved_arrays": len(arrays),
            "saved_bytes": int(sum(o.nbytes for o in owners.values()))}

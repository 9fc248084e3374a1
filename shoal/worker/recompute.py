"""Recompute (activation checkpointing): keep a segment's inputs, run it again in backward.

    h = recompute(block, h)                                    # block's activations are not kept
    model = apply_recompute(model, ["blocks.0", "blocks.1"])   # strategy.recompute_configs form

`recompute(function, *args)` runs `function` under no_grad and records one `Function` node
that holds only its tensor inputs (and the random generators' states). The node's backward runs
`function` again with grad enabled on detached copies of those inputs, with the generators put
back where they were (dropout draws the same masks), backpropagates the incoming gradient
through that sub-graph as part of the running pass (`autograd.run_nested_backward`) and returns
the inputs' gradients. The graph keeps one node per segment instead of the segment's
activations; backward pays one more forward per segment.

The parameters of a Layer (or of a bound method of a Layer) are inputs of the node as well: the
nested pass hands their gradients to the outer pass, which accumulates them once, after every
path to them is summed, and runs their post-accumulate hooks then. So a parameter used inside
and outside a segment, or in a segment used twice, gets one accumulation and one hook call per
pass, and DataParallel's all-reduce sees the final sum. A plain callable's closure parameters
are accumulated by the nested pass itself (hooks run there, with the outer pass's id); one that
is also reached another way raises GradError (its hook would have seen a partial gradient):
recompute a Layer instead.

Contract of `function`: the same inputs give the same computation (no data-dependent branches on
anything but the inputs, no side effects that must not run twice). Tensors computed elsewhere
that need a gradient must be passed as arguments (positional or keyword, not inside
containers); a captured one makes the backward raise GradError.
"""
from __future__ import annotations

import contextlib
import difflib
import types
from typing import Callable, ContextManager

from shoal.kernels import backend_of, default_backend
from shoal.worker import autograd
from shoal.worker.amp._autocast import capture_policy
from shoal.worker.autograd import Function, enable_grad, is_grad_enabled, no_grad
from shoal.worker.errors import GradError
from shoal.worker.nn.layer import Layer
from shoal.worker.tensor import Tensor

__all__ = ["recompute", "apply_recompute", "is_recomputed", "register_forward_state",
           "RecomputeError", "UnknownCheckpointError"]


class RecomputeError(GradError):
    """recompute or apply_recompute used in a way they cannot honour."""


class UnknownCheckpointError(RecomputeError, KeyError):
    """apply_recompute named a sublayer the model does not have."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


# thread-local modes that a recomputation must run under as the forward did (auto_cast, say):
# each capture() is called at forward time and returns a reusable context manager
_STATE_CAPTURES: list[Callable[[], ContextManager]] = [capture_policy]


def register_forward_state(capture: Callable[[], ContextManager]) -> None:
    """Make every recomputation run under the mode its forward ran under.

    `capture()` is called when a recomputed forward runs and returns a context manager that
    re-establishes the calling thread's mode (it is entered once per backward, so it must be
    reusable). For example, mixed precision registers one that reinstates the auto_cast policy
    in force, so the recomputed segment casts as its forward did."""
    if not callable(capture):
        raise RecomputeError(f"register_forward_state({capture!r}): give a callable returning a "
                             f"context manager")
    _STATE_CAPTURES.append(capture)


def _parameters_of(function) -> list:
    owner = function if isinstance(function, Layer) else getattr(function, "__self__", None)
    if isinstance(owner, Layer):
        return [p for p in owner.parameters() if p.requires_grad]
    return []


def _check_no_hidden_grad_tensors(values, where: str) -> None:
    stack = list(values)
    while stack:
        v = stack.pop()
        if isinstance(v, (list, tuple)):
            stack.extend(v)
        elif isinstance(v, dict):
            stack.extend(v.values())
        elif isinstance(v, Tensor) and v.requires_grad:
            raise RecomputeError(
                f"recompute({where}): a tensor that requires grad sits inside a container "
                f"argument, where its gradient would be lost; pass it as an argument of its own "
                f"(positional or keyword)")


def _rng_states(arrays) -> list:
    backends = {id(default_backend()): default_backend()}
    for a in arrays:
        be = backend_of(a)
        backends.setdefault(id(be), be)
    return [(be, be.get_rng_state()) for be in backends.values()]


@contextlib.contextmanager
def _replayed(rng_states, scopes):
    now = [(be, be.get_rng_state()) for be, _ in rng_states]
    try:
        for be, state in rng_states:
            be.set_rng_state(state)
        with contextlib.ExitStack() as stack:
            for scope in scopes:
                stack.enter_context(scope)
            with enable_grad():
                yield
    finally:  # the stream goes on as if no recomputation had drawn from it
        for be, state in now:
            be.set_rng_state(state)


class _Grads:
    """The gradients of a segment's several outputs, as one gradient of its node."""

    __slots__ = ("parts",)

    def __init__(self, parts: list):
        self.parts = parts

    @property
    def shape(self) -> tuple:
        return (len(self.parts),)

    def __add__(self, other: _Grads) -> _Grads:
        return _Grads([b if a is None else a if b is None else autograd.accumulate(a, b)
                       for a, b in zip(self.parts, other.parts)])


class _Pick(Function):
    """Output `index` of a segment with several outputs."""

    def __init__(self, node: _Recompute, index: int, count: int, shape: tuple):
        self.edges, self.needs_grad, self.out_shape = (node,), (True,), shape
        self.index, self.count = index, count

    def backward(self, grad):
        parts = [None] * self.count
        parts[self.index] = grad
        return _Grads(parts)


def _name(function) -> str:
    return getattr(function, "__qualname__", None) or type(function).__name__


class _Recompute(Function):
    """One recomputed segment: edges are its tensor inputs, then its parameters."""

    def run(self, function, args, kwargs, params, preserve_rng_state: bool):
        self.function, self.params = function, params
        self.args = list(args)
        self.kwargs = dict(kwargs)
        self.slots = [i for i, a in enumerate(args) if isinstance(a, Tensor)]
        self.keys = [k for k, v in kwargs.items() if isinstance(v, Tensor)]
        tensors = [args[i] for i in self.slots] + [kwargs[k] for k in self.keys]
        for i in self.slots:
            self.args[i] = None
        for k in self.keys:
            self.kwargs[k] = None
        self.inputs = [t.data for t in tensors]
        self.rng = _rng_states(self.inputs + [p.data for p in params]) if preserve_rng_state \
            else []
        self.scopes = [capture() for capture in _STATE_CAPTURES]
        with no_grad():
            out = function(*args, **kwargs)
        self.needs_grad = tuple(t.requires_grad for t in tensors) + (True,) * len(params)
        if True not in self.needs_grad:
            return out
        self.edges = tuple(t if t._ctx is None else t._ctx for t in tensors + params)
        return self._link(out)

    def _link(self, out):
        if isinstance(out, Tensor):
            self.out_shape, self.layout = out.shape, None
            return Tensor._make(out.data, True, self) if out.dtype.kind == "f" else out
        if not isinstance(out, (tuple, list)) or not any(isinstance(o, Tensor) for o in out):
            raise RecomputeError(
                f"recompute({_name(self.function)}): the function returned "
                f"{type(out).__name__}; it must return a Tensor or a tuple/list of Tensors")
        n = len(out)
        self.out_shape = (n,)
        self.layout = (type(out), [o.shape if isinstance(o, Tensor) else None for o in out])
        linked = [Tensor._make(o.data, True, _Pick(self, i, n, o.shape))
                  if isinstance(o, Tensor) and o.dtype.kind == "f" else o
                  for i, o in enumerate(out)]
        return type(out)(linked)

    def _outputs(self, out) -> list:
        """The recomputed outputs as a list, checked against what the forward gave."""
        if self.layout is None:
            same = isinstance(out, Tensor) and out.shape == self.out_shape
            outs = [out]
        else:
            kind, shapes = self.layout
            outs = list(out) if isinstance(out, (tuple, list)) else []
            same = len(outs) == len(shapes) and all(
                (s is None) != isinstance(o, Tensor) and (s is None or o.shape == s)
                for o, s in zip(outs, shapes))
        if not same:
            raise RecomputeError(
                f"recompute({_name(self.function)}): run again in backward, the function "
                f"returned something else than in its forward; it must compute the same "
                f"outputs (kinds and shapes) from the same inputs")
        return outs

    def backward(self, grad):
        parts = grad.parts if isinstance(grad, _Grads) else [grad]
        k = len(self.inputs)
        leaves = [Tensor._make(a, need) for a, need in zip(self.inputs, self.needs_grad[:k])]
        args, kwargs = list(self.args), dict(self.kwargs)
        for i, t in zip(self.slots, leaves):
            args[i] = t
        for key, t in zip(self.keys, leaves[len(self.slots):]):
            kwargs[key] = t
        with _replayed(self.rng, self.scopes):
            try:
                out = self.function(*args, **kwargs)
            except Exception as e:
                raise RecomputeError(
                    f"recompute({_name(self.function)}): the function raised when run again in "
                    f"backward ({type(e).__name__}: {e}); it ran in the forward, so it must not "
                    f"depend on state that changed since (the graph is kept: fix it and call "
                    f"backward again if the first one had retain_graph=True)") from e
        pairs = [(o, g) for o, g in zip(self._outputs(out), parts)
                 if g is not None and isinstance(o, Tensor)]
        captured = autograd.run_nested_backward([o for o, _ in pairs], [g for _, g in pairs],
                                                leaves + self.params)
        return tuple(captured.get(id(t)) for t in leaves + self.params)


def recompute(function, *args, preserve_rng_state: bool = True, **kwargs):
    """Run `function(*args, **kwargs)` keeping only its inputs; recompute the rest in backward.

    Args:
        function: a Layer or a callable of Tensors. A Layer's (or a Layer's bound method's)
            trainable parameters get their gradients through the outer pass, exactly once.
        args, kwargs: its arguments; the Tensors among them (top level) are the inputs whose
            gradients flow back (None to those that do not require grad).
        preserve_rng_state: put the random generators back as they were at this call when
            recomputing, so dropout draws the same masks (Paddle's default, True).
    Returns:
        what `function` returns: a Tensor, or a tuple/list of Tensors (and other values).
    Raises:
        RecomputeError when `function` is not callable, returns no Tensor, hides a tensor that
        requires grad inside a container argument, or (in backward) raises or returns
        something else when run again.

    Under no_grad it just calls `function`. Not thread-safe per segment: one backward at a
    time through a node.

        >>> h = recompute(block, h)            # block(h) without keeping block's activations
        >>> a, b = recompute(two_heads, h)     # several outputs
    """
    if not callable(function):
        raise RecomputeError(f"recompute({function!r}): the first argument must be a Layer or "
                             f"a callable of Tensors")
    if not is_grad_enabled():
        return function(*args, **kwargs)
    _check_no_hidden_grad_tensors([a for a in args if not isinstance(a, Tensor)]
                                  + [v for v in kwargs.values() if not isinstance(v, Tensor)],
                                  _name(function))
    return _Recompute().run(function, args, kwargs, _parameters_of(function),
                            preserve_rng_state)


class _RecomputedForward:
    """A sublayer's forward run through recompute: the layer's instance attribute `forward`."""

    def __init__(self, layer: Layer):
        self.layer = layer  # a deepcopy of the model copies this with the layer, consistently

    def __call__(self, *args, **kwargs):
        return recompute(types.MethodType(type(self.layer).forward, self.layer), *args, **kwargs)


def is_recomputed(layer: Layer) -> bool:
    """Whether apply_recompute made `layer`'s forward run through recompute."""
    return isinstance(layer.__dict__.get("forward"), _RecomputedForward)


def apply_recompute(model: Layer, checkpoints: list[str]) -> Layer:
    """Make each named sublayer of `model` run its forward through `recompute` (in place).

    Args:
        model: the Layer (before or after wrapping it in DataParallel; the names differ).
        checkpoints: names as `model.named_sublayers()` gives them ("blocks.0", "encoder.fc").
            A checkpointed layer's input is kept and everything inside it is recomputed in
            backward; naming a layer and one inside it nests the recomputation.
    Returns:
        `model` itself.
    Raises:
        UnknownCheckpointError for a name the model does not have (with close matches); nothing
        is changed then. RecomputeError when a named layer's forward was already replaced by
        something other than apply_recompute.

    Idempotent: a layer already recomputed is left as it is, so applying the same list twice
    changes nothing. A deepcopy of the model keeps the recomputation (on the copy's layers).

        >>> blocks = [n for n, _ in model.named_sublayers() if n.startswith("blocks.")]
        >>> apply_recompute(model, blocks)
    """
    if not isinstance(model, Layer):
        raise RecomputeError(f"apply_recompute(model): expected a Layer, got "
                             f"{type(model).__name__}")
    if isinstance(checkpoints, str):
        raise RecomputeError(f"apply_recompute(checkpoints={checkpoints!r}): give a list of "
                             f"names, e.g. [{checkpoints!r}]")
    layers = dict(model.named_sublayers())
    chosen = []
    for name in checkpoints:
        layer = layers.get(name) if isinstance(name, str) else None
        if layer is None:
            close = difflib.get_close_matches(str(name), list(layers), n=3)
            hint = f"; close matches: {close}" if close else ""
            raise UnknownCheckpointError(
                f"apply_recompute: {type(model).__name__} has no sublayer named {name!r}{hint}. "
                f"Nothing was changed; list the names with "
                f"[n for n, _ in model.named_sublayers()]")
        own = layer.__dict__.get("forward")
        if own is not None and not isinstance(own, _RecomputedForward):
            raise RecomputeError(
                f"apply_recompute: sublayer {name!r} ({type(layer).__name__}) has a forward "
                f"replaced by {own!r}; apply recompute before whatever replaced it")
        chosen.append(layer)
    for layer in chosen:
        if not is_recomputed(layer):
            object.__setattr__(layer, "forward", _RecomputedForward(layer))
    return model

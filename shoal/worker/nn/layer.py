"""`Layer`: the module tree (parameters, sublayers, buffers, state dicts, modes)."""
from __future__ import annotations

import collections
import itertools
from typing import Any, Callable, Iterator

import numpy as np

from shoal.kernels import backend_of, default_backend, get_backend
from shoal.worker.autograd import no_grad
from shoal.worker.errors import DTypeError, ShapeError, StateDictError
from shoal.worker.nn import initializer as init
from shoal.worker.tensor import Tensor, get_default_dtype

_name_counters: dict[str, itertools.count] = collections.defaultdict(itertools.count)


def unique_name(prefix: str) -> str:
    """`prefix_N` with N counting per prefix in this process (Paddle's naming)."""
    return f"{prefix}_{next(_name_counters[prefix])}"


class Parameter(Tensor):
    """A trainable tensor owned by a Layer (requires_grad unless `trainable` is False)."""

    __slots__ = ("trainable",)

    def __init__(self, data, name: str | None = None, trainable: bool = True, dtype=None):
        super().__init__(data, dtype=dtype, requires_grad=trainable)
        self.trainable = trainable
        self.name = name

    def __repr__(self) -> str:
        return "Parameter containing:\n" + super().__repr__()


class ParamAttr:
    """How to create one parameter: its name, initializer and whether it trains."""

    def __init__(self, name: str | None = None, initializer: init.Initializer | None = None,
                 trainable: bool = True):
        self.name, self.initializer, self.trainable = name, initializer, trainable


def _as_attr(attr) -> ParamAttr | None:
    """None -> defaults, False -> no parameter, an Initializer or ParamAttr as given."""
    if attr is False:
        return None
    if attr is None:
        return ParamAttr()
    if isinstance(attr, init.Initializer):
        return ParamAttr(initializer=attr)
    if isinstance(attr, ParamAttr):
        return attr
    raise TypeError(f"expected a ParamAttr, an Initializer, None or False, got {attr!r}")


class Layer:
    """Base class of every layer: subclass it, create parameters and sublayers in
    `__init__` (after ``super().__init__()``) and define `forward`.

    Attributes holding a Parameter, a Layer or a registered buffer are tracked
    in registration order; `state_dict()` names them by their attribute path
    (``"encoder.fc1.weight"``).
    """

    training: bool

    def __init__(self, name_scope: str | None = None, dtype=None):
        object.__setattr__(self, "_parameters", collections.OrderedDict())
        object.__setattr__(self, "_sub_layers", collections.OrderedDict())
        object.__setattr__(self, "_buffers", collections.OrderedDict())
        object.__setattr__(self, "_non_persistable", set())
        object.__setattr__(self, "training", True)
        object.__setattr__(self, "_full_name", unique_name(name_scope or type(self).__name__.lower()))
        object.__setattr__(self, "_dtype", np.dtype(dtype) if dtype is not None else get_default_dtype())
        object.__setattr__(self, "_n_weights", 0)
        object.__setattr__(self, "_n_biases", 0)

    # -- registration ----------------------------------------------------------
    def __setattr__(self, name: str, value: Any) -> None:
        if "_parameters" not in self.__dict__:
            raise AttributeError(f"{type(self).__name__}.__init__ must call super().__init__() "
                                 f"before assigning attribute {name!r}")
        for registry in (self._parameters, self._sub_layers, self._buffers):
            registry.pop(name, None)
        if isinstance(value, Parameter):
            self._parameters[name] = value
        elif isinstance(value, Layer):
            self._sub_layers[name] = value
        elif isinstance(value, Tensor) and name in self.__dict__.get("_buffer_names", ()):
            self._buffers[name] = value
        object.__setattr__(self, name, value)

    def __delattr__(self, name: str) -> None:
        for registry in (self._parameters, self._sub_layers, self._buffers):
            registry.pop(name, None)
        object.__delattr__(self, name)

    def add_parameter(self, name: str, parameter: Parameter | None) -> Parameter | None:
        if parameter is not None and not isinstance(parameter, Parameter):
            raise TypeError(f"add_parameter({name!r}): expected a Parameter, got "
                            f"{type(parameter).__name__}")
        setattr(self, name, parameter)
        if parameter is None:
            self._parameters[name] = None
        return parameter

    def add_sublayer(self, name: str, sublayer: Layer) -> Layer:
        if not isinstance(sublayer, Layer):
            raise TypeError(f"add_sublayer({name!r}): expected a Layer, got "
                            f"{type(sublayer).__name__}")
        setattr(self, name, sublayer)
        return sublayer

    def register_buffer(self, name: str, tensor: Tensor, persistable: bool = True) -> None:
        """Track a non-trainable tensor (saved in state_dict when `persistable`)."""
        if not isinstance(tensor, Tensor):
            raise TypeError(f"register_buffer({name!r}): expected a Tensor, got "
                            f"{type(tensor).__name__}")
        names = self.__dict__.setdefault("_buffer_names", set())
        names.add(name)
        if persistable:
            self._non_persistable.discard(name)
        else:
            self._non_persistable.add(name)
        setattr(self, name, tensor)

    def create_parameter(self, shape, attr=None, dtype=None, is_bias: bool = False,
                         default_initializer: init.Initializer | None = None) -> Parameter | None:
        """A new Parameter of `shape`, or None when `attr` is False.

        The initializer is the attr's if given, else the global one
        (`set_global_initializer`), else `default_initializer`, else Xavier
        uniform for weights and zeros for biases.
        """
        attr = _as_attr(attr)
        if attr is None:
            return None
        shape = tuple(int(s) for s in shape)
        if any(s < 0 for s in shape):
            raise ShapeError(f"create_parameter: negative dimension in shape {shape}")
        dtype = np.dtype(dtype) if dtype is not None else self._dtype
        initializer = (attr.initializer or init.global_initializer(is_bias) or default_initializer
                       or (init.Constant(0.0) if is_bias else init.XavierUniform()))
        counter = "_n_biases" if is_bias else "_n_weights"
        k = self.__dict__[counter]
        object.__setattr__(self, counter, k + 1)
        name = attr.name or f"{self._full_name}.{'b' if is_bias else 'w'}_{k}"
        data = initializer(shape, dtype, default_backend())
        p = Parameter.__new__(Parameter)
        p.data, p.requires_grad, p._grad, p._ctx = data, attr.trainable, None, None
        p.name, p.trainable = name, attr.trainable
        return p

    # -- traversal -------------------------------------------------------------
    def named_sublayers(self, prefix: str = "", include_self: bool = False) -> Iterator[tuple[str, Layer]]:
        seen = set()
        stack = [(prefix, self)]
        while stack:
            path, layer = stack.pop(0)
            if id(layer) in seen:
                continue
            seen.add(id(layer))
            if layer is not self or include_self:
                yield path, layer
            stack[0:0] = [(f"{path}.{n}" if path else n, sub)
                          for n, sub in layer._sub_layers.items() if sub is not None]

    def sublayers(self, include_self: bool = False) -> list[Layer]:
        return [layer for _, layer in self.named_sublayers(include_self=include_self)]

    def named_children(self) -> Iterator[tuple[str, Layer]]:
        return iter(self._sub_layers.items())

    def children(self) -> Iterator[Layer]:
        return iter(self._sub_layers.values())

    def named_parameters(self, prefix: str = "", include_sublayers: bool = True
                         ) -> Iterator[tuple[str, Parameter]]:
        seen = set()
        layers = self.named_sublayers(prefix, include_self=True) if include_sublayers \
            else [(prefix, self)]
        for path, layer in layers:
            for n, p in layer._parameters.items():
                if p is None or id(p) in seen:
                    continue
                seen.add(id(p))
                yield (f"{path}.{n}" if path else n), p

    def parameters(self, include_sublayers: bool = True) -> list[Parameter]:
        """Every parameter once, in registration order."""
        return [p for _, p in self.named_parameters(include_sublayers=include_sublayers)]

    def named_buffers(self, prefix: str = "") -> Iterator[tuple[str, Tensor]]:
        for path, layer in self.named_sublayers(prefix, include_self=True):
            for n, b in layer._buffers.items():
                yield (f"{path}.{n}" if path else n), b

    def apply(self, fn: Callable[[Layer], None]) -> Layer:
        for layer in self.sublayers(include_self=True):
            fn(layer)
        return self

    # -- modes -------------------------------------------------------------------
    def train(self) -> Layer:
        for layer in self.sublayers(include_self=True):
            object.__setattr__(layer, "training", True)
        return self

    def eval(self) -> Layer:
        for layer in self.sublayers(include_self=True):
            object.__setattr__(layer, "training", False)
        return self

    def clear_gradients(self) -> None:
        for p in self.parameters():
            p.clear_grad()

    def to(self, backend: str | None = None, dtype=None) -> Layer:
        """Move every parameter and buffer to `backend` and/or cast floats to `dtype`."""
        be = get_backend(backend) if backend is not None else None
        for t in itertools.chain(self.parameters(), (b for _, b in self.named_buffers())):
            data = t.data
            if be is not None and backend_of(data) is not be:
                data = be.asarray(backend_of(data).to_numpy(data))
            if dtype is not None and data.dtype.kind == "f":
                data = data.astype(dtype)
            t.data = data
            t._grad = None
        return self

    # -- calling -----------------------------------------------------------------
    def forward(self, *args, **kwargs):
        raise NotImplementedError(f"{type(self).__name__} does not define forward()")

    def __call__(self, *args, **kwargs):
        return self.forward(*args, **kwargs)

    # -- state -------------------------------------------------------------------
    def state_dict(self) -> collections.OrderedDict[str, Tensor]:
        """Structured name -> Tensor for every parameter and persistable buffer."""
        out = collections.OrderedDict(self.named_parameters())
        for path, layer in self.named_sublayers(include_self=True):
            for n, b in layer._buffers.items():
                if n not in layer._non_persistable:
                    out[f"{path}.{n}" if path else n] = b
        return out

    def set_state_dict(self, state_dict, strict: bool = True) -> tuple[list[str], list[str]]:
        """Copy values into this layer's tensors, checking keys and shapes first.

        With `strict` (the default) a missing or unexpected key raises; a
        mis-shaped or non-numeric value always raises. Nothing is changed when
        it raises. Returns (missing keys, unexpected keys).
        """
        own = self.state_dict()
        missing = [k for k in own if k not in state_dict]
        unexpected = [k for k in state_dict if k not in own]
        problems = []
        if strict and missing:
            problems.append(f"missing keys {missing}")
        if strict and unexpected:
            problems.append(f"unexpected keys {unexpected}")
        values = {}
        for k, t in own.items():
            if k not in state_dict:
                continue
            v = state_dict[k]
            arr = v.data if isinstance(v, Tensor) else v
            shape = tuple(getattr(arr, "shape", np.shape(arr)))
            kind = getattr(getattr(arr, "dtype", None), "kind", np.asarray(arr).dtype.kind)
            if shape != t.shape:
                problems.append(f"{k!r} has shape {shape} in the state dict but {t.shape} "
                                f"in {type(self).__name__}")
            elif kind not in "biuf" or (t.dtype.kind == "f") != (kind == "f"):
                problems.append(f"{k!r} has dtype kind {kind!r} in the state dict but "
                                f"{t.dtype} in {type(self).__name__}")
            else:
                values[k] = arr
        if problems:
            err = DTypeError if all("dtype" in p for p in problems) else StateDictError
            raise err(f"set_state_dict into {type(self).__name__}: " + "; ".join(problems)
                      + ". Nothing was loaded; build the model with the same structure as the "
                        "one saved, or pass strict=False to skip missing and unexpected keys")
        with no_grad():
            for k, arr in values.items():
                t = own[k]
                be = backend_of(t.data)
                src = backend_of(arr)
                host = src.to_numpy(arr) if src is not be else arr
                t.data[...] = be.asarray(host, dtype=t.dtype)
        return missing, unexpected

    load_dict = set_state_dict

    # -- printing ------------------------------------------------------------------
    def extra_repr(self) -> str:
        return ""

    def __repr__(self) -> str:
        lines = []
        for name, sub in self._sub_layers.items():
            body = repr(sub).replace("\n", "\n  ")
            lines.append(f"  ({name}): {body}")
        head = f"{type(self).__name__}({self.extra_repr()}"
        return head + ")" if not lines else head + "\n" + "\n".join(lines) + "\n)"


class LayerWrapper(Layer):
    """A Layer that wraps another as `self._layers` (DataParallel, ShardedDataParallel, AMP's
    AutoCastLayer, PipelineParallel): its state dict has the wrapped layer's keys, so a model
    saves and loads the same with or without the wrapper."""

    def state_dict(self):
        return self._layers.state_dict()

    def set_state_dict(self, state_dict, strict: bool = True):
        return self._layers.set_state_dict(state_dict, strict)

    load_dict = set_state_dict

"""Concrete layers: Linear, Embedding, Dropout, LayerNorm, activations, containers."""
from __future__ import annotations

import collections
from typing import Iterable, Iterator

from shoal.worker.nn import functional as F
from shoal.worker.nn import initializer as init
from shoal.worker.nn.layer import Layer
from shoal.worker.tensor import Tensor


class Linear(Layer):
    """y = x @ weight + bias, weight of shape [in_features, out_features]."""

    def __init__(self, in_features: int, out_features: int, weight_attr=None, bias_attr=None,
                 name: str | None = None):
        super().__init__(name)
        self.in_features, self.out_features = in_features, out_features
        self.weight = self.create_parameter((in_features, out_features), attr=weight_attr)
        self.bias = self.create_parameter((out_features,), attr=bias_attr, is_bias=True)

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, dtype={self._dtype}"


class Embedding(Layer):
    """A lookup table [num_embeddings, embedding_dim] whose gradient is row-sparse."""

    def __init__(self, num_embeddings: int, embedding_dim: int, padding_idx: int | None = None,
                 sparse: bool = True, weight_attr=None, name: str | None = None):
        super().__init__(name)
        if padding_idx is not None and not -num_embeddings <= padding_idx < num_embeddings:
            raise ValueError(f"Embedding: padding_idx={padding_idx} is outside "
                             f"[-{num_embeddings}, {num_embeddings})")
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.padding_idx, self.sparse = padding_idx, sparse
        self.weight = self.create_parameter((num_embeddings, embedding_dim), attr=weight_attr)

    def forward(self, ids) -> Tensor:
        out = F.embedding(ids, self.weight, self.padding_idx)
        return out

    def extra_repr(self) -> str:
        pad = f", padding_idx={self.padding_idx}" if self.padding_idx is not None else ""
        return f"{self.num_embeddings}, {self.embedding_dim}{pad}, sparse={self.sparse}"


class Dropout(Layer):
    def __init__(self, p: float = 0.5, name: str | None = None):
        super().__init__(name)
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"Dropout: p={p} must lie in [0, 1]")
        self.p = p

    def forward(self, x: Tensor) -> Tensor:
        return F.dropout(x, self.p, self.training)

    def extra_repr(self) -> str:
        return f"p={self.p}"


class LayerNorm(Layer):
    def __init__(self, normalized_shape, epsilon: float = 1e-5, weight_attr=None, bias_attr=None,
                 name: str | None = None):
        super().__init__(name)
        shape = (normalized_shape,) if isinstance(normalized_shape, int) else tuple(normalized_shape)
        self.normalized_shape, self.epsilon = shape, epsilon
        self.weight = self.create_parameter(shape, attr=weight_attr,
                                            default_initializer=init.Constant(1.0))
        self.bias = self.create_parameter(shape, attr=bias_attr, is_bias=True)

    def forward(self, x: Tensor) -> Tensor:
        return F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.epsilon)

    def extra_repr(self) -> str:
        return f"normalized_shape={list(self.normalized_shape)}, epsilon={self.epsilon}"


class _Activation(Layer):
    fn = None

    def __init__(self, name: str | None = None):
        super().__init__(name)

    def forward(self, x: Tensor) -> Tensor:
        return type(self).fn(x)


class ReLU(_Activation):
    fn = staticmethod(F.relu)


class Sigmoid(_Activation):
    fn = staticmethod(F.sigmoid)


class Tanh(_Activation):
    fn = staticmethod(F.tanh)


class GELU(Layer):
    def __init__(self, approximate: bool = False, name: str | None = None):
        super().__init__(name)
        self.approximate = approximate

    def forward(self, x: Tensor) -> Tensor:
        return F.gelu(x, self.approximate)

    def extra_repr(self) -> str:
        return f"approximate={self.approximate}" if self.approximate else ""


class Sequential(Layer):
    """Layers applied in order: ``Sequential(l1, l2)`` or ``Sequential(("a", l1), ("b", l2))``."""

    def __init__(self, *layers):
        super().__init__()
        if len(layers) == 1 and isinstance(layers[0], (dict, collections.OrderedDict)):
            layers = tuple(layers[0].items())
        for i, item in enumerate(layers):
            name, layer = item if isinstance(item, tuple) else (str(i), item)
            self.add_sublayer(name, layer)

    def __getitem__(self, i):
        layers = list(self._sub_layers.values())
        if isinstance(i, slice):
            return Sequential(*[(n, layer) for n, layer in list(self._sub_layers.items())[i]])
        return layers[i]

    def __len__(self) -> int:
        return len(self._sub_layers)

    def __iter__(self) -> Iterator[Layer]:
        return iter(self._sub_layers.values())

    def forward(self, x):
        for layer in self._sub_layers.values():
            x = layer(x)
        return x


class LayerList(Layer):
    """A list of sublayers that registers them (a plain list would hide their parameters)."""

    def __init__(self, sublayers: Iterable[Layer] | None = None):
        super().__init__()
        for layer in sublayers or ():
            self.append(layer)

    def append(self, layer: Layer) -> LayerList:
        self.add_sublayer(str(len(self._sub_layers)), layer)
        return self

    def extend(self, layers: Iterable[Layer]) -> LayerList:
        for layer in layers:
            self.append(layer)
        return self

    def __getitem__(self, i):
        layers = list(self._sub_layers.values())
        return LayerList(layers[i]) if isinstance(i, slice) else layers[i]

    def __setitem__(self, i: int, layer: Layer) -> None:
        if not isinstance(layer, Layer):
            raise TypeError(f"LayerList[{i}] = ...: expected a Layer, got {type(layer).__name__}")
        name = list(self._sub_layers)[i]
        self._sub_layers[name] = layer  # in place, keeping the order
        object.__setattr__(self, name, layer)

    def __len__(self) -> int:
        return len(self._sub_layers)

    def __iter__(self) -> Iterator[Layer]:
        return iter(self._sub_layers.values())

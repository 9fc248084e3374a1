"""Parameter initializers (Paddle's names) and the global default.

An initializer is called with (shape, dtype, backend) and returns a new array
drawn from the backend's generator, so `shoal.seed(n)` makes models repeatable.
"""
from __future__ import annotations

import math

import numpy as np


class Initializer:
    """Base class: subclasses define `__call__(shape, dtype, backend) -> array`."""

    def __call__(self, shape, dtype, backend):
        raise NotImplementedError

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in vars(self).items())
        return f"{type(self).__name__}({args})"


def _fans(shape) -> tuple[int, int]:
    """(fan_in, fan_out) for Paddle's layouts: [in, out] for linear weights."""
    if len(shape) == 0:
        return 1, 1
    if len(shape) == 1:
        return shape[0], shape[0]
    receptive = int(np.prod(shape[2:])) if len(shape) > 2 else 1
    if len(shape) == 2:
        return shape[0], shape[1]
    return shape[1] * receptive, shape[0] * receptive  # conv: [out, in, k...]


class Constant(Initializer):
    def __init__(self, value: float = 0.0):
        self.value = value

    def __call__(self, shape, dtype, backend):
        return backend.xp.full(shape, self.value, dtype=dtype)


class Uniform(Initializer):
    def __init__(self, low: float = -1.0, high: float = 1.0):
        if not low < high:
            raise ValueError(f"Uniform(low={low}, high={high}): low must be below high")
        self.low, self.high = low, high

    def __call__(self, shape, dtype, backend):
        return backend.uniform(shape, self.low, self.high, dtype=dtype)


class Normal(Initializer):
    def __init__(self, mean: float = 0.0, std: float = 1.0):
        if std < 0:
            raise ValueError(f"Normal(std={std}): std must be non-negative")
        self.mean, self.std = mean, std

    def __call__(self, shape, dtype, backend):
        return backend.normal(shape, self.mean, self.std, dtype=dtype)


class TruncatedNormal(Normal):
    """Normal values redrawn until they lie within two standard deviations."""

    def __call__(self, shape, dtype, backend):
        xp = backend.xp
        out = backend.normal(shape, 0.0, 1.0, dtype=dtype)
        bad = xp.abs(out) > 2.0
        while bool(bad.any()):  # each pass redraws ~5% of what is left: a handful of passes
            out[bad] = backend.normal((int(bad.sum()),), 0.0, 1.0, dtype=dtype)
            bad = xp.abs(out) > 2.0
        return out * self.std + self.mean


class XavierUniform(Initializer):
    def __init__(self, fan_in: int | None = None, fan_out: int | None = None, gain: float = 1.0):
        self.fan_in, self.fan_out, self.gain = fan_in, fan_out, gain

    def __call__(self, shape, dtype, backend):
        fi, fo = _fans(shape)
        fi, fo = self.fan_in or fi, self.fan_out or fo
        limit = self.gain * math.sqrt(6.0 / max(fi + fo, 1))
        return backend.uniform(shape, -limit, limit, dtype=dtype)


class XavierNormal(XavierUniform):
    def __call__(self, shape, dtype, backend):
        fi, fo = _fans(shape)
        fi, fo = self.fan_in or fi, self.fan_out or fo
        return backend.normal(shape, 0.0, self.gain * math.sqrt(2.0 / max(fi + fo, 1)), dtype=dtype)


class KaimingUniform(Initializer):
    """He initialization for ReLU networks: U(-b, b), b = gain * sqrt(3 / fan_in)."""

    def __init__(self, fan_in: int | None = None, negative_slope: float = 0.0):
        self.fan_in, self.negative_slope = fan_in, negative_slope

    def _std(self, shape) -> float:
        fan_in = self.fan_in or _fans(shape)[0]
        gain = math.sqrt(2.0 / (1 + self.negative_slope ** 2))
        return gain / math.sqrt(max(fan_in, 1))

    def __call__(self, shape, dtype, backend):
        bound = math.sqrt(3.0) * self._std(shape)
        return backend.uniform(shape, -bound, bound, dtype=dtype)


class KaimingNormal(KaimingUniform):
    def __call__(self, shape, dtype, backend):
        return backend.normal(shape, 0.0, self._std(shape), dtype=dtype)


class Assign(Initializer):
    """Exactly the values given (a list, array or Tensor of the parameter's shape)."""

    def __init__(self, value):
        self.value = np.asarray(getattr(value, "numpy", lambda: value)())

    def __call__(self, shape, dtype, backend):
        if tuple(self.value.shape) != tuple(shape):
            from shoal.worker.errors import ShapeError
            raise ShapeError(f"Assign initializer: value shape {self.value.shape} != parameter "
                             f"shape {tuple(shape)}")
        return backend.asarray(self.value.astype(dtype))


_global: dict[bool, Initializer | None] = {False: None, True: None}


def set_global_initializer(weight_init: Initializer | None, bias_init: Initializer | None = None) -> None:
    """Initializers used for every parameter created afterwards without its own
    (pass None to go back to the layers' defaults)."""
    for v in (weight_init, bias_init):
        if v is not None and not isinstance(v, Initializer):
            raise TypeError(f"set_global_initializer: {v!r} is not an Initializer")
    _global[False], _global[True] = weight_init, bias_init


def global_initializer(is_bias: bool) -> Initializer | None:
    return _global[is_bias]


__all__ = ["Initializer", "Constant", "Uniform", "Normal", "TruncatedNormal", "XavierUniform",
           "XavierNormal", "KaimingUniform", "KaimingNormal", "Assign", "set_global_initializer"]

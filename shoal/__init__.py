"""Shoal: eager, torch-free distributed training (parameter servers and collectives).

The public face: ``shoal.Tensor``, ``shoal.nn``, ``shoal.optimizer``,
``shoal.save`` / ``shoal.load`` and the tensor functions below. The parameter
server, collectives and launcher load lazily, so ``import shoal`` stays fast.
"""
import sys as _sys

from shoal import kernels
from shoal.errors import ShoalError
from shoal.kernels import BackendError
from shoal.worker import (DTypeError, EngineError, Function, GradError, IndexRangeError,
                          SerializationError, ShapeError, SparseGrad, StateDictError, Tensor,
                          enable_grad, get_default_dtype, is_grad_enabled, load, no_grad, save,
                          set_default_dtype, set_grad_enabled)
from shoal.worker import amp, nn
from shoal.worker import optim as optimizer
from shoal.worker.ops import (abs, add, cast, clone, concat, div, exp, flatten, gather, log, matmul,
                              max, maximum, mean, minimum, mul, neg, pow, relu, reshape, sigmoid,
                              split, sqrt, squeeze, stack, sub, sum, tanh, transpose, unsqueeze)

# `import shoal.nn.functional as F` and friends reach the same module objects.
for _alias, _mod in {"amp": amp, "nn": nn, "nn.functional": nn.functional,
                     "nn.initializer": nn.initializer, "optimizer": optimizer,
                     "optimizer.lr": optimizer.lr}.items():
    _sys.modules[f"{__name__}.{_alias}"] = _mod

__version__ = "0.1.0"


def __getattr__(name: str):
    # the PS/fleet side loads on first use: `import shoal` stays fast and zmq-free
    if name in ("fleet", "datasets"):
        import importlib
        return importlib.import_module(f"shoal.{name}")
    raise AttributeError(f"module 'shoal' has no attribute {name!r}")


def to_tensor(data, dtype=None, stop_gradient: bool = True, backend=None) -> Tensor:
    """A new Tensor from `data` (Paddle's spelling: `stop_gradient=False` to require grad)."""
    return Tensor(data, dtype=dtype, requires_grad=not stop_gradient, backend=backend)


def seed(value: int) -> None:
    """Seed every backend's generator (initializers, dropout) for a repeatable run."""
    kernels.seed(value)


def set_device(device: str) -> None:
    """'cpu' (numpy) or 'gpu' (cupy): where new tensors and parameters are created."""
    names = {"cpu": "numpy", "gpu": "cupy"}
    if device not in names:
        raise BackendError(f"set_device({device!r}): expected one of {sorted(names)}")
    kernels.set_default_backend(names[device])


def zeros(shape, dtype=None) -> Tensor:
    return Tensor(kernels.default_backend().xp.zeros(shape, dtype=dtype or get_default_dtype()))


def ones(shape, dtype=None) -> Tensor:
    return Tensor(kernels.default_backend().xp.ones(shape, dtype=dtype or get_default_dtype()))


def randn(shape, dtype=None) -> Tensor:
    dt = dtype or get_default_dtype()
    return Tensor(kernels.default_backend().normal(tuple(shape), dtype=dt), dtype=dt)


def rand(shape, dtype=None) -> Tensor:
    dt = dtype or get_default_dtype()
    return Tensor(kernels.default_backend().uniform(tuple(shape), dtype=dt), dtype=dt)


__all__ = [
    "Tensor", "to_tensor", "amp", "nn", "optimizer", "kernels", "save", "load", "no_grad",
    "enable_grad",
    "set_grad_enabled", "is_grad_enabled", "seed", "set_device", "set_default_dtype",
    "get_default_dtype", "zeros", "ones", "randn", "rand", "Function", "SparseGrad",
    "abs", "add", "cast", "clone", "concat", "div", "exp", "flatten", "gather", "log", "matmul",
    "max", "maximum", "mean", "minimum", "mul", "neg", "pow", "relu", "reshape", "sigmoid",
    "split", "sqrt", "squeeze", "stack", "sub", "sum", "tanh", "transpose", "unsqueeze",
    "ShoalError", "BackendError", "EngineError", "ShapeError", "DTypeError", "GradError",
    "IndexRangeError", "StateDictError", "SerializationError",
]

"""Eager training on a worker: Tensor and autograd, nn layers, optimizers, save/load."""
from shoal.worker.autograd import Function, enable_grad, is_grad_enabled, no_grad, set_grad_enabled
from shoal.worker.errors import (DTypeError, EngineError, GradError, IndexRangeError, SerializationError,
                                 ShapeError, StateDictError)
from shoal.worker.sparse import SparseGrad
from shoal.worker.tensor import Tensor, get_default_dtype, set_default_dtype
from shoal.worker import ops
from shoal.worker import nn, optim
from shoal.worker.serialization import load, save

__all__ = ["Tensor", "Function", "SparseGrad", "no_grad", "enable_grad", "set_grad_enabled",
           "is_grad_enabled", "set_default_dtype", "get_default_dtype", "ops", "nn", "optim",
           "save", "load", "EngineError", "ShapeError", "DTypeError", "GradError",
           "IndexRangeError", "StateDictError", "SerializationError"]

"""Errors of the eager engine (worker/)."""
from shoal.errors import ShoalError


class EngineError(ShoalError):
    """Base class of errors raised by the eager engine."""


class ShapeError(EngineError, ValueError):
    """Operands, gradients or state entries whose shapes do not fit."""


class DTypeError(EngineError, TypeError):
    """An operand of the wrong dtype."""


class IndexRangeError(EngineError, IndexError):
    """An id or index outside the rows it addresses."""


class GradError(EngineError, RuntimeError):
    """Autograd was used in a way it cannot honour (backward on a non-scalar, a freed graph, ...)."""


class StateDictError(EngineError, KeyError):
    """A state dict that does not match the layer or optimizer it is loaded into."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class SerializationError(EngineError, ValueError):
    """A file that is not a Shoal checkpoint, or an object that cannot be saved safely."""


class AmpError(EngineError, ValueError):
    """Automatic mixed precision used with a bad argument (a list name, a level, a ratio ...)."""

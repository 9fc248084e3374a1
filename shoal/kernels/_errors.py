"""Errors of the kernels layer."""
from shoal.errors import ShoalError


class KernelError(ShoalError):
    """Base class of errors raised by kernels/."""


class BackendError(KernelError, ValueError):
    """An array backend was asked for by a name that is unknown or not usable here."""


class KernelShapeError(KernelError, ValueError):
    """A kernel got arrays whose shapes do not fit together."""

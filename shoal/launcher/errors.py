"""The launcher's errors."""
from shoal.errors import ShoalError


class LaunchError(ShoalError):
    """A job could not start, or one of its processes failed (the message names which and why)."""


class StoreBindError(LaunchError):
    """The rendezvous store of a collective job could not bind its address (a busy --master)."""

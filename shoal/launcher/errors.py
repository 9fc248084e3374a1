"""The launcher's errors."""
from shoal.errors import ShoalError


class LaunchError(ShoalError):
    """A job could not start, or one of its processes failed (the message names which and why)."""

"""The fleet facade's errors."""
from shoal.errors import ShoalError


class FleetError(ShoalError):
    """fleet was called in the wrong order, with the wrong role, or with conflicting settings."""

"""The root of Shoal's exceptions; each subsystem derives its own base from it."""


class ShoalError(Exception):
    """Base class of every error Shoal raises on purpose."""

"""Launching Shoal jobs: the local supervisor of a PS job's servers and workers (fleetrun builds on it)."""
from shoal.launcher.errors import LaunchError
from shoal.launcher.local import Child, LocalJob

__all__ = ["LocalJob", "Child", "LaunchError"]

"""Launching Shoal jobs: the local supervisors of PS and collective jobs (fleetrun builds on
them) and spawn() for collective jobs started from one script."""
from shoal.launcher._spawn import ProcessFailedError, spawn
from shoal.launcher.errors import LaunchError, StoreBindError
from shoal.launcher.local import Child, CollectiveJob, LocalJob

__all__ = ["LocalJob", "CollectiveJob", "Child", "spawn", "LaunchError", "ProcessFailedError",
           "StoreBindError"]

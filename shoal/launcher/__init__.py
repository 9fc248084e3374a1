"""Launching Shoal jobs: the local supervisors of PS and collective jobs (fleetrun builds on
them), spawn() for collective jobs started from one script, and submit() for a PS job sent to
a Ray cluster through Ray job submission (Ray loads only when a Ray job runs)."""
from shoal.launcher._spawn import ProcessFailedError, spawn
from shoal.launcher._submit import submit
from shoal.launcher.errors import LaunchError, StoreBindError
from shoal.launcher.local import Child, CollectiveJob, LocalJob

__all__ = ["LocalJob", "CollectiveJob", "Child", "spawn", "submit", "LaunchError",
           "ProcessFailedError", "StoreBindError"]

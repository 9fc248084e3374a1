"""Parameter servers: sharded sparse and dense tables, accessors, RPC with auth, server, client, checkpoints.

Loaded only when imported (``import shoal`` does not pull in zmq).
"""
from shoal.ps.client import PSClient, PSHandle
from shoal.ps.errors import (CheckpointError, PSError, PSTimeoutError, RemoteError, TableError,
                             WireError)
from shoal.ps.spec import DenseTableSpec, SparseTableSpec

# The server's entry point is shoal.ps.server (python -m shoal.ps.server, or its serve());
# it is not imported here so that `python -m shoal.ps.server` runs it exactly once.
__all__ = ["PSClient", "PSHandle", "SparseTableSpec", "DenseTableSpec", "PSError",
           "PSTimeoutError", "RemoteError", "TableError", "WireError", "CheckpointError"]

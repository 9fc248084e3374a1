"""Parameter servers: sharded sparse and dense tables, accessors, RPC with auth, server, client, checkpoints.

Loaded only when imported (``import shoal`` does not pull in zmq).
"""
from shoal.ps.client import PSClient, PSHandle
from shoal.ps.errors import (CheckpointError, PSError, PSTimeoutError, RemoteError, TableError,
                             WireError)
from shoal.ps.server import serve
from shoal.ps.spec import DenseTableSpec, SparseTableSpec

__all__ = ["PSClient", "PSHandle", "serve", "SparseTableSpec", "DenseTableSpec", "PSError",
           "PSTimeoutError", "RemoteError", "TableError", "WireError", "CheckpointError"]

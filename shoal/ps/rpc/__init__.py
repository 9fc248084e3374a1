"""The parameter server's transport: wire format, job-token auth, RPC server and client.

ZeroMQ DEALER/ROUTER sockets carry messages whose frame 0 is a msgpack
header and whose other frames are raw numpy buffers (:mod:`.wire`); every
connection proves it holds the job token through ZAP (:mod:`.auth`).
:class:`RpcServer` dispatches ops to handlers on a thread pool;
:class:`RpcClient` lets any number of threads keep calls in flight and wait
on their :class:`Handle`.
"""
from shoal.ps.rpc.auth import AuthMode, curve_server_keys
from shoal.ps.rpc.client import ConnState, RpcClient
from shoal.ps.rpc.handle import Handle
from shoal.ps.rpc.server import Handler, RpcServer, ServerState
from shoal.ps.rpc.wire import DEFAULT_MAX_BYTES, DTYPES, decode, encode

__all__ = ["AuthMode", "ConnState", "DEFAULT_MAX_BYTES", "DTYPES", "Handle", "Handler", "RpcClient",
           "RpcServer", "ServerState", "curve_server_keys", "decode", "encode"]

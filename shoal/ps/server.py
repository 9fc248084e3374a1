"""The parameter server process: `python -m shoal.ps.server` and `fleet.run_server()`.

A server binds the endpoint it is given (port 0 binds a free port
atomically), reports the endpoint it really got before serving (to a file or
an inherited pipe fd the launcher names), and serves until a client sends
`stop`, SIGTERM/SIGINT arrives, or its parent launcher dies. The job token
comes from SHOAL_JOB_TOKEN.

    python -m shoal.ps.server --index 0 --servers 2 --endpoint tcp://127.0.0.1:0 \\
        --report-file /tmp/ps0.endpoint
"""
from __future__ import annotations

import argparse
import os
import signal
import sys
import threading

from shoal._atomic import atomic_write
from shoal.kernels import tune_for_server
from shoal.ps.errors import PSError
from shoal.ps.rpc import RpcServer
from shoal.ps.service import INLINE_OPS, PSService

TOKEN_ENV = "SHOAL_JOB_TOKEN"


def report_endpoint(endpoint: str, report_file: str | None = None, report_fd: int | None = None) -> None:
    """Tell the launcher where this server listens: a file written atomically, or a pipe fd."""
    line = endpoint + "\n"
    if report_file:
        atomic_write(report_file, lambda f: f.write(line.encode()))
    if report_fd is not None:
        os.write(report_fd, line.encode())
        os.close(report_fd)


def serve(index: int, n_servers: int, endpoint: str, token: str, *, auth: str = "plain",
          n_threads: int = 64, max_bytes: int | None = None, report=None,
          stop_event: threading.Event | None = None, load_dir: str | None = None) -> None:
    """Run server `index` of `n_servers` until stopped. Blocks.

    `load_dir` loads this server's share of a checkpoint before serving
    (fleet.init_server(dirname)). `report(endpoint)` is called once the
    socket is bound. `stop_event`, when
    set by another thread (or a `stop` request), drains in-flight requests
    and returns.
    """
    tune_for_server()
    service = PSService(index, n_servers, max_waiters=max(1, n_threads - 4))
    if load_dir is not None:
        service.op_load({"dir": os.path.abspath(load_dir)}, [])
    kwargs = {} if max_bytes is None else {"max_bytes": max_bytes}
    rpc = RpcServer(endpoint, token=token, auth=auth, handlers=service.handlers(),
                    n_threads=n_threads, inline_ops=INLINE_OPS, **kwargs)
    real = rpc.start()
    try:
        if report is not None:
            report(real)
        while not service.stop_requested.wait(0.2):
            if stop_event is not None and stop_event.is_set():
                break
    finally:
        rpc.stop(drain_timeout=10.0)
        service.close()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m shoal.ps.server",
                                 description="Run one Shoal parameter server.")
    ap.add_argument("--index", type=int, required=True, help="this server's index (0-based)")
    ap.add_argument("--servers", type=int, required=True, help="number of servers in the job")
    ap.add_argument("--endpoint", default="tcp://127.0.0.1:0",
                    help="where to bind; port 0 picks a free port (default %(default)s)")
    ap.add_argument("--auth", choices=["plain", "curve"], default="plain")
    ap.add_argument("--threads", type=int, default=64, help="RPC handler threads")
    ap.add_argument("--max-bytes", type=int, default=None, help="largest request accepted")
    ap.add_argument("--report-file", default=os.environ.get("SHOAL_ENDPOINT_FILE"),
                    help="write the bound endpoint here (default $SHOAL_ENDPOINT_FILE)")
    ap.add_argument("--report-fd", type=int, default=None, help="write the endpoint to this pipe fd")
    args = ap.parse_args(argv)
    token = os.environ.get(TOKEN_ENV)
    if not token:
        print(f"shoal.ps.server: {TOKEN_ENV} is not set; every server and worker of a job needs "
              f"the same job token (fleetrun sets it)", file=sys.stderr)
        return 2
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    try:
        serve(args.index, args.servers, args.endpoint, token, auth=args.auth,
              n_threads=args.threads, max_bytes=args.max_bytes, stop_event=stop,
              report=lambda ep: report_endpoint(ep, args.report_file, args.report_fd))
    except PSError as e:
        print(f"shoal.ps.server {args.index}: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

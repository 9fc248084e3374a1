"""Fixtures for parameter-server tests: a job token, in-process RPC servers and clients, and
servers in child processes that bind port 0 and report their endpoint through a pipe.

Every socket binds and connects to 127.0.0.1 only. Every process started here is ended by PID
at teardown, also when the test fails.
"""
from __future__ import annotations

import ctypes
import importlib
import json
import os
import secrets
import select
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
CHILD_START_TIMEOUT_S = 60.0  # a cold interpreter importing numpy and zmq on a busy 2-core machine


@pytest.fixture
def job_token() -> str:
    """A fresh random job token."""
    return secrets.token_hex(16)


@pytest.fixture
def rpc_server():
    """``start(handlers, token, **kwargs) -> RpcServer``: a started server on 127.0.0.1 port 0.

    Every server started is stopped at teardown (``drain_timeout=2``).
    """
    from shoal.ps.rpc import RpcServer

    servers = []

    def start(handlers, token, **kwargs):
        kwargs.setdefault("endpoint", "tcp://127.0.0.1:0")
        server = RpcServer(kwargs.pop("endpoint"), token=token, handlers=handlers, **kwargs)
        servers.append(server)
        server.start()
        return server

    yield start
    for server in servers:
        server.stop(drain_timeout=2.0)


@pytest.fixture
def rpc_client():
    """``connect(endpoints, token, **kwargs) -> RpcClient``; every client is closed at teardown."""
    from shoal.ps.rpc import RpcClient

    clients = []

    def connect(endpoints, token, **kwargs):
        client = RpcClient(endpoints, token, **kwargs)
        clients.append(client)
        return client

    yield connect
    for client in clients:
        client.close()


@pytest.fixture
def server_process():
    """``start(factory, **kwargs) -> (endpoint, pid)``: a server in a child process.

    ``factory`` is ``"package.module:function"``, importable from the repository root in a fresh
    interpreter; ``function(**kwargs)`` returns an unstarted server with ``start() -> endpoint``
    and ``stop()`` (an RpcServer, or anything built on one). ``kwargs`` must be JSON-able; they
    travel through the child's stdin, so a job token never shows in a process listing. The child
    binds (port 0), prints its endpoint on stdout (a pipe), serves until its stdin closes, then
    stops the server and exits. It dies with its parent (PR_SET_PDEATHSIG). Teardown closes each
    child's stdin, waits up to 10 s, then kills it by PID.
    """
    procs: list[subprocess.Popen] = []

    def start(factory: str, **kwargs) -> tuple[str, int]:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
        stderr = tempfile.TemporaryFile()
        proc = subprocess.Popen(
            [sys.executable, "-c", "from tests.ps.conftest import serve_child; serve_child()"],
            cwd=REPO_ROOT, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=stderr)
        procs.append(proc)
        proc.stdin.write((json.dumps({"factory": factory, "kwargs": kwargs}) + "\n").encode())
        proc.stdin.flush()
        ready, _, _ = select.select([proc.stdout], [], [], CHILD_START_TIMEOUT_S)
        line = proc.stdout.readline().decode().strip() if ready else ""
        if not line.startswith("ENDPOINT "):
            _end(proc)
            stderr.seek(0)
            pytest.fail(f"server child {factory} did not report an endpoint within "
                        f"{CHILD_START_TIMEOUT_S:.0f} s (got {line!r}); its stderr:\n"
                        f"{stderr.read().decode(errors='replace')[-4000:]}")
        return line.split(" ", 1)[1], proc.pid

    yield start
    for proc in procs:
        _end(proc)


def _end(proc: subprocess.Popen) -> None:
    """Stop a child: close its stdin (it stops its server), then SIGKILL it by PID after 10 s."""
    try:
        proc.stdin.close()
    except OSError:
        pass
    try:
        proc.wait(10.0)
    except subprocess.TimeoutExpired:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10.0)


def serve_child() -> None:
    """Entry point of a server child process (see the ``server_process`` fixture)."""
    try:  # die with the parent, even if it is killed with no chance to clean up
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
    spec = json.loads(sys.stdin.readline())
    module, _, name = spec["factory"].partition(":")
    server = getattr(importlib.import_module(module), name)(**spec["kwargs"])
    endpoint = server.start()
    sys.stdout.write(f"ENDPOINT {endpoint}\n")
    sys.stdout.flush()
    sys.stdin.read()  # until the parent closes our stdin (or dies)
    server.stop()


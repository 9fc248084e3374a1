"""Round-trip throughput of the PS RPC transport against a bare pyzmq echo.

Two echo servers run in separate processes on 127.0.0.1: an RpcServer whose
"echo" handler returns the array it got, and a bare pyzmq ROUTER that sends
back the frames it got; both authenticate with a job token the same way
(PLAIN by default, --auth curve for CurveZMQ on both). One client process
times round trips through RpcClient.call and through a bare DEALER
(send_multipart / recv_multipart, copy=False) of the same payload, one
request in flight, interleaving the two (alternating which goes
first) call by call and comparing medians, because these machines are
noisy. Throughput counts the payload once per round trip: MB/s = payload
bytes / median round-trip time / 1e6. Prints one JSON line per case on stdout:

    {"bench": "ps_rpc", "case": "echo_1MiB", "value": <rpc MB/s>, "unit": "MB/s",
     "reference": "pyzmq_echo", "ratio": <rpc / bare>}

Usage: python bench/ps_rpc.py [--rounds 15] [--sizes 1,16] [--auth plain]
(python bench/ps_rpc.py --serve rpc|bare is the server side; it reads the
token from stdin and prints its endpoint.)
"""
from __future__ import annotations

import argparse
import json
import os
import secrets
import select
import statistics
import subprocess
import sys
import time

import numpy as np
import zmq

from shoal.ps.rpc import RpcClient, RpcServer
from shoal.ps.rpc.auth import configure_client_socket, configure_server_socket, start_authenticator

MIB = 1 << 20


def serve(kind: str, auth: str) -> None:
    """Child process: start an echo server on 127.0.0.1 port 0, print its endpoint, serve until stdin closes."""
    token = sys.stdin.readline().strip()
    if kind == "rpc":
        server = RpcServer("tcp://127.0.0.1:0", token=token, auth=auth,
                           handlers={"echo": lambda header, arrays: ({}, arrays)})
        print(server.start(), flush=True)
        sys.stdin.read()
        server.stop()
        return
    ctx = zmq.Context()
    zap = start_authenticator(ctx, token, auth)  # same security as the rpc side (CURVE costs per message)
    sock = ctx.socket(zmq.ROUTER)
    configure_server_socket(sock, token, auth)
    sock.linger = 0
    sock.bind("tcp://127.0.0.1:0")
    print(sock.last_endpoint.decode(), flush=True)
    poller = zmq.Poller()
    poller.register(sock, zmq.POLLIN)
    poller.register(sys.stdin.fileno(), zmq.POLLIN)
    while True:
        events = dict(poller.poll())
        if sys.stdin.fileno() in events:
            sock.close(0)
            zap.stop()
            ctx.term()
            return
        sock.send_multipart(sock.recv_multipart(copy=False), copy=False)


def start_server(kind: str, token: str, auth: str) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--serve", kind, "--auth", auth],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    proc.stdin.write(token + "\n")
    proc.stdin.flush()
    ready, _, _ = select.select([proc.stdout], [], [], 60.0)
    line = proc.stdout.readline().strip() if ready else ""
    if not line.startswith("tcp://"):
        proc.kill()
        raise RuntimeError(f"{kind} echo server did not report an endpoint (got {line!r})")
    return proc, line


def stop_server(proc: subprocess.Popen) -> None:
    try:
        proc.stdin.close()
        proc.wait(10)
    except (subprocess.TimeoutExpired, OSError):
        pass
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, 9)
            proc.wait()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--serve", choices=["rpc", "bare"])
    p.add_argument("--auth", default="plain", choices=["plain", "curve"])
    p.add_argument("--rounds", type=int, default=15,
                   help="scales the number of round trips: rounds * 64 / MiB per side, at least 100")
    p.add_argument("--sizes", default="1,16", help="payload sizes in MiB, comma-separated")
    args = p.parse_args()
    if args.serve:
        serve(args.serve, args.auth)
        return

    token = secrets.token_hex(16)
    procs = []
    try:
        rpc_proc, rpc_ep = start_server("rpc", token, args.auth)
        procs.append(rpc_proc)
        bare_proc, bare_ep = start_server("bare", token, args.auth)
        procs.append(bare_proc)
        ctx = zmq.Context()
        bare = ctx.socket(zmq.DEALER)
        bare.linger = 0
        configure_client_socket(bare, token, args.auth)
        bare.connect(bare_ep)
        with RpcClient([rpc_ep], token, auth=args.auth, timeout=60.0) as client:
            for mib in (float(s) for s in args.sizes.split(",")):
                payload = np.ones(int(mib * MIB) // 4, np.float32)
                nbytes = payload.nbytes
                (_, (back,)) = client.call(0, "echo", {}, [payload])
                assert np.array_equal(back, payload), "rpc echo returned other bytes"
                bare.send_multipart([payload], copy=False)
                assert bytes(bare.recv_multipart(copy=False)[0].buffer) == payload.tobytes()
                calls = max(100, int(args.rounds * 64 / mib))  # round trips per side

                def rpc_once() -> float:
                    t0 = time.perf_counter()
                    client.call(0, "echo", {}, [payload])
                    return time.perf_counter() - t0

                def bare_once() -> float:
                    t0 = time.perf_counter()
                    bare.send_multipart([payload], copy=False)
                    bare.recv_multipart(copy=False)
                    return time.perf_counter() - t0

                for _ in range(10):  # warm up both paths
                    rpc_once(), bare_once()
                rpc_s, bare_s = [], []
                for r in range(calls):  # interleaved call by call, alternating which goes first
                    if r % 2 == 0:
                        rpc_s.append(rpc_once())
                        bare_s.append(bare_once())
                    else:
                        bare_s.append(bare_once())
                        rpc_s.append(rpc_once())
                rpc_s = [nbytes / t / 1e6 for t in rpc_s]
                bare_s = [nbytes / t / 1e6 for t in bare_s]
                rpc_mbs, bare_mbs = statistics.median(rpc_s), statistics.median(bare_s)
                label = f"{mib:g}MiB"
                case = f"echo_{label}" if args.auth == "plain" else f"echo_{label}_{args.auth}"
                print(json.dumps({"bench": "ps_rpc", "case": case, "value": round(rpc_mbs, 1), "unit": "MB/s",
                                  "reference": "pyzmq_echo", "ratio": round(rpc_mbs / bare_mbs, 3)}), flush=True)
                print(f"{case}: rpc {rpc_mbs:.0f} MB/s ({nbytes / rpc_mbs:.0f} us per round trip), bare pyzmq "
                      f"{bare_mbs:.0f} MB/s ({nbytes / bare_mbs:.0f} us), {len(rpc_s)} round trips each",
                      file=sys.stderr)
        bare.close(0)
        ctx.term()
    finally:
        for proc in procs:
            stop_server(proc)


if __name__ == "__main__":
    main()

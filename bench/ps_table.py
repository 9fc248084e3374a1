"""Parameter-server table benchmarks (JSON lines, ratios against same-run references).

(a) in-process: pull then push of a batch of 100,000 Zipf-like keys against a
    10M-key sparse table, dim 16, adagrad, through the table's public calls
    (hash lookups, dedup, shard split, statistics included); reference: numpy
    gathering rows by precomputed row indices and applying the same adagrad
    update to precomputed unique rows of a pre-built array.
(b) loopback, 1 server process: pull and push throughput (MB/s) of a dense
    table with its real rule (adam) for 1 MiB and 16 MiB payloads, and of
    sparse pulls/pushes of the same byte size beside them. References, in
    another process: a bare pyzmq DEALER/ROUTER echo of the same bytes (the
    issue's reference), and, stricter, bare pyzmq moving the bytes once the
    same way (a small request answered by the payload for pulls, the payload
    answered by a small reply for pushes).

Each case interleaves the two sides and reports medians. Usage:
    python bench/ps_table.py [--keys 10000000] [--batch 100000] [--rounds 15] [--skip-rpc]
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import statistics
import sys
import tempfile
import time

import numpy as np

from shoal.ps.sparse_table import SparseTable
from shoal.ps.spec import DenseTableSpec, SparseTableSpec

DIM = 16


def emit(case: str, value: float, unit: str, reference: str, ratio: float, **extra) -> None:
    print(json.dumps({"bench": "ps_table", "case": case, "value": round(value, 1), "unit": unit,
                      "reference": reference, "ratio": round(ratio, 3), **extra}), flush=True)


def timed_pair(first, second, r: int) -> tuple[float, float]:
    """Run both once, in an order that alternates with `r`; their times, in (first, second) order."""
    times = {}
    for fn in ((first, second) if r % 2 else (second, first)):
        t = time.perf_counter()
        fn()
        times[fn] = time.perf_counter() - t
    return times[first], times[second]


def zipf_keys(rng, n_keys: int, batch: int) -> np.ndarray:
    """Zipf-like (s ~ 1.1) ranks over n_keys, mapped to scattered uint64 ids."""
    ranks = np.minimum(rng.zipf(1.1, batch), n_keys) - 1
    return (ranks.astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15)) ^ np.uint64(0x5851F42D4C957F2D)


def bench_in_process(n_keys: int, batch: int, rounds: int) -> None:
    spec = SparseTableSpec(name="emb", dim=DIM, rule="adagrad", shards=4)
    table = SparseTable(spec)
    all_keys = (np.arange(n_keys, dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15)) ^ \
        np.uint64(0x5851F42D4C957F2D)
    t0 = time.perf_counter()
    for start in range(0, n_keys, 1_000_000):
        table.pull(all_keys[start:start + 1_000_000], training=True)
    print(f"built a {len(table):,}-key table in {time.perf_counter() - t0:.1f}s", file=sys.stderr)

    # the reference: a pre-built array, row indices and unique rows computed ahead of time
    ref_emb = np.random.default_rng(1).uniform(-1e-4, 1e-4, (n_keys, DIM)).astype(np.float32)
    ref_g2 = np.zeros((n_keys, 1), np.float32)
    lr, g0 = np.float32(spec.learning_rate), np.float32(spec.initial_g2sum)

    rng = np.random.default_rng(0)
    t_table, t_ref = [], []
    for r in range(rounds + 2):
        keys = zipf_keys(rng, n_keys, batch)
        grads = rng.normal(0, 0.01, (batch, DIM)).astype(np.float32)
        shows = np.ones(batch, np.float32)
        clicks = (rng.random(batch) < 0.2).astype(np.float32)
        ranks = ((keys ^ np.uint64(0x5851F42D4C957F2D)) * np.uint64(0xF1DE83E19937733D)).astype(np.int64)
        uniq, inverse = np.unique(ranks, return_inverse=True)
        merged = np.zeros((len(uniq), DIM), np.float32)
        np.add.at(merged, inverse, grads)

        def run_table():
            table.pull(keys, training=True)
            table.push(keys, grads, shows, clicks)

        def run_ref():
            _ = ref_emb[ranks]
            w, g2 = ref_emb[uniq], ref_g2[uniq]
            w -= (lr * np.sqrt(g0 / (g0 + g2))) * merged
            np.clip(w, -10, 10, out=w)
            g2 += (merged * merged).mean(axis=1, keepdims=True)
            ref_emb[uniq], ref_g2[uniq] = w, g2

        tt, tr = timed_pair(run_table, run_ref, r)
        if r >= 2:
            t_table.append(tt)
            t_ref.append(tr)
    mt, mr = statistics.median(t_table), statistics.median(t_ref)
    emit(f"pull_push_{batch // 1000}k_of_{n_keys // 1_000_000}M_dim{DIM}_adagrad", batch / mt,
         "keys/s", "numpy_index", mr / mt, reference_value=round(batch / mr, 1))


# -- over loopback ------------------------------------------------------------------------------
def _echo_server(conn):
    """Bare pyzmq peer. [b"get", n] -> n bytes back (a pull's shape); [b"put", data] -> b"ok"
    (a push's); [b"echo", data] -> data back (the issue's echo reference); [b"stop"] ends."""
    import zmq
    ctx = zmq.Context()
    sock = ctx.socket(zmq.ROUTER)
    port = sock.bind_to_random_port("tcp://127.0.0.1")
    conn.send(f"tcp://127.0.0.1:{port}")
    blobs = {}
    while True:
        ident, cmd, *rest = sock.recv_multipart(copy=False)
        cmd = bytes(cmd.buffer)
        if cmd == b"stop":
            break
        if cmd == b"get":
            n = int(bytes(rest[0].buffer))
            sock.send_multipart([ident, blobs.setdefault(n, np.ones(n // 4, np.float32))], copy=False)
        elif cmd == b"echo":
            sock.send_multipart([ident, *rest], copy=False)
        else:
            sock.send_multipart([ident, b"ok"], copy=False)
    sock.close(linger=0)
    ctx.term()


def _ps_server(conn, token):
    from shoal.ps.server import serve
    serve(0, 1, "tcp://127.0.0.1:0", token, n_threads=4, max_bytes=1 << 28,
          report=lambda ep: conn.send(ep))


def bench_loopback(rounds: int) -> None:
    import zmq

    from shoal.ps.client import PSClient
    token = os.urandom(16).hex()
    ctx_mp = mp.get_context("spawn")
    a, b = ctx_mp.Pipe()
    echo = ctx_mp.Process(target=_echo_server, args=(b,), daemon=True)
    echo.start()
    echo_ep = a.recv()
    c, d = ctx_mp.Pipe()
    server = ctx_mp.Process(target=_ps_server, args=(d, token), daemon=True)
    server.start()
    ps_ep = c.recv()
    zctx = zmq.Context()
    dealer = zctx.socket(zmq.DEALER)
    dealer.connect(echo_ep)
    client = PSClient([ps_ep], token, timeout=60)
    try:
        for mib in (1, 16):
            n = mib * (1 << 20) // 4
            client.create_table(DenseTableSpec(name=f"d{mib}", size=n, rule="adam"))
            client.init_dense(f"d{mib}", np.zeros(n, np.float32))
            sparse = SparseTableSpec(name=f"s{mib}", dim=DIM, rule="adagrad")
            client.create_table(sparse)
            n_keys = n // DIM
            keys = np.arange(n_keys, dtype=np.uint64)
            client.pull_sparse(f"s{mib}", keys)
            payload = np.ones(n, np.float32)
            grads = np.ones((n_keys, DIM), np.float32)

            def bare_fetch():
                dealer.send_multipart([b"get", b"%d" % payload.nbytes])
                dealer.recv(copy=False)

            def bare_send():
                dealer.send_multipart([b"put", payload], copy=False)
                dealer.recv()

            def bare_echo():
                dealer.send_multipart([b"echo", payload], copy=False)
                dealer.recv(copy=False)

            dense_pull = lambda: client.pull_dense(f"d{mib}")  # noqa: E731
            dense_push = lambda: client.push_dense(f"d{mib}", payload)  # noqa: E731
            cases = [
                # the reference: a bare echo of the same bytes (they cross twice)
                ("dense_pull", dense_pull, bare_echo),
                ("dense_push", dense_push, bare_echo),
                # stricter, like for like: bare pyzmq moving the bytes once, the same way
                ("dense_pull", dense_pull, bare_fetch),
                ("dense_push", dense_push, bare_send),
                ("sparse_pull", lambda: client.pull_sparse(f"s{mib}", keys), bare_fetch),
                ("sparse_push", lambda: client.push_sparse(f"s{mib}", keys, grads), bare_send),
            ]
            for name, fn, ref in cases:
                t_case, t_ref = [], []
                for r in range(rounds + 2):
                    tc, tr = timed_pair(fn, ref, r)
                    if r >= 2:
                        t_case.append(tc)
                        t_ref.append(tr)
                mb = mib * 1.048576
                mc, mr = statistics.median(t_case), statistics.median(t_ref)
                emit(f"{name}_{mib}MiB", mb / mc, "MB/s", f"pyzmq_{ref.__name__}", mr / mc,
                     reference_value=round(mb / mr, 1))
    finally:
        client.stop_servers()
        client.close()
        dealer.send_multipart([b"stop"])
        dealer.close(linger=0)
        zctx.term()
        server.join(15)
        echo.join(15)
        for p in (server, echo):
            if p.is_alive():
                p.kill()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--keys", type=int, default=10_000_000)
    ap.add_argument("--batch", type=int, default=100_000)
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--skip-rpc", action="store_true")
    ap.add_argument("--skip-table", action="store_true")
    args = ap.parse_args(argv)
    if not args.skip_table:
        bench_in_process(args.keys, args.batch, args.rounds)
    if not args.skip_rpc:
        bench_loopback(args.rounds)
    return 0


if __name__ == "__main__":
    tempfile.tempdir = tempfile.gettempdir()
    sys.exit(main())

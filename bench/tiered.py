"""Tiered sparse tables (a RAM budget with the cold rows in RocksDB): JSON lines, human text on stderr.

Cases (see CASES at the bottom; each is a function taking the parsed args):

pull_push_zipf_10pct_ram
    In process, on SparseTable directly (the RPC path is the same for both
    sides): batches of Zipf(1.05) keys over a 10M-key universe (ranks mapped
    through a fixed random permutation to scattered uint64 ids, so hot keys
    are not small ints), each a training pull then a push (dim 16, adagrad,
    4 shards), starting from empty tables. The tiered table (storage ssd,
    memory_budget_mb: the smallest under which 10% of the rows the stream
    creates stay in RAM, by the tier's own accounting) against the all-RAM
    table, in interleaved rounds (fresh tables each round, the order
    rotating); value: the tiered table's median keys/s (pull keys + push
    keys), reference: the all-RAM table's. Two lines: eviction 'lfu' (the
    cache policy: fewest shows first) and, as
    pull_push_zipf_10pct_ram_unseen_days, the default (unseen days, then
    Paddle's show/click score: a model-value policy, which on this stream,
    clicks at random, keeps fewer of the often-seen keys).
    The table close (RocksDB flushing its memtables) is outside the timing;
    RocksDB's background flushes and compactions during the stream are in it.

rows_50m_dim16_budget_4gb
    In a child process (spawn), as a server would run it (tune_for_server):
    a table of --keys (default 50M) distinct keys x dim 16 (adagrad, 4
    shards, storage ssd) under --budget-mb, trained in batches of a training
    pull then a push of new keys; then VmHWM from /proc/self/status. value:
    peak RSS MB (the cold tier's key index in RAM included, and reported as
    cold_index_mb), reference budget_4096mb, ratio peak / 4096, with rows
    per tier and seconds. The RocksDB directory is a temporary one, removed after.

pass_mode_ctr_dnn
    examples/ctr_dnn.py as real jobs of servers and workers on 127.0.0.1
    (bench/ctr_ps.py's runner; 1x1 and 2x2): pass mode (ps_pass, each
    epoch one pass: its keys' whole records pulled once, trained on the
    worker, written back and merged) against per-step pulls and pushes in
    sync mode (the same semantics), interleaved rounds, medians; async
    (per-step pulls with prefetch) beside it. Examples/s over the whole
    epoch, the pass's pull and write-back included; no GPU here, so the
    pass table is numpy.

Usage: python bench/tiered.py [--quick] [--case NAME ...] [--keys N] [--budget-mb MB]
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import multiprocessing as mp
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from shoal.ps.sparse_table import SparseTable
from shoal.ps.spec import SparseTableSpec

BENCH = "tiered"
DIM = 16
ZIPF_S = 1.05
UNIVERSE = 10_000_000
BUDGET_50M_MB = 1300.0  # 50M keys: peak RSS with this budget in bench/README; 2600 peaked at 4934 MiB


def emit(case: str, value: float, unit: str, reference: str, ratio: float, **extra) -> None:
    print(json.dumps({"bench": BENCH, "case": case, "value": round(value, 1), "unit": unit,
                      "reference": reference, "ratio": round(ratio, 3), **extra}), flush=True)


def say(*parts) -> None:
    print(*parts, file=sys.stderr, flush=True)


def budget_mb_for(spec: SparseTableSpec, hot_rows: int) -> float:
    """The smallest memory_budget_mb under which `spec`'s shards keep `hot_rows` rows in RAM in all
    (shoal.ps.tiers.tiered's own accounting: arena, key map, room for a request's new rows)."""
    from shoal.ps.tiers.tiered import budget_rows
    row_bytes = 4 * SparseTable(spec).shards[0].width + 8 + 1
    want = -(-hot_rows // spec.shards)
    lo, hi = 1.0, float(want * row_bytes * 8 + (1 << 20))
    while hi - lo > 1.0:  # budget_rows grows with the budget: bisect on bytes
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if budget_rows(mid, row_bytes) >= want else (mid, hi)
    return hi * spec.shards / 2 ** 20


def scattered(ids: np.ndarray) -> np.ndarray:
    """Distinct ids -> distinct, scattered uint64 keys (an odd multiplier is a bijection)."""
    return (ids.astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15)) ^ np.uint64(0x5851F42D4C957F2D)


# -- pull_push_zipf_10pct_ram ----------------------------------------------------------------
def zipf_stream(n_batches: int, batch: int, seed: int = 0) -> list[np.ndarray]:
    """`n_batches` arrays of `batch` keys: Zipf(ZIPF_S) ranks over UNIVERSE (inverse CDF),
    each rank a fixed random key."""
    rng = np.random.default_rng(seed)
    cdf = np.cumsum(1.0 / np.arange(1, UNIVERSE + 1, dtype=np.float64) ** ZIPF_S)
    cdf /= cdf[-1]
    key_of_rank = scattered(rng.permutation(UNIVERSE))
    return [key_of_rank[np.minimum(np.searchsorted(cdf, rng.random(batch)), UNIVERSE - 1)]
            for _ in range(n_batches)]


def case_zipf(args) -> None:
    n_batches, batch, rounds = (60, 32768, 3) if args.quick else (args.batches, 32768, args.rounds)
    t0 = time.perf_counter()
    stream = zipf_stream(n_batches, batch)
    rng = np.random.default_rng(1)
    grads = [rng.normal(0, 0.01, (batch, DIM)).astype(np.float32) for _ in range(4)]
    shows = np.ones(batch, np.float32)
    clicks = [(rng.random(batch) < 0.1).astype(np.float32) for _ in range(4)]
    rows = len(np.unique(np.concatenate(stream)))
    base = SparseTableSpec(name="emb", dim=DIM, rule="adagrad", shards=4)
    budget_mb = budget_mb_for(base, rows // 10)
    say(f"zipf: {n_batches} batches x {batch} keys, {rows:,} distinct keys "
        f"(stream built in {time.perf_counter() - t0:.1f}s); tiered budget {budget_mb:.2f} MB")

    def run(spec: SparseTableSpec) -> tuple[float, dict]:
        table = SparseTable(spec)
        try:
            t = time.perf_counter()
            for i, keys in enumerate(stream):
                table.pull(keys, training=True)
                table.push(keys, grads[i % 4], shows, clicks[i % 4])
            elapsed = time.perf_counter() - t
            stats = table.stats()
            stats["map_bytes"] = sum(sh.map.capacity * 16 for sh in table.shards)
            return elapsed, stats
        finally:
            table.close()

    policies = ("lfu", "unseen_days")
    times = {w: [] for w in ("ram",) + policies}
    last, ram_stats = {}, None
    for r in range(rounds):
        path = tempfile.mkdtemp(prefix="shoal-bench-tiered-")
        try:
            order = list(times)
            for which in order[r % 3:] + order[:r % 3]:
                spec = base if which == "ram" else dataclasses.replace(
                    base, storage="ssd", ssd_path=path, memory_budget_mb=budget_mb, eviction=which)
                elapsed, stats = run(spec)
                times[which].append(elapsed)
                if which == "ram":
                    ram_stats = stats
                else:
                    last[which] = stats
        finally:
            shutil.rmtree(path, ignore_errors=True)
        say(f"  round {r}: all-RAM {times['ram'][-1]:.2f}s, " + ", ".join(
            f"tiered {p} {times[p][-1]:.2f}s ({times['ram'][-1] / times[p][-1]:.3f}x)"
            for p in policies))
    n_keys = 2 * batch * n_batches
    ram_kps = n_keys / statistics.median(times["ram"])
    for p in policies:
        tier_kps = n_keys / statistics.median(times[p])
        tiers = last[p]["tiers"]
        emit("pull_push_zipf_10pct_ram" + ("" if p == "lfu" else f"_{p}"), tier_kps, "keys/s",
             "all_ram", tier_kps / ram_kps, eviction=p, reference_value=round(ram_kps, 1),
             rounds=rounds, batches=n_batches, batch=batch, rows=last[p]["rows"],
             arena_rows=tiers["arena"]["rows"], cold_rows=tiers["cold.ssd"]["rows"],
             cold_index_mb=round(tiers["cold.ssd"]["ram_bytes"] / 2 ** 20, 2),
             budget_mb=round(budget_mb, 2),
             all_ram_mb=round((ram_stats["bytes"] + ram_stats["map_bytes"]) / 2 ** 20, 2))


# -- rows_50m_dim16_budget_4gb -----------------------------------------------------------------
def _peak_rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status (not Linux?)")


def _train_many_keys(n_keys: int, batch: int, budget_mb: float, path: str, conn) -> None:
    """Child: a server's table of `n_keys` keys trained in batches; sends its figures back."""
    from shoal.kernels import tune_for_server
    tune_for_server()
    spec = SparseTableSpec(name="big", dim=DIM, rule="adagrad", shards=4, storage="ssd",
                           ssd_path=path, memory_budget_mb=budget_mb)
    table = SparseTable(spec)
    rng = np.random.default_rng(0)
    grads = rng.normal(0, 0.01, (batch, DIM)).astype(np.float32)
    order = rng.permutation(n_keys)  # new keys in a random order, no key twice
    t0 = time.perf_counter()
    for start in range(0, n_keys, batch):
        keys = scattered(order[start:start + batch])
        table.pull(keys, training=True)
        table.push(keys, grads[:len(keys)])
        if (start // batch) % 20 == 0:
            print(f"  {start + len(keys):,} keys, {time.perf_counter() - t0:.0f}s, "
                  f"peak RSS {_peak_rss_mb():.0f} MB", file=sys.stderr, flush=True)
    seconds = time.perf_counter() - t0
    stats = table.stats()
    peak = _peak_rss_mb()
    table.close()
    conn.send({"peak_mb": peak, "seconds": seconds, "stats": stats})


def case_50m(args) -> None:
    n_keys = 2_000_000 if args.quick and args.keys is None else (args.keys or 50_000_000)
    # fewer keys than 50M: the same share of them in RAM as 50M under the default budget
    budget = args.budget_mb or round(BUDGET_50M_MB * min(1.0, n_keys / 50_000_000), 1)
    path = tempfile.mkdtemp(prefix="shoal-bench-50m-")
    ctx = mp.get_context("spawn")
    recv, send = ctx.Pipe(duplex=False)
    say(f"{n_keys:,} keys x dim {DIM} under memory_budget_mb={budget} (RocksDB in {path})")
    child = ctx.Process(target=_train_many_keys, args=(n_keys, 500_000, budget, path, send))
    child.start()
    send.close()
    try:
        try:
            out = recv.recv()
        except EOFError:
            child.join(60)
            raise RuntimeError(f"the {n_keys:,}-key child process died (exit code "
                               f"{child.exitcode}) before reporting; see its output above") from None
    finally:
        child.join(60)
        if child.is_alive():
            child.kill()
            child.join()
        shutil.rmtree(path, ignore_errors=True)
    tiers, peak = out["stats"]["tiers"], out["peak_mb"]
    emit(f"rows_{n_keys // 1_000_000}m_dim{DIM}_budget_4gb", peak, "MB", "budget_4096mb",
         peak / 4096, rows=out["stats"]["rows"], arena_rows=tiers["arena"]["rows"],
         cold_rows=tiers["cold.ssd"]["rows"],
         cold_index_mb=round(tiers["cold.ssd"]["ram_bytes"] / 2 ** 20, 1),
         memory_budget_mb=budget, seconds=round(out["seconds"], 1))


def case_pass_mode(args) -> None:
    """examples/ctr_dnn.py as real jobs (bench/ctr_ps.py's runner): pass mode (ps_pass, the epoch
    one pass) against per-step pulls and pushes in sync mode (the same semantics: one worker's
    pass = per-step sync training), interleaved rounds, medians; async (per-step pulls with
    prefetch) is printed beside it. Each job's examples/s includes its pass's pull and
    write-back."""
    from ctr_ps import run  # bench/ctr_ps.py, beside this file

    from shoal.worker.data.synthetic import ensure_synthetic_ctr

    samples = 40_000 if args.quick else args.ctr_samples
    rounds = 1 if args.quick else args.ctr_rounds
    job = argparse.Namespace(cache=os.path.join(tempfile.gettempdir(), "shoal-bench-ctr"),
                             samples=samples, test_samples=max(2000, samples // 10), timeout=900)
    ensure_synthetic_ctr(job.cache, n_train=job.samples, n_test=job.test_samples)
    modes = ("pass", "sync", "async")
    for shape in args.ctr_shapes.split(","):
        figures = {m: [] for m in modes}
        with tempfile.TemporaryDirectory(prefix="shoal-bench-pass-") as tmp:
            for r in range(rounds):
                order = modes if r % 2 == 0 else modes[::-1]
                for mode in order:
                    work = Path(tmp) / f"{mode}-{r}"
                    work.mkdir()
                    workers = [f for f in run(f"{shape}:{mode}", job, work) if f["role"] == "worker"]
                    figures[mode].append(sum(w["train_examples_per_s"] for w in workers))
                    say(f"  pass_mode {shape} {mode} round {r}: {figures[mode][-1]:.0f} examples/s")
        med = {m: statistics.median(v) for m, v in figures.items()}
        emit(f"pass_mode_ctr_dnn_{shape}", med["pass"], "examples/s", "per_step_sync",
             med["pass"] / med["sync"], reference_value=round(med["sync"], 1),
             async_examples_per_s=round(med["async"], 1), ratio_vs_async=round(med["pass"] / med["async"], 3),
             samples=job.samples, rounds=rounds)


# The cases, in the order they run.
CASES = {
    "pull_push_zipf_10pct_ram": case_zipf,
    "rows_50m_dim16_budget_4gb": case_50m,
    "pass_mode_ctr_dnn": case_pass_mode,
}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="a ~30 s smoke run (small sizes)")
    ap.add_argument("--case", action="append", choices=sorted(CASES),
                    help="run only this case (repeatable)")
    ap.add_argument("--batches", type=int, default=300, help="zipf: batches per round")
    ap.add_argument("--rounds", type=int, default=5, help="zipf: interleaved rounds")
    ap.add_argument("--keys", type=int, default=None, help="50m: keys (default 50,000,000)")
    ap.add_argument("--budget-mb", type=float, default=None,
                    help=f"50m: memory_budget_mb (default {BUDGET_50M_MB:.0f} for 50M keys)")
    ap.add_argument("--ctr-samples", type=int, default=200_000,
                    help="pass mode: synthetic CTR training samples per job")
    ap.add_argument("--ctr-shapes", default="1x1,2x2", help="pass mode: servers x workers")
    ap.add_argument("--ctr-rounds", type=int, default=3, help="pass mode: interleaved rounds")
    args = ap.parse_args(argv)
    for name in args.case or list(CASES):
        CASES[name](args)
    return 0


if __name__ == "__main__":
    sys.exit(main())

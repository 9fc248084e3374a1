"""The native uint64 -> row hash map against a Python dict doing the same work.

Two cases, each as interleaved rounds (map, dict, dict, map, ...) with medians,
because these machines are noisy:

- lookup_10M: a map and a dict each hold 10M random uint64 keys; a round
  looks up 1M random present keys in batches of 100k and produces an int64
  row array (the dict side: ``[d.get(k, -1) for k in batch.tolist()]`` into
  numpy, the idiom a Python table would use).
- insert_10M: a round fills an empty map (default capacity, so every rehash
  on the way is paid) with 10M fresh keys in batches of 100k via
  get_or_insert; the dict side gives each new key the next row id with
  ``setdefault(k, len(d))``.

Python's garbage collector is off while timing (as in timeit). Prints one JSON
line per case on stdout:

    {"bench": "keymap", "case": "lookup_10M", "value": <keys/s>, "unit": "keys/s",
     "reference": "python_dict", "ratio": <keymap rate / dict rate>}

Usage: python bench/keymap.py [--keys 10000000] [--lookups 1000000] [--batch 100000]
                              [--lookup-rounds 7] [--insert-rounds 3]
"""
from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time

import numpy as np

from shoal.ps._keymap import KeyMap


def unique_keys(n: int, rng: np.random.Generator) -> np.ndarray:
    keys = np.unique(rng.integers(0, 2**64, size=n + n // 1000 + 16, dtype=np.uint64))
    return rng.permutation(keys)[:n]


def timed(fn) -> float:
    gc.disable()
    try:
        t = time.perf_counter()
        fn()
        return time.perf_counter() - t
    finally:
        gc.enable()


def interleave(a, b, rounds: int) -> tuple[list[float], list[float]]:
    """Runs a and b `rounds` times each, alternating which goes first; returns their times."""
    ta, tb = [], []
    for i in range(rounds):
        if i % 2 == 0:
            ta.append(timed(a))
            tb.append(timed(b))
        else:
            tb.append(timed(b))
            ta.append(timed(a))
    return ta, tb


def batches(keys: np.ndarray, size: int) -> list[np.ndarray]:
    return [keys[i : i + size] for i in range(0, len(keys), size)]


def emit(case: str, n: int, t_map: list[float], t_dict: list[float]) -> None:
    value = n / statistics.median(t_map)
    ref = n / statistics.median(t_dict)
    print(
        json.dumps(
            {
                "bench": "keymap",
                "case": case,
                "value": round(value),
                "unit": "keys/s",
                "reference": "python_dict",
                "ratio": round(value / ref, 2),
            }
        ),
        flush=True,
    )
    print(
        f"  {case}: keymap {value / 1e6:.1f}M keys/s (rounds {[round(t, 3) for t in t_map]} s), "
        f"dict {ref / 1e6:.2f}M keys/s (rounds {[round(t, 3) for t in t_dict]} s)",
        file=sys.stderr,
    )


def label(n: int) -> str:
    return f"{n // 1_000_000}M" if n % 1_000_000 == 0 else f"{n // 1000}k" if n % 1000 == 0 else str(n)


def bench_lookup(keys: np.ndarray, args, rng: np.random.Generator) -> None:
    n = len(keys)
    km = KeyMap()
    for b in batches(keys, args.batch):
        km.get_or_insert(b)
    d = dict(zip(keys.tolist(), range(n)))
    print(f"  built map ({km!r}) and dict of {n} keys", file=sys.stderr)

    queries = batches(keys[rng.integers(0, n, size=args.lookups)], args.batch)
    expect = [km.lookup(q) for q in queries]

    def run_map():
        for q in queries:
            km.lookup(q)

    def run_dict():
        get = d.get
        for q in queries:
            np.array([get(k, -1) for k in q.tolist()], dtype=np.int64)

    got = [np.array([d.get(k, -1) for k in q.tolist()], dtype=np.int64) for q in queries]
    assert all(np.array_equal(e, g) for e, g in zip(expect, got)), "map and dict disagree"
    t_map, t_dict = interleave(run_map, run_dict, args.lookup_rounds)
    emit(f"lookup_{label(n)}", args.lookups, t_map, t_dict)


def bench_insert(keys: np.ndarray, args) -> None:
    parts = batches(keys, args.batch)
    state = {}

    def run_map():
        km = KeyMap()
        for b in parts:
            km.get_or_insert(b)
        state["map"] = km

    def run_dict():
        d = {}
        setdefault = d.setdefault
        for b in parts:
            np.array([setdefault(k, len(d)) for k in b.tolist()], dtype=np.int64)
        state["dict"] = d

    # Each side's previous result is dropped outside the timed region.
    t_map, t_dict = [], []
    for i in range(args.insert_rounds):
        order = (("map", run_map, t_map), ("dict", run_dict, t_dict))
        for name, fn, times in order if i % 2 == 0 else order[::-1]:
            state.pop(name, None)
            times.append(timed(fn))
    assert len(state["map"]) == len(state["dict"]) == len(keys), "map and dict disagree"
    assert np.array_equal(state["map"].lookup(keys[:1000]), np.arange(1000)), "rows are not 0, 1, 2, ..."
    emit(f"insert_{label(len(keys))}", len(keys), t_map, t_dict)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--keys", type=int, default=10_000_000)
    p.add_argument("--lookups", type=int, default=1_000_000)
    p.add_argument("--batch", type=int, default=100_000)
    p.add_argument("--lookup-rounds", type=int, default=7)
    p.add_argument("--insert-rounds", type=int, default=3)
    args = p.parse_args()
    rng = np.random.default_rng(0)
    keys = unique_keys(args.keys, rng)
    bench_lookup(keys, args, rng)
    gc.collect()
    bench_insert(keys, args)


if __name__ == "__main__":
    main()

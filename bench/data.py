"""Parse throughput of the native MultiSlot reader against whole-file numpy tokenization.

A ~50 MB synthetic CTR file (shoal.datasets.synthetic_ctr, MultiSlot text,
68 tokens a line) is parsed by:

- the native reader (`MultiSlotReader.parse` on the bytes in memory) with 1
  thread and with the default min(4, cores) threads, and `read_file` from disk
  (mmap) with the default threads;
- the reference, in the same run: ``np.array(data.split(), dtype=np.float64)``
  reshaped to [lines, 68] (what one writes in numpy for a fixed layout; it
  cannot check counts and reads ids through float64), or pandas' C reader
  (``read_csv(sep=" ", header=None)``) when pandas is installed.

Rounds of the two sides are interleaved and medians compared, because these
machines are noisy. One JSON line per figure on stdout:

    {"bench": "data", "case": "parse_1thread_mb", "value": <MB/s>, "unit": "MB/s",
     "reference": "numpy_split", "ratio": <value / reference value>}

Usage: python bench/data.py [--mb 50] [--rounds 5]
"""
from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import sys
import tempfile
import time

import numpy as np

from shoal.datasets import SlotList, synthetic_ctr_blocks, write_multislot
from shoal.worker.data import MultiSlotReader
from shoal.worker.data.reader import default_threads

BYTES_PER_LINE = 386  # about, for the CTR layout: sizes the file


def reference_numpy(data: bytes) -> int:
    tok = np.array(data.split(), dtype=np.float64)
    rows = tok.reshape(-1, 68)
    label, dense = rows[:, 1], rows[:, 3:16]
    ids = rows[:, 17::2].astype(np.uint64)
    assert dense.shape[1] == 13 and ids.shape[1] == 26
    return len(label)


def reference_pandas(data: bytes) -> int:
    import pandas as pd
    frame = pd.read_csv(io.BytesIO(data), sep=" ", header=None, engine="c")
    return len(frame)


def timed(fn, *args) -> float:
    t = time.perf_counter()
    fn(*args)
    return time.perf_counter() - t


def emit(case: str, value: float, unit: str, reference: str, ref_value: float) -> None:
    print(json.dumps({"bench": "data", "case": case, "value": round(value, 1), "unit": unit,
                      "reference": reference, "ratio": round(value / ref_value, 2)}), flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--mb", type=float, default=50.0)
    p.add_argument("--rounds", type=int, default=5)
    args = p.parse_args()
    n = int(args.mb * 1e6 / BYTES_PER_LINE)
    slots = SlotList.ctr()
    try:
        import pandas  # noqa: F401
        ref_name, ref_fn = "pandas_read_csv", reference_pandas
    except ImportError:
        ref_name, ref_fn = "numpy_split", reference_numpy

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "part-00000.txt")
        write_multislot(synthetic_ctr_blocks(n, chunk=65536, seed=0), path)
        with open(path, "rb") as f:
            data = f.read()
        n_lines = data.count(b"\n")
        mb = len(data) / 1e6
        threads = default_threads()
        one = MultiSlotReader(slots, n_threads=1)
        many = MultiSlotReader(slots, n_threads=threads)
        assert one.parse(data).size == n_lines == ref_fn(data), "the reader and the reference disagree"
        print(f"  file: {mb:.1f} MB, {n_lines} lines; reference {ref_name}; {threads} threads by default",
              file=sys.stderr)

        cases = {"parse_1thread": lambda: one.parse(data),
                 f"parse_{threads}threads": lambda: many.parse(data),
                 f"read_file_{threads}threads": lambda: many.read_file(path)}
        times = {k: [] for k in cases}
        ref_times = []
        for r in range(args.rounds):
            order = list(cases.items())
            for name, fn in order if r % 2 == 0 else order[::-1]:
                times[name].append(timed(fn))
                ref_times.append(timed(ref_fn, data))
        ref = statistics.median(ref_times)
        for name, ts in times.items():
            t = statistics.median(ts)
            emit(f"{name}_mb", mb / t, "MB/s", ref_name, mb / ref)
            emit(f"{name}_lines", n_lines / t, "lines/s", ref_name, n_lines / ref)
            print(f"  {name}: {mb / t:.0f} MB/s, {n_lines / t / 1e6:.2f}M lines/s "
                  f"(median of {[round(x, 3) for x in ts]} s); {ref_name}: {mb / ref:.1f} MB/s", file=sys.stderr)


if __name__ == "__main__":
    main()

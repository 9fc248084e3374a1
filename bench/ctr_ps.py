"""CTR-DNN on parameter servers: throughput, test AUC and memory per configuration.

Runs examples/ctr_dnn.py (26 sparse slots x dim 9, 13 dense, MLP 400-400-400-2,
Adam, batch 512, one epoch of the synthetic Criteo-like set) as real jobs of
servers and workers on 127.0.0.1 through shoal.launcher.LocalJob, for 1x1 and
2x2 in sync, async and GEO, plus local mode (one process). References,
measured in this run:

- throughput: the dense-compute ceiling, the same MLP's forward, backward and
  Adam update in plain numpy (bench/engine.py's NumpyMLP) with the same thread
  count as each job process, no sparse part, no I/O; measured before every
  configuration and taken as the median. A 2x2 figure is the sum over its
  workers, still against the one-process ceiling.
- test AUC: local mode's AUC on the same data (and the hidden model's best
  possible AUC, printed beside it).
- peak RSS and launch-to-first-step: local mode's.

One JSON line per figure on stdout (DESIGN.md's format); progress on stderr.

    python bench/ctr_ps.py [--samples 600000] [--test-samples 100000] [--configs 1x1:async,2x2:geo]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")  # the ceiling runs with the jobs' thread count
os.environ.setdefault("OPENBLAS_NUM_THREADS", os.environ["OMP_NUM_THREADS"])

import numpy as np  # noqa: E402

from engine import NumpyMLP  # noqa: E402  (bench/engine.py, beside this file)

from shoal.launcher import LocalJob  # noqa: E402
from shoal.worker.data.synthetic import best_auc, ensure_synthetic_ctr  # noqa: E402
from shoal.worker.data import InMemoryDataset, SlotList  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
JOB = REPO / "examples" / "ctr_dnn.py"
PRESET = {"sync": "ps_sync", "async": "ps_async", "geo": "ps_geo", "half_async": "ps_half_async",
          "pass": "ps_pass"}
SIZES = (26 * 9 + 13, 400, 400, 400, 2)


def emit(case: str, value: float, unit: str, reference: str, ratio: float, **extra) -> None:
    print(json.dumps({"bench": "ctr_ps", "case": case, "value": round(value, 4), "unit": unit,
                      "reference": reference, "ratio": round(ratio, 3), **extra}), flush=True)


def ceiling(steps: int = 60, batch: int = 512) -> float:
    """Examples/s of the dense step alone in plain numpy (median step time)."""
    rng = np.random.default_rng(0)
    weights = []
    for i in range(len(SIZES) - 1):
        weights += [(rng.standard_normal((SIZES[i], SIZES[i + 1])) * 0.05).astype(np.float32),
                    np.zeros(SIZES[i + 1], np.float32)]
    mlp = NumpyMLP(weights)
    x = rng.random((batch, SIZES[0]), dtype=np.float32)
    y = rng.integers(0, 2, batch)
    times = []
    for i in range(steps + 5):
        t = time.perf_counter()
        mlp.step(x, y)
        if i >= 5:
            times.append(time.perf_counter() - t)
    return batch / statistics.median(times)


def run(config: str, args, work: Path) -> list[dict]:
    """One job; the figures every process wrote."""
    shape, mode = config.split(":")
    out = work / config.replace(":", "_")
    out.mkdir()
    job_args = ["--cache", args.cache, "--samples", str(args.samples),
                "--test-samples", str(args.test_samples), "--log-dir", str(out),
                "--metrics-out", str(out / "{role}-{rank}.json")]
    t0 = time.time()
    if shape == "local":
        import subprocess
        env = {k: v for k, v in os.environ.items() if not k.startswith(("PADDLE_", "SHOAL_"))
               and k != "TRAINING_ROLE"}
        res = subprocess.run([sys.executable, str(JOB), *job_args], env=env, capture_output=True,
                             text=True, timeout=args.timeout)
        if res.returncode:
            raise RuntimeError(f"local run failed:\n{res.stderr[-3000:]}")
    else:
        n_servers, n_workers = (int(x) for x in shape.split("x"))
        with LocalJob(JOB, ["--strategy", PRESET[mode], *job_args], n_servers=n_servers,
                      n_workers=n_workers, log_dir=out) as job:
            job.wait(timeout=args.timeout)
    print(f"{config}: {time.time() - t0:.1f}s", file=sys.stderr, flush=True)
    return [json.loads(p.read_text()) for p in sorted(out.glob("*.json"))]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=600_000)
    ap.add_argument("--test-samples", type=int, default=100_000)
    ap.add_argument("--configs", default="1x1:sync,1x1:async,1x1:geo,2x2:sync,2x2:async,2x2:geo")
    ap.add_argument("--cache", default=os.path.join(tempfile.gettempdir(), "shoal-bench-ctr"))
    ap.add_argument("--timeout", type=float, default=900)
    args = ap.parse_args(argv)

    made = ensure_synthetic_ctr(args.cache, n_train=args.samples, n_test=args.test_samples)
    test = InMemoryDataset(batch_size=4096, use_var=SlotList.ctr())
    test.set_filelist(made.test)
    test.load_into_memory()
    ceiling_auc = best_auc(test.block)
    test.release_memory()

    ceilings = []
    with tempfile.TemporaryDirectory(prefix="shoal-ctr-ps-") as tmp:
        work = Path(tmp)
        ceilings.append(ceiling())
        local = {f["role"]: f for f in run("local:sync", args, work)}["worker"]
        for config in args.configs.split(","):
            ceilings.append(ceiling())
            figures = run(config, args, work)
            workers = [f for f in figures if f["role"] == "worker"]
            servers = [f for f in figures if f["role"] == "server"]
            dense_ceiling = statistics.median(ceilings)
            total = sum(w["train_examples_per_s"] for w in workers)
            name = config.replace(":", "_")
            emit(f"{name}_examples_per_s", total, "examples/s", "numpy_dense_ceiling",
                 total / dense_ceiling, reference_value=round(dense_ceiling, 1))
            emit(f"{name}_test_auc", workers[0]["test_auc"], "auc", "local_mode_auc",
                 workers[0]["test_auc"] / local["test_auc"], reference_value=round(local["test_auc"], 4),
                 best_possible_auc=round(ceiling_auc, 4))
            for role, group in (("server", servers), ("worker", workers)):
                peak = max(f["peak_rss_mb"] for f in group)
                emit(f"{name}_{role}_peak_rss", peak, "MB", "local_mode_peak_rss",
                     peak / local["peak_rss_mb"], reference_value=round(local["peak_rss_mb"], 1))
            first = [w["launch_to_first_step_s"] for w in workers if "launch_to_first_step_s" in w]
            if first and "launch_to_first_step_s" in local:
                emit(f"{name}_launch_to_first_step", max(first), "s", "local_mode_launch_to_first_step",
                     max(first) / local["launch_to_first_step_s"],
                     reference_value=round(local["launch_to_first_step_s"], 2))
            b = workers[0]["breakdown"]
            print(f"  {config} worker 0 ms/step: " + ", ".join(
                f"{k[:-3]} {b[k]:.2f}" for k in b if k.endswith("_ms")), file=sys.stderr)
        dense_ceiling = statistics.median(ceilings)
        emit("local_examples_per_s", local["train_examples_per_s"], "examples/s",
             "numpy_dense_ceiling", local["train_examples_per_s"] / dense_ceiling,
             reference_value=round(dense_ceiling, 1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Launch to first step: fleetrun's start (SHOAL_LAUNCH_T0) to the end of the first training step.

2 servers x 2 workers, local backend, the CTR example with its data already generated, against
the same script in local mode (one process, from its start) measured in the same run, alternating,
medians over --rounds. One JSON line (DESIGN.md's format); progress on stderr.

    python bench/launch.py [--rounds 3] [--samples 600000]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from shoal.worker.data.synthetic import ensure_synthetic_ctr

REPO = Path(__file__).resolve().parents[1]
JOB = REPO / "examples" / "ctr_dnn.py"


def _env() -> dict:
    return {k: v for k, v in os.environ.items()
            if not k.startswith(("PADDLE_", "SHOAL_")) and k not in ("TRAINING_ROLE", "POD_IP")}


def one(work: Path, args, fleetrun: bool) -> float:
    out = work / ("fleet" if fleetrun else "local")
    out.mkdir(exist_ok=True)
    job = ["--cache", args.cache, "--samples", str(args.samples), "--test-samples", "1000",
           "--steps", "1", "--log-dir", str(out), "--metrics-out", str(out / "{role}-{rank}.json")]
    if fleetrun:
        cmd = [sys.executable, "-m", "shoal.launcher", "--server_num", "2", "--worker_num", "2",
               "--log_dir", str(out), str(JOB), "--strategy", "ps_async", *job]
    else:
        cmd = [sys.executable, str(JOB), *job]
    res = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=600)
    if res.returncode:
        raise RuntimeError(f"{' '.join(cmd[:6])} ... failed:\n{res.stderr[-2000:]}")
    workers = [json.loads(p.read_text()) for p in out.glob("worker-*.json")]
    return max(w["launch_to_first_step_s"] for w in workers)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--samples", type=int, default=600_000)
    ap.add_argument("--cache", default=os.path.join(tempfile.gettempdir(), "shoal-bench-ctr"))
    args = ap.parse_args(argv)
    # the test set differs from ctr_ps's cache (1000 samples): keep a cache of its own
    args.cache = args.cache + "-launch"
    ensure_synthetic_ctr(args.cache, n_train=args.samples, n_test=1000)
    fleet_t, local_t = [], []
    with tempfile.TemporaryDirectory(prefix="shoal-launch-") as tmp:
        for r in range(args.rounds):
            order = (True, False) if r % 2 == 0 else (False, True)
            for fleetrun in order:
                t = one(Path(tmp), args, fleetrun)
                (fleet_t if fleetrun else local_t).append(t)
                print(f"round {r}: {'fleetrun 2x2' if fleetrun else 'local'} {t:.2f}s", file=sys.stderr)
    f, loc = statistics.median(fleet_t), statistics.median(local_t)
    print(json.dumps({"bench": "launch", "case": "fleetrun_2x2_launch_to_first_step", "value": round(f, 3),
                      "unit": "s", "reference": "local_mode_start_to_first_step", "ratio": round(f / loc, 3),
                      "reference_value": round(loc, 3)}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

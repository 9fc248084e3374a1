"""Run a fleet script as a real PS job for a test: server processes first, then workers.

Every process is a child of the test, binds only 127.0.0.1, gets its role through the
environment contract (shoal.configs.cluster), and is stopped by PID when the job ends or
the test fails (SIGTERM, then SIGKILL).
"""
from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from pathlib import Path

from shoal.configs.cluster import ServerEnv, WorkerEnv
from tests.ps.servers import stop_processes

TOKEN = "fleet-test-token-0123456789"
REPO = Path(__file__).resolve().parents[2]


_stop = stop_processes


def _env(contract: dict) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PADDLE_", "SHOAL_"))
           and k not in ("TRAINING_ROLE", "POD_IP")}
    env.update(contract, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1",
               PYTHONPATH=str(REPO) + os.pathsep + env.get("PYTHONPATH", ""))
    return env


@contextlib.contextmanager
def servers(script, n_servers: int, n_workers: int, workdir, args=()):
    """Start `n_servers` processes of `script` as PSERVERs; yield (endpoints, processes)."""
    workdir = Path(workdir)
    procs, reports = [], []
    try:
        for i in range(n_servers):
            report = workdir / f"server{i}.endpoint"
            reports.append(report)
            env = ServerEnv(trainers_num=n_workers, job_token=TOKEN, server_index=i,
                            servers=("127.0.0.1:0",) * n_servers, current_endpoint="127.0.0.1:0",
                            report_path=str(report)).to_environ()
            with open(workdir / f"serverlog.{i}", "wb") as log:
                procs.append(subprocess.Popen([sys.executable, str(script), *args], env=_env(env),
                                              stdout=log, stderr=subprocess.STDOUT))
        endpoints, deadline = [], time.monotonic() + 60
        for p, report in zip(procs, reports):
            while not report.exists():
                if p.poll() is not None:
                    raise RuntimeError(f"server exited with {p.returncode} before reporting: "
                                       f"{(workdir / 'serverlog.0').read_text()[-2000:]}")
                if time.monotonic() > deadline:
                    raise TimeoutError("servers did not report their endpoints within 60 s")
                time.sleep(0.02)
            endpoints.append(report.read_text().strip().replace("tcp://", ""))
        yield endpoints, procs
    finally:
        _stop(procs)


def start_workers(script, endpoints, n_workers: int, workdir, args_of) -> list:
    workdir = Path(workdir)
    trainers = tuple(f"127.0.0.1:{7000 + i}" for i in range(n_workers))  # never bound in these tests
    procs = []
    for w in range(n_workers):
        env = WorkerEnv(trainers_num=n_workers, job_token=TOKEN, trainer_id=w,
                        pservers=tuple(endpoints), trainer_endpoints=trainers,
                        current_endpoint=trainers[w]).to_environ()
        with open(workdir / f"workerlog.{w}", "wb") as log:
            procs.append(subprocess.Popen([sys.executable, str(script), *args_of(w)],
                                          env=_env(env), stdout=log, stderr=subprocess.STDOUT))
    return procs


def run_job(script, n_servers: int, n_workers: int, workdir, args_of, server_args=(),
            timeout: float = 120.0) -> list[int]:
    """Run a whole job; return the workers' exit codes (servers must exit by themselves after)."""
    workdir = Path(workdir)
    with servers(script, n_servers, n_workers, workdir, server_args) as (endpoints, sprocs):
        workers = start_workers(script, endpoints, n_workers, workdir, args_of)
        try:
            deadline = time.monotonic() + timeout
            for p in workers:
                p.wait(timeout=max(1.0, deadline - time.monotonic()))
            if all(p.returncode == 0 for p in workers):
                for p in sprocs:  # stop_worker of worker 0 stops the servers
                    p.wait(timeout=30)
        finally:
            _stop(workers)
        return [p.returncode for p in workers]


def log_of(workdir, role: str, i: int) -> str:
    return (Path(workdir) / f"{role}log.{i}").read_text()

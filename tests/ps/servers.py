"""Start real parameter-server processes on 127.0.0.1 for a test, and always stop them."""
from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time

TOKEN = "test-token-0123456789"


def stop_processes(procs) -> None:
    """SIGTERM every process still running, then SIGKILL those not gone within 10 s."""
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    for p in procs:
        try:
            p.wait(timeout=10)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(timeout=10)


@contextlib.contextmanager
def running_servers(n: int, workdir, token: str = TOKEN, auth: str = "plain", extra_args=()):
    """Yield the endpoints of `n` servers (separate processes binding port 0).

    Each server reports its bound endpoint through a file; the processes are
    stopped by PID on exit (SIGTERM, then SIGKILL after 10 s), even when the
    test fails.
    """
    procs, files = [], []
    env = dict(os.environ, SHOAL_JOB_TOKEN=token)
    try:
        for i in range(n):
            report = os.path.join(str(workdir), f"ps{i}.endpoint")
            files.append(report)
            log = open(os.path.join(str(workdir), f"serverlog.{i}"), "wb")
            procs.append(subprocess.Popen(
                [sys.executable, "-m", "shoal.ps.server", "--index", str(i), "--servers", str(n),
                 "--endpoint", "tcp://127.0.0.1:0", "--report-file", report, "--auth", auth,
                 *extra_args], env=env, stdout=log, stderr=subprocess.STDOUT))
            log.close()
        deadline = time.monotonic() + 60
        endpoints = []
        for proc, report in zip(procs, files):
            while not os.path.exists(report):
                if proc.poll() is not None:
                    raise RuntimeError(f"server exited with {proc.returncode} before reporting; "
                                       f"see {os.path.dirname(report)}/serverlog.*")
                if time.monotonic() > deadline:
                    raise TimeoutError("servers did not report their endpoints within 60 s")
                time.sleep(0.02)
            with open(report) as f:
                endpoints.append(f.read().strip())
        yield endpoints, procs
    finally:
        stop_processes(procs)

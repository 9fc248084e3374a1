"""The Ray head of the Ray backend's tests: started once per test session inside a network
namespace that has only the loopback device up (Ray insists on a node address of its own; in
the namespace that is 127.0.0.1, so nothing binds or connects to another address of the
machine), stopped by its process group (never `ray stop`, which kills by name), the namespace
deleted afterwards.

Ray's token-auth mode turns itself on when ~/.ray/auth_token exists (and RAY_AUTH_MODE is
unset): the head then refuses every client that does not send the token, the dashboard's HTTP
API included. The head and every client here get a HOME of their own (so the runner's
~/.ray is never read) and RAY_AUTH_MODE=disabled; a token file is put in that HOME on purpose,
so each run shows that one present breaks nothing.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
GCS_PORT, DASHBOARD_PORT = 6379, 8265
_READY = f"""
import json, sys, time, urllib.request
deadline = time.monotonic() + 60
while True:
    try:  # the job API answers once the dashboard's job module is up
        urllib.request.urlopen("http://127.0.0.1:{DASHBOARD_PORT}/api/jobs/", timeout=2).read()
        break
    except Exception as e:
        if time.monotonic() > deadline:
            sys.exit(f"the dashboard did not answer within 60s: {{e}}")
        time.sleep(0.2)
import ray
ray.init("127.0.0.1:{GCS_PORT}", log_to_driver=False)
assert ray.get(ray.remote(lambda: 1).remote(), timeout=30) == 1
print(json.dumps(ray.cluster_resources()))
"""


@dataclasses.dataclass
class RayHead:
    """A running head: `netns(...)` prefixes a command to run it inside the namespace."""

    ns: str
    address: str          # the GCS address, for --ray_address / ray.init
    dashboard: str        # http://..., for job submission
    home: Path
    env: dict             # the environment of every client (and of the head)

    def netns(self, *argv) -> list[str]:
        return ["ip", "netns", "exec", self.ns, *map(str, argv)]


def _clean_env(home: Path) -> dict:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("PADDLE_", "SHOAL_", "OMP_", "OPENBLAS_", "MKL_", "RAY_"))
           and k not in ("TRAINING_ROLE", "PYTHONUNBUFFERED")}
    # RAY_JOB_STOP_WAIT_TIME_S: a stopped job's fleetrun gets time for its graceful stop
    # (Ray's default, 3 s, SIGKILLs it sooner; the actors then die with their owner)
    env.update(PYTHONPATH=str(REPO), HOME=str(home), RAY_AUTH_MODE="disabled",
               RAY_USAGE_STATS_ENABLED="0", RAY_JOB_STOP_WAIT_TIME_S="15")
    return env


def _in_namespace(ns: str) -> list[int]:
    """Processes whose network namespace is `ns` (ours: the namespace is the test's own)."""
    try:
        target = os.stat(f"/run/netns/{ns}").st_ino
    except OSError:
        return []
    pids = []
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                if os.stat(f"/proc/{pid}/ns/net").st_ino == target:
                    pids.append(int(pid))
            except OSError:
                pass
    return pids


@pytest.fixture(scope="session")
def ray_head():
    if importlib.util.find_spec("ray") is None:
        pytest.skip("Ray is not installed (pip install -e '.[ray]')")
    if os.geteuid() != 0 or shutil.which("ip") is None:
        pytest.skip("the Ray tests run Ray in a network namespace of their own: they need root "
                    "and iproute2's `ip`")
    ns = f"shoal-ray-{os.getpid()}"
    made = subprocess.run(["ip", "netns", "add", ns], capture_output=True, text=True, timeout=30)
    if made.returncode != 0:
        pytest.skip(f"cannot create a network namespace ({made.stderr.strip()})")
    base = Path(tempfile.mkdtemp(prefix="shoal-ray-"))  # short: Ray's socket paths live in it
    head = None
    try:
        subprocess.run(["ip", "netns", "exec", ns, "ip", "link", "set", "lo", "up"], check=True,
                       timeout=30)
        home = base / "home"
        (home / ".ray").mkdir(parents=True)
        (home / ".ray" / "auth_token").write_text(secrets.token_hex(32))  # must change nothing
        env = _clean_env(home)
        info = RayHead(ns, f"127.0.0.1:{GCS_PORT}", f"http://127.0.0.1:{DASHBOARD_PORT}", home, env)
        with open(base / "head.log", "wb") as log:
            head = subprocess.Popen(info.netns(
                "ray", "start", "--head", "--block", "--num-cpus", 4, "--num-gpus", 0,
                "--object-store-memory", 80_000_000, "--node-ip-address", "127.0.0.1",
                "--port", GCS_PORT, "--dashboard-host", "127.0.0.1", "--dashboard-port",
                DASHBOARD_PORT, "--include-dashboard", "true", "--disable-usage-stats",
                "--temp-dir", base / "ray"), env=env, stdout=log, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL, start_new_session=True)
        ready = subprocess.run(info.netns(sys.executable, "-c", _READY), env=env, timeout=120,
                               capture_output=True, text=True)
        if ready.returncode != 0 or head.poll() is not None:
            tail = (base / "head.log").read_text(errors="replace")[-3000:]
            pytest.fail(f"the Ray head did not come up:\n{ready.stderr[-3000:]}\nhead log:\n{tail}")
        yield info
    finally:
        if head is not None:
            for sig, wait in ((signal.SIGTERM, 3), (signal.SIGKILL, 10)):
                try:
                    os.killpg(head.pid, sig)  # its process group: gcs, raylet, dashboard, workers
                except ProcessLookupError:
                    pass
                try:
                    head.wait(timeout=wait)
                    break
                except subprocess.TimeoutExpired:
                    pass
            try:
                os.killpg(head.pid, signal.SIGKILL)  # what SIGTERM left of the group
            except ProcessLookupError:
                pass
            head.wait(timeout=10)
        deadline = time.monotonic() + 10
        while _in_namespace(ns) and time.monotonic() < deadline:
            for pid in _in_namespace(ns):  # anything that left the group: still the test's own
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            time.sleep(0.1)
        subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=30)
        shutil.rmtree(base, ignore_errors=True)

"""fleetrun over two "nodes" on one machine: 127.0.0.1 and ::1, each with its own fleetrun,
inside a network namespace the test creates with only loopback up (so the fixed ports a job
over several nodes needs are free there). Skipped where namespaces cannot be made (not root)."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from tests.launcher.test_fleetrun import _env, _orphans

HERE = Path(__file__).parent
NODES = ("127.0.0.1", "::1")


@pytest.fixture(scope="module")
def netns():
    if os.geteuid() != 0 or shutil.which("ip") is None:
        pytest.skip("needs root and iproute2 to create a loopback-only network namespace")
    name = f"shoal-mn-{os.getpid()}"
    made = subprocess.run(["ip", "netns", "add", name], capture_output=True, text=True)
    if made.returncode != 0:
        pytest.skip(f"cannot create a network namespace: {made.stderr.strip()}")
    try:
        subprocess.run(["ip", "netns", "exec", name, "ip", "link", "set", "lo", "up"], check=True)
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], capture_output=True)


def _nodes(netns, tmp_path, flags, script, script_args, timeout=90):
    """Start one fleetrun per node (same flags, its own --node_ip and log dir); wait for both."""
    token = f"multinode-{uuid.uuid4().hex}"
    procs = []
    try:
        for i, node in enumerate(NODES):
            cmd = ["ip", "netns", "exec", netns, sys.executable, "-m", "shoal.launcher", *flags,
                   "--node_ip", node, "--log_dir", str(tmp_path / f"log{i}"), str(script),
                   *map(str, script_args)]
            procs.append(subprocess.Popen(cmd, env=_env(SHOAL_JOB_TOKEN=token), text=True,
                                          stdout=subprocess.PIPE, stderr=subprocess.PIPE))
        deadline = time.monotonic() + timeout
        outs = [p.communicate(timeout=max(1, deadline - time.monotonic())) for p in procs]
        return [p.returncode for p in procs], outs, token
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()


def test_a_ps_job_over_two_nodes(netns, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    flags = ["--servers", "127.0.0.1:6170,[::1]:6171", "--workers", "127.0.0.1,::1"]
    codes, outs, token = _nodes(netns, tmp_path, flags, HERE / "roles.py", [out, "ok", "-"])
    assert codes == [0, 0], outs
    envs = {p.stem: json.loads(p.read_text()) for p in out.glob("*.json")}
    assert sorted(envs) == ["server0", "server1", "worker0", "worker1"]
    for w in ("worker0", "worker1"):
        assert envs[w]["PADDLE_PSERVERS_IP_PORT_LIST"] == "127.0.0.1:6170,[::1]:6171"
        assert envs[w]["PADDLE_TRAINER_ENDPOINTS"] == "127.0.0.1:0,[::1]:0"
    assert envs["worker1"]["PADDLE_CURRENT_ENDPOINT"] == "[::1]:0"
    assert envs["server1"]["PADDLE_CURRENT_ENDPOINT"] == "[::1]:6171"
    assert {e["SHOAL_JOB_TOKEN"] for e in envs.values()} == {token}
    assert (tmp_path / "log1" / "serverlog.1").exists() and (tmp_path / "log0" / "workerlog.0").exists()
    assert not _orphans(token)


def test_a_collective_job_over_two_nodes_gets_its_contract_and_a_clear_gloo_refusal(netns, tmp_path):
    """The nodes' ranks get one world (4 ranks, the first node's store at --master). Gloo joins
    ranks of one address family only, and the two loopback "nodes" a test may use are IPv4 and
    IPv6: every rank says so, naming the fix, and both fleetruns fail cleanly."""
    out = tmp_path / "out"
    out.mkdir()
    flags = ["--ips", ",".join(NODES), "--nproc_per_node", "2", "--master", "127.0.0.1:6200"]
    codes, outs, token = _nodes(netns, tmp_path, flags, HERE / "coll_roles.py", [out, "ok", "-"])
    assert codes == [1, 1], outs
    for i, ranks in enumerate(((0, 1), (2, 3))):
        # the first rank of a node to fail makes its fleetrun stop the other, which on a loaded
        # machine may not have reached init_parallel_env yet (an empty log): every rank that got
        # there says so, and on every node at least one did
        logs = [(tmp_path / f"log{i}" / f"workerlog.{r}").read_text() for r in ranks]
        said = [log for log in logs if "mixes IPv4 and IPv6" in log]
        assert said and all(log in said for log in logs if log.strip()), logs
        assert all("127.0.0.1:0,127.0.0.1:0,[::1]:0,[::1]:0" in log for log in said)
    assert "master 127.0.0.1:6200" in (tmp_path / "log0" / "endpoints.log").read_text()
    assert not _orphans(token)


def test_a_job_over_two_nodes_without_a_shared_token_is_refused(tmp_path):
    env = {k: v for k, v in _env().items() if k != "SHOAL_JOB_TOKEN"}
    p = subprocess.run([sys.executable, "-m", "shoal.launcher", "--node_ip", "127.0.0.1", "--servers",
                        "127.0.0.1:6170,[::1]:6171", "--workers", "127.0.0.1,::1",
                        "--log_dir", str(tmp_path / "log"),
                        str(HERE / "roles.py"), str(tmp_path), "ok", "-"],
                       env=env, capture_output=True, text=True, timeout=60)
    assert p.returncode == 2 and "SHOAL_JOB_TOKEN" in p.stderr


@pytest.mark.parametrize("args,says", [
    (["--servers", "127.0.0.1:6170,[::1]:6171", "--worker_num", "2"], "give --workers"),
    (["--workers", "127.0.0.1,::1", "--server_num", "1"], "give --servers"),
    (["--servers", "127.0.0.1:6170", "--start_port", "7000", "--worker_num", "1"], "give one"),
    (["--ips", "127.0.0.1,127.0.0.1"], "lists a node twice"),
])
def test_an_incomplete_job_over_several_nodes_is_refused(tmp_path, args, says):
    p = subprocess.run([sys.executable, "-m", "shoal.launcher", "--node_ip", "127.0.0.1", *args,
                        "--log_dir", str(tmp_path / "log"), str(HERE / "roles.py"), str(tmp_path),
                        "ok", "-"], env=_env(SHOAL_JOB_TOKEN="t"), capture_output=True, text=True,
                       timeout=60)
    assert p.returncode == 2 and says in p.stderr and len(p.stderr.strip().splitlines()) == 1, p.stderr

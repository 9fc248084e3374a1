"""fleetrun, local backend, collective mode: the contract each rank gets, failures, restarts."""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from tests.launcher.test_fleetrun import _busy_port, _fleetrun, _launch, _orphans

pytest.importorskip("shoal.collective._gloo", reason="the Gloo binding is not built (libgloo-dev)")

SCRIPT = Path(__file__).with_name("coll_roles.py")


def _run(tmp_path, action="ok", who="-", nproc=3, extra=(), timeout=60):
    return _launch(tmp_path, ["--nproc_per_node", nproc] if nproc else [], SCRIPT, action, who,
                   extra, timeout)


def test_every_rank_gets_the_contract_and_the_job_exits_0(tmp_path):
    rc, stdout, stderr, out, token = _run(tmp_path)
    assert rc == 0, stderr
    assert "[worker 0] rank 0 of 3 sums 3" in stdout
    envs = [json.loads((out / f"rank{r}.gen0.json").read_text()) for r in range(3)]
    masters = {e["PADDLE_MASTER"] for e in envs}
    assert len(masters) == 1 and masters.pop().startswith("127.0.0.1:")
    for r, env in enumerate(envs):
        assert env["TRAINING_ROLE"] == "TRAINER" and env["PADDLE_TRAINER_ID"] == str(r)
        assert env["PADDLE_TRAINERS_NUM"] == "3" and env["PADDLE_PSERVERS_IP_PORT_LIST"] == ""
        assert env["PADDLE_CURRENT_ENDPOINT"] == env["PADDLE_TRAINER_ENDPOINTS"].split(",")[r]
        assert env["SHOAL_JOB_TOKEN"] == token and env["SHOAL_RESTART"] == "0"
        assert env["OMP_NUM_THREADS"] == str(max(1, (os.cpu_count() or 1) // 3))
    assert "master 127.0.0.1:" in (tmp_path / "log" / "endpoints.log").read_text()
    assert not _orphans(token)


def test_devices_give_each_rank_its_own(tmp_path):
    rc, _, stderr, out, _ = _run(tmp_path, nproc=None, extra=["--devices", "3,5"])
    assert rc == 0, stderr
    assert [json.loads((out / f"rank{r}.gen0.json").read_text())["CUDA_VISIBLE_DEVICES"]
            for r in range(2)] == ["3", "5"]


@pytest.mark.parametrize("action,shows", [("raise", "fails on purpose"),
                                          ("sigkill", "killed by signal SIGKILL")])
def test_a_failing_rank_stops_the_job_within_10s_naming_it(tmp_path, action, shows):
    rc, _, stderr, out, token = _run(tmp_path, action, "1")
    ended = time.time()
    assert rc == 1, stderr
    assert "worker 1 (pid" in stderr and shows in stderr
    assert ended - float((out / "failed_at").read_text()) < 10
    assert not _orphans(token)


def test_max_restarts_restarts_every_rank_under_a_new_generation(tmp_path):
    rc, _, stderr, out, token = _run(tmp_path, "once", "1", extra=["--max_restarts", "1"])
    assert rc == 0, stderr
    assert "restarting every rank (1 of 1) under rendezvous generation 1" in stderr
    for r in range(3):
        gen1 = json.loads((out / f"rank{r}.gen1.json").read_text())
        assert gen1["SHOAL_RESTART"] == "1"
    assert (tmp_path / "log" / "workerlog.1.restart0").exists()
    assert not _orphans(token)


def test_without_restarts_left_the_job_fails(tmp_path):
    rc, _, stderr, _, token = _run(tmp_path, "once", "1")
    assert rc == 1 and "killed by signal SIGKILL" in stderr
    assert not _orphans(token)


@pytest.mark.parametrize("args,says", [
    (["--nproc_per_node", "0"], "--nproc_per_node 0"),
    (["--nproc_per_node", "3", "--devices", "0,1"], "disagrees"),
    (["--devices", "a,b"], "--devices"),
    (["--ips", "10.0.0.1,10.0.0.2"], "belong to this machine"),
    (["--ips", "127.0.0.1", "--master", "10.0.0.2:7000"], "runs on the first node"),
    (["--ips", "127.0.0.1,10.0.0.2"], "shared secret"),
    (["--node_ip", "10.0.0.9", "--ips", "127.0.0.1"], "not among the hosts"),
    (["--master", "nohost"], "--master"),
])
def test_bad_arguments_get_one_line_and_exit_2(tmp_path, args, says):
    p = _fleetrun([*args, "--log_dir", tmp_path / "log", SCRIPT, tmp_path, "ok", "-"])
    _, stderr = p.communicate(timeout=60)
    assert p.returncode == 2, stderr
    assert says in stderr and len(stderr.strip().splitlines()) == 1, stderr


def test_a_busy_master_port_gets_one_line_and_exit_2(tmp_path):
    with _busy_port() as s:
        master = f"127.0.0.1:{s.getsockname()[1]}"
        p = _fleetrun(["--nproc_per_node", 2, "--master", master, "--log_dir", tmp_path / "log",
                       SCRIPT, tmp_path, "ok", "-"])
        _, stderr = p.communicate(timeout=60)
    assert p.returncode == 2, stderr
    assert "cannot bind" in stderr and len(stderr.strip().splitlines()) == 1, stderr

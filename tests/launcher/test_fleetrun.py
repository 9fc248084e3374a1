"""fleetrun, local backend, PS mode: the contract each role gets, failures, signals, bad args."""
from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROLES = Path(__file__).with_name("roles.py")
REPO = Path(__file__).resolve().parents[2]


def _env(**extra) -> dict:
    # nothing of the runner's own settings leaks into what is checked (thread counts, buffering)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PADDLE_", "SHOAL_", "OMP_",
                                                                     "OPENBLAS_", "MKL_"))
           and k not in ("TRAINING_ROLE", "PYTHONUNBUFFERED")}
    env.update(PYTHONPATH=str(REPO), **extra)
    return env


def _fleetrun(args, env=None, **kw):
    return subprocess.Popen([sys.executable, "-m", "shoal.launcher", *map(str, args)],
                            env=env or _env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, **kw)


def _orphans(token: str) -> list[int]:
    """Processes that still carry this job's token in their environment."""
    left = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/environ", "rb") as f:
                if f"SHOAL_JOB_TOKEN={token}".encode() in f.read():
                    left.append(int(pid))
        except OSError:
            pass
    return left


def _launch(tmp_path, mode_args, script, action, who, extra=(), timeout=60):
    """Run fleetrun with a fresh job token; (exit code, stdout, stderr, out dir, token)."""
    token = f"fleetrun-test-{os.getpid()}-{time.monotonic_ns()}"
    out = tmp_path / "out"
    out.mkdir(exist_ok=True)
    p = _fleetrun([*mode_args, "--log_dir", tmp_path / "log", *extra, script, out, action, who],
                  env=_env(SHOAL_JOB_TOKEN=token))
    try:
        stdout, stderr = p.communicate(timeout=timeout)
    finally:
        if p.poll() is None:
            p.kill()
    return p.returncode, stdout, stderr, out, token


def _run(tmp_path, action="ok", who="-", n_servers=2, n_workers=2, extra=(), timeout=60):
    return _launch(tmp_path, ["--server_num", n_servers, "--worker_num", n_workers], ROLES,
                   action, who, extra, timeout)


def test_every_role_gets_the_contract_and_the_job_exits_0(tmp_path):
    rc, stdout, stderr, out, token = _run(tmp_path)
    assert rc == 0, stderr
    assert "[worker 0] worker 0 up" in stdout  # rank 0 streamed with a prefix
    envs = {p.stem: json.loads(p.read_text()) for p in out.glob("*.json")}
    assert sorted(envs) == ["server0", "server1", "worker0", "worker1"]
    servers = envs["worker0"]["PADDLE_PSERVERS_IP_PORT_LIST"].split(",")
    assert len(servers) == 2 and all(s.startswith("127.0.0.1:") and not s.endswith(":0") for s in servers)
    for name, env in envs.items():
        assert env["SHOAL_JOB_TOKEN"] == token and env["PADDLE_TRAINERS_NUM"] == "2"
        assert float(env["SHOAL_LAUNCH_T0"]) <= time.time()
        assert env["OMP_NUM_THREADS"] == str(max(1, (os.cpu_count() or 1) // 4))
        assert env["TRAINING_ROLE"] == ("PSERVER" if name.startswith("server") else "TRAINER")
    assert [envs[f"worker{w}"]["PADDLE_TRAINER_ID"] for w in range(2)] == ["0", "1"]
    assert envs["worker1"]["PADDLE_PSERVERS_IP_PORT_LIST"] == envs["worker0"]["PADDLE_PSERVERS_IP_PORT_LIST"]
    log = tmp_path / "log"
    assert {p.name for p in log.iterdir()} >= {"serverlog.0", "serverlog.1", "workerlog.0",
                                               "workerlog.1", "endpoints.log"}
    assert "worker 1 up" in (log / "workerlog.1").read_text()
    assert not _orphans(token)


def test_devices_in_ps_mode_give_each_worker_of_the_node_its_gpu_in_turn(tmp_path):
    rc, _, stderr, out, token = _run(tmp_path, n_servers=1, n_workers=3, extra=["--gpus", "3,5"])
    assert rc == 0, stderr
    envs = {p.stem: json.loads(p.read_text()) for p in out.glob("*.json")}
    assert [envs[f"worker{w}"]["CUDA_VISIBLE_DEVICES"] for w in range(3)] == ["3", "5", "3"]
    assert envs["server0"].get("CUDA_VISIBLE_DEVICES") == os.environ.get("CUDA_VISIBLE_DEVICES")
    assert not _orphans(token)


@pytest.mark.parametrize("action,who,shows", [
    ("raise", "worker1", "worker 1 (pid"), ("sigkill", "worker0", "killed by signal SIGKILL"),
    ("spawn", "worker1", "worker 1 (pid")])
def test_a_failing_worker_stops_the_job_within_10s_naming_it(tmp_path, action, who, shows):
    rc, _, stderr, out, token = _run(tmp_path, action, who)
    ended = time.time()
    assert rc == 1, stderr
    assert shows in stderr
    assert ended - float((out / "failed_at").read_text()) < 10
    if action == "raise":
        assert "fails on purpose" in stderr  # the log's last lines come with the message
    assert not _orphans(token)  # grandchildren that ignore SIGTERM included ("spawn")


def test_grandchildren_are_stopped_when_the_job_succeeds(tmp_path):
    rc, _, stderr, out, token = _run(tmp_path, "spawn", "-")
    assert rc == 0, stderr
    assert len(list(out.glob("grandchild*"))) == 2
    assert not _orphans(token)


def test_a_server_that_fails_while_stopping_fails_the_job(tmp_path):
    rc, _, stderr, _, token = _run(tmp_path, "late-fail", "server1")
    assert rc == 1 and "server 1 (pid" in stderr and "failed while stopping" in stderr, stderr
    assert "saving the last checkpoint failed" in stderr
    assert not _orphans(token)


@contextlib.contextmanager
def _running(tmp_path, n_servers: int, n_workers: int, action: str, ready: str):
    """A fleetrun job of roles.py doing `action`, yielded once `ready` (a glob in its output
    directory) matches; killed on the way out if it is still running."""
    token = f"fleetrun-test-{os.getpid()}-{time.monotonic_ns()}"
    out = tmp_path / "out"
    out.mkdir(exist_ok=True)
    p = _fleetrun(["--server_num", n_servers, "--worker_num", n_workers, "--log_dir",
                   tmp_path / "log", ROLES, out, action, "-"], env=_env(SHOAL_JOB_TOKEN=token))
    try:
        want = n_workers if ready == "worker*.json" else 1
        deadline = time.monotonic() + 60
        while len(list(out.glob(ready))) < want:
            assert time.monotonic() < deadline and p.poll() is None, p.stderr.read() if p.poll() else ""
            time.sleep(0.05)
        yield p, out, token
    finally:
        if p.poll() is None:
            p.kill()
            p.wait(timeout=10)


def test_a_killed_server_stops_the_job(tmp_path):
    with _running(tmp_path, 2, 1, "hang", "worker*.json") as (p, out, token):
        time.sleep(0.5)
        server = json.loads((out / "server1.json").read_text())
        pids = [pid for pid in _orphans(token) if _role_of(pid) == ("PSERVER", "1")]
        assert pids, server
        os.kill(pids[0], signal.SIGKILL)
        killed = time.monotonic()
        _, stderr = p.communicate(timeout=30)
        assert time.monotonic() - killed < 10
    assert p.returncode == 1 and "server 1 (pid" in stderr and "SIGKILL" in stderr
    assert not _orphans(token)


def _role_of(pid: int):
    try:
        env = dict(kv.split("=", 1) for kv in open(f"/proc/{pid}/environ").read().split("\0") if "=" in kv)
    except OSError:
        return None
    return env.get("TRAINING_ROLE"), env.get("SHOAL_SERVER_INDEX")


@pytest.mark.parametrize("sig,code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_signal_to_fleetrun_stops_everything(tmp_path, sig, code):
    with _running(tmp_path, 1, 2, "hang", "worker*.json") as (p, _, token):
        p.send_signal(sig)
        _, stderr = p.communicate(timeout=30)
    assert p.returncode == code, stderr
    assert not _orphans(token)


def test_sigkill_of_fleetrun_itself_leaves_nothing_behind(tmp_path):
    """Children die with their parent; their own children (here one that ignores SIGTERM) are
    killed by the janitor that outlives fleetrun."""
    with _running(tmp_path, 1, 1, "spawn-hang", "grandchild0") as (p, _, token):
        p.kill()
        p.wait(timeout=10)
        deadline = time.monotonic() + 10
        while _orphans(token) and time.monotonic() < deadline:
            time.sleep(0.1)
    assert not _orphans(token)


def test_flags_come_from_shoal_fleetrun_variables_never_from_the_contract(tmp_path):
    token = f"fleetrun-test-{os.getpid()}-env"
    out = tmp_path / "out"
    out.mkdir()
    env = _env(SHOAL_JOB_TOKEN=token, SHOAL_FLEETRUN_SERVER_NUM="1", SHOAL_FLEETRUN_WORKER_NUM="1",
               PADDLE_TRAINERS_NUM="7", TRAINING_ROLE="TRAINER")
    p = _fleetrun(["--log_dir", tmp_path / "log", ROLES, out, "ok", "-"], env=env)
    _, stderr = p.communicate(timeout=60)
    assert p.returncode == 0, stderr
    assert sorted(x.stem for x in out.glob("*.json")) == ["server0", "worker0"]
    assert json.loads((out / "worker0.json").read_text())["PADDLE_TRAINERS_NUM"] == "1"


def _busy_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen()
    return s


@pytest.mark.parametrize("args,says", [
    (["--bogus", "1", str(ROLES)], "unrecognized arguments"),
    (["--server_num", "1", "--worker_num", "1"], "script"),
    (["--server_num", "1", "--worker_num", "1", "no_such_script.py"], "does not exist"),
    (["--server_num", "1", "--worker_num", "1", "--nproc_per_node", "2", str(ROLES)],
     "cannot be used together"),
    (["--server_num", "0", "--worker_num", "1", str(ROLES)], "--server_num 0"),
    (["--server-num", "1", "--worker-num", "1", "--strategy", "no_such_preset", str(ROLES)],
     "neither a file nor a preset"),
    (["--servers", "foo", "--worker_num", "1", str(ROLES)], "--servers"),
    (["--servers", "127.0.0.1:abc", "--worker_num", "1", str(ROLES)], "--servers"),
    (["--servers", "10.0.0.1:7000", "--worker_num", "1", str(ROLES)], "belong to this machine"),
    (["--server_num", "1", "--worker_num", "1", "--log_dir", str(ROLES), str(ROLES)], "--log_dir"),
    (["--server_num", "1", "--worker_num", "1", "--devices", "0,x", str(ROLES)],
     "give device ids such as 0,1"),
    (["--server_num", "1", "--worker_num", "1", "--devices", "0", "--gpus", "1", str(ROLES)],
     "disagree"),
    (["--backend", "ray", "--server_num", "1", "--worker_num", "1", "--devices", "0", str(ROLES)],
     "give --worker_gpus N"),
])
def test_bad_arguments_get_one_line_and_exit_2(args, says):
    p = _fleetrun(args)
    _, stderr = p.communicate(timeout=60)
    assert p.returncode == 2
    assert says in stderr and len(stderr.strip().splitlines()) == 1, stderr


def test_a_busy_start_port_gets_one_line_and_exit_2(tmp_path):
    with _busy_port() as s:
        port = s.getsockname()[1]
        p = _fleetrun(["--server_num", 1, "--worker_num", 1, "--start_port", port, "--log_dir",
                       tmp_path / "log", ROLES, tmp_path, "ok", "-"])
        _, stderr = p.communicate(timeout=60)
    assert p.returncode == 2, stderr
    assert "not all free" in stderr and len(stderr.strip().splitlines()) == 1


def test_a_second_job_in_the_same_log_dir_is_refused(tmp_path):
    with _running(tmp_path, 1, 1, "hang", "worker*.json") as (first, _, token):
        second = _fleetrun(["--server_num", 1, "--worker_num", 1, "--log_dir", tmp_path / "log",
                            ROLES, tmp_path, "ok", "-"])
        _, stderr = second.communicate(timeout=60)
        assert second.returncode == 2 and "in use by another job" in stderr, stderr
        assert len(stderr.strip().splitlines()) == 1
        first.send_signal(signal.SIGTERM)
        first.communicate(timeout=30)
    assert not _orphans(token)


def test_max_restarts_brings_a_killed_worker_back_and_the_job_finishes(tmp_path):
    """An async job: worker 1 dies once, is restarted with SHOAL_RESTART=1, rejoins the running
    job (tables kept, no init barrier) and everyone finishes."""
    rc, _, stderr, out, token = _run(tmp_path, "once", "worker1",
                                     extra=["--max_restarts", "2", "--strategy", "ps_async"])
    assert rc == 0, stderr
    assert "restarting it (1 of 2)" in stderr
    assert sorted(p.name for p in out.glob("*.done.*")) == ["worker0.done.0", "worker1.done.1"]
    assert (tmp_path / "log" / "workerlog.1.restart0").exists()
    assert not _orphans(token)


def test_without_restarts_left_the_job_fails(tmp_path):
    rc, _, stderr, _, token = _run(tmp_path, "once", "worker1", extra=["--strategy", "ps_async"])
    assert rc == 1 and "worker 1 (pid" in stderr and "SIGKILL" in stderr
    assert not _orphans(token)


@pytest.mark.parametrize("strategy", ["ps_sync", "ps_half_async"])
def test_a_restarted_worker_of_a_stepped_job_resumes_at_the_others_step(tmp_path, strategy):
    """Sync and half-async: the others wait for worker 1 at its step's barrier; the restarted
    worker finds that barrier on server 0, resumes at that step (its predecessor's partial pushes
    replaced, not added) and every worker runs the same 12 steps."""
    rc, _, stderr, out, token = _run(tmp_path, "once", "worker1",
                                     extra=["--max_restarts", "1", "--strategy", strategy])
    assert rc == 0, stderr
    assert (out / "worker0.done.0").read_text() == "0"
    assert (out / "worker1.done.1").read_text() == "5"
    assert not _orphans(token)


def test_a_restarted_worker_of_a_pass_mode_job_is_refused_with_the_reason(tmp_path):
    """Pass mode merges a pass over every worker's write-back: a restarted worker cannot take
    over its predecessor's part, so it says so and the job fails instead of hanging."""
    rc, _, stderr, _, token = _run(tmp_path, "once", "worker1",
                                   extra=["--max_restarts", "1", "--strategy", "ps_pass"])
    assert rc != 0
    log = (tmp_path / "log" / "workerlog.1").read_text()
    assert "into a pass-mode job" in log and "last checkpoint" in log, log[-2000:]
    assert not _orphans(token)

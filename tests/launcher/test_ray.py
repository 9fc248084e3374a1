"""fleetrun --backend ray and fleetrun submit, against a real Ray head (conftest.ray_head) in a
network namespace with only loopback: the CTR example, the contract each role gets (the job
token never in a runtime_env), failures, Ctrl-C, job submission, bad input."""
from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROLES = Path(__file__).with_name("roles.py")
REPO = Path(__file__).resolve().parents[2]


def _popen(head, argv, token=None, **env):
    env = dict(head.env, **env)
    if token is not None:
        env["SHOAL_JOB_TOKEN"] = token
    return subprocess.Popen(head.netns(sys.executable, *map(str, argv)), env=env, cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _fleetrun(head, args, *, timeout=60, token=None, submit=False):
    """(exit status, stdout, stderr) of fleetrun [submit] run inside the head's namespace."""
    argv = ["-m", "shoal.launcher", *(["submit"] if submit else []), *args]
    p = _popen(head, argv, token)
    try:
        out, err = p.communicate(timeout=timeout)
    finally:
        if p.poll() is None:
            p.kill()
            p.communicate(timeout=10)
    return p.returncode, out, err


def _ray_args(head, tmp_path, n_servers, n_workers):
    return ["--backend", "ray", "--ray_address", head.address, "--server_num", n_servers,
            "--worker_num", n_workers, "--log_dir", tmp_path / "log"]


def _left(mark: str) -> list[int]:
    """Processes whose command line names `mark` (a test's own tmp path), and Shoal's actors."""
    pids = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")
        except OSError:
            continue
        if mark.encode() in cmd or b"ray::_RoleActor" in cmd:
            pids.append(int(pid))
    return pids


def _nothing_left(mark: str, within: float = 10.0) -> bool:
    deadline = time.monotonic() + within  # a killed actor's worker process takes a moment
    while _left(mark) and time.monotonic() < deadline:
        time.sleep(0.1)
    return not _left(mark)


def _get(head, path: str):
    """A GET on the dashboard's HTTP API, from inside the namespace."""
    code = (f"import urllib.request, sys; sys.stdout.write(urllib.request.urlopen("
            f"{head.dashboard + path!r}, timeout=10).read().decode())")
    out = subprocess.run(head.netns(sys.executable, "-c", code), env=head.env, timeout=60,
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def test_ctr_example_runs_on_ray(ray_head, tmp_path):
    rc, out, err = _fleetrun(ray_head, [*_ray_args(ray_head, tmp_path, 1, 2), "examples/ctr_dnn.py",
                                        "--samples", 20000, "--test-samples", 4000,
                                        "--cache", tmp_path / "data"], timeout=90)
    assert rc == 0, err
    assert "[worker 0] final test AUC:" in out, out[-2000:]
    assert (tmp_path / "log" / "workerlog.1").exists() and (tmp_path / "log" / "serverlog.0").exists()
    assert _nothing_left(str(tmp_path))


def test_every_role_gets_the_contract_and_the_token_never_rides_in_a_runtime_env(ray_head, tmp_path):
    token = f"ray-test-{os.getpid()}-{time.monotonic_ns()}"
    out = tmp_path / "out"
    out.mkdir()
    rc, stdout, err = _fleetrun(ray_head, [*_ray_args(ray_head, tmp_path, 1, 2), "--worker_cpus", 1.5,
                                           ROLES, out, "ok", "-"], token=token)
    assert rc == 0, err
    assert "[worker 0] worker 0 up" in stdout
    envs = {p.stem: json.loads(p.read_text()) for p in out.glob("*.json")}
    assert sorted(envs) == ["server0", "worker0", "worker1"]
    servers = envs["worker0"]["PADDLE_PSERVERS_IP_PORT_LIST"].split(",")
    assert len(servers) == 1 and servers[0].startswith("127.0.0.1:") and not servers[0].endswith(":0")
    assert envs["worker1"]["PADDLE_PSERVERS_IP_PORT_LIST"] == ",".join(servers)
    for name, env in envs.items():
        assert env["SHOAL_JOB_TOKEN"] == token and env["PADDLE_TRAINERS_NUM"] == "2"
        assert env["TRAINING_ROLE"] == ("PSERVER" if name.startswith("server") else "TRAINER")
        assert env["POD_IP"] == "127.0.0.1" and float(env["SHOAL_LAUNCH_T0"]) <= time.time()
        assert env["SHOAL_LOG_DIR"] == str(tmp_path / "log")
    assert [envs[f"worker{w}"]["PADDLE_TRAINER_ID"] for w in range(2)] == ["0", "1"]
    assert envs["worker0"]["PADDLE_TRAINER_ENDPOINTS"] == "127.0.0.1:0,127.0.0.1:0"
    assert envs["server0"]["OMP_NUM_THREADS"] == "1" and envs["worker0"]["OMP_NUM_THREADS"] == "1"
    # Ray keeps every job's and actor's runtime env; the token is in none of them
    actors = _get(ray_head, "/api/v0/actors?detail=1&limit=10000")["data"]["result"]["result"]
    ours = [a for a in actors if a["class_name"] == "_RoleActor"]
    assert ours and not any(token in a["serialized_runtime_env"] for a in ours)
    assert token not in json.dumps(actors) and token not in json.dumps(_get(ray_head, "/api/jobs/"))
    assert _nothing_left(str(tmp_path))


def test_a_worker_that_raises_fails_the_job_within_10s_naming_it(ray_head, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    rc, _, err = _fleetrun(ray_head, [*_ray_args(ray_head, tmp_path, 1, 2), ROLES, out, "raise",
                                      "worker1"])
    ended = time.time()
    assert rc == 1, err
    assert "worker 1 (pid" in err and "fails on purpose" in err, err
    assert ended - float((out / "failed_at").read_text()) < 10
    assert _nothing_left(str(tmp_path))  # the actors' scripts (and the actors) are gone


@contextlib.contextmanager
def _running(head, tmp_path, action, token):
    out = tmp_path / "out"
    out.mkdir()
    p = _popen(head, ["-m", "shoal.launcher", *_ray_args(head, tmp_path, 1, 2), ROLES, out, action,
                      "-"], token)
    try:
        deadline = time.monotonic() + 60
        # every role has written its environment, and the workers' grandchildren (written after
        # it) their pids: on a loaded machine those come noticeably later
        ready = [("server*.json", 1), ("worker*.json", 2)]
        if action.startswith("spawn"):
            ready.append(("grandchild*", 2))
        while any(len(list(out.glob(pattern))) < n for pattern, n in ready):
            assert time.monotonic() < deadline and p.poll() is None, p.communicate()[1][-3000:]
            time.sleep(0.05)
        yield p, out
    finally:
        if p.poll() is None:
            p.kill()
            p.communicate(timeout=10)


def test_a_killed_actor_fails_the_job_naming_its_role(ray_head, tmp_path):
    with _running(ray_head, tmp_path, "hang", None) as (p, out):
        pid = json.loads((out / "server0.json").read_text())["pid"]
        actor = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
        os.kill(actor, signal.SIGKILL)  # the Ray worker process that hosts server 0's actor
        killed = time.monotonic()
        _, err = p.communicate(timeout=30)
        assert time.monotonic() - killed < 10
    assert p.returncode == 1 and "server 0 (pid" in err and "Ray actor died" in err, err
    assert _nothing_left(str(tmp_path))  # its script died with it (PDEATHSIG)


@pytest.mark.parametrize("sig,action,code", [(signal.SIGINT, "spawn-hang", 130),
                                             (signal.SIGTERM, "hang", 143)])
def test_a_signal_stops_every_actor_and_script_and_no_actor_holds_the_token(ray_head, tmp_path, sig,
                                                                             action, code):
    """SIGINT/SIGTERM to fleetrun (Ray's own SIGTERM exit is not in the way): everything is
    stopped; the actors (the scripts' parents) never had the token in their environment: it
    came by a method call."""
    token = f"ray-test-{os.getpid()}-{time.monotonic_ns()}"
    with _running(ray_head, tmp_path, action, token) as (p, out):
        for name in ("server0", "worker0", "worker1"):
            pid = json.loads((out / f"{name}.json").read_text())["pid"]
            actor = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
            assert b"ray::_RoleActor" in Path(f"/proc/{actor}/cmdline").read_bytes()
            assert token.encode() not in Path(f"/proc/{actor}/environ").read_bytes()
        if action == "spawn-hang":  # grandchildren that ignore SIGTERM: the group is SIGKILLed
            assert len(list(out.glob("grandchild*"))) == 2
            time.sleep(0.5)  # they have set SIGTERM aside by now
        p.send_signal(sig)
        _, err = p.communicate(timeout=30)
    assert p.returncode == code, err
    assert f"stopped by {sig.name}" in err
    assert _nothing_left(str(tmp_path))


def test_max_restarts_brings_a_killed_worker_back_on_its_actor(ray_head, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    rc, _, err = _fleetrun(ray_head, [*_ray_args(ray_head, tmp_path, 1, 2), "--max_restarts", 2,
                                      "--strategy", "ps_async", ROLES, out, "once", "worker1"])
    assert rc == 0, err
    assert "restarting it (1 of 2)" in err
    assert sorted(p.name for p in out.glob("*.done.*")) == ["worker0.done.0", "worker1.done.1"]
    assert (tmp_path / "log" / "workerlog.1.restart0").exists()
    assert _nothing_left(str(tmp_path))


def test_submit_runs_the_job_and_brings_its_logs_back(ray_head, tmp_path):
    job = tmp_path / "job"  # the working_dir Ray uploads: only the script
    job.mkdir()
    (job / "roles.py").write_text(ROLES.read_text())
    out = tmp_path / "out"
    out.mkdir()
    rc, stdout, err = _fleetrun(ray_head, ["--ray_address", ray_head.dashboard, "--server_num", 1,
                                           "--worker_num", 1, job / "roles.py", out, "ok", "-"],
                                submit=True, timeout=90)
    assert rc == 0, err
    assert "[worker 0] worker 0 up" in stdout, stdout  # the job's driver printed it on the cluster
    assert "SUCCEEDED" in err
    assert sorted(p.stem for p in out.glob("*.json")) == ["server0", "worker0"]
    assert _nothing_left(str(tmp_path))


def test_ctrl_c_of_submit_stops_the_job(ray_head, tmp_path):
    job = tmp_path / "job"
    job.mkdir()
    (job / "roles.py").write_text(ROLES.read_text())
    out = tmp_path / "out"
    out.mkdir()
    p = _popen(ray_head, ["-m", "shoal.launcher", "submit", "--ray_address", ray_head.address,
                          "--server_num", 1, "--worker_num", 1, job / "roles.py", out, "hang", "-"])
    try:
        deadline = time.monotonic() + 60
        while not (out / "worker0.json").exists():
            assert time.monotonic() < deadline and p.poll() is None, p.communicate()[1][-3000:]
            time.sleep(0.05)
        p.send_signal(signal.SIGINT)
        stdout, err = p.communicate(timeout=30)
    finally:
        if p.poll() is None:
            p.kill()
            p.communicate(timeout=10)
    assert p.returncode == 130, err
    assert "is STOPPED" in err, err
    assert "fleetrun: stopped by SIGTERM" in stdout  # the job's own fleetrun stopped gracefully
    assert _nothing_left(str(tmp_path))


def test_submit_api_returns_1_for_a_failed_job(ray_head, tmp_path):
    job = tmp_path / "job"
    job.mkdir()
    (job / "roles.py").write_text(ROLES.read_text())
    out = tmp_path / "out"
    out.mkdir()
    code = ("import sys; from shoal.launcher import submit; sys.exit(submit(sys.argv[1], "
            "sys.argv[2:], address=%r, server_num=1, worker_num=1))" % ray_head.address)
    p = _popen(ray_head, ["-c", code, job / "roles.py", out, "raise", "worker0"])
    try:
        stdout, err = p.communicate(timeout=90)
    finally:
        if p.poll() is None:
            p.kill()
            p.communicate(timeout=10)
    assert p.returncode == 1, err
    assert "FAILED" in err and "fails on purpose" in stdout, (stdout[-2000:], err[-2000:])
    assert _nothing_left(str(tmp_path))


def test_an_unreachable_cluster_is_one_line_and_exit_2(ray_head, tmp_path):
    started = time.monotonic()
    rc, _, err = _fleetrun(ray_head, ["--backend", "ray", "--ray_address", "127.0.0.1:1",
                                      "--server_num", 1, "--worker_num", 1, ROLES, tmp_path, "ok", "-"])
    assert rc == 2 and "cannot reach the Ray cluster at 127.0.0.1:1" in err, err
    assert time.monotonic() - started < 30


@pytest.mark.parametrize("args,says", [
    (["--backend", "ray", "--server_num", 1, "--worker_num", 1, ROLES], "needs a Ray cluster"),
    (["--backend", "ray", "--ray_address", "http://127.0.0.1:8265", "--server_num", 1,
      "--worker_num", 1, ROLES], "dashboard's"),
    (["--backend", "ray", "--ray_address", "127.0.0.1:6379", "--nproc_per_node", 2, ROLES],
     "parameter-server jobs only"),
    (["--backend", "ray", "--ray_address", "127.0.0.1:6379", "--server_num", 1, "--worker_num", 1,
      "--start_port", 7000, ROLES], "--start_port is for the local backend"),
    (["--backend", "nowhere", "--server_num", 1, "--worker_num", 1, ROLES], "not a backend"),
    (["submit", "--server_num", 1, "--worker_num", 1, ROLES], "needs a Ray cluster"),
])
def test_bad_ray_input_gets_one_line_and_exit_2(args, says):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "SHOAL_FLEETRUN_"))}
    p = subprocess.run([sys.executable, "-m", "shoal.launcher", *map(str, args)], env=env,
                       capture_output=True, text=True, timeout=60, cwd=REPO)
    assert p.returncode == 2, p.stderr
    assert says in p.stderr and len(p.stderr.strip().splitlines()) == 1, p.stderr


@pytest.mark.parametrize("sub", [[], ["submit"]])
def test_without_ray_installed_fleetrun_says_how_to_get_it(sub):
    code = ("import sys; sys.modules['ray'] = None; from shoal.launcher.cli import main; "
            "sys.exit(main(sys.argv[1:]))")
    p = subprocess.run([sys.executable, "-c", code, *sub, "--backend", "ray", "--ray_address",
                        "127.0.0.1:6379", "--server_num", "1", "--worker_num", "1", str(ROLES)],
                       capture_output=True, text=True, timeout=60, cwd=REPO)
    assert p.returncode == 2 and "pip install 'shoal[ray]'" in p.stderr, p.stderr
    assert len(p.stderr.strip().splitlines()) == 1

"""The main job, examples/ctr_dnn.py: local mode, resume, and a real 2x2 job through LocalJob."""
from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from shoal.launcher import LaunchError, LocalJob
from tests.fleet import procs

JOB = Path(__file__).resolve().parents[2] / "examples" / "ctr_dnn.py"
SMALL = ["--samples", "6000", "--test-samples", "2000", "--batch", "256"]


def run_local(tmp_path, *args) -> tuple[str, dict]:
    out = tmp_path / f"m{len(list(tmp_path.glob('m*.json')))}.json"
    res = subprocess.run([sys.executable, str(JOB), "--cache", str(tmp_path / "data"),
                          "--log-dir", str(tmp_path / "log"), "--metrics-out", str(out), *SMALL,
                          *args], env=procs._env({}), capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    return res.stdout, json.loads(out.read_text())


def test_the_main_job_trains_and_reports_the_test_auc(tmp_path):
    stdout, figures = run_local(tmp_path)
    m = re.search(r"final test AUC: (0\.\d{4})", stdout)
    assert m, stdout
    assert float(m.group(1)) == pytest.approx(figures["test_auc"], abs=1e-4)
    assert figures["test_auc"] > 0.55 and figures["step"] == 24  # 6000 / 256 batches
    assert 0.6 < figures["test_accuracy"] < 1 and 0 < figures["test_logloss"] < 0.7
    assert {"pull_wait_ms", "push_wait_ms", "compute_ms"} <= set(figures["breakdown"])
    log = [json.loads(line) for line in (tmp_path / "log" / "metrics.jsonl").read_text().splitlines()]
    assert log[-1]["test_auc"] == pytest.approx(figures["test_auc"])


def test_resume_continues_exactly_where_the_save_left_off(tmp_path):
    _, straight = run_local(tmp_path, "--steps", "16")
    _, first = run_local(tmp_path, "--steps", "8", "--save", str(tmp_path / "ckpt"))
    _, resumed = run_local(tmp_path, "--steps", "16", "--resume", str(tmp_path / "ckpt"))
    assert first["step"] == 8 and resumed["step"] == 16 and resumed["examples"] == 8 * 256
    assert resumed["test_auc"] == pytest.approx(straight["test_auc"], abs=1e-9)
    assert first["test_auc"] != pytest.approx(straight["test_auc"], abs=1e-6)


@pytest.mark.parametrize("preset,mode", [("ps_async", "async"), ("ps_pass", "pass")])
def test_the_main_job_runs_as_two_servers_and_two_workers(tmp_path, preset, mode):
    args = ["--strategy", preset, "--cache", str(tmp_path / "data"), *SMALL,
            "--metrics-out", str(tmp_path / "{role}-{rank}.json")]
    with LocalJob(JOB, args, n_servers=2, n_workers=2, log_dir=tmp_path / "log") as job:
        job.wait(timeout=300)
    assert "final test AUC: 0." in (tmp_path / "log" / "workerlog.0").read_text()
    workers = [json.loads((tmp_path / f"worker-{w}.json").read_text()) for w in range(2)]
    for name in ("test_auc", "test_accuracy", "test_logloss"):  # one global figure each
        assert workers[0][name] == workers[1][name]
    assert sum(w["examples"] for w in workers) == 6000
    assert all(w["mode"] == mode for w in workers)
    if mode == "pass":  # one pass per worker over its 3000 samples, merged (async is noisier)
        assert workers[0]["test_auc"] > 0.55
    assert all((tmp_path / f"server-{s}.json").exists() for s in range(2))


def test_a_failing_worker_stops_the_job_and_is_named(tmp_path):
    args = ["--data", str(tmp_path / "nowhere")]
    with pytest.raises(LaunchError, match=r"worker \d \(pid \d+\) failed \(exit code") as e:
        with LocalJob(JOB, args, n_servers=1, n_workers=2, log_dir=tmp_path / "log",
                      grace=2.0) as job:
            job.wait(timeout=120)
    assert "needs files in" in str(e.value)  # the log's tail is in the message
    assert all(c.popen.poll() is not None for c in job.servers + job.workers)

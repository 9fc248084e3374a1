"""PS training end to end: real server processes and workers on 127.0.0.1, against local mode."""
from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from tests.fleet import procs

JOB = Path(__file__).with_name("job.py")


def local_run(tmp_path, *args) -> dict:
    """The job in local mode (no contract variable: one process, in-process tables)."""
    out = tmp_path / "local.npz"
    res = subprocess.run([sys.executable, str(JOB), "--out", str(out), *args], env=procs._env({}),
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "local mode" in res.stderr
    return dict(np.load(out))


def ps_run(tmp_path, n_servers, n_workers, *args) -> list[dict]:
    work = tmp_path / f"job{n_servers}x{n_workers}"
    work.mkdir()
    codes = procs.run_job(JOB, n_servers, n_workers, work,
                          lambda w: ["--out", str(work / f"w{w}.npz"), *args],
                          server_args=["--out", "-", *args])
    assert codes == [0] * n_workers, procs.log_of(work, "worker", codes.index(next(c for c in codes if c)))
    return [dict(np.load(work / f"w{w}.npz")) for w in range(n_workers)]


def test_sync_with_one_worker_reproduces_local_training(tmp_path):
    args = ["--mode", "sync", "--steps", "8", "--batch", "16"]
    local = local_run(tmp_path, *args)
    (ps,) = ps_run(tmp_path, 2, 1, *args)
    assert np.abs(local["rows"] - local["rows0"]).max() > 1e-4  # training moved the rows
    np.testing.assert_allclose(ps["rows"], local["rows"], atol=1e-6)
    np.testing.assert_allclose(ps["dense"], local["dense"], atol=1e-6)
    np.testing.assert_allclose(ps["losses"], local["losses"], rtol=1e-6)


def test_sync_with_two_workers_reproduces_local_training_on_the_double_batch(tmp_path):
    local = local_run(tmp_path, "--mode", "sync", "--steps", "8", "--batch", "16")
    w0, w1 = ps_run(tmp_path, 2, 2, "--mode", "sync", "--steps", "8", "--batch", "8")
    for w in (w0, w1):
        np.testing.assert_allclose(w["rows"], local["rows"], atol=1e-6)
        np.testing.assert_allclose(w["dense"], local["dense"], atol=1e-6)
    # the mean of the two workers' losses is the loss of the double batch
    np.testing.assert_allclose((w0["losses"] + w1["losses"]) / 2, local["losses"], rtol=1e-5)


@pytest.mark.parametrize("mode,flush", [("async", "flush"), ("half_async", "flush"),
                                        ("geo", "flush"), ("async", "stop"), ("geo", "stop")])
def test_no_gradient_is_lost(tmp_path, mode, flush):
    """SGD at lr 1 on the servers: the tables change by exactly minus every gradient computed
    (GEO: the deltas are averaged over the workers, as Paddle's GEO-SGD). "flush" reads the
    tables after fleet.flush(); "stop" after stop_worker alone (its own flush)."""
    extra = ["--read-after-stop"] if flush == "stop" else []
    workers = ps_run(tmp_path, 2, 2, "--mode", mode, "--steps", "12", "--batch", "8", "--sgd1",
                     "--k-steps", "5", *extra)
    keys = workers[0]["keys"]
    pushed = np.zeros(workers[0]["rows"].shape)
    for w in workers:
        pushed[np.searchsorted(keys, w["pushed_keys"])] += w["pushed"]
    dense_pushed = sum(w["dense_pushed"] for w in workers)
    scale = 0.5 if mode == "geo" else 1.0
    assert np.abs(pushed).max() > 0.05
    np.testing.assert_allclose(workers[0]["rows"] - workers[0]["rows0"], -scale * pushed, atol=1e-6)
    np.testing.assert_allclose(workers[0]["dense"] - workers[0]["dense0"], -scale * dense_pushed,
                               atol=2e-6)


@pytest.mark.parametrize("mode", ["async", "geo"])
def test_two_by_two_reaches_the_auc_of_one_process(tmp_path, mode):
    args = ["--steps", "800", "--eval", "1000", "--k-steps", "10"]
    local = local_run(tmp_path, "--mode", "sync", "--batch", "32", *args)
    workers = ps_run(tmp_path, 2, 2, "--mode", mode, "--batch", "16", *args)
    assert local["auc"] > 0.75
    assert workers[0]["auc"] == workers[1]["auc"]  # every worker reports the global figure
    assert abs(float(workers[0]["auc"]) - float(local["auc"])) < 0.03


@pytest.mark.parametrize("mode,sig", [("async", signal.SIGKILL), ("sync", signal.SIGSTOP),
                                      ("geo", signal.SIGSTOP)])
def test_a_server_that_dies_or_hangs_fails_every_worker_with_its_name(tmp_path, mode, sig):
    """A killed server is noticed at once; a hung one (SIGSTOP) within the RPC timeout."""
    args = ["--mode", mode, "--steps", "1000000", "--batch", "8", "--rpc-timeout", "5",
            "--sleep", "0.002", "--k-steps", "3"]
    with procs.servers(JOB, 2, 2, tmp_path, ["--out", "-", *args]) as (endpoints, sprocs):
        workers = procs.start_workers(JOB, endpoints, 2, tmp_path,
                                      lambda w: ["--out", str(tmp_path / f"w{w}.npz"), *args])
        try:
            deadline = time.monotonic() + 60
            while not all("training" in procs.log_of(tmp_path, "worker", w) for w in range(2)):
                assert time.monotonic() < deadline, procs.log_of(tmp_path, "worker", 0)
                assert all(p.poll() is None for p in workers), procs.log_of(tmp_path, "worker", 0)
                time.sleep(0.05)
            time.sleep(0.5)
            sprocs[1].send_signal(sig)
            killed = time.monotonic()
            for p in workers:
                p.wait(timeout=60)
            # within the RPC timeout (5 s) plus the barrier's grace, with a wide margin; never
            # a multiple of the timeout
            assert time.monotonic() - killed < 5 + 5 + 8
        finally:
            sprocs[1].send_signal(signal.SIGKILL)  # a stopped process ignores SIGTERM
            procs._stop(workers)
    for w, p in enumerate(workers):
        assert p.returncode != 0
        log = procs.log_of(tmp_path, "worker", w)
        assert endpoints[1] in log, log[-3000:]


def test_sync_with_uneven_step_counts_fails_naming_the_rule(tmp_path):
    work = tmp_path / "job"
    work.mkdir()
    base = ["--mode", "sync", "--batch", "8", "--rpc-timeout", "4"]
    codes = procs.run_job(JOB, 1, 2, work,
                          lambda w: ["--out", str(work / f"w{w}.npz"), *base, "--steps", ("6", "3")[w]],
                          server_args=["--out", "-", *base], timeout=90)
    assert codes[0] != 0
    assert "must run the same number of steps" in procs.log_of(work, "worker", 0)


def test_servers_started_from_a_checkpoint_keep_its_dense_and_sparse_state(tmp_path):
    args = ["--mode", "sync", "--steps", "6", "--batch", "8"]
    (first,) = ps_run(tmp_path, 1, 1, *args, "--save", str(tmp_path / "ckpt"))
    work = tmp_path / "second"
    work.mkdir()
    codes = procs.run_job(JOB, 2, 1, work, lambda w: ["--out", str(work / "w0.npz"), *args],
                          server_args=["--out", "-", *args, "--server-load", str(tmp_path / "ckpt")])
    assert codes == [0], procs.log_of(work, "worker", 0)
    second = dict(np.load(work / "w0.npz"))
    np.testing.assert_array_equal(second["dense0"], first["dense"])  # not worker 0's fresh init
    np.testing.assert_array_equal(second["rows0"], first["rows"])


def test_a_partial_contract_raises_naming_the_missing_variables(tmp_path):
    env = procs._env({"TRAINING_ROLE": "TRAINER", "PADDLE_TRAINERS_NUM": "2"})
    res = subprocess.run([sys.executable, str(JOB), "--out", str(tmp_path / "x.npz")], env=env,
                         capture_output=True, text=True, timeout=60)
    assert res.returncode != 0
    assert "PADDLE_TRAINER_ID" in res.stderr and "PADDLE_PSERVERS_IP_PORT_LIST" in res.stderr


def test_global_shuffle_moves_every_sample_to_exactly_one_worker(tmp_path):
    sample = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "ctr_multislot_sample.txt"
    if not sample.exists():
        pytest.skip(f"the shared data sample {sample} is not here")
    lines = sample.read_text().splitlines(keepends=True)
    parts = [tmp_path / f"part-{i}.txt" for i in range(2)]
    for i, p in enumerate(parts):
        p.write_text("".join(lines[i::2]))
    script = Path(__file__).with_name("shuffle_job.py")
    out = str(tmp_path / "w{rank}.npz")
    codes = procs.run_job(script, 1, 2, tmp_path, lambda w: [out, *map(str, parts)],
                          server_args=[out, *map(str, parts)])
    assert codes == [0, 0], procs.log_of(tmp_path, "worker", 0)
    got = [np.load(out.format(rank=w)) for w in range(2)]
    assert [int(g["before"]) for g in got] == [1000, 1000]
    assert all(0 < len(g["c1"]) < 2000 for g in got)  # both workers kept and received samples
    seen = sorted(zip(np.concatenate([g["c1"] for g in got]).tolist(),
                      np.concatenate([g["c26"] for g in got]).tolist(),
                      np.concatenate([g["label"] for g in got]).astype(int).tolist()))
    want = sorted((int(t[17]), int(t[-1]), int(t[1]))
                  for t in (line.split() for line in lines))
    assert seen == want


@pytest.mark.parametrize("mode", ["sync", "async", "geo"])
def test_shows_and_clicks_of_every_occurrence_reach_the_servers(tmp_path, mode):
    """One show per key occurrence, one click per occurrence in a positive sample, in every mode
    (GEO sends them with its deltas): what admission, shrink and save modes decide by."""
    from tests.fleet.job import data
    steps, batch = 10, 8
    ckpt = tmp_path / "ckpt"
    ps_run(tmp_path, 2, 2, "--mode", mode, "--steps", str(steps), "--batch", str(batch),
           "--k-steps", "4", "--save", str(ckpt))
    show = click = 0.0
    for f in ckpt.glob("shard-*.npz"):
        with np.load(f) as z:
            show += z["sparse/emb/stat.show"].sum()
            click += z["sparse/emb/stat.click"].sum()
    _, _, lengths, _, labels = data(1, steps * 2 * batch)
    assert show == pytest.approx(lengths.sum())
    assert click == pytest.approx((lengths.sum(axis=1) * labels).sum())

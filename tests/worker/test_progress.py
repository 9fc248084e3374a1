"""Progress display: JSON-lines log, rank gating, the bar's thread, StepTimer arithmetic."""
import io
import json
import threading
import time

import numpy as np
import pytest
from rich.console import Console
from rich.table import Table

import shoal
from shoal.worker.progress import PROGRESS_ENV, ProgressError, StepTimer, TrainingProgress


def terminal():
    buf = io.StringIO()
    return buf, Console(file=buf, force_terminal=True, width=160)


def test_log_writes_parseable_json_lines(tmp_path):
    path = tmp_path / "logs" / "metrics.jsonl"  # the directory is created
    with TrainingProgress(total_examples=100, rank=0, log_path=path, enabled=False) as prog:
        prog.update(10, loss=0.5)
        first = prog.log(step=1, loss=0.5, auc=np.float64(0.75))
        prog.update(30)
        time.sleep(0.01)
        prog.log(step=2, loss=shoal.Tensor(np.array(0.25, np.float32)), auc=float("nan"),
                 hist=np.arange(3))
    lines = path.read_text().splitlines()
    assert len(lines) == 2
    records = [json.loads(line) for line in lines]
    for r in records:
        assert {"ts", "elapsed_s", "examples", "examples_per_s", "step"} <= set(r)
    assert records[0]["step"] == 1 and records[0]["examples"] == 10 and records[0]["auc"] == 0.75
    assert records[0] == first
    assert records[1]["examples"] == 40 and records[1]["loss"] == 0.25
    assert records[1]["auc"] is None  # NaN is written as null (strict JSON)
    assert records[1]["hist"] == [0, 1, 2]
    assert 0 < records[1]["examples_per_s"] < 30 / 0.01 * 1.01
    assert records[1]["ts"] >= records[0]["ts"]
    # a second run appends
    with TrainingProgress(rank=0, log_path=path, enabled=False) as prog:
        prog.log(step=3)
    assert len(path.read_text().splitlines()) == 3


def test_log_refuses_reserved_keys_and_use_outside_the_context(tmp_path):
    prog = TrainingProgress(rank=0, log_path=tmp_path / "m.jsonl", enabled=False)
    with pytest.raises(ProgressError, match="with TrainingProgress"):
        prog.log(step=1)
    with prog:
        with pytest.raises(ProgressError, match="examples"):
            prog.log(step=1, examples=3)
        with pytest.raises(ProgressError, match="JSON"):
            prog.log(step=1, thing=object())
    assert (tmp_path / "m.jsonl").read_text() == ""


def test_other_ranks_print_nothing_and_write_no_file(tmp_path, capsys):
    buf, console = terminal()
    path = tmp_path / "m.jsonl"
    with TrainingProgress(total_examples=10, rank=1, log_path=path, enabled=True,
                          console=console) as prog:
        prog.update(5, loss=1.0, auc=0.5)
        assert prog.log(step=1, loss=1.0) is None
        prog.print("hello")
        assert not prog.bar_enabled
    assert not path.exists()
    assert buf.getvalue() == ""
    out = capsys.readouterr()
    assert out.out == "" and out.err == ""


def test_bar_renders_and_leaves_no_thread(tmp_path):
    before = set(threading.enumerate())
    buf, console = terminal()
    with TrainingProgress(total_examples=1000, rank=0, enabled=True, console=console,
                          refresh_per_second=50) as prog:
        assert prog.bar_enabled
        assert len(set(threading.enumerate()) - before) >= 1  # rich's refresh thread
        for _ in range(10):
            prog.update(50, loss=0.123, auc=0.7, lr=np.float32(1e-4))
        time.sleep(0.1)
        prog.print("breakdown")
    assert set(threading.enumerate()) - before == set()
    text = buf.getvalue()
    assert "ex/s" in text and "loss=0.123" in text and "auc=0.7" in text and "breakdown" in text
    assert "500/1,000" in text


def test_bar_thread_is_stopped_on_exceptions():
    before = set(threading.enumerate())
    _, console = terminal()
    with pytest.raises(KeyError):
        with TrainingProgress(rank=0, enabled=True, console=console) as prog:
            prog.update(1, loss=2.0)
            raise KeyError("boom")
    assert set(threading.enumerate()) - before == set()


def test_update_is_cheap():
    _, console = terminal()
    with TrainingProgress(total_examples=None, rank=0, enabled=True, console=console) as prog:
        n = 20000
        t0 = time.perf_counter()
        for _ in range(n):
            prog.update(64, loss=0.5, auc=0.7)
        per_call = (time.perf_counter() - t0) / n
    assert prog.examples == 64 * n
    assert per_call < 1e-3  # microseconds in practice; a wide margin for noisy machines


def test_enabled_follows_rank_argument_and_environment(monkeypatch):
    monkeypatch.setenv(PROGRESS_ENV, "1")
    assert TrainingProgress(rank=0).bar_enabled
    assert not TrainingProgress(rank=2).bar_enabled
    assert not TrainingProgress(rank=0, enabled=False).bar_enabled
    monkeypatch.setenv(PROGRESS_ENV, "0")
    assert not TrainingProgress(rank=0).bar_enabled
    assert TrainingProgress(rank=0, enabled=True).bar_enabled
    monkeypatch.delenv(PROGRESS_ENV)
    assert not TrainingProgress(rank=0).bar_enabled  # pytest's stderr is not a terminal
    monkeypatch.setenv(PROGRESS_ENV, "maybe")
    with pytest.raises(ProgressError, match="SHOAL_PROGRESS='maybe'"):
        TrainingProgress(rank=0)


def test_bad_arguments():
    with pytest.raises(ProgressError, match="total_examples"):
        TrainingProgress(total_examples=-1, rank=0, enabled=False)
    with TrainingProgress(rank=0, enabled=False) as prog:
        with pytest.raises(ProgressError, match="n_examples"):
            prog.update(-1)
        with pytest.raises(ProgressError, match="nested"):
            prog.__enter__()


def test_step_timer_summary_sums_to_the_step():
    timer = StepTimer()
    for _ in range(4):
        with timer.step():
            with timer.phase("pull_wait"):
                time.sleep(0.002)
            with timer.phase("compute"):
                time.sleep(0.001)
            t0 = time.perf_counter()
            time.sleep(0.0005)
            timer.add("push_wait", time.perf_counter() - t0)
    s = timer.summary()
    assert s["steps"] == 4
    assert s["push_wait_ms"] >= 0.5
    assert s["pull_wait_ms"] >= 2.0 and s["compute_ms"] >= 1.0
    phases = ("pull_wait", "compute", "push_wait", "other")
    assert sum(s[f"{p}_ms"] for p in phases) == pytest.approx(s["step_ms"])
    assert sum(s[f"{p}_share"] for p in phases) == pytest.approx(1.0)
    assert s["other_ms"] >= 0


def test_step_timer_without_step_timing_and_table():
    timer = StepTimer()
    assert timer.summary() == {"steps": 0.0}
    for _ in range(2):
        timer.add("a", 0.003)
        timer.add("b", 0.001)
    s = timer.summary()
    assert s["steps"] == 2 and s["step_ms"] == pytest.approx(4.0)
    assert s["a_share"] == pytest.approx(0.75) and s["b_share"] == pytest.approx(0.25)
    assert "other_ms" not in s
    table = timer.table()
    assert isinstance(table, Table)
    buf = io.StringIO()
    Console(file=buf, width=100).print(table)
    text = buf.getvalue()
    assert "a" in text and "75.0%" in text and "3.000" in text and "2 steps" in text
    timer.reset()
    assert timer.summary() == {"steps": 0.0}


def test_step_timer_add_is_thread_safe():
    timer = StepTimer()

    def work():
        for _ in range(10000):
            timer.add("push_wait", 1e-6)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert timer._counts["push_wait"] == 40000

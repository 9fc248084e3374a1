"""The training progress display: a rich bar, JSON-lines metrics and a step-time breakdown.

- :class:`TrainingProgress` (a context manager) shows, on rank 0 only, a
  ``rich`` progress bar on stderr with examples/s, loss, AUC and any other
  figure, and independently appends metrics to a JSON-lines file.
- :class:`StepTimer` measures where a step's time goes (named phases) and
  renders the breakdown as a rich Table.

Other ranks print nothing and write no file, so a training script calls the
same methods everywhere.

Example::

    timer = StepTimer()
    with TrainingProgress(total_examples=len(data), rank=rank, log_path="metrics.jsonl") as prog:
        for step, batch in enumerate(loader):
            with timer.step():
                with timer.phase("pull_wait"):
                    rows = pull(batch)
                loss = train_step(batch, rows)
            prog.update(len(batch), loss=loss, auc=auc_value)
            if step % 100 == 0:
                prog.log(step=step, loss=loss, auc=auc_value)
        prog.print(timer.table())
"""
from __future__ import annotations

import json
import math
import os
import sys
import threading
import time
from typing import Any, Optional

from rich.console import Console
from rich.progress import (BarColumn, Progress, ProgressColumn, SpinnerColumn, Task, TextColumn,
                           TimeElapsedColumn, TimeRemainingColumn)
from rich.table import Table
from rich.text import Text

from shoal.worker.errors import EngineError

__all__ = ["TrainingProgress", "StepTimer", "ProgressError", "PROGRESS_ENV"]

#: 1 forces the bar on (rank 0), 0 off; unset: on iff stderr is a terminal.
PROGRESS_ENV = "SHOAL_PROGRESS"
_ON, _OFF = ("1", "true", "yes", "on"), ("0", "false", "no", "off")
# keys log() writes itself; a figure of the same name would be ambiguous
_RESERVED = ("ts", "elapsed_s", "examples", "examples_per_s")


class ProgressError(EngineError, ValueError):
    """A progress display used wrongly (bad setting, log outside the context, reserved key)."""


def _bar_wanted(enabled: Optional[bool]) -> bool:
    if enabled is not None:
        return bool(enabled)
    value = os.environ.get(PROGRESS_ENV)
    if value is not None and value.strip() != "":
        v = value.strip().lower()
        if v in _ON:
            return True
        if v in _OFF:
            return False
        raise ProgressError(f"{PROGRESS_ENV}={value!r} is not understood; set it to 1 (show the "
                            f"progress bar) or 0 (hide it), or unset it (shown on a terminal)")
    try:
        return sys.stderr is not None and sys.stderr.isatty()
    except (AttributeError, ValueError):  # replaced or closed stderr
        return False


def _fmt(value: Any) -> str:
    item = getattr(value, "item", None)  # Tensors and numpy scalars: converted at render time only
    if callable(item):
        try:
            value = item()
        except Exception:  # a multi-element array: show it as it is
            return str(value)
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) >= 1e-3 or value == 0 or not math.isfinite(value) \
            else f"{value:.3e}"
    return str(value)


def _rate(per_s: Optional[float]) -> str:
    if per_s is None:
        return "- ex/s"
    for unit, scale in (("M", 1e6), ("k", 1e3)):
        if per_s >= scale:
            return f"{per_s / scale:.1f}{unit} ex/s"
    return f"{per_s:.1f} ex/s"


class _RateColumn(ProgressColumn):
    def render(self, task: Task) -> Text:
        return Text(_rate(task.speed), style="progress.data.speed")


class _FiguresColumn(ProgressColumn):
    def render(self, task: Task) -> Text:
        items = tuple(task.fields.items())  # one C-level copy: the loop thread may add keys meanwhile
        return Text("  ".join(f"{k}={_fmt(v)}" for k, v in items))


def _jsonable(value: Any) -> Any:
    if isinstance(value, float):
        return value if math.isfinite(value) else None  # strict JSON has no NaN / inf
    if isinstance(value, (str, int, bool)) or value is None:
        return value
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    tolist = getattr(value, "tolist", None)  # numpy scalars and arrays, Tensors
    if callable(tolist):
        return _jsonable(tolist())
    raise ProgressError(f"TrainingProgress.log: a figure of type {type(value).__name__} cannot be "
                        f"written as JSON; pass numbers, strings, lists or arrays")


class _Refresher(threading.Thread):
    """Redraws a Progress at a fixed rate until stopped; stop() joins it."""

    def __init__(self, progress: Progress, per_second: float) -> None:
        super().__init__(name="shoal-progress", daemon=True)
        self.progress, self.interval = progress, 1.0 / per_second
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.wait(self.interval):
            self.progress.refresh()

    def stop(self) -> None:
        self.done.set()
        self.join()


class TrainingProgress:
    """A progress bar and a metrics log for a training loop; active on rank 0 only.

    Args:
        total_examples: examples in the run (for percent and ETA), or None.
        rank: this worker's rank; only rank 0 shows a bar or writes a file.
        log_path: JSON-lines file that :meth:`log` appends to (rank 0), or None.
        enabled: show the bar (rank 0 only). None: as ``SHOAL_PROGRESS`` says
            (1 on, 0 off), else iff stderr is a terminal.
        console: where the bar is drawn (default: a rich Console on stderr).
        refresh_per_second: redraw rate of the bar (its own thread redraws).

    :meth:`update` costs a few microseconds (the bar is redrawn by rich's
    refresh thread at `refresh_per_second`, never by the caller). The bar's
    thread is stopped and the file closed on exit, also on exceptions. Not
    thread-safe: call it from the training loop's thread.
    """

    def __init__(self, total_examples: Optional[int] = None, rank: int = 0,
                 log_path: Optional[str | os.PathLike] = None, enabled: Optional[bool] = None, *,
                 description: str = "train", console: Optional[Console] = None,
                 refresh_per_second: float = 4.0) -> None:
        if total_examples is not None and (not isinstance(total_examples, int) or total_examples < 0):
            raise ProgressError(f"TrainingProgress: total_examples must be an int >= 0 or None, "
                                f"got {total_examples!r}")
        if not refresh_per_second > 0:
            raise ProgressError(f"TrainingProgress: refresh_per_second must be > 0, got "
                                f"{refresh_per_second!r}")
        self.rank = rank
        self.total_examples = total_examples
        self.is_main = rank == 0
        self.log_path = os.fspath(log_path) if (log_path is not None and self.is_main) else None
        self.bar_enabled = self.is_main and _bar_wanted(enabled)
        self.description = description
        self._console = console
        self._refresh = refresh_per_second
        self._progress: Optional[Progress] = None
        self._task = None
        self._refresher: Optional[_Refresher] = None
        self._file = None
        self._entered = False
        self.examples = 0
        self._t0 = self._last_t = time.perf_counter()
        self._last_examples = 0

    # -- lifetime ------------------------------------------------------------------
    def __enter__(self) -> "TrainingProgress":
        if self._entered:
            raise ProgressError("TrainingProgress: already inside its `with` block; it cannot be nested")
        self._t0 = self._last_t = time.perf_counter()
        self.examples = self._last_examples = 0
        try:
            if self.log_path is not None:
                parent = os.path.dirname(self.log_path)
                if parent:
                    os.makedirs(parent, exist_ok=True)
                self._file = open(self.log_path, "a", encoding="utf-8")
            if self.bar_enabled:
                self._start_bar()
        except BaseException:
            self._close()
            raise
        self._entered = True
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        self._entered = False
        self._close()
        return False

    def _start_bar(self) -> None:
        console = self._console or Console(file=sys.stderr)
        columns = [SpinnerColumn(), TextColumn("[progress.description]{task.description}"),
                   BarColumn(), TextColumn("{task.completed:,.0f}" + (
                       f"/{self.total_examples:,}" if self.total_examples is not None else "") + " ex"),
                   _RateColumn(), TimeElapsedColumn()]
        if self.total_examples is not None:
            columns.append(TimeRemainingColumn())
        columns.append(_FiguresColumn())
        # our own refresh thread, not rich's: rich's Live.stop() does not join its thread
        self._progress = Progress(*columns, console=console, auto_refresh=False, transient=False)
        self._task = self._progress.add_task(self.description, total=self.total_examples)
        self._progress.start()
        self._refresher = _Refresher(self._progress, self._refresh)
        self._refresher.start()

    def _close(self) -> None:
        progress, self._progress = self._progress, None
        refresher, self._refresher = self._refresher, None
        f, self._file = self._file, None
        try:
            if refresher is not None:
                refresher.stop()
            if progress is not None:
                progress.stop()  # draws the final state
        finally:
            if f is not None:
                f.close()

    # -- per step ------------------------------------------------------------------
    def update(self, n_examples: int, **figures: Any) -> None:
        """Count `n_examples` more and show `figures` (loss=..., auc=..., any other).

        Cheap enough for every step: figures are stored as given (Tensors
        too) and formatted only when the bar is redrawn.
        """
        if n_examples < 0:
            raise ProgressError(f"TrainingProgress.update: n_examples must be >= 0, got {n_examples!r}")
        self.examples += n_examples
        if self._progress is not None:
            self._progress.update(self._task, advance=n_examples, **figures)

    def log(self, step: Optional[int] = None, **figures: Any) -> Optional[dict]:
        """Append one JSON object to the log file (rank 0; a no-op elsewhere) and flush it.

        The object holds ``ts`` (Unix time), ``elapsed_s``, ``examples`` (counted
        by :meth:`update`), ``examples_per_s`` since the previous log (or the
        start), ``step`` when given, and `figures` (numbers, NaN written as
        null, strings, arrays). Returns the object written, or None when
        nothing is written (not rank 0, or no log_path).

        Raises:
            ProgressError: called outside the ``with`` block, a figure named
                like a key above, or a figure that is not JSON-able.
        """
        if self.log_path is None:
            return None
        if self._file is None:
            raise ProgressError("TrainingProgress.log: the log file is open only inside "
                                "`with TrainingProgress(...) as progress:`")
        clash = [k for k in figures if k in _RESERVED]
        if clash:
            raise ProgressError(f"TrainingProgress.log: {clash} are written by log() itself "
                                f"({list(_RESERVED)}); rename those figures")
        now = time.perf_counter()
        span = now - self._last_t
        rate = (self.examples - self._last_examples) / span if span > 0 else None
        record = {"ts": time.time(), "elapsed_s": now - self._t0, "examples": self.examples,
                  "examples_per_s": rate}
        if step is not None:
            record["step"] = step
        record.update(figures)
        record = _jsonable(record)
        self._file.write(json.dumps(record, allow_nan=False) + "\n")
        self._file.flush()
        self._last_t, self._last_examples = now, self.examples
        return record

    def print(self, *objects: Any) -> None:
        """Print on rank 0 (above the bar while it runs; on stderr otherwise), e.g. a StepTimer table."""
        if not self.is_main:
            return
        if self._progress is not None:
            self._progress.console.print(*objects)
        else:
            (self._console or Console(file=sys.stderr)).print(*objects)


class _Phase:
    __slots__ = ("timer", "name", "t0")

    def __init__(self, timer: "StepTimer", name: str) -> None:
        self.timer, self.name = timer, name

    def __enter__(self) -> "_Phase":
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc) -> bool:
        self.timer.add(self.name, time.perf_counter() - self.t0)
        return False


class _Step:
    __slots__ = ("timer", "t0")

    def __init__(self, timer: "StepTimer") -> None:
        self.timer = timer

    def __enter__(self) -> "_Step":
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc) -> bool:
        self.timer.add_step(time.perf_counter() - self.t0)
        return False


class StepTimer:
    """Per-step time breakdown: totals and counts of named phases (time.perf_counter).

    Time whole steps with ``with timer.step():`` (or ``add_step(seconds)``) and
    parts of them with ``with timer.phase("pull_wait"):`` or
    ``timer.add("push_wait", seconds)`` (e.g. measured by a communicator).
    Phases should not overlap: overlapping ones are each counted in full.
    Without step timing, a step's time is the sum of its phases and the step
    count the largest phase count. ``add`` and ``add_step`` are thread-safe.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.reset()

    def reset(self) -> None:
        """Forget all measurements."""
        with self._lock:
            self._totals: dict[str, float] = {}
            self._counts: dict[str, int] = {}
            self._steps = 0
            self._step_total = 0.0

    def phase(self, name: str) -> _Phase:
        """A context manager adding its duration to phase `name`."""
        return _Phase(self, name)

    def step(self) -> _Step:
        """A context manager timing one whole step."""
        return _Step(self)

    def add(self, name: str, seconds: float, count: int = 1) -> None:
        """Add `seconds` spent in phase `name` (`count` occurrences)."""
        with self._lock:
            self._totals[name] = self._totals.get(name, 0.0) + seconds
            self._counts[name] = self._counts.get(name, 0) + count

    def add_step(self, seconds: float, count: int = 1) -> None:
        """Add `count` whole steps that took `seconds` together."""
        with self._lock:
            self._steps += count
            self._step_total += seconds

    def _snapshot(self) -> tuple[dict[str, float], dict[str, int], int, float, bool]:
        with self._lock:
            totals, counts = dict(self._totals), dict(self._counts)
            steps, step_total = self._steps, self._step_total
        measured = steps > 0
        if not measured:
            steps = max(counts.values(), default=0)
            step_total = sum(totals.values())
        return totals, counts, steps, step_total, measured

    def summary(self) -> dict[str, float]:
        """{"steps", "step_ms", "<phase>_ms", "<phase>_share", ..., "other_ms", "other_share"}.

        ``<phase>_ms`` is the phase's mean time per step in milliseconds and
        ``<phase>_share`` its fraction of the step time; ``other`` is the step
        time outside every phase (present when steps are timed). The ms add up
        to ``step_ms`` and the shares to 1 when phases do not overlap. Empty
        (only ``steps`` = 0) before anything was measured.
        """
        totals, _, steps, step_total, measured = self._snapshot()
        out: dict[str, float] = {"steps": float(steps)}
        if steps == 0:
            return out
        out["step_ms"] = step_total / steps * 1e3
        for name, total in totals.items():
            out[f"{name}_ms"] = total / steps * 1e3
            out[f"{name}_share"] = total / step_total if step_total > 0 else 0.0
        if measured:
            other = step_total - sum(totals.values())
            out["other_ms"] = other / steps * 1e3
            out["other_share"] = other / step_total if step_total > 0 else 0.0
        return out

    def table(self, title: str = "step time") -> Table:
        """The breakdown as a rich Table: phase, ms/step, share, calls."""
        totals, counts, steps, step_total, measured = self._snapshot()
        table = Table(title=f"{title} ({steps} steps)")
        table.add_column("phase")
        table.add_column("ms/step", justify="right")
        table.add_column("share", justify="right")
        table.add_column("calls", justify="right")
        if steps == 0:
            return table
        rows = sorted(totals.items(), key=lambda kv: -kv[1])
        for name, total in rows:
            share = total / step_total if step_total > 0 else 0.0
            table.add_row(name, f"{total / steps * 1e3:.3f}", f"{share:.1%}", str(counts[name]))
        if measured:
            other = step_total - sum(totals.values())
            share = other / step_total if step_total > 0 else 0.0
            table.add_row("other", f"{other / steps * 1e3:.3f}", f"{share:.1%}", "")
        table.add_row("step", f"{step_total / steps * 1e3:.3f}", "100.0%", str(steps), style="bold")
        return table

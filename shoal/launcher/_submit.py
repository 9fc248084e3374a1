"""`fleetrun submit` and `shoal.launcher.submit`: a whole `--backend ray` job through Ray job
submission.

The job's entrypoint is `python -m shoal.launcher --backend ray <options> script.py args`, run
by Ray on the cluster with the script's directory uploaded as its `working_dir` (so the
script, and a strategy file beside it, travel with the job; Shoal itself must be installed on
the cluster). That driver supervises the actors as `fleetrun --backend ray` does and generates
the job token there: no secret is sent with the submission. The job's logs are streamed back to
stdout while it runs; the outcome is the exit status.

The address is the dashboard's (http://HEAD:8265) or the cluster's (HEAD:6379; Ray looks the
dashboard up through it), from --ray_address or RAY_ADDRESS.
"""
from __future__ import annotations

import asyncio
import os
import shlex
import signal
import sys
import threading
import time
from pathlib import Path

from shoal.configs.cluster import CONTRACT_VARIABLES
from shoal.launcher._ray import RayUnavailableError, check_reachable, cluster_address, require_ray
from shoal.launcher.errors import LaunchError

# not passed on to the job's own fleetrun: it is --backend ray by construction, finds its
# cluster through the RAY_ADDRESS Ray gives every job, and places servers itself
_NOT_FORWARDED = ("backend", "ray_address", "servers", "workers", "start_port")
_POLL = 0.5


def submit(script, args=(), *, address: str | None = None, working_dir=None,
           **fleetrun_options) -> int:
    """Run `script` with `args` as a Shoal job on a Ray cluster through Ray job submission.

    Args:
        script: the training script; it must lie inside `working_dir`.
        args: the script's arguments.
        address: the dashboard's http://HOST:8265 or the cluster's HOST:PORT (default
            RAY_ADDRESS).
        working_dir: the directory uploaded with the job (default: the script's directory).
            Ray uploads all of it (up to Ray's size limit): keep it small.
        fleetrun_options: fleetrun's flags by name, e.g. server_num=1, worker_num=2,
            strategy="ps_async", worker_cpus=2.

    Returns:
        0 when the job SUCCEEDED; 1 when it FAILED or was STOPPED (the status and Ray's
        message are printed on stderr); 128 + the signal when this process was interrupted
        (the job is stopped first).

    Raises:
        LaunchError: an unknown or bad option (named), or a script outside `working_dir`.
        RayUnavailableError: Ray is not installed or the cluster cannot be reached.

    Blocks until the job ends, streaming its logs to sys.stdout. Example:
        submit("train.py", ["--epochs", "1"], address="http://127.0.0.1:8265",
               server_num=1, worker_num=2)
    """
    from shoal.launcher.cli import _FLAGS, UsageError, parse
    known = [name for name, *_ in _FLAGS if name not in ("backend", "ray_address")]
    argv = []
    for name, value in fleetrun_options.items():
        if name not in known:
            raise LaunchError(f"submit() got an unknown fleetrun option {name!r}; the options are "
                              f"{', '.join(known)}")
        argv += [f"--{name}", str(value)]
    if address is not None:
        argv += ["--ray_address", address]
    try:
        parsed = parse(["--backend", "ray", *argv, str(script), *map(str, args)],
                       submitting=True)
    except UsageError as e:
        raise LaunchError(f"submit(): {e}") from None
    return run(parsed, working_dir=working_dir)


def main(argv: list[str]) -> int:
    """`fleetrun submit [options] script.py [args]`; exit status as submit() returns it, 2 for
    bad options, an unreachable cluster or Ray not installed."""
    from shoal.launcher.cli import UsageError, parse
    try:
        args = parse(["--backend", "ray", *argv], submitting=True)
        if args.backend != "ray":
            raise UsageError(f"fleetrun submit runs the job on Ray; drop --backend {args.backend}")
    except UsageError as e:
        print(f"fleetrun submit: {e} (fleetrun --help lists the flags)", file=sys.stderr)
        return 2
    try:
        return run(args)
    except RayUnavailableError as e:
        print(f"fleetrun submit: {e}", file=sys.stderr)
        return 2
    except LaunchError as e:
        print(f"fleetrun submit: {e}", file=sys.stderr)
        return 1


def _entrypoint(args, working_dir: Path) -> list[str]:
    from shoal.launcher.cli import _FLAGS
    script = Path(args.script).resolve()
    rel = os.path.relpath(script, working_dir)
    if rel.startswith(".."):
        raise LaunchError(f"script {args.script} is not inside the working_dir {working_dir} "
                          f"uploaded with the job; give a working_dir that holds it")
    entry = ["python", "-m", "shoal.launcher", "--backend", "ray"]
    for name, _, default, _ in _FLAGS:
        value = getattr(args, name)
        if name in _NOT_FORWARDED or value is None or value == default:
            continue
        if name == "strategy" and Path(value).is_file():  # a file travels in the working_dir
            value = os.path.relpath(Path(value).resolve(), working_dir)
            if value.startswith(".."):
                raise LaunchError(f"--strategy {args.strategy} is not inside the working_dir "
                                  f"{working_dir} uploaded with the job; put it beside the script "
                                  f"or name a preset")
        entry += [f"--{name}", str(value)]
    return entry + [rel, *args.script_args]


class _LogStream:
    """The job's logs to stdout, each character once: streamed by Ray's tail_job_logs in a
    thread, and whatever that missed taken from get_job_logs (`catch_up`)."""

    def __init__(self, client, job: str):
        self.client, self.job = client, job
        self.lock, self.written, self.closed = threading.Lock(), 0, False
        self.thread = threading.Thread(target=self._follow, name="fleetrun-submit-logs", daemon=True)
        self.thread.start()

    def _write(self, text: str) -> None:
        with self.lock:
            if self.closed:
                return
            sys.stdout.write(text)
            sys.stdout.flush()
            self.written += len(text)

    def _follow(self) -> None:
        async def follow():
            async for chunk in self.client.tail_job_logs(self.job):
                self._write(chunk)
        try:
            asyncio.run(follow())
        except Exception:  # the catch-up from get_job_logs covers what the stream missed
            pass

    def catch_up(self, final: bool = False) -> None:
        if final:
            self.thread.join(timeout=5)
        try:
            logs = self.client.get_job_logs(self.job)
        except Exception:
            return
        with self.lock:
            if len(logs) > self.written:
                sys.stdout.write(logs[self.written:])
                sys.stdout.flush()
                self.written = len(logs)
            self.closed = self.closed or final


def run(args, working_dir=None) -> int:
    """Submit the job the parsed fleetrun options describe; see submit()."""
    require_ray()
    from ray.job_submission import JobSubmissionClient
    address = cluster_address(args.ray_address)
    working_dir = Path(working_dir or Path(args.script).resolve().parent).resolve()
    entry = _entrypoint(args, working_dir)
    runtime_env = {"working_dir": str(working_dir)}
    # Shoal's own settings (SHOAL_PROGRESS, SHOAL_DATA_CACHE, ...) go along; the contract, the
    # job token above all, never does: the job's fleetrun makes its own
    settings = {k: v for k, v in os.environ.items() if k.startswith("SHOAL_")
                and k not in CONTRACT_VARIABLES and not k.startswith("SHOAL_FLEETRUN_")}
    if settings:
        runtime_env["env_vars"] = settings
    check_reachable(address)
    try:
        client = JobSubmissionClient(address)
    except Exception as e:
        raise RayUnavailableError(f"cannot reach Ray job submission at {address}: "
                                  f"{str(e).strip().splitlines()[0] if str(e).strip() else e!r}") from e
    job = client.submit_job(entrypoint=shlex.join(entry), runtime_env=runtime_env,
                            metadata={"shoal_job_id": args.job_id})
    print(f"fleetrun submit: submitted {job} to {address} (working_dir {working_dir}); its "
          f"output follows", file=sys.stderr, flush=True)
    interrupted = {"signal": None}

    def on_signal(sig, _frame):
        if interrupted["signal"] is None:
            interrupted["signal"] = sig
            raise KeyboardInterrupt
    main_thread = threading.current_thread() is threading.main_thread()
    old = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)} if main_thread else {}
    stream = None
    try:
        stream = _LogStream(client, job)
        while not client.get_job_status(job).is_terminal():
            if not stream.thread.is_alive():
                stream.catch_up()
            time.sleep(_POLL)
        stream.catch_up(final=True)
    except KeyboardInterrupt:
        sig = interrupted["signal"] or signal.SIGINT
        interrupted["signal"] = sig
        client.stop_job(job)
        deadline = time.monotonic() + 15
        while not client.get_job_status(job).is_terminal() and time.monotonic() < deadline:
            time.sleep(0.2)
        if stream is not None:
            stream.catch_up(final=True)
        print(f"fleetrun submit: stopped by {signal.Signals(sig).name}; job {job} is "
              f"{client.get_job_status(job).value}", file=sys.stderr)
        return 128 + int(sig)
    finally:
        for s, h in old.items():
            signal.signal(s, h)
    info = client.get_job_info(job)
    status = info.status.value
    if status == "SUCCEEDED":
        print(f"fleetrun submit: job {job} SUCCEEDED", file=sys.stderr)
        return 0
    print(f"fleetrun submit: job {job} {status}: {info.message}", file=sys.stderr)
    return 1

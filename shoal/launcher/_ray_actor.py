"""The actor side of the Ray backend: one role of a job on its node (see _ray.py).

`_RoleActor` becomes a Ray actor where the driver wraps it with ray.remote; it runs the
user's script as its own child exactly as LocalJob runs one (own process group,
PR_SET_PDEATHSIG to the actor, output to `<log_dir>/serverlog.N` / `workerlog.N`), beside a
janitor that SIGKILLs the script's group should the actor die. Nothing here imports Ray at
module level.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from shoal.configs.cluster import CONTRACT_VARIABLES
from shoal.launcher.local import _JANITOR, Child, _die_with_parent, _group_alive, _signal

# the janitor forks away first: Ray kills a dying worker's direct children, which would take
# a direct-child janitor with it before it could clean up
_DETACHED_JANITOR = "import os\nif os.fork():\n    os._exit(0)\n" + _JANITOR


class _RoleActor:
    """One role of the job on its node: runs the script as its child. A Ray actor once wrapped
    by ray.remote (`_ray._actor_class`); its methods are the driver's control calls, run one at a
    time (Ray's default for a synchronous actor)."""

    def __init__(self, role: str, rank: int):
        self.role, self.rank = role, rank
        self.child: Child | None = None
        self.report: Path | None = None
        # SIGKILLs the script's process group if this actor dies (its stdin then closes)
        self._janitor = subprocess.Popen([sys.executable, "-c", _DETACHED_JANITOR],
                                         stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                                         stderr=subprocess.DEVNULL, start_new_session=True)
        self._janitor.wait(timeout=30)  # the parent half exits at once; its child reads on

    def node(self) -> dict:
        import ray
        return {"ip": ray.util.get_node_ip_address(), "pid": os.getpid(), "cwd": os.getcwd()}

    def start(self, spec: dict) -> dict:
        """Start the script: spec has script, script_rel, args, log_dir, env, report, keep_log_as."""
        if self.child is not None and self.child.popen.poll() is None:
            raise RuntimeError(f"{self.role} {self.rank} is still running")
        script = spec["script"]
        if not os.path.isfile(script):  # not at the driver's path here: try the job's working dir
            script = spec["script_rel"]
            if script is None or not os.path.isfile(script):
                raise FileNotFoundError(f"script {spec['script']} is not on this node "
                                        f"({self.node()['ip']}, cwd {os.getcwd()}); put it there at "
                                        f"the same path, or use `fleetrun submit`, which ships it")
        log_dir = Path(spec["log_dir"])
        log_dir.mkdir(parents=True, exist_ok=True)
        log = log_dir / f"{self.role}log.{self.rank}"
        if spec.get("keep_log_as") and log.exists():
            log.replace(log_dir / spec["keep_log_as"])
        env = {k: v for k, v in os.environ.items()
               if k not in CONTRACT_VARIABLES and not k.startswith(("PADDLE_", "SHOAL_FLEETRUN_"))}
        env.update(spec["env"])
        self.report = Path(spec["report"]) if spec.get("report") else None
        if self.report is not None:
            self.report.unlink(missing_ok=True)
        with open(log, "wb") as out:
            popen = subprocess.Popen([sys.executable, script, *spec["args"]], env=env,
                                     stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     start_new_session=True, preexec_fn=_die_with_parent(os.getpid()))
        self._tell(f"group {popen.pid}")
        self.child = Child(self.role, self.rank, popen, log)
        return {"pid": popen.pid, "log": str(log)}

    def poll(self) -> int | None:
        return None if self.child is None else self.child.popen.poll()

    def endpoint(self) -> str | None:
        """The server's reported endpoint once it has written it, else None."""
        if self.report is None or not self.report.exists():
            return None
        text = self.report.read_text().strip().replace("tcp://", "")
        self.report.unlink(missing_ok=True)
        return text or None

    def read_log(self, offset: int, size: int) -> bytes:
        if self.child is None:
            return b""
        try:
            with open(self.child.log, "rb") as f:
                f.seek(offset)
                return f.read(size)
        except OSError:
            return b""

    def tail(self, lines: int = 20) -> str:
        return "(not started)" if self.child is None else self.child.tail(lines)

    def stop(self, grace: float) -> tuple[int | None, bool]:
        """SIGTERM the script's group, SIGKILL what is left after `grace` s; returns (exit status,
        whether the script was still running: then its exit is this stop's doing)."""
        c = self.child
        if c is None:
            return None, False
        running = c.popen.poll() is None
        if _group_alive(c):
            _signal(c, signal.SIGTERM if grace > 0 else signal.SIGKILL)
        end = time.monotonic() + grace
        while _group_alive(c) and time.monotonic() < end:
            time.sleep(0.05)
        if _group_alive(c):
            _signal(c, signal.SIGKILL)
        try:
            c.popen.wait(timeout=10)
        except subprocess.TimeoutExpired:  # pragma: no cover - SIGKILL cannot be ignored
            pass
        end = time.monotonic() + 5
        while _group_alive(c) and time.monotonic() < end:
            time.sleep(0.02)
        if not _group_alive(c):
            self._tell(f"gone {c.popen.pid}")
        return c.popen.returncode, running

    def _tell(self, line: str) -> None:
        try:
            self._janitor.stdin.write(f"{line}\n".encode())
            self._janitor.stdin.flush()
        except OSError:
            pass

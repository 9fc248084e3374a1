"""The local supervisor: a PS job's servers and workers as child processes of this one.

Servers start first (the user's script with TRAINING_ROLE=PSERVER, as in
Paddle); each binds port 0 and reports its real endpoint into a file named
by SHOAL_ENDPOINT_REPORT, and the supervisor waits (bounded) for every
report before it starts the workers with the full
PADDLE_PSERVERS_IP_PORT_LIST. No port is probed and bound later.

Every child runs in its own process group and dies with its parent
(PR_SET_PDEATHSIG); a small janitor process holds the list of the groups and
SIGKILLs them all if the supervisor itself dies, so even a SIGKILL of
fleetrun leaves no grandchild behind. Stopping signals whole groups (a
child's own children included). Each child writes its output to
`<log_dir>/serverlog.N` / `workerlog.N` (unbuffered), and gets
OMP_NUM_THREADS = max(1, cores // processes) unless the caller set it. One
job at a time uses a log_dir (a lock file says which).
When every worker exits 0 the servers are given a grace period to exit (the
first worker's stop_worker stops them), then SIGTERM. When any process fails,
every other one gets SIGTERM, then SIGKILL after the grace period, and
`wait` raises LaunchError naming the role, rank, exit code or signal and the
last lines of its log.
"""
from __future__ import annotations

import ctypes
import fcntl
import os
import secrets
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from shoal.configs.cluster import CONTRACT_VARIABLES, ServerEnv, WorkerEnv
from shoal.launcher.errors import LaunchError, StoreBindError

_PR_SET_PDEATHSIG = 1
_THREAD_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")
_LIBC = ctypes.CDLL(None, use_errno=True)  # loaded before any fork: nothing is loaded in a child

# The janitor: reads the process groups of the job on stdin; at EOF without "done" (the
# supervisor died), SIGKILLs every group it was told of and not told is gone.
_JANITOR = """
import os, signal, sys
groups = set()
for line in sys.stdin:
    word, _, pgid = line.strip().partition(" ")
    if word == "done":
        sys.exit(0)
    (groups.add if word == "group" else groups.discard)(int(pgid))
for pgid in groups:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except OSError:
        pass
"""


class LogDirBusyError(LaunchError):
    """Another job is using the log directory."""


def _die_with_parent(parent: int):
    def preexec() -> None:  # in the child between fork and exec: no allocation-heavy work
        _LIBC.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() != parent:  # the parent died before prctl took effect
            os._exit(1)
    return preexec


@dataclass
class Child:
    """One process of the job."""

    role: str          # "server" or "worker"
    rank: int
    popen: subprocess.Popen
    log: Path

    def describe(self) -> str:
        return f"{self.role} {self.rank} (pid {self.popen.pid})"

    def exit_text(self) -> str:
        rc = self.popen.returncode
        if rc is None:
            return "still running"
        if rc < 0:
            return f"killed by signal {signal.Signals(-rc).name}"
        return f"exit code {rc}"

    def tail(self, lines: int = 20) -> str:
        try:
            text = self.log.read_text(errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])


def await_endpoint(child, read, running, deadline: float, timeout: float) -> str:
    """Poll `read()` until a server reports its endpoint; LaunchError (with the log's last lines)
    if `running()` turns False first, or past `deadline` (monotonic)."""
    while True:
        endpoint = read()
        if endpoint:
            return endpoint
        if not running():
            raise LaunchError(f"{child.describe()} exited ({child.exit_text()}) before reporting "
                              f"its endpoint; last lines of {child.log}:\n{child.tail()}")
        if time.monotonic() > deadline:
            raise LaunchError(f"{child.describe()} did not report its endpoint within "
                              f"{timeout:.0f}s; last lines of {child.log}:\n{child.tail()}")
        time.sleep(0.02)


def take_log_dir(log_dir: Path):
    """Lock `log_dir` for one job (the open lock file, holding this pid); LogDirBusyError names
    the fleetrun that holds it."""
    log_dir.mkdir(parents=True, exist_ok=True)
    lock = open(log_dir / ".fleetrun.lock", "a+")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.seek(0)
        holder = lock.read().strip() or "?"
        lock.close()
        raise LogDirBusyError(f"log_dir {log_dir} is in use by another job (fleetrun pid "
                              f"{holder}); choose another --log_dir") from None
    lock.truncate(0)
    lock.write(str(os.getpid()))
    lock.flush()
    return lock


def _endpoint(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _signal(child: Child, sig: int) -> None:
    try:
        os.killpg(child.popen.pid, sig)  # the child leads its own group: take its children too
    except (ProcessLookupError, PermissionError):
        pass


def _group_alive(child: Child) -> bool:
    """Whether any process is left in the child's group (its leader reaped first)."""
    child.popen.poll()
    try:
        os.killpg(child.popen.pid, 0)
        return True
    except (ProcessLookupError, PermissionError):
        return False


class LocalJob:
    """Run `script` as a PS job of `n_servers` servers and `n_workers` workers on this machine.

    Args:
        script: the user's script (a path); `script_args` follow it.
        log_dir: where serverlog.N, workerlog.N and endpoints.log go.
        token: the job token (default: a fresh random one).
        strategy_path: a strategy YAML for SHOAL_STRATEGY (None: unset).
        host: the address every process binds and connects to.
        env: extra variables for every child.
        start_timeout: seconds the servers may take to report their endpoints.
        grace: seconds between SIGTERM and SIGKILL, and for servers to exit after the workers.
        server_hosts, worker_hosts: for a job over several nodes, the host of every server and
            worker (in index order); this supervisor starts those whose host is `host` (this
            node) and gives every process the whole job's endpoints. Servers on other nodes
            need their real ports in `ports`; all nodes must share `token`.
        devices: GPU ids; this node's workers take them in turn (the i-th local worker sees
            only devices[i % len(devices)] through CUDA_VISIBLE_DEVICES, so a pass-mode
            worker's pass table lands on its own GPU). None: the workers inherit the variable.

    Use as a context manager (`with LocalJob(...) as job: job.wait()`) so the
    processes are stopped whatever happens. Not thread-safe.
    """

    def __init__(self, script, script_args=(), *, n_servers: int, n_workers: int, log_dir,
                 token: str | None = None, strategy_path: str | None = None,
                 host: str = "127.0.0.1", env: dict | None = None, start_timeout: float = 60.0,
                 grace: float = 5.0, python: str = sys.executable, ports: list[int] | None = None,
                 max_restarts: int = 0, on_restart=None, server_hosts: list[str] | None = None,
                 worker_hosts: list[str] | None = None, devices: list[str] | None = None):
        self._check_sizes(n_servers, n_workers)
        if devices is not None and not devices:
            raise LaunchError("devices=[]: give at least one GPU id, or None")
        self.devices = list(devices) if devices is not None else None
        self.script, self.script_args = str(script), [str(a) for a in script_args]
        self.n_servers, self.n_workers = n_servers, n_workers
        self.log_dir = Path(log_dir)
        self.token = token or secrets.token_hex(16)
        self.strategy_path, self.host = strategy_path, host
        self.extra_env = dict(env or {})
        self.start_timeout, self.grace, self.python = start_timeout, grace, python
        if ports is not None and len(ports) != n_servers:
            raise LaunchError(f"{len(ports)} server ports for {n_servers} servers")
        self.ports = list(ports) if ports is not None else [0] * n_servers  # 0: a free port
        self.server_hosts = list(server_hosts) if server_hosts is not None else [host] * n_servers
        self.worker_hosts = list(worker_hosts) if worker_hosts is not None else [host] * n_workers
        if len(self.server_hosts) != n_servers or len(self.worker_hosts) != n_workers:
            raise LaunchError(f"{len(self.server_hosts)} server hosts and {len(self.worker_hosts)} "
                              f"worker hosts for {n_servers} servers and {n_workers} workers")
        far = [i for i, h in enumerate(self.server_hosts) if h != host and self.ports[i] == 0]
        if far:
            raise LaunchError(f"server(s) {far} run on other nodes: give their real ports "
                              f"(--servers ip:port,...) so this node's workers can reach them")
        self.max_restarts, self.restarts = max_restarts, 0
        self.on_restart = on_restart  # called with (failed child, restart number) before a restart
        self._common: dict = {}
        self.servers: list[Child] = []
        self.workers: list[Child] = []
        self.endpoints: list[str] = []
        self.launch_t0 = time.time()
        self._nonce = secrets.token_hex(4)
        self._lock = None
        self._janitor: subprocess.Popen | None = None
        self._signalled: set[int] = set()  # pids this supervisor sent a signal to

    # -- starting ------------------------------------------------------------------
    @staticmethod
    def _check_sizes(n_servers: int, n_workers: int) -> None:
        if n_servers < 1 or n_workers < 1:
            raise LaunchError(f"a PS job needs at least one server and one worker, got "
                              f"--server_num {n_servers} --worker_num {n_workers}")

    def _base_env(self) -> dict:
        # the parent's contract and fleetrun flags stay behind; other settings (SHOAL_PROGRESS, ...) pass
        env = {k: v for k, v in os.environ.items()
               if k not in CONTRACT_VARIABLES and not k.startswith(("PADDLE_", "SHOAL_FLEETRUN_"))}
        here = sum(h == self.host for h in self.server_hosts + self.worker_hosts)
        threads = str(max(1, (os.cpu_count() or 1) // max(1, here)))
        for var in _THREAD_VARS:
            env[var] = os.environ.get(var, threads)
        env.setdefault("PYTHONUNBUFFERED", "1")  # a log's last lines are there when a child dies
        env.update(self.extra_env)
        env["SHOAL_LAUNCH_T0"] = repr(self.launch_t0)
        return env

    def _spawn(self, role: str, rank: int, contract: dict) -> Child:
        log = self.log_dir / f"{role}log.{rank}"
        env = dict(self._base_env(), **contract)
        with open(log, "wb") as out:
            popen = subprocess.Popen([self.python, self.script, *self.script_args], env=env,
                                     stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     start_new_session=True, preexec_fn=_die_with_parent(os.getpid()))
        self._tell_janitor(f"group {popen.pid}")
        return Child(role, rank, popen, log)

    def _tell_janitor(self, line: str) -> None:
        try:
            self._janitor.stdin.write(f"{line}\n".encode())
            self._janitor.stdin.flush()
        except (AttributeError, OSError):  # no janitor (never started, or already done)
            pass

    def _take_log_dir(self) -> None:
        self._lock = take_log_dir(self.log_dir)

    def _start_janitor(self) -> None:
        self._janitor = subprocess.Popen([self.python, "-c", _JANITOR], stdin=subprocess.PIPE,
                                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                         start_new_session=True)

    def _keep_failed_log(self, rank: int, restart: int) -> None:
        """Before a restart: the failed run's log stays beside the new one (workerlog.N.restartK)."""
        log = self.log_dir / f"workerlog.{rank}"
        if restart and log.exists():
            log.replace(self.log_dir / f"workerlog.{rank}.restart{restart - 1}")

    def start(self) -> list[str]:
        """Start the servers, wait for their endpoints, start the workers; returns the endpoints.

        On any failure (a server that dies or never reports, an interrupt, a
        spawn error) every process started so far is stopped before it raises.
        """
        try:
            return self._start()
        except BaseException:
            self.close()
            raise

    def _start(self) -> list[str]:
        self._take_log_dir()
        self._start_janitor()
        common = dict(job_token=self.token, strategy_path=self.strategy_path,
                      log_dir=str(self.log_dir), launch_t0=self.launch_t0)
        reports = {}
        everyone = tuple(_endpoint(h, p) for h, p in zip(self.server_hosts, self.ports))
        for i in self._here(self.server_hosts):
            report = self.log_dir / f".server{i}.{self._nonce}.endpoint"
            report.unlink(missing_ok=True)
            reports[i] = report
            contract = ServerEnv(trainers_num=self.n_workers, server_index=i, servers=everyone,
                                 current_endpoint=everyone[i], report_path=str(report),
                                 **common).to_environ()
            self.servers.append(self._spawn("server", i, contract))
        deadline = time.monotonic() + self.start_timeout
        self.endpoints = list(everyone)  # servers on other nodes bind the ports they were given
        for child in self.servers:
            report = reports[child.rank]
            endpoint = await_endpoint(
                child, lambda: report.exists() and report.read_text().strip(),
                lambda: child.popen.poll() is None, deadline, self.start_timeout)
            self.endpoints[child.rank] = endpoint.replace("tcp://", "")
            report.unlink(missing_ok=True)
        (self.log_dir / "endpoints.log").write_text(
            "".join(f"server {i} {ep}\n" for i, ep in enumerate(self.endpoints)))
        self._common = common
        for w in self._here(self.worker_hosts):
            self.workers.append(self._spawn_worker(w, restart=0))
        return self.endpoints

    def _here(self, hosts: list[str]) -> list[int]:
        """The indices of the processes that run on this node."""
        return [i for i, h in enumerate(hosts) if h == self.host]

    def _spawn_worker(self, rank: int, restart: int) -> Child:
        # the workers' own endpoints are only names here (no worker binds them in PS mode)
        trainers = tuple(_endpoint(h, 0) for h in self.worker_hosts)
        contract = WorkerEnv(trainers_num=self.n_workers, trainer_id=rank,
                             pservers=tuple(self.endpoints), trainer_endpoints=trainers,
                             current_endpoint=trainers[rank], restart=restart,
                             **self._common).to_environ()
        if self.devices is not None:  # this node's workers take the GPUs in turn
            local = self._here(self.worker_hosts).index(rank)
            contract["CUDA_VISIBLE_DEVICES"] = self.devices[local % len(self.devices)]
        self._keep_failed_log(rank, restart)
        return self._spawn("worker", rank, contract)

    def _restart(self, child: Child) -> bool:
        """Start a failed worker again if restarts are left (its process group is stopped first)."""
        if child.role != "worker" or self.restarts >= self.max_restarts:
            return False
        self.restarts += 1
        _signal(child, signal.SIGKILL)  # whatever the failed worker left in its group
        child.popen.wait(timeout=10)
        if not _group_alive(child):
            self._tell_janitor(f"gone {child.popen.pid}")
        if self.on_restart is not None:
            self.on_restart(child, self.restarts)
        self.workers[self.workers.index(child)] = self._spawn_worker(child.rank, restart=self.restarts)
        return True

    # -- supervising ---------------------------------------------------------------
    def _failed(self) -> Child | None:
        for child in self.workers:
            rc = child.popen.poll()
            if rc is not None and rc != 0:
                return child
        for child in self.servers:
            # exit 0 is a server told to stop (by the first worker's stop_worker); a server that
            # stops while others still need it makes their next call fail, naming it
            if child.popen.poll() is not None and child.popen.returncode != 0 \
                    and child.popen.pid not in self._signalled:
                return child
        return None

    def wait(self, timeout: float | None = None) -> None:
        """Return once every worker exited 0 and the servers are down; raise LaunchError on a failure
        (everything else stopped first) or past `timeout` seconds."""
        deadline = None if timeout is None else time.monotonic() + timeout
        # a node with servers only serves until a worker elsewhere stops them (or one fails)
        while any(c.popen.poll() is None for c in self.workers or self.servers):
            bad = self._failed()
            if bad is not None and self._restart(bad):
                continue
            if bad is not None:
                self.stop()
                raise LaunchError(f"{bad.describe()} failed ({bad.exit_text()}); stopped the other "
                                  f"processes. Last lines of {bad.log}:\n{bad.tail()}")
            if deadline is not None and time.monotonic() > deadline:
                self.stop()
                raise LaunchError(f"the job did not finish within {timeout:.0f}s; stopped it")
            time.sleep(0.05)
        bad = self._failed()
        if bad is not None and self._restart(bad):
            return self.wait(None if deadline is None else max(1.0, deadline - time.monotonic()))
        if bad is not None:
            self.stop()
            raise LaunchError(f"{bad.describe()} failed ({bad.exit_text()}); last lines of "
                              f"{bad.log}:\n{bad.tail()}")
        end = time.monotonic() + self.grace
        while any(c.popen.poll() is None for c in self.servers) and time.monotonic() < end:
            time.sleep(0.05)
        bad = self._failed()  # a server that failed while shutting down (a last save, say)
        self.stop()
        if bad is not None:
            raise LaunchError(f"{bad.describe()} failed while stopping ({bad.exit_text()}); last "
                              f"lines of {bad.log}:\n{bad.tail()}")

    def stop(self) -> None:
        """SIGTERM every process group of the job (children and their children), SIGKILL what is
        left after the grace period. Idempotent; returns once every group is empty."""
        children = self.servers + self.workers
        for child in children:
            if _group_alive(child):
                if child.popen.poll() is None:
                    self._signalled.add(child.popen.pid)
                _signal(child, signal.SIGTERM)
        end = time.monotonic() + self.grace
        while any(_group_alive(c) for c in children) and time.monotonic() < end:
            time.sleep(0.05)
        for child in children:
            if _group_alive(child):
                self._signalled.add(child.popen.pid)
                _signal(child, signal.SIGKILL)
        for child in children:
            try:
                child.popen.wait(timeout=10)
            except subprocess.TimeoutExpired:  # pragma: no cover - SIGKILL cannot be ignored
                pass
        deadline = time.monotonic() + 5
        while any(_group_alive(c) for c in children) and time.monotonic() < deadline:
            time.sleep(0.02)
        for child in children:
            if not _group_alive(child):
                self._tell_janitor(f"gone {child.popen.pid}")

    def kill(self) -> None:
        """SIGKILL every process group at once (a second Ctrl-C)."""
        for child in self.servers + self.workers:
            self._signalled.add(child.popen.pid)
            _signal(child, signal.SIGKILL)

    def close(self) -> None:
        """Stop everything, then let the janitor go and free the log directory."""
        self.stop()
        if self._janitor is not None:
            self._tell_janitor("done")
            try:
                self._janitor.stdin.close()
            except OSError:
                pass
            self._janitor.wait(timeout=10)
            self._janitor = None
        if self._lock is not None:
            self._lock.close()
            self._lock = None

    def __enter__(self) -> "LocalJob":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class CollectiveJob(LocalJob):
    """Run `script` as a collective job of `nprocs` ranks on this machine.

    The supervisor serves the job's rendezvous store itself (bound to `master`, 'host:port',
    or to a free port of `host`) and gives every rank PADDLE_MASTER. With `devices`, rank i
    sees only device devices[i] (CUDA_VISIBLE_DEVICES). A failed rank with restarts left
    restarts the whole job: every rank is stopped and started again with the next restart
    generation (SHOAL_RESTART), under which they rendezvous afresh (a failed Gloo or NCCL
    context cannot be reused); the store keeps serving. Otherwise as LocalJob."""

    def __init__(self, script, script_args=(), *, nprocs: int, log_dir, master: str | None = None,
                 devices: list[str] | None = None, nodes: list[str] | None = None, **kw):
        if devices is not None and len(devices) != nprocs:
            raise LaunchError(f"{len(devices)} devices for {nprocs} processes; give one device per "
                              f"process")
        host = kw.get("host", "127.0.0.1")
        nodes = list(nodes) if nodes is not None else [host]
        if host not in nodes or len(set(nodes)) != len(nodes):
            raise LaunchError(f"this node ({host}) must appear once in the nodes {nodes}")
        if len(nodes) > 1 and master is None:
            raise LaunchError(f"a job over {len(nodes)} nodes needs --master host:port (on the "
                              f"first node, {nodes[0]}, which serves the rendezvous store)")
        if len(nodes) > 1 and kw.get("max_restarts", 0):
            raise LaunchError("--max_restarts over several nodes is not available: every node would "
                              "have to restart together; restart the job instead")
        super().__init__(script, script_args, n_servers=0, n_workers=nprocs * len(nodes),
                         log_dir=log_dir, worker_hosts=[h for h in nodes for _ in range(nprocs)],
                         **kw)
        self.master, self.devices, self.nprocs = master, devices, nprocs
        self.node = nodes.index(host)
        self.store = None
        self.generation = 0

    @staticmethod
    def _check_sizes(n_servers: int, n_workers: int) -> None:
        if n_workers < 1:
            raise LaunchError(f"a collective job needs at least one process, got --nproc_per_node "
                              f"{n_workers}")

    def _start(self) -> list[str]:
        from shoal.collective import RendezvousError, StoreServer
        from shoal.configs.cluster import parse_endpoint
        self._take_log_dir()
        self._start_janitor()
        host, port = parse_endpoint(self.master) if self.master else (self.host, 0)
        if self.node == 0:  # the first node serves the store; the others reach it at --master
            try:
                self.store = StoreServer(host, port, token=self.token)
            except RendezvousError as e:
                raise StoreBindError(str(e)) from e
        self.master = self.store.endpoint if self.store is not None else self.master
        (self.log_dir / "endpoints.log").write_text(f"master {self.master}\n")
        self._common = dict(job_token=self.token, strategy_path=self.strategy_path,
                            log_dir=str(self.log_dir), launch_t0=self.launch_t0)
        for rank in self._here(self.worker_hosts):
            self.workers.append(self._spawn_worker(rank, restart=0))
        return [self.master]

    def _spawn_worker(self, rank: int, restart: int) -> Child:
        trainers = tuple(_endpoint(h, 0) for h in self.worker_hosts)
        contract = WorkerEnv(trainers_num=self.n_workers, trainer_id=rank, pservers=(),
                             trainer_endpoints=trainers, current_endpoint=trainers[rank],
                             master=self.master, restart=restart, **self._common).to_environ()
        contract["SHOAL_MASTER_SERVED"] = "launcher"
        if self.devices is not None:
            contract["CUDA_VISIBLE_DEVICES"] = str(self.devices[rank % self.nprocs])
        self._keep_failed_log(rank, restart)
        return self._spawn("worker", rank, contract)

    def _restart(self, child: Child) -> bool:
        """Restart every rank under the next generation, if restarts are left."""
        if self.restarts >= self.max_restarts:
            return False
        self.restarts += 1
        self.generation += 1
        if self.on_restart is not None:
            self.on_restart(child, self.restarts)
        self.stop()
        self.workers = [self._spawn_worker(r, restart=self.generation)
                        for r in self._here(self.worker_hosts)]
        return True

    def close(self) -> None:
        super().close()
        if self.store is not None:
            self.store.close()
            self.store = None

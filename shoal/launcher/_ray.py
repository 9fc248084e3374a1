"""The Ray backend: a PS job's servers and workers as Ray actors on an existing Ray cluster.

Each role is one actor (`_ray_actor._RoleActor`, num_cpus / num_gpus from fleetrun's flags)
that runs the user's script as a child process of its own on its node: in its own process
group, with PR_SET_PDEATHSIG to the actor and a janitor beside it (as in the local backend),
output to `<log_dir>/serverlog.N` / `workerlog.N` on that node. A killed actor takes its
script and the script's children with it.

The driver (`RayJob`, in fleetrun) supervises as `LocalJob` does, through actor method calls:
it creates every actor, asks each for its node's address (ray.util.get_node_ip_address() on
the actor), starts the servers (port 0, each reporting its real endpoint into a file on its
node that its actor reads back), then the workers with the full PADDLE_PSERVERS_IP_PORT_LIST;
it polls every process, stops all of them when any fails, and kills the actors at the end
whatever happened. The contract of each process, the job token included, travels as the
argument of the `start` call: never in a runtime_env. Ray carries only these few control calls;
the script talks to its servers over Shoal's own transport.

Ray is imported here only inside functions: `import shoal.launcher` never loads it.
"""
from __future__ import annotations

import importlib.util
import logging
import os
import secrets
import signal
import socket
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from shoal.configs.cluster import CONTRACT_VARIABLES, ServerEnv, WorkerEnv
from shoal.launcher.errors import LaunchError
from shoal.launcher.local import _THREAD_VARS, await_endpoint, take_log_dir

_INSTALL = "pip install 'shoal[ray]'"
_CALL_TIMEOUT = 10.0   # seconds an actor has to answer a control call
_POLL = 0.1


class RayUnavailableError(LaunchError):
    """Ray is not installed, no cluster address was given, or the cluster cannot be reached."""


def ray_installed() -> bool:
    try:
        return importlib.util.find_spec("ray") is not None
    except (ImportError, ValueError):  # sys.modules["ray"] is None: imports of it are blocked
        return False


def require_ray():
    """The ray module; RayUnavailableError saying how to install it when it is missing."""
    if not ray_installed():
        raise RayUnavailableError(f"the Ray backend needs Ray, which is not installed: {_INSTALL}")
    import ray
    return ray


def cluster_address(address: str | None) -> str:
    """`address`, else RAY_ADDRESS; RayUnavailableError when neither is set."""
    address = address or os.environ.get("RAY_ADDRESS")
    if not address:
        raise RayUnavailableError("the Ray backend needs a cluster: give --ray_address HOST:PORT "
                                  "(the head's GCS port, 6379 by default) or set RAY_ADDRESS")
    return address


def check_reachable(address: str, timeout: float = 5.0) -> None:
    """Raise RayUnavailableError unless something accepts a TCP connection at the address Ray
    will use (Ray itself retries an unreachable address for minutes before it gives up).

    A connection check only: nothing binds, so no port is probed for later use."""
    if address in ("auto", "local"):
        return  # Ray finds (or refuses) the local cluster itself, quickly
    if "://" in address:
        parts = urlsplit(address)
        host, port = parts.hostname, parts.port or (8265 if parts.scheme.startswith("http") else 10001)
    else:
        target = address
        try:  # what ray.init connects to (it may map 127.0.0.1 to this node's address)
            from ray._private.services import canonicalize_bootstrap_address
            target = canonicalize_bootstrap_address(address) or address
        except Exception:
            pass
        host, _, port = target.rpartition(":")
        host = host.strip("[]")
        if not host or not port.isdigit():
            raise RayUnavailableError(f"Ray address {address!r} is not HOST:PORT (nor ray://HOST:PORT, "
                                      f"http://HOST:PORT or auto)")
        port = int(port)
    try:
        with socket.create_connection((host, port), timeout=timeout):
            pass
    except OSError as e:
        why = "timed out" if isinstance(e, socket.timeout) else (e.strerror or str(e))
        raise RayUnavailableError(f"cannot reach the Ray cluster at {address} ({host}:{port}: {why} "
                                  f"within {timeout:.0f}s); start one with `ray start --head` or "
                                  f"give the head's address with --ray_address / RAY_ADDRESS") from None


def connect(address: str | None, timeout: float = 5.0) -> bool:
    """ray.init to the cluster at `address` (else RAY_ADDRESS) unless Ray is already initialised
    in this process; returns whether this call initialised it (and so should shut it down)."""
    ray = require_ray()
    if ray.is_initialized():
        return False
    address = cluster_address(address)
    if address.startswith(("http://", "https://")):
        raise RayUnavailableError(f"--ray_address {address} is the dashboard's (job submission) "
                                  f"address; --backend ray needs the cluster address HOST:PORT (GCS, "
                                  f"6379 by default) or ray://HOST:10001; `fleetrun submit` takes "
                                  f"either form")
    check_reachable(address, timeout)
    # ray.init makes SIGTERM exit the process at once (and its core dumps a stack for it):
    # the caller's handlers (fleetrun's graceful stop) are put back
    main = threading.current_thread() is threading.main_thread()
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)} if main else {}
    try:
        ray.init(address=address, logging_level=logging.WARNING, log_to_driver=False)
    except Exception as e:  # ConnectionError, ValueError, an authentication failure ...
        raise RayUnavailableError(f"could not connect to the Ray cluster at {address}: "
                                  f"{_first_line(e)}") from e
    finally:
        for sig, handler in handlers.items():
            if handler is not None:
                signal.signal(sig, handler)
    return True


def _live_ray():
    """The ray module while this process is connected, else None: a Ray call after
    ray.shutdown() would quietly start a new local Ray instance."""
    if "ray" not in sys.modules:
        return None
    import ray
    return ray if ray.is_initialized() else None


def _first_line(err: BaseException, limit: int = 300) -> str:
    text = str(err).strip().splitlines()
    return (text[0] if text else type(err).__name__)[:limit]


_ACTOR = None


def _actor_class():
    global _ACTOR
    if _ACTOR is None:
        from shoal.launcher._ray_actor import _RoleActor
        _ACTOR = require_ray().remote(_RoleActor)
    return _ACTOR


# --- the driver ----------------------------------------------------------------------------

@dataclass
class RayChild:
    """One process of the job, seen from the driver: its actor and what the actor reported."""

    role: str
    rank: int
    actor: Any
    ip: str = "?"
    pid: int | None = None
    log: str = ""
    returncode: int | None = None
    died: str | None = None      # why the actor itself is gone (it took the script with it)
    started: bool = False
    signalled: bool = False      # stopped by the driver: its exit is no failure

    def describe(self) -> str:
        return f"{self.role} {self.rank} (pid {self.pid} on {self.ip})"

    def running(self) -> bool:
        return self.started and self.returncode is None and self.died is None

    def exit_text(self) -> str:
        if self.died is not None:
            return f"its Ray actor died: {self.died}"
        rc = self.returncode
        if rc is None:
            return "still running"
        if rc < 0:
            return f"killed by signal {signal.Signals(-rc).name}"
        return f"exit code {rc}"

    def tail(self, lines: int = 20) -> str:
        ray = _live_ray()
        try:
            if ray is not None:
                return ray.get(self.actor.tail.remote(lines), timeout=_CALL_TIMEOUT)
        except Exception:
            pass
        try:  # the actor is gone; the log may still be readable here (same node, shared disk)
            return "\n".join(Path(self.log).read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return f"(no log: its Ray actor is gone; the log was {self.log} on {self.ip})"


class RayJob:
    """Run `script` as a PS job of Ray actors on the cluster at `address` (default RAY_ADDRESS).

    Args mirror LocalJob's; in addition `server_cpus`, `worker_cpus` and `worker_gpus` are the
    Ray resources of each actor (and the thread count of its script: OMP_NUM_THREADS = its
    CPUs unless set here), `start_timeout` bounds placing the actors as well as the servers'
    reports. `log_dir` is made absolute here and used at that path on every actor's node.

    Use as a context manager (`with RayJob(...) as job: job.wait()`): the scripts are stopped
    and the actors killed whatever happens. Not thread-safe, except `read_log`.
    """

    def __init__(self, script, script_args=(), *, n_servers: int, n_workers: int, log_dir,
                 address: str | None = None, token: str | None = None,
                 strategy_path: str | None = None, env: dict | None = None,
                 server_cpus: float = 1.0, worker_cpus: float = 1.0, worker_gpus: float = 0.0,
                 start_timeout: float = 60.0, grace: float = 5.0, max_restarts: int = 0,
                 on_restart=None):
        if n_servers < 1 or n_workers < 1:
            raise LaunchError(f"a PS job needs at least one server and one worker, got "
                              f"--server_num {n_servers} --worker_num {n_workers}")
        self.script = os.path.abspath(script)
        rel = os.path.relpath(self.script)
        self.script_rel = None if rel.startswith("..") else rel
        self.script_args = [str(a) for a in script_args]
        self.n_servers, self.n_workers = n_servers, n_workers
        self.log_dir = Path(log_dir).resolve()
        self.address = address
        self.token = token or secrets.token_hex(16)
        self.strategy_path, self.extra_env = strategy_path, dict(env or {})
        self.cpus = {"server": server_cpus, "worker": worker_cpus}
        self.worker_gpus = worker_gpus
        self.start_timeout, self.grace = start_timeout, grace
        self.max_restarts, self.restarts, self.on_restart = max_restarts, 0, on_restart
        self.servers: list[RayChild] = []
        self.workers: list[RayChild] = []
        self.endpoints: list[str] = []
        self.launch_t0 = time.time()
        self._nonce = secrets.token_hex(4)
        self._common: dict = {}
        self._owns_ray = False
        self._lock = None
        # worker 0's log as the console reads it: how far it got, and the unread rest kept
        # when the actors go (close), so the console gets all of it
        self._log_lock = threading.Lock()
        self._log_pos, self._log_rest, self._closed = 0, None, False

    # -- starting ------------------------------------------------------------------
    def start(self) -> list[str]:
        """Connect, place the actors, start the servers, wait for their endpoints, start the
        workers; returns the endpoints. On any failure everything started is stopped first."""
        try:
            return self._start()
        except BaseException:
            self.close()
            raise

    def _start(self) -> list[str]:
        ray = require_ray()
        self._owns_ray = connect(self.address)
        self._take_log_dir()
        cls = _actor_class()
        for i in range(self.n_servers):
            actor = cls.options(num_cpus=self.cpus["server"]).remote("server", i)
            self.servers.append(RayChild("server", i, actor))
        for w in range(self.n_workers):
            actor = cls.options(num_cpus=self.cpus["worker"],
                                num_gpus=self.worker_gpus).remote("worker", w)
            self.workers.append(RayChild("worker", w, actor))
        children = self.servers + self.workers
        refs = [c.actor.node.remote() for c in children]
        try:
            nodes = ray.get(refs, timeout=self.start_timeout)
        except ray.exceptions.GetTimeoutError:
            raise LaunchError(
                f"the Ray cluster did not place the job's actors within {self.start_timeout:.0f}s "
                f"(servers: {self.n_servers} x {self.cpus['server']:g} CPU; workers: "
                f"{self.n_workers} x {self.cpus['worker']:g} CPU + {self.worker_gpus:g} GPU); it has "
                f"{_resources(ray.available_resources())} free of "
                f"{_resources(ray.cluster_resources())}; lower --server_cpus/--worker_cpus/"
                f"--worker_gpus or add nodes") from None
        except ray.exceptions.RayError as e:
            raise LaunchError(f"starting the job's Ray actors failed: {_first_line(e)}") from e
        for child, node in zip(children, nodes):
            child.ip = node["ip"]
        self._common = dict(job_token=self.token, strategy_path=self.strategy_path,
                            log_dir=str(self.log_dir), launch_t0=self.launch_t0)
        current = [f"{_host(s.ip)}:0" for s in self.servers]
        for i, child in enumerate(self.servers):
            report = self.log_dir / f".server{i}.{self._nonce}.endpoint"
            contract = ServerEnv(trainers_num=self.n_workers, server_index=i, servers=tuple(current),
                                 current_endpoint=current[i], report_path=str(report),
                                 **self._common).to_environ()
            self._launch(child, contract, report=str(report))
        deadline = time.monotonic() + self.start_timeout
        for child in self.servers:
            def running(child=child) -> bool:
                self._refresh([child])
                return child.running()
            self.endpoints.append(await_endpoint(
                child, lambda child=child: self._call(child, child.actor.endpoint.remote()),
                running, deadline, self.start_timeout))
        (self.log_dir / "endpoints.log").write_text(
            "".join(f"server {i} {ep}\n" for i, ep in enumerate(self.endpoints)))
        for child in self.workers:
            self._launch(child, self._worker_contract(child.rank, restart=0))
        return self.endpoints

    def _take_log_dir(self) -> None:
        # the lock lives on the driver's node: on a one-node cluster that is the actors' log_dir
        self._lock = take_log_dir(self.log_dir)

    def _worker_contract(self, rank: int, restart: int) -> dict:
        # the workers' own endpoints are only names here (no worker binds them in PS mode)
        trainers = tuple(f"{_host(w.ip)}:0" for w in self.workers)
        return WorkerEnv(trainers_num=self.n_workers, trainer_id=rank, pservers=tuple(self.endpoints),
                         trainer_endpoints=trainers, current_endpoint=trainers[rank],
                         restart=restart, **self._common).to_environ()

    def _settings(self, role: str) -> dict:
        """What every process of `role` gets besides its contract (the local backend's rules)."""
        env = {k: v for k, v in os.environ.items() if k.startswith("SHOAL_")
               and k not in CONTRACT_VARIABLES and not k.startswith("SHOAL_FLEETRUN_")}
        threads = str(max(1, int(self.cpus[role])))
        for var in _THREAD_VARS:
            env[var] = os.environ.get(var, threads)
        env["PYTHONUNBUFFERED"] = "1"
        env.update(self.extra_env)
        env["SHOAL_LAUNCH_T0"] = repr(self.launch_t0)
        return env

    def _launch(self, child: RayChild, contract: dict, *, report: str | None = None,
                keep_log_as: str | None = None) -> None:
        spec = dict(script=self.script, script_rel=self.script_rel, args=self.script_args,
                    log_dir=str(self.log_dir), env={**self._settings(child.role), **contract},
                    report=report, keep_log_as=keep_log_as)
        started = self._call(child, child.actor.start.remote(spec))
        if started is None:
            raise LaunchError(f"{child.describe()} could not start ({child.exit_text()})")
        child.pid, child.log = started["pid"], started["log"]
        child.started, child.returncode, child.signalled = True, None, False

    def _call(self, child: RayChild, ref, timeout: float = _CALL_TIMEOUT):
        """ray.get of one control call; an actor that died or does not answer is marked died
        (None is returned). A call that raised inside the actor raises LaunchError."""
        import ray
        try:
            return ray.get(ref, timeout=timeout)
        except ray.exceptions.RayActorError as e:
            child.died = child.died or _first_line(e)
        except ray.exceptions.GetTimeoutError:
            child.died = child.died or f"it did not answer a control call within {timeout:.0f}s"
        except ray.exceptions.RayTaskError as e:
            raise LaunchError(f"{child.describe()}: {_first_line(e.cause if e.cause else e)}") from e
        return None

    # -- supervising ---------------------------------------------------------------
    def _refresh(self, children=None) -> None:
        """Ask each running process for its exit status (all at once)."""
        if children is None:
            children = self.servers + self.workers
        children = [c for c in children if c.running()]
        refs = [c.actor.poll.remote() for c in children]
        for child, ref in zip(children, refs):
            rc = self._call(child, ref)
            if rc is not None:
                child.returncode = rc

    def _failed(self) -> RayChild | None:
        for child in self.workers:
            if child.died is not None or child.returncode not in (None, 0):
                return child
        for child in self.servers:
            # exit 0 is a server told to stop (by the first worker's stop_worker)
            if not child.signalled and (child.died is not None or child.returncode not in (None, 0)):
                return child
        return None

    def _restart(self, child: RayChild) -> bool:
        """Start a failed worker's script again on its actor if restarts are left."""
        if child.role != "worker" or child.died is not None or self.restarts >= self.max_restarts:
            return False
        self.restarts += 1
        self._call(child, child.actor.stop.remote(0), timeout=30)  # what it left in its group
        if self.on_restart is not None:
            self.on_restart(child, self.restarts)
        self._launch(child, self._worker_contract(child.rank, restart=self.restarts),
                     keep_log_as=f"workerlog.{child.rank}.restart{self.restarts - 1}")
        return True

    def _failure(self, bad: RayChild, what: str = "failed") -> LaunchError:
        return LaunchError(f"{bad.describe()} {what} ({bad.exit_text()}); stopped the other "
                           f"processes. Last lines of {bad.log} (on {bad.ip}):\n{bad.tail()}")

    def wait(self, timeout: float | None = None) -> None:
        """Return once every worker exited 0 and the servers are down; raise LaunchError on a
        failure (everything else stopped first) or past `timeout` seconds."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            self._refresh()
            bad = self._failed()
            if bad is not None and self._restart(bad):
                continue
            if bad is not None:
                self.stop()
                raise self._failure(bad)
            if not any(c.running() for c in self.workers):
                break
            if deadline is not None and time.monotonic() > deadline:
                self.stop()
                raise LaunchError(f"the job did not finish within {timeout:.0f}s; stopped it")
            time.sleep(_POLL)
        end = time.monotonic() + self.grace
        while any(c.running() for c in self.servers) and time.monotonic() < end:
            time.sleep(_POLL)
            self._refresh(self.servers)
        bad = self._failed()  # a server that failed while shutting down (a last save, say)
        self.stop()
        if bad is not None:
            raise self._failure(bad, "failed while stopping")

    def read_log(self, rank: int, offset: int, size: int) -> bytes:
        """Bytes of worker `rank`'s log from `offset` (b"" when there are none, or on an error).
        Worker 0's log stays readable after close() up to its end. Safe to call from another
        thread; reads are meant to be sequential (the console's)."""
        with self._log_lock:
            if self._closed:
                if rank != 0 or self._log_rest is None:
                    return b""
                start, rest = self._log_rest
                return rest[max(0, offset - start):max(0, offset - start + size)]
            data = self._read_actor_log(rank, offset, size)
            if rank == 0:
                self._log_pos = max(self._log_pos, offset + len(data))
            return data

    def _read_actor_log(self, rank: int, offset: int, size: int) -> bytes:
        ray = _live_ray()
        if ray is None or rank >= len(self.workers) or not self.workers[rank].started:
            return b""
        try:
            return ray.get(self.workers[rank].actor.read_log.remote(offset, size),
                           timeout=_CALL_TIMEOUT)
        except Exception:
            return b""

    def _keep_log_rest(self, limit: int = 256 << 20) -> None:
        """Before the actors go: fetch what the console has not read of worker 0's log."""
        with self._log_lock:
            if self._closed:
                return
            chunks, pos = [], self._log_pos
            while pos - self._log_pos < limit:
                chunk = self._read_actor_log(0, pos, 1 << 20)
                if not chunk:
                    break
                chunks.append(chunk)
                pos += len(chunk)
            self._log_rest = (self._log_pos, b"".join(chunks))
            self._closed = True

    def stop(self) -> None:
        """Stop every script (SIGTERM to its group, SIGKILL after the grace period), all actors
        at once. Idempotent; the actors stay up (close() kills them)."""
        if _live_ray() is None:
            return
        children = [c for c in self.servers + self.workers if c.started and c.died is None]
        refs = [c.actor.stop.remote(self.grace) for c in children]
        for child, ref in zip(children, refs):
            out = self._call(child, ref, timeout=self.grace + 30)
            if out is not None:
                rc, was_running = out
                child.returncode = rc
                child.signalled = child.signalled or was_running

    def kill(self) -> None:
        """Kill every actor at once (their scripts die with them): a second Ctrl-C."""
        ray = _live_ray()
        if ray is None:
            return
        for child in self.servers + self.workers:
            if child.running():
                child.signalled = True
            try:
                ray.kill(child.actor, no_restart=True)
            except Exception:
                pass

    def close(self) -> None:
        """Stop the scripts, kill the actors, free the log directory and disconnect."""
        try:
            self.stop()
            self._keep_log_rest()
        finally:
            self.kill()
            if self._lock is not None:
                self._lock.close()
                self._lock = None
            with self._log_lock:
                self._closed = True
                if self._owns_ray and _live_ray() is not None:
                    _live_ray().shutdown()
                self._owns_ray = False

    def __enter__(self) -> "RayJob":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _host(ip: str) -> str:
    return f"[{ip}]" if ":" in ip else ip


def _resources(res: dict) -> str:
    return f"{res.get('CPU', 0):g} CPU + {res.get('GPU', 0):g} GPU"

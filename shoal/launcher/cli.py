"""fleetrun: start a Shoal job's servers and workers (`fleetrun [options] script.py [args]`).

    fleetrun --server_num 2 --worker_num 2 examples/ctr_dnn.py --strategy ps_async
    fleetrun --backend ray --ray_address HEAD:6379 --server_num 1 --worker_num 2 script.py
    fleetrun submit --ray_address http://HEAD:8265 --server_num 1 --worker_num 2 script.py

`--backend ray` runs every server and worker as a Ray actor on an existing Ray cluster (this
process supervises them); `fleetrun submit` sends that whole job through Ray job submission
with the script's directory as its working_dir, streams its logs and exits with its outcome.

Every flag is also read from SHOAL_FLEETRUN_<FLAG> (e.g. SHOAL_FLEETRUN_SERVER_NUM=2); the
command line wins. Flags never come from the contract variables fleetrun sets for its children
(TRAINING_ROLE, PADDLE_*), so a fleetrun started inside a job is not confused by its parent.

Exit codes: 0 when every worker exited 0; 1 when a process failed (fleetrun says which, how,
and prints the last lines of its log); 2 for bad arguments (one line saying what to fix);
130/143 when interrupted (SIGINT/SIGTERM), after stopping every process.
"""
from __future__ import annotations

import argparse
import os
import signal
import socket
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from shoal.configs.cluster import parse_endpoint
from shoal.configs.errors import ConfigError
from shoal.launcher import _ray
from shoal.launcher.errors import LaunchError, StoreBindError
from shoal.launcher.local import CollectiveJob, LocalJob, LogDirBusyError

_ENV_PREFIX = "SHOAL_FLEETRUN_"
# (flag, type, default, help); both spellings (--server_num, --server-num) are accepted
_FLAGS = [
    ("server_num", int, None, "PS mode: number of servers on this machine"),
    ("worker_num", int, None, "PS mode: number of workers on this machine"),
    ("servers", str, None, "PS mode: server endpoints 'ip:port,...' (fixes their ports)"),
    ("workers", str, None, "PS mode: worker ips 'ip,...' (one worker each)"),
    ("nproc_per_node", int, None, "collective mode: processes per node"),
    ("devices", str, None, "GPU ids, e.g. '0,1': collective mode, one per rank; PS mode (local "
                           "backend), the workers of this node take them in turn"),
    ("gpus", str, None, "the same as --devices"),
    ("ips", str, None, "collective mode: node ips 'ip,...'"),
    ("master", str, None, "collective mode: rendezvous endpoint ip:port (on the first of --ips)"),
    ("node_ip", str, None, "this node's address among --servers/--workers/--ips (default: the one "
                           "listed address that belongs to this machine)"),
    ("log_dir", str, "log", "directory of workerlog.N, serverlog.N, endpoints.log"),
    ("strategy", str, None, "a strategy YAML file or a preset name (ps_sync, ps_async, ...)"),
    ("start_port", int, None, "servers bind start_port, start_port+1, ... (default: free ports)"),
    ("max_restarts", int, 0, "restart failed workers up to N times in all (PS: async and GEO jobs; "
                             "collective: every rank restarts, under a new rendezvous)"),
    ("job_id", str, "default", "a name for the job (log lines, Ray)"),
    ("backend", str, "local", "where processes run: local or ray"),
    ("ray_address", str, None, "Ray backend: the cluster address HOST:PORT (GCS) or ray://HOST:PORT; "
                               "fleetrun submit also takes the dashboard's http://HOST:8265 "
                               "(default RAY_ADDRESS)"),
    ("server_cpus", float, 1.0, "Ray backend: CPUs per server actor"),
    ("worker_cpus", float, 1.0, "Ray backend: CPUs per worker actor"),
    ("worker_gpus", float, 0.0, "Ray backend: GPUs per worker actor"),
]
_PS_FLAGS = ("server_num", "worker_num", "servers", "workers")
_TAIL_CHUNK = 1 << 20
_COLLECTIVE_FLAGS = ("nproc_per_node", "devices", "gpus", "ips", "master")
_BOTH_FLAGS = ("devices", "gpus")  # collective flags that PS mode takes too


class UsageError(Exception):
    """A bad command line: fleetrun prints the message on one line and exits 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse prints usage and exits 2; fleetrun wants one line
        raise UsageError(message)


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="fleetrun", description=__doc__.split("\n\n")[0],
                epilog="Every flag can also be set as SHOAL_FLEETRUN_<FLAG> in the environment "
                       "(e.g. SHOAL_FLEETRUN_WORKER_NUM=4); the command line wins. "
                       "`fleetrun submit [options] script.py [args]` sends a --backend ray job "
                       "through Ray job submission instead of running it here.",
                formatter_class=argparse.RawDescriptionHelpFormatter)
    for name, kind, default, text in _FLAGS:
        env = _ENV_PREFIX + name.upper()
        p.add_argument(f"--{name}", f"--{name.replace('_', '-')}", dest=name, type=kind,
                       default=None, help=f"{text} [env {env}]" +
                       (f" (default {default})" if default not in (None, "") else ""))
    p.add_argument("script", help="the training script (every process runs it)")
    p.add_argument("script_args", nargs=argparse.REMAINDER, help="arguments for the script")
    return p


def parse(argv: list[str], environ=os.environ, *, submitting: bool = False) -> argparse.Namespace:
    """The options, from the command line, then SHOAL_FLEETRUN_* variables, then defaults.
    `submitting`: for `fleetrun submit` (the job runs on the cluster: no local log_dir is made)."""
    args = _parser().parse_args(argv)
    args.submitting = submitting
    for name, kind, default, _ in _FLAGS:
        if getattr(args, name) is not None:
            continue
        env = _ENV_PREFIX + name.upper()
        if env in environ:
            try:
                setattr(args, name, kind(environ[env]))
            except ValueError:
                raise UsageError(f"{env}={environ[env]!r} is not a valid {kind.__name__} for "
                                 f"--{name}") from None
        else:
            setattr(args, name, default)
    return _check(args, environ)


def _check(args, environ=os.environ) -> argparse.Namespace:
    ps = [f for f in _PS_FLAGS if getattr(args, f) is not None]
    coll = [f for f in _COLLECTIVE_FLAGS if getattr(args, f) is not None
            and not (ps and f in _BOTH_FLAGS)]
    if ps and coll:
        raise UsageError(f"--{ps[0]} (parameter-server mode) and --{coll[0]} (collective mode) "
                         f"cannot be used together; give the flags of one mode")
    args.collective = not ps
    if args.backend not in _BACKENDS:
        raise UsageError(f"--backend {args.backend!r} is not a backend; the backends are "
                         f"{', '.join(_BACKENDS)}")
    _BACKENDS[args.backend].check(args, environ)
    if args.max_restarts < 0:
        raise UsageError(f"--max_restarts {args.max_restarts} must be >= 0")
    args.device_list = _device_list(args)
    if args.collective:
        return _check_collective(args)
    args.server_hosts = args.worker_hosts = None
    if args.servers is not None:
        endpoints = [e.strip() for e in args.servers.split(",") if e.strip()]
        hosts = []
        for e in endpoints:
            try:
                host, port = parse_endpoint(e)
            except ValueError as err:
                raise UsageError(f"--servers: {err}") from None
            if port == 0:
                raise UsageError(f"--servers {e}: give each server its real port (or leave "
                                 f"--servers unset: --server_num N servers bind free ports)")
            hosts.append(host)
        if len(set(endpoints)) != len(endpoints):
            raise UsageError(f"--servers lists an endpoint twice: {args.servers}")
        if args.server_num is not None and args.server_num != len(endpoints):
            raise UsageError(f"--server_num {args.server_num} disagrees with the "
                             f"{len(endpoints)} endpoints of --servers")
        args.server_num = len(endpoints)
        args.server_endpoints, args.server_hosts = endpoints, hosts
    else:
        args.server_endpoints = None
    if args.workers is not None:
        ips = [w.strip() for w in args.workers.split(",") if w.strip()]
        if args.worker_num is not None and args.worker_num != len(ips):
            raise UsageError(f"--worker_num {args.worker_num} disagrees with the {len(ips)} ips "
                             f"of --workers")
        args.worker_num = len(ips)
        args.worker_hosts = ips
    listed = (args.server_hosts or []) + (args.worker_hosts or [])
    if len(set(listed)) > 1 and (args.server_hosts is None or args.worker_hosts is None):
        missing = "--workers ip,..." if args.worker_hosts is None else "--servers ip:port,..."
        raise UsageError(f"a job over several nodes lists all of its processes: give {missing} "
                         f"too, the same on every node")
    if args.start_port is not None and args.server_endpoints is not None:
        raise UsageError("--start_port and --servers both fix the servers' ports; give one")
    args.node = _this_node(args, listed, "--servers/--workers", environ) if listed else \
        (args.node_ip or "127.0.0.1")
    if args.server_num is not None and args.server_hosts is None:
        args.server_hosts = [args.node] * args.server_num      # free ports on this node
    if args.worker_num is not None and args.worker_hosts is None:
        args.worker_hosts = [args.node] * args.worker_num
    for flag in ("server_num", "worker_num"):
        value = getattr(args, flag)
        if value is None or value < 1:
            raise UsageError(f"--{flag} {value}: a PS job needs at least one "
                             f"{flag.split('_')[0]}; give --{flag} N with N >= 1")
    if args.start_port is not None and not 1 <= args.start_port <= 65535 - args.server_num:
        raise UsageError(f"--start_port {args.start_port} must lie in [1, {65535 - args.server_num}]")
    return _check_common(args)


def _check_common(args) -> argparse.Namespace:
    if not Path(args.script).is_file():
        raise UsageError(f"script {args.script!r} does not exist")
    if args.submitting:
        return args
    try:
        Path(args.log_dir).mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UsageError(f"--log_dir {args.log_dir}: {e.strerror or e}") from None
    return args


def _check_ray(args, environ) -> None:
    """The Ray backend's flags (before the mode's own checks)."""
    if args.collective:
        raise UsageError("--backend ray runs parameter-server jobs only: collective mode on Ray is "
                         "not available in this build yet; start a PS job with --server_num N "
                         "--worker_num M")
    for flag in _BOTH_FLAGS:
        if getattr(args, flag) is not None:
            raise UsageError(f"--{flag} is for the local backend: on Ray, Ray gives each worker "
                             f"actor its GPUs; give --worker_gpus N")
    for flag in ("servers", "workers", "start_port"):
        if getattr(args, flag) is not None:
            raise UsageError(f"--{flag} is for the local backend: on Ray each server binds a free "
                             f"port on its actor's node and Ray places the workers; give "
                             f"--server_num N --worker_num M")
    if not _ray.ray_installed():
        raise UsageError("--backend ray needs Ray, which is not installed: pip install 'shoal[ray]'")
    address = args.ray_address or environ.get("RAY_ADDRESS")
    if not address:
        raise UsageError("--backend ray needs a Ray cluster: give --ray_address HOST:PORT (the "
                         "head's GCS port, 6379 by default) or set RAY_ADDRESS")
    if address.startswith(("http://", "https://")) and not args.submitting:
        given = f"--ray_address {address}" if args.ray_address else f"RAY_ADDRESS={address}"
        raise UsageError(f"{given} is the dashboard's (job submission) address; "
                         f"--backend ray needs the cluster address HOST:PORT (GCS, 6379 by default) "
                         f"or ray://HOST:10001; `fleetrun submit` takes either")
    for flag in ("server_cpus", "worker_cpus", "worker_gpus"):
        if getattr(args, flag) < 0:
            raise UsageError(f"--{flag} {getattr(args, flag):g} must be >= 0")


def _device_list(args) -> list[str] | None:
    """--devices (or --gpus) as a list of GPU ids; None when neither is given."""
    if args.devices is not None and args.gpus is not None and args.devices != args.gpus:
        raise UsageError(f"--devices {args.devices} and --gpus {args.gpus} disagree; give one")
    devices = args.devices if args.devices is not None else args.gpus
    if devices is None:
        return None
    listed = [d.strip() for d in devices.split(",") if d.strip()]
    if not listed or not all(d.isdigit() for d in listed):
        raise UsageError(f"--devices {devices!r}: give device ids such as 0,1")
    return listed


def _check_collective(args) -> argparse.Namespace:
    """Collective mode: --nproc_per_node / --devices, one node (--ips of this machine only)."""
    devices = args.devices if args.devices is not None else args.gpus
    if args.device_list is not None:
        if args.nproc_per_node is not None and args.nproc_per_node != len(args.device_list):
            raise UsageError(f"--nproc_per_node {args.nproc_per_node} disagrees with the "
                             f"{len(args.device_list)} devices of --devices {devices}")
        args.nproc_per_node = len(args.device_list)
    if args.nproc_per_node is None:
        args.nproc_per_node = 1
    if args.nproc_per_node < 1:
        raise UsageError(f"--nproc_per_node {args.nproc_per_node}: a collective job needs at least "
                         f"one process; give --nproc_per_node N with N >= 1")
    args.nodes = None
    if args.ips is not None:
        args.nodes = [ip.strip() for ip in args.ips.split(",") if ip.strip()]
        if not args.nodes:
            raise UsageError(f"--ips {args.ips!r}: give the nodes' addresses, e.g. 10.0.0.1,10.0.0.2")
        if len(set(args.nodes)) != len(args.nodes):
            raise UsageError(f"--ips {args.ips} lists a node twice; give each node once")
        args.node = _this_node(args, args.nodes, "--ips", os.environ)
    else:
        args.node = args.node_ip or "127.0.0.1"
    if args.master is not None:
        try:
            host, _ = parse_endpoint(args.master)
        except ValueError as err:
            raise UsageError(f"--master: {err}") from None
        first = args.nodes[0] if args.nodes else args.node
        if host != first:
            raise UsageError(f"--master {args.master}: the rendezvous store runs on the first node "
                             f"({first}); give --master {first}:PORT")
    elif args.start_port is not None:
        if not 1 <= args.start_port <= 65535:
            raise UsageError(f"--start_port {args.start_port} must lie in [1, 65535]")
        first = args.nodes[0] if args.nodes else args.node  # the first node serves the store
        args.master = f"[{first}]:{args.start_port}" if ":" in first else f"{first}:{args.start_port}"
    if args.nodes is not None and len(args.nodes) > 1:
        if args.master is None:
            raise UsageError(f"--ips lists {len(args.nodes)} nodes: give --master {args.nodes[0]}:PORT "
                             f"(the first node serves the rendezvous store there)")
        if args.max_restarts:
            raise UsageError("--max_restarts over several nodes is not available (every node would "
                             "have to restart together); restart the job instead")
    return _check_common(args)


def _this_node(args, hosts: list[str], flag: str, environ) -> str:
    """This node's address among the job's `hosts`: --node_ip, or the one listed address that
    belongs to this machine. A job over several nodes needs the shared SHOAL_JOB_TOKEN."""
    distinct = list(dict.fromkeys(hosts))
    if args.node_ip is not None:
        if args.node_ip not in distinct:
            raise UsageError(f"--node_ip {args.node_ip} is not among the hosts of {flag} "
                             f"({', '.join(distinct)})")
        node = args.node_ip
    else:
        mine = [h for h in distinct if _is_this_machine(h)]
        if len(mine) != 1:
            which = "none" if not mine else f"several ({', '.join(mine)})"
            raise UsageError(f"{which} of the hosts of {flag} ({', '.join(distinct)}) belong to "
                             f"this machine; give --node_ip ADDRESS to say which node this is")
        node = mine[0]
    if len(distinct) > 1 and not environ.get("SHOAL_JOB_TOKEN"):
        raise UsageError(f"a job over {len(distinct)} nodes needs one shared secret: set "
                         f"SHOAL_JOB_TOKEN to the same value on every node")
    return node


def _is_this_machine(host: str) -> bool:
    """Whether `host` is an address of this machine (a socket can bind it)."""
    try:
        infos = socket.getaddrinfo(host, 0, type=socket.SOCK_STREAM)
    except socket.gaierror:
        return False
    for family, kind, _, _, address in infos:
        try:
            with socket.socket(family, kind) as s:
                s.bind(address)
            return True
        except OSError:
            continue
    return False


def _strategy_path(name: str | None) -> str | None:
    """A YAML path as given; a preset name becomes the path of the preset's file."""
    if name is None or Path(name).is_file():
        return None if name is None else os.path.abspath(name)
    from shoal.configs import DistributedStrategy, presets
    if name not in presets():
        raise UsageError(f"--strategy {name!r} is neither a file nor a preset; presets are "
                         f"{', '.join(presets())}")
    DistributedStrategy.load(name)  # a broken preset fails here, in one line
    import shoal.configs
    return str(Path(shoal.configs.__file__).with_name("presets") / f"{name}.yaml")


def _shown(job) -> int | str:
    """The worker whose output goes to the console: worker 0, or this node's first worker in a
    job over several nodes ('none' on a node of servers only: nothing is streamed)."""
    hosts = getattr(job, "worker_hosts", None)
    if hosts is None:
        return 0
    here = [r for r, h in enumerate(hosts) if h == job.host]
    return here[0] if here else "none"


def _file_reader(path: Path) -> Callable[[int, int], bytes]:
    def read(pos: int, size: int) -> bytes:
        try:
            with open(path, "rb") as f:
                f.seek(pos)
                return f.read(size)
        except FileNotFoundError:
            return b""
    return read


class _Tail(threading.Thread):
    """Streams a growing log to our stdout with a prefix (rank 0's output); `read(pos, size)`
    gives the log's bytes from pos (a local file, or an actor's log on another node)."""

    def __init__(self, read: Callable[[int, int], bytes], prefix: str):
        super().__init__(name="fleetrun-tail", daemon=True)
        self.read, self.prefix, self.done = read, prefix, threading.Event()

    def run(self) -> None:
        pos, rest = 0, b""
        while True:
            finishing = self.done.is_set()
            chunk = self.read(pos, _TAIL_CHUNK)
            pos += len(chunk)
            lines = (rest + chunk).split(b"\n")
            rest = lines.pop()
            for line in lines:
                sys.stdout.write(f"{self.prefix}{line.decode(errors='replace')}\n")
            sys.stdout.flush()
            if len(chunk) == _TAIL_CHUNK:
                continue  # more is waiting: read on before sleeping (or stopping)
            if finishing:
                if rest:
                    sys.stdout.write(f"{self.prefix}{rest.decode(errors='replace')}\n")
                return
            self.done.wait(0.1)


def _job(args):
    """The supervisor of the job the arguments describe, and the server ports it binds."""
    common = dict(log_dir=args.log_dir, token=os.environ.get("SHOAL_JOB_TOKEN"),
                  strategy_path=_strategy_path(args.strategy), max_restarts=args.max_restarts)
    if args.collective:
        def restarting(child, n):
            print(f"fleetrun: rank {child.rank} failed ({child.exit_text()}); restarting every rank "
                  f"({n} of {args.max_restarts}) under rendezvous generation {n}; the failed run's "
                  f"logs are workerlog.N.restart{n - 1}", file=sys.stderr, flush=True)
        return CollectiveJob(args.script, args.script_args, nprocs=args.nproc_per_node,
                             master=args.master, devices=args.device_list, on_restart=restarting,
                             host=args.node, nodes=args.nodes, **common), None
    ports = None
    if args.server_endpoints is not None:
        ports = [int(e.rsplit(":", 1)[1]) for e in args.server_endpoints]
    elif args.start_port is not None:
        ports = [args.start_port + i for i in range(args.server_num)]
    job = LocalJob(args.script, args.script_args, n_servers=args.server_num,
                   n_workers=args.worker_num, ports=ports, host=args.node, devices=args.device_list,
                   server_hosts=args.server_hosts, worker_hosts=args.worker_hosts,
                   on_restart=lambda child, n: print(
                       f"fleetrun: {child.describe()} failed ({child.exit_text()}); restarting it "
                       f"({n} of {args.max_restarts}); its log so far is {child.log}.restart{n - 1}",
                       file=sys.stderr, flush=True), **common)
    return job, ports


def _ray_job(args):
    """The Ray backend's supervisor (PS mode only; its servers bind free ports)."""
    job = _ray.RayJob(args.script, args.script_args, n_servers=args.server_num,
                      n_workers=args.worker_num, log_dir=args.log_dir, address=args.ray_address,
                      token=os.environ.get("SHOAL_JOB_TOKEN"),
                      strategy_path=_strategy_path(args.strategy), server_cpus=args.server_cpus,
                      worker_cpus=args.worker_cpus, worker_gpus=args.worker_gpus,
                      max_restarts=args.max_restarts,
                      on_restart=lambda child, n: print(
                          f"fleetrun: {child.describe()} failed ({child.exit_text()}); restarting "
                          f"it ({n} of {args.max_restarts}); its log so far is "
                          f"{child.log}.restart{n - 1} on {child.ip}", file=sys.stderr, flush=True))
    return job, None


@dataclass(frozen=True)
class _Backend:
    """Where a job's processes run: the backend's flag checks, its supervisor, and how
    worker 0's log is read for the console."""

    check: Callable[[argparse.Namespace, dict], None]   # raises UsageError
    job: Callable                                       # args -> (job, fixed server ports)
    reader: Callable                                    # (job, args) -> read(pos, size) -> bytes


_BACKENDS = {
    "local": _Backend(lambda args, environ: None, _job,
                      lambda job, args: _file_reader(Path(args.log_dir) / f"workerlog.{_shown(job)}")),
    "ray": _Backend(_check_ray, _ray_job,
                    lambda job, args: lambda pos, size: job.read_log(0, pos, size)),
}


def run(args) -> int:
    backend = _BACKENDS[args.backend]
    job, ports = backend.job(args)
    stopping = {"signal": None}

    def on_signal(sig, _frame):
        if stopping["signal"] is not None:  # a second one: no more grace
            job.kill()
            return
        stopping["signal"] = sig
        raise KeyboardInterrupt
    old = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    shown = _shown(job)
    tail = _Tail(backend.reader(job, args), f"[worker {shown}] ")
    finished = False
    try:
        job.start()
        tail.start()
        job.wait()
        finished = True
        return 0
    except KeyboardInterrupt:
        stopping["signal"] = stopping["signal"] or signal.SIGINT
        job.close()
        print(f"fleetrun: stopped by {signal.Signals(stopping['signal']).name}; every process of "
              f"the job is stopped", file=sys.stderr)
        return 128 + int(stopping["signal"])
    except (LogDirBusyError, _ray.RayUnavailableError) as e:  # no cluster there: a bad address
        print(f"fleetrun: {e}", file=sys.stderr)
        return 2
    except StoreBindError as e:  # the rendezvous store could not bind --master / --start_port
        print(f"fleetrun: {e}", file=sys.stderr)
        return 2
    except LaunchError as e:
        busy = ports is not None and any("Address already in use" in c.tail(50) for c in job.servers)
        if busy:
            print(f"fleetrun: the server ports {ports[0]}..{ports[-1]} are not all free (a server "
                  f"could not bind); choose other ports, or leave --start_port unset so servers "
                  f"bind free ports themselves", file=sys.stderr)
            return 2
        print(f"fleetrun: {e}", file=sys.stderr)
        return 1
    finally:
        if stopping["signal"] is None:
            stopping["signal"] = signal.SIGTERM  # from here on a signal only hurries the stop
        job.close()
        tail.done.set()
        if tail.is_alive():
            tail.join(timeout=None if finished else 5)
            if tail.is_alive():
                print(f"fleetrun: worker {shown}'s console output was cut short; all of it is in "
                      f"{Path(args.log_dir) / f'workerlog.{shown}'}", file=sys.stderr)
        for s, h in old.items():
            signal.signal(s, h)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["submit"]:
        from shoal.launcher._submit import main as submit_main
        return submit_main(argv[1:])
    try:
        args = parse(argv)
    except UsageError as e:
        print(f"fleetrun: {e} (fleetrun --help lists the flags)", file=sys.stderr)
        return 2
    try:
        return run(args)
    except (UsageError, ConfigError, OSError) as e:
        print(f"fleetrun: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # a signal that arrived outside the job's own handling
        print("fleetrun: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

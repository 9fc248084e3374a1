"""The environment contract: what `fleetrun` puts in the environment of every process it starts.

Written once, here: the launcher builds a `WorkerEnv` or `ServerEnv` and calls `to_environ()`;
the process calls `ClusterEnv.detect()`. The variables are Paddle's (so scripts and cluster
tooling written for fleet keep working) plus Shoal's own SHOAL_*:

  TRAINING_ROLE                 TRAINER or PSERVER
  PADDLE_TRAINER_ID             worker: its rank, 0 .. PADDLE_TRAINERS_NUM-1
  PADDLE_TRAINERS_NUM           number of workers
  PADDLE_PSERVERS_IP_PORT_LIST  comma-separated host:port of the servers ('' for a collective job);
                                a server may see port 0 entries (servers that bind a free port)
  PADDLE_TRAINER_ENDPOINTS      worker: comma-separated host:port of every worker, in rank order
  PADDLE_CURRENT_ENDPOINT       this process's host:port (a server binds it; port 0 = any free port)
  POD_IP, PADDLE_PORT           a server's endpoint the Paddle way (instead of, or agreeing with,
                                PADDLE_CURRENT_ENDPOINT)
  PADDLE_MASTER                 collective worker: host:port of the job's rendezvous store (served
                                by the launcher, or by rank 0 on the port given); unset in PS jobs
  SHOAL_SERVER_INDEX            server: its position in PADDLE_PSERVERS_IP_PORT_LIST; required when
                                that list has port 0 entries (several servers may then read
                                'host:0'), otherwise found from the server's endpoint
  SHOAL_ENDPOINT_REPORT         server: file the server writes its real bound endpoint to;
                                required when it binds port 0
  SHOAL_JOB_TOKEN               the job's shared secret (optional here: the Ray backend hands it
                                to actors by a method call, never through the environment)
  SHOAL_STRATEGY                path of the strategy YAML (`fleetrun --strategy`)
  SHOAL_LOG_DIR                 directory for this process's logs
  SHOAL_LAUNCH_T0               launch time, float seconds since the epoch
  SHOAL_RESTART                 restart generation, 0 for the first start
  SHOAL_AUTH                    plain (default) or curve: how connections authenticate

With none of them set, a process runs in local mode (`detect()` returns None). With some set
and others missing, `detect()` raises ContractError naming every missing or malformed variable:
never a silent fall-back to one process. POD_IP alone does not count as set: Kubernetes puts it
in every pod.
"""
from __future__ import annotations

import dataclasses
import enum
import math
import os
from collections.abc import Mapping
from typing import ClassVar

from shoal.configs.errors import ContractError

CONTRACT_VARIABLES = (
    "TRAINING_ROLE", "PADDLE_TRAINER_ID", "PADDLE_TRAINERS_NUM", "PADDLE_PSERVERS_IP_PORT_LIST",
    "PADDLE_TRAINER_ENDPOINTS", "PADDLE_CURRENT_ENDPOINT", "POD_IP", "PADDLE_PORT",
    "PADDLE_MASTER", "SHOAL_SERVER_INDEX", "SHOAL_ENDPOINT_REPORT", "SHOAL_JOB_TOKEN", "SHOAL_STRATEGY",
    "SHOAL_LOG_DIR", "SHOAL_LAUNCH_T0", "SHOAL_RESTART", "SHOAL_AUTH",
)
_AMBIENT = frozenset({"POD_IP"})   # set in every Kubernetes pod: alone it does not mean a fleet job


class Role(enum.Enum):
    TRAINER = "TRAINER"
    PSERVER = "PSERVER"


class Auth(enum.Enum):
    """How a client authenticates to a server (ZeroMQ ZAP)."""

    PLAIN = "plain"   # the job token in clear, for trusted networks
    CURVE = "curve"   # encrypted, keys derived from the job token


def parse_endpoint(text: str) -> tuple[str, int]:
    """'host:port' or '[v6 addr]:port' -> (host, port). Raises ValueError saying what is wrong."""
    if not isinstance(text, str) or text != text.strip() or not text:
        raise ValueError("expected host:port")
    if text.startswith("["):
        host, sep, port = text[1:].partition("]:")
        if not sep or not host:
            raise ValueError("expected [ipv6]:port")
    else:
        host, sep, port = text.rpartition(":")
        if not sep or not host or ":" in host:
            raise ValueError("expected host:port (write an IPv6 address as [addr]:port)")
    if any(c.isspace() or c in ",[]" for c in host):
        raise ValueError(f"host {host!r} has a space, comma or bracket")
    if not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"port {port!r} is not an int in 0..65535")
    return host, int(port)


def _endpoint_of(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


@dataclasses.dataclass(frozen=True, kw_only=True)
class ClusterEnv:
    """The fields every process of a job shares; see WorkerEnv and ServerEnv for the roles.

    Construction checks every invariant and raises ContractError naming each broken one (with
    the variable it comes from). Lists given for endpoint fields are stored as tuples.
    """

    role: ClassVar[Role]
    _required: ClassVar[tuple[str, ...]] = ("trainers_num",)
    trainers_num: int
    job_token: str | None = None
    strategy_path: str | None = None
    log_dir: str | None = None
    launch_t0: float | None = None
    restart: int = 0
    auth: Auth = Auth.PLAIN

    def __post_init__(self):
        if type(self) is ClusterEnv:
            raise TypeError("ClusterEnv is the shared part of WorkerEnv and ServerEnv; build one of those")
        for f in dataclasses.fields(self):
            if isinstance(getattr(self, f.name), list):
                object.__setattr__(self, f.name, tuple(getattr(self, f.name)))
        if isinstance(self.auth, str) and self.auth in {a.value for a in Auth}:
            object.__setattr__(self, "auth", Auth(self.auth))
        problems = [(_VARIABLE[name], f"{name} is required") for name in self._required
                    if getattr(self, name) is None]
        problems += self._check(vars(self))
        if problems:
            raise _error(type(self).__name__, problems)

    @classmethod
    def _check(cls, v: dict) -> list[tuple[str, str]]:
        """(variable, problem) for each broken invariant among the values in `v`; a None value
        of a required field is unknown (already reported) and skips the checks that need it."""
        out = []
        n = v["trainers_num"]
        if n is not None and (not _is_int(n) or n < 1):
            out.append(("PADDLE_TRAINERS_NUM", f"trainers_num={n!r} must be an int >= 1"))
        if not _is_int(v["restart"]) or v["restart"] < 0:
            out.append(("SHOAL_RESTART", f"restart={v['restart']!r} must be an int >= 0"))
        t0 = v["launch_t0"]
        if t0 is not None and not (isinstance(t0, (int, float)) and math.isfinite(t0) and t0 >= 0):
            out.append(("SHOAL_LAUNCH_T0", f"launch_t0={t0!r} must be finite seconds since the epoch"))
        if v["job_token"] == "":
            out.append(("SHOAL_JOB_TOKEN", "the job token is empty; give the job's secret or leave "
                                           "SHOAL_JOB_TOKEN unset"))
        if not isinstance(v["auth"], Auth):
            out.append(("SHOAL_AUTH", f"auth={v['auth']!r} is not one of {[a.value for a in Auth]}"))
        return out

    def _common_environ(self) -> dict[str, str]:
        env = {"TRAINING_ROLE": self.role.value, "PADDLE_TRAINERS_NUM": str(self.trainers_num),
               "SHOAL_RESTART": str(self.restart), "SHOAL_AUTH": self.auth.value}
        for var, value in (("SHOAL_JOB_TOKEN", self.job_token), ("SHOAL_STRATEGY", self.strategy_path),
                           ("SHOAL_LOG_DIR", self.log_dir)):
            if value is not None:
                env[var] = value
        if self.launch_t0 is not None:
            env["SHOAL_LAUNCH_T0"] = repr(float(self.launch_t0))
        return env

    @staticmethod
    def detect(env: Mapping[str, str] | None = None) -> WorkerEnv | ServerEnv | None:
        """This process's contract: None in local mode (no contract variable set), else the
        WorkerEnv or ServerEnv that TRAINING_ROLE names.

        Raises ContractError naming every missing or malformed variable when some are set.
        Example: `env = ClusterEnv.detect(); if env is None: run_locally()`."""
        env = os.environ if env is None else env
        if not any(v in env for v in CONTRACT_VARIABLES if v not in _AMBIENT):
            return None
        return ClusterEnv.from_environ(env)

    @classmethod
    def from_environ(cls, env: Mapping[str, str] | None = None) -> WorkerEnv | ServerEnv:
        """Read the contract of the role TRAINING_ROLE names (on a subclass: of that role).

        Raises ContractError naming every missing or malformed variable."""
        env = os.environ if env is None else env
        r = _Reader(env)
        role_text = env.get("TRAINING_ROLE")
        target = {Role.TRAINER.value: WorkerEnv, Role.PSERVER.value: ServerEnv}.get(role_text)
        if cls is not ClusterEnv and target is not None and target is not cls:
            r.bad("TRAINING_ROLE", f"TRAINING_ROLE={role_text!r}, but {cls.__name__} is the "
                                   f"{cls.role.value} role's contract")
        elif role_text is None:
            r.missing("TRAINING_ROLE")
        elif target is None:
            r.bad("TRAINING_ROLE", f"TRAINING_ROLE={role_text!r} is not a role; use TRAINER or PSERVER")
        if cls is not ClusterEnv:
            target = cls
        elif target is None:   # still name what the likely role misses, guessed from what is set
            target = ServerEnv if any(v in env for v in ("SHOAL_SERVER_INDEX", "SHOAL_ENDPOINT_REPORT",
                                                         "PADDLE_PORT")) else WorkerEnv
        values = {**_read_common(r), **target._read(r)}
        problems = r.problems + target._check({**_defaults(target), **values})
        if problems:
            raise _error(f"{target.role.value} process ({target.__name__})", problems, env=True)
        return target(**values)


@dataclasses.dataclass(frozen=True, kw_only=True)
class WorkerEnv(ClusterEnv):
    """The contract of a worker (TRAINING_ROLE=TRAINER)."""

    role: ClassVar[Role] = Role.TRAINER
    _required: ClassVar[tuple[str, ...]] = ("trainers_num", "trainer_id", "pservers",
                                            "trainer_endpoints", "current_endpoint")
    trainer_id: int
    pservers: tuple[str, ...]            # the servers' real endpoints ('' in the env: none)
    trainer_endpoints: tuple[str, ...]   # every worker's endpoint, in rank order
    current_endpoint: str                # this worker's: trainer_endpoints[trainer_id]
    master: str | None = None            # collective jobs: the rendezvous store's host:port

    @classmethod
    def _check(cls, v):
        out = super()._check(v)
        i, n, workers, current = v["trainer_id"], v["trainers_num"], v["trainer_endpoints"], \
            v["current_endpoint"]
        if i is not None and (not _is_int(i) or i < 0 or (_is_int(n) and i >= n)):
            top = n - 1 if _is_int(n) else "N-1"
            out.append(("PADDLE_TRAINER_ID", f"trainer_id={i!r} must be an int in 0..{top} "
                                             f"(below PADDLE_TRAINERS_NUM={n!r})"))
            i = None
        if v["pservers"] is not None:
            out += _endpoint_problems("PADDLE_PSERVERS_IP_PORT_LIST", v["pservers"], real=True)
        if current is not None:
            out += _endpoint_problems("PADDLE_CURRENT_ENDPOINT", (current,), real=False)
        if v.get("master") is not None:
            out += _endpoint_problems("PADDLE_MASTER", (v["master"],), real=True)
        if workers is not None:
            out += _endpoint_problems("PADDLE_TRAINER_ENDPOINTS", workers, real=False)
            if _is_int(n) and len(workers) != n:
                out.append(("PADDLE_TRAINER_ENDPOINTS",
                            f"has {len(workers)} endpoints but PADDLE_TRAINERS_NUM={n}; give one "
                            f"endpoint per worker"))
            elif i is not None and current is not None and i < len(workers) and workers[i] != current:
                out.append(("PADDLE_CURRENT_ENDPOINT",
                            f"PADDLE_CURRENT_ENDPOINT={current!r} is not PADDLE_TRAINER_ENDPOINTS[{i}]="
                            f"{workers[i]!r}; they must agree"))
        return out

    def to_environ(self) -> dict[str, str]:
        """The variables to start this worker with (all str)."""
        host, _ = parse_endpoint(self.current_endpoint)
        env = {**self._common_environ(), "PADDLE_TRAINER_ID": str(self.trainer_id),
               "PADDLE_PSERVERS_IP_PORT_LIST": ",".join(self.pservers),
               "PADDLE_TRAINER_ENDPOINTS": ",".join(self.trainer_endpoints),
               "PADDLE_CURRENT_ENDPOINT": self.current_endpoint, "POD_IP": host}
        if self.master is not None:
            env["PADDLE_MASTER"] = self.master
        return env

    @staticmethod
    def _read(r: _Reader) -> dict:
        return dict(trainer_id=r.int("PADDLE_TRAINER_ID", minimum=0),
                    trainers_num=r.int("PADDLE_TRAINERS_NUM", minimum=1),
                    pservers=r.endpoints("PADDLE_PSERVERS_IP_PORT_LIST", allow_empty=True),
                    trainer_endpoints=r.endpoints("PADDLE_TRAINER_ENDPOINTS"),
                    current_endpoint=r.endpoint("PADDLE_CURRENT_ENDPOINT"),
                    master=r.endpoint("PADDLE_MASTER", required=False))


@dataclasses.dataclass(frozen=True, kw_only=True)
class ServerEnv(ClusterEnv):
    """The contract of a parameter server (TRAINING_ROLE=PSERVER).

    `current_endpoint` is what the server binds; with port 0 it binds a free port and writes
    the real endpoint to `report_path` before any worker starts. `servers` may then hold port 0
    entries, which is why `server_index` comes from SHOAL_SERVER_INDEX in that case."""

    role: ClassVar[Role] = Role.PSERVER
    _required: ClassVar[tuple[str, ...]] = ("trainers_num", "server_index", "servers",
                                            "current_endpoint")
    server_index: int
    servers: tuple[str, ...]
    current_endpoint: str
    report_path: str | None = None

    @classmethod
    def _check(cls, v):
        out = super()._check(v)
        i, servers, current = v["server_index"], v["servers"], v["current_endpoint"]
        if servers is not None:
            out += _endpoint_problems("PADDLE_PSERVERS_IP_PORT_LIST", servers, real=False)
            if not servers:
                out.append(("PADDLE_PSERVERS_IP_PORT_LIST", "is empty; a server needs the list of servers"))
        if i is not None and (not _is_int(i) or i < 0 or (servers is not None and i >= len(servers))):
            bound = f" in 0..{len(servers) - 1}" if servers else ""
            out.append(("SHOAL_SERVER_INDEX", f"server_index={i!r} must be an int{bound} (a position "
                                              f"in PADDLE_PSERVERS_IP_PORT_LIST)"))
        elif i is not None and servers and current is not None and servers[i] != current:
            out.append(("PADDLE_CURRENT_ENDPOINT",
                        f"PADDLE_CURRENT_ENDPOINT={current!r} is not PADDLE_PSERVERS_IP_PORT_LIST"
                        f"[{i}]={servers[i]!r}; they must agree"))
        if current is not None:
            try:
                port = parse_endpoint(current)[1]
            except ValueError as e:
                out.append(("PADDLE_CURRENT_ENDPOINT", f"{current!r}: {e}"))
            else:
                if port == 0 and not v["report_path"]:
                    out.append(("SHOAL_ENDPOINT_REPORT", "SHOAL_ENDPOINT_REPORT is missing: a server "
                                "binding port 0 must report its real endpoint to the launcher there"))
        return out

    def to_environ(self) -> dict[str, str]:
        """The variables to start this server with (all str)."""
        host, port = parse_endpoint(self.current_endpoint)
        env = {**self._common_environ(), "PADDLE_PSERVERS_IP_PORT_LIST": ",".join(self.servers),
               "PADDLE_CURRENT_ENDPOINT": self.current_endpoint, "POD_IP": host,
               "PADDLE_PORT": str(port), "SHOAL_SERVER_INDEX": str(self.server_index)}
        if self.report_path is not None:
            env["SHOAL_ENDPOINT_REPORT"] = self.report_path
        return env

    @staticmethod
    def _read(r: _Reader) -> dict:
        servers = r.endpoints("PADDLE_PSERVERS_IP_PORT_LIST")
        current = r.server_endpoint()
        index = r.int("SHOAL_SERVER_INDEX", minimum=0, required=False)
        if "SHOAL_SERVER_INDEX" not in r.env and servers is not None:
            if any(parse_endpoint(s)[1] == 0 for s in servers):
                r.missing("SHOAL_SERVER_INDEX", "PADDLE_PSERVERS_IP_PORT_LIST has port 0 entries, so "
                                                "this server's position cannot be found from its "
                                                "endpoint; the launcher must set it")
            elif current is not None and servers.count(current) != 1:
                r.bad("PADDLE_CURRENT_ENDPOINT",
                      f"PADDLE_CURRENT_ENDPOINT={current!r} appears {servers.count(current)} times "
                      f"in PADDLE_PSERVERS_IP_PORT_LIST={','.join(servers)!r}; it must appear once "
                      f"(or set SHOAL_SERVER_INDEX)")
            elif current is not None:
                index = servers.index(current)
        return dict(server_index=index, servers=servers,
                    trainers_num=r.int("PADDLE_TRAINERS_NUM", minimum=1), current_endpoint=current,
                    report_path=r.text("SHOAL_ENDPOINT_REPORT", required=False))


_VARIABLE = {"trainers_num": "PADDLE_TRAINERS_NUM", "trainer_id": "PADDLE_TRAINER_ID",
             "pservers": "PADDLE_PSERVERS_IP_PORT_LIST", "servers": "PADDLE_PSERVERS_IP_PORT_LIST",
             "trainer_endpoints": "PADDLE_TRAINER_ENDPOINTS",
             "current_endpoint": "PADDLE_CURRENT_ENDPOINT", "server_index": "SHOAL_SERVER_INDEX"}


def _defaults(cls) -> dict:
    return {f.name: (f.default if f.default is not dataclasses.MISSING else None)
            for f in dataclasses.fields(cls)}


# --- reading variables ---------------------------------------------------------------------

_MEANING = {
    "TRAINING_ROLE": "TRAINER or PSERVER",
    "PADDLE_TRAINER_ID": "this worker's rank, 0..PADDLE_TRAINERS_NUM-1",
    "PADDLE_TRAINERS_NUM": "the number of workers",
    "PADDLE_PSERVERS_IP_PORT_LIST": "comma-separated host:port of the servers, '' for none",
    "PADDLE_TRAINER_ENDPOINTS": "comma-separated host:port of every worker",
    "PADDLE_CURRENT_ENDPOINT": "this process's host:port",
    "SHOAL_SERVER_INDEX": "this server's position in PADDLE_PSERVERS_IP_PORT_LIST",
    "PADDLE_MASTER": "host:port of the collective job's rendezvous store",
}


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


class _Reader:
    """Reads variables from one mapping, collecting every problem instead of stopping at the first."""

    def __init__(self, env: Mapping[str, str]):
        self.env, self.problems = env, []   # problems: [(variable, text)]

    def missing(self, var: str, why: str = "") -> None:
        self.problems.append((var, f"{var} is missing ({why or _MEANING.get(var, 'required')})"))

    def bad(self, var: str, text: str) -> None:
        self.problems.append((var, text))

    def text(self, var: str, *, required: bool = True) -> str | None:
        value = self.env.get(var)
        if value is None and required:
            self.missing(var)
        return value

    def int(self, var: str, *, minimum: int | None = None, required: bool = True) -> int | None:
        value = self.text(var, required=required)
        if value is None:
            return None
        try:
            number = int(value.strip())
        except ValueError:
            return self.bad(var, f"{var}={value!r} is not an int")
        if minimum is not None and number < minimum:
            return self.bad(var, f"{var}={value!r} must be >= {minimum}")
        return number

    def endpoint(self, var: str, *, required: bool = True) -> str | None:
        value = self.text(var, required=required)
        if value is None:
            return None
        try:
            parse_endpoint(value)
        except ValueError as e:
            return self.bad(var, f"{var}={value!r}: {e}")
        return value

    def endpoints(self, var: str, *, allow_empty: bool = False) -> tuple[str, ...] | None:
        value = self.text(var)
        if value is None:
            return None
        if value.strip() == "":
            if allow_empty:
                return ()
            return self.bad(var, f"{var} is empty; give {_MEANING[var]}")
        items = tuple(value.split(","))
        broken = []
        for item in items:
            try:
                parse_endpoint(item)
            except ValueError as e:
                broken.append(f"{item!r} ({e})")
        if broken:
            return self.bad(var, f"{var}={value!r} has malformed entries: {', '.join(broken)}")
        return items

    def server_endpoint(self) -> str | None:
        """PADDLE_CURRENT_ENDPOINT, or POD_IP:PADDLE_PORT (both ways given: they must agree)."""
        current = self.endpoint("PADDLE_CURRENT_ENDPOINT", required=False)
        ip, port = self.env.get("POD_IP"), self.int("PADDLE_PORT", minimum=0, required=False)
        if "PADDLE_CURRENT_ENDPOINT" in self.env:
            if current is not None and ip is not None and port is not None and \
                    parse_endpoint(current) != (ip, port):
                self.bad("PADDLE_CURRENT_ENDPOINT", f"PADDLE_CURRENT_ENDPOINT={current!r} disagrees "
                                                    f"with POD_IP={ip!r}, PADDLE_PORT={port}")
            return current
        if ip is None or "PADDLE_PORT" not in self.env:
            self.missing("PADDLE_CURRENT_ENDPOINT", "this server's host:port; or set both POD_IP "
                                                    "and PADDLE_PORT")
            return None
        if port is None:
            return None
        endpoint = _endpoint_of(ip, port)
        try:
            parse_endpoint(endpoint)
        except ValueError as e:
            return self.bad("POD_IP", f"POD_IP={ip!r} with PADDLE_PORT={port} gives {endpoint!r}: {e}")
        return endpoint

    def raise_if_any(self, what: str) -> None:
        if self.problems:
            raise _error(what, self.problems, env=True)


def _read_common(r: _Reader) -> dict:
    out = {"job_token": r.text("SHOAL_JOB_TOKEN", required=False),
           "strategy_path": r.text("SHOAL_STRATEGY", required=False),
           "log_dir": r.text("SHOAL_LOG_DIR", required=False),
           "restart": r.int("SHOAL_RESTART", minimum=0, required=False) or 0}
    t0 = r.text("SHOAL_LAUNCH_T0", required=False)
    if t0 is not None:
        try:
            out["launch_t0"] = float(t0)
            if not math.isfinite(out["launch_t0"]) or out["launch_t0"] < 0:
                raise ValueError
        except ValueError:
            r.bad("SHOAL_LAUNCH_T0", f"SHOAL_LAUNCH_T0={t0!r} is not finite seconds since the epoch")
    auth = r.text("SHOAL_AUTH", required=False)
    if auth is not None:
        try:
            out["auth"] = Auth(auth.strip().lower())
        except ValueError:
            r.bad("SHOAL_AUTH", f"SHOAL_AUTH={auth!r} is not one of {[a.value for a in Auth]}")
    return out


def _endpoint_problems(var: str, endpoints, *, real: bool) -> list[tuple[str, str]]:
    if not isinstance(endpoints, tuple) or not all(isinstance(e, str) for e in endpoints):
        return [(var, f"{endpoints!r} must be a sequence of 'host:port' strings")]
    out = []
    for e in endpoints:
        try:
            _, port = parse_endpoint(e)
        except ValueError as err:
            out.append((var, f"{e!r}: {err}"))
            continue
        if real and port == 0:
            out.append((var, f"{e!r} has port 0: a worker needs the servers' real endpoints (the "
                             f"launcher fills them in from the servers' SHOAL_ENDPOINT_REPORT)"))
    dupes = sorted({e for e in endpoints if endpoints.count(e) > 1 and not e.endswith(":0")})
    if dupes:
        out.append((var, f"lists {dupes} more than once; every process needs its own endpoint"))
    return out


def _error(what: str, problems: list[tuple[str, str]], *, env: bool = False) -> ContractError:
    lines = [text if text.startswith(var) else f"{var}: {text}" for var, text in problems]
    count = f"{len(lines)} problem{'s' if len(lines) > 1 else ''}"
    if env:
        head = (f"incomplete or invalid fleet environment for a {what} ({count}); fleetrun sets "
                f"these for every process it starts, or unset all contract variables to run in "
                f"local mode")
    else:
        head = f"invalid {what} ({count})"
    message = f"{head}:\n  - " + "\n  - ".join(lines)
    return ContractError(message, lines, [var for var, _ in problems])

"""The environment contract: round trips, local mode, and errors naming every bad variable."""
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shoal.configs import (CONTRACT_VARIABLES, Auth, ClusterEnv, ContractError, Role, ServerEnv,
                           WorkerEnv, parse_endpoint)
from shoal.configs.errors import ConfigError


def worker(**kw):
    base = dict(trainer_id=1, trainers_num=2, pservers=("127.0.0.1:7000", "127.0.0.1:7001"),
                trainer_endpoints=("127.0.0.1:8000", "127.0.0.1:8001"),
                current_endpoint="127.0.0.1:8001", job_token="secret", strategy_path="/job/s.yaml",
                log_dir="/job/log", launch_t0=1712345678.25, restart=2, auth=Auth.CURVE)
    return WorkerEnv(**{**base, **kw})


def server(**kw):
    base = dict(server_index=1, servers=("127.0.0.1:0", "127.0.0.1:0"),
                current_endpoint="127.0.0.1:0", trainers_num=3, report_path="/tmp/report.1",
                job_token="secret")
    return ServerEnv(**{**base, **kw})


def test_worker_round_trip():
    w = worker()
    env = w.to_environ()
    assert all(isinstance(v, str) for v in env.values())
    assert env["TRAINING_ROLE"] == "TRAINER" and env["PADDLE_TRAINER_ID"] == "1"
    assert WorkerEnv.from_environ(env) == w
    assert ClusterEnv.detect(env) == w
    assert w.role is Role.TRAINER


def test_server_round_trip_with_port_zero():
    s = server()
    env = s.to_environ()
    assert env["SHOAL_SERVER_INDEX"] == "1" and env["PADDLE_PORT"] == "0"
    assert ServerEnv.from_environ(env) == s
    assert ClusterEnv.detect(env) == s
    assert s.role is Role.PSERVER


def test_collective_worker_has_no_servers():
    w = worker(pservers=())
    assert w.to_environ()["PADDLE_PSERVERS_IP_PORT_LIST"] == ""
    assert ClusterEnv.detect(w.to_environ()) == w


def test_lists_are_stored_as_tuples_and_the_env_is_hashable():
    w = worker(pservers=["127.0.0.1:7000"])
    assert w.pservers == ("127.0.0.1:7000",)
    hash(w)


def test_to_environ_writes_only_contract_variables():
    for env in (worker().to_environ(), server().to_environ()):
        assert set(env) <= set(CONTRACT_VARIABLES)


hosts = st.sampled_from(["127.0.0.1", "localhost", "node-3.cluster", "::1", "10.0.0.7"])
ports = st.integers(1, 65535)


def _endpoint(host, port):
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


endpoint_lists = st.lists(st.tuples(hosts, ports).map(lambda hp: _endpoint(*hp)), min_size=1,
                          max_size=6, unique=True)
common = dict(job_token=st.none() | st.text(st.characters(codec="ascii", exclude_characters="\x00"),
                                            min_size=1, max_size=20),
              strategy_path=st.none() | st.just("/s.yaml"), log_dir=st.none() | st.just("/log"),
              launch_t0=st.none() | st.floats(0, 4e9), restart=st.integers(0, 50),
              auth=st.sampled_from(list(Auth)))


@st.composite
def workers(draw):
    endpoints = draw(endpoint_lists)
    i = draw(st.integers(0, len(endpoints) - 1))
    return WorkerEnv(trainer_id=i, trainers_num=len(endpoints), trainer_endpoints=endpoints,
                     current_endpoint=endpoints[i], pservers=draw(st.lists(
                         st.tuples(hosts, ports).map(lambda hp: _endpoint(*hp)), max_size=4, unique=True)),
                     **{k: draw(v) for k, v in common.items()})


@st.composite
def servers(draw):
    endpoints = draw(endpoint_lists)
    i = draw(st.integers(0, len(endpoints) - 1))
    if draw(st.booleans()):   # before the servers report: every port still 0
        endpoints = [_endpoint(parse_endpoint(e)[0], 0) for e in endpoints]
    port0 = parse_endpoint(endpoints[i])[1] == 0
    return ServerEnv(server_index=i, servers=endpoints, current_endpoint=endpoints[i],
                     trainers_num=draw(st.integers(1, 64)),
                     report_path=("/tmp/r" if port0 or draw(st.booleans()) else None),
                     **{k: draw(v) for k, v in common.items()})


@settings(max_examples=100, deadline=None)
@given(st.one_of(workers(), servers()))
def test_round_trip_property(env):
    assert ClusterEnv.detect(env.to_environ()) == env
    assert type(env).from_environ(env.to_environ()) == env


def test_server_index_found_from_its_endpoint():
    env = {"TRAINING_ROLE": "PSERVER", "PADDLE_PSERVERS_IP_PORT_LIST": "127.0.0.1:7000,127.0.0.1:7001",
           "PADDLE_CURRENT_ENDPOINT": "127.0.0.1:7001", "PADDLE_TRAINERS_NUM": "2"}
    s = ClusterEnv.detect(env)
    assert isinstance(s, ServerEnv) and s.server_index == 1 and s.report_path is None


def test_server_endpoint_from_pod_ip_and_paddle_port():
    env = {"TRAINING_ROLE": "PSERVER", "PADDLE_PSERVERS_IP_PORT_LIST": "10.0.0.1:7000,10.0.0.2:7000",
           "POD_IP": "10.0.0.2", "PADDLE_PORT": "7000", "PADDLE_TRAINERS_NUM": "4"}
    s = ClusterEnv.detect(env)
    assert s.current_endpoint == "10.0.0.2:7000" and s.server_index == 1


def test_server_endpoints_that_disagree_are_named():
    env = {"TRAINING_ROLE": "PSERVER", "PADDLE_PSERVERS_IP_PORT_LIST": "10.0.0.1:7000",
           "PADDLE_CURRENT_ENDPOINT": "10.0.0.1:7000", "POD_IP": "10.0.0.9", "PADDLE_PORT": "7000",
           "PADDLE_TRAINERS_NUM": "1"}
    with pytest.raises(ContractError, match="disagrees with POD_IP='10.0.0.9'"):
        ClusterEnv.detect(env)


def test_port_zero_server_list_needs_an_explicit_index_and_a_report_path():
    env = {"TRAINING_ROLE": "PSERVER", "PADDLE_PSERVERS_IP_PORT_LIST": "127.0.0.1:0,127.0.0.1:0",
           "PADDLE_CURRENT_ENDPOINT": "127.0.0.1:0", "PADDLE_TRAINERS_NUM": "1"}
    with pytest.raises(ContractError) as e:
        ClusterEnv.detect(env)
    assert set(e.value.variables) == {"SHOAL_SERVER_INDEX", "SHOAL_ENDPOINT_REPORT"}
    assert "port 0 entries" in str(e.value)


def test_a_worker_needs_real_server_ports():
    with pytest.raises(ContractError, match="has port 0: a worker needs the servers' real endpoints"):
        worker(pservers=("127.0.0.1:0",))


# --- local mode and partial environments -------------------------------------------------------

def test_no_contract_variable_is_local_mode():
    assert ClusterEnv.detect({}) is None
    assert ClusterEnv.detect({"HOME": "/root", "PATH": "/bin"}) is None
    assert ClusterEnv.detect({"POD_IP": "10.1.2.3"}) is None   # every Kubernetes pod has it


def test_detect_reads_os_environ_by_default(monkeypatch):
    for var in CONTRACT_VARIABLES:
        monkeypatch.delenv(var, raising=False)
    assert ClusterEnv.detect() is None
    for var, value in worker().to_environ().items():
        monkeypatch.setenv(var, value)
    assert ClusterEnv.detect() == worker()


@pytest.mark.parametrize("var", [v for v in CONTRACT_VARIABLES if v != "POD_IP"])
def test_any_single_contract_variable_leaves_local_mode(var):
    with pytest.raises(ContractError):
        ClusterEnv.detect({var: "1"})


def test_partial_worker_env_names_every_missing_and_bad_variable():
    env = {"TRAINING_ROLE": "TRAINER", "PADDLE_TRAINER_ID": "x", "SHOAL_AUTH": "rsa"}
    with pytest.raises(ContractError) as e:
        ClusterEnv.detect(env)
    msg = str(e.value)
    assert "PADDLE_TRAINER_ID='x' is not an int" in msg
    assert "SHOAL_AUTH='rsa' is not one of ['plain', 'curve']" in msg
    for var in ("PADDLE_TRAINERS_NUM", "PADDLE_PSERVERS_IP_PORT_LIST", "PADDLE_TRAINER_ENDPOINTS",
                "PADDLE_CURRENT_ENDPOINT"):
        assert f"{var} is missing" in msg
    assert set(e.value.variables) == {"PADDLE_TRAINER_ID", "SHOAL_AUTH", "PADDLE_TRAINERS_NUM",
                                      "PADDLE_PSERVERS_IP_PORT_LIST", "PADDLE_TRAINER_ENDPOINTS",
                                      "PADDLE_CURRENT_ENDPOINT"}
    assert "local mode" in msg
    assert isinstance(e.value, ConfigError)


def test_partial_server_env_names_every_missing_variable():
    with pytest.raises(ContractError) as e:
        ClusterEnv.detect({"TRAINING_ROLE": "PSERVER"})
    assert set(e.value.variables) == {"PADDLE_PSERVERS_IP_PORT_LIST", "PADDLE_CURRENT_ENDPOINT",
                                      "PADDLE_TRAINERS_NUM"}
    assert "POD_IP and PADDLE_PORT" in str(e.value)


def test_missing_role_is_named_with_what_a_worker_would_miss():
    env = worker().to_environ()
    del env["TRAINING_ROLE"], env["PADDLE_TRAINER_ENDPOINTS"]
    with pytest.raises(ContractError) as e:
        ClusterEnv.detect(env)
    assert set(e.value.variables) == {"TRAINING_ROLE", "PADDLE_TRAINER_ENDPOINTS"}


def test_unknown_role_and_wrong_role():
    with pytest.raises(ContractError, match="TRAINING_ROLE='boss' is not a role; use TRAINER or PSERVER"):
        ClusterEnv.detect({"TRAINING_ROLE": "boss"})
    with pytest.raises(ContractError, match="but ServerEnv is the PSERVER role's contract"):
        ServerEnv.from_environ(worker().to_environ())


@pytest.mark.parametrize("change,var,text", [
    ({"PADDLE_TRAINER_ID": "2"}, "PADDLE_TRAINER_ID", "below PADDLE_TRAINERS_NUM=2"),
    ({"PADDLE_TRAINER_ID": "-1"}, "PADDLE_TRAINER_ID", "must be >= 0"),
    ({"PADDLE_TRAINERS_NUM": "3"}, "PADDLE_TRAINER_ENDPOINTS", "has 2 endpoints but PADDLE_TRAINERS_NUM=3"),
    ({"PADDLE_CURRENT_ENDPOINT": "127.0.0.1:8000"}, "PADDLE_CURRENT_ENDPOINT",
     "is not PADDLE_TRAINER_ENDPOINTS[1]='127.0.0.1:8001'"),
    ({"PADDLE_PSERVERS_IP_PORT_LIST": "127.0.0.1:7000,nohost"}, "PADDLE_PSERVERS_IP_PORT_LIST",
     "malformed entries: 'nohost'"),
    ({"PADDLE_TRAINER_ENDPOINTS": "127.0.0.1:8000,127.0.0.1:99999"}, "PADDLE_TRAINER_ENDPOINTS",
     "'99999' is not an int in 0..65535"),
    ({"PADDLE_PSERVERS_IP_PORT_LIST": "127.0.0.1:7000,127.0.0.1:7000"}, "PADDLE_PSERVERS_IP_PORT_LIST",
     "more than once"),
    ({"SHOAL_LAUNCH_T0": "yesterday"}, "SHOAL_LAUNCH_T0", "not finite seconds since the epoch"),
    ({"SHOAL_LAUNCH_T0": "nan"}, "SHOAL_LAUNCH_T0", "not finite seconds since the epoch"),
    ({"SHOAL_RESTART": "-1"}, "SHOAL_RESTART", "must be >= 0"),
    ({"SHOAL_JOB_TOKEN": ""}, "SHOAL_JOB_TOKEN", "the job token is empty"),
])
def test_bad_worker_values_name_the_variable(change, var, text):
    env = {**worker().to_environ(), **change}
    with pytest.raises(ContractError) as e:
        ClusterEnv.detect(env)
    assert var in e.value.variables and text in str(e.value)


def test_cross_field_and_parse_problems_are_reported_together():
    env = {**worker().to_environ(), "PADDLE_TRAINER_ID": "5", "SHOAL_AUTH": "none"}
    with pytest.raises(ContractError) as e:
        ClusterEnv.detect(env)
    assert set(e.value.variables) == {"PADDLE_TRAINER_ID", "SHOAL_AUTH"}


def test_direct_construction_is_validated():
    with pytest.raises(ContractError) as e:
        WorkerEnv(trainer_id=2, trainers_num=2, pservers=(), trainer_endpoints=("a:1",),
                  current_endpoint="a:1")
    assert set(e.value.variables) == {"PADDLE_TRAINER_ID", "PADDLE_TRAINER_ENDPOINTS"}
    with pytest.raises(ContractError, match="SHOAL_SERVER_INDEX"):
        server(server_index=2)
    with pytest.raises(ContractError, match="must report its real endpoint"):
        server(report_path=None)


@pytest.mark.parametrize("text,expected", [
    ("127.0.0.1:80", ("127.0.0.1", 80)), ("[::1]:0", ("::1", 0)), ("node-1:65535", ("node-1", 65535)),
])
def test_parse_endpoint(text, expected):
    assert parse_endpoint(text) == expected


@pytest.mark.parametrize("text", ["", "host", ":80", "host:", "host:x", "::1:80", "[::1]80",
                                  " host:80", "host:70000", "a b:1"])
def test_parse_endpoint_rejects(text):
    with pytest.raises(ValueError):
        parse_endpoint(text)


def test_launch_t0_round_trips_exactly():
    t0 = math.pi * 1e9
    assert ClusterEnv.detect(worker(launch_t0=t0).to_environ()).launch_t0 == t0

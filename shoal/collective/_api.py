"""The collective API (Paddle's names): init_parallel_env, ranks, groups and the operations.

    import shoal.collective as dist
    dist.init_parallel_env()                 # from fleetrun's environment contract
    x = np.ones(4, np.float32)
    dist.all_reduce(x)                       # in place: the sum over every rank
    task = dist.all_reduce(x, sync_op=False); ...; task.wait()

Every operation takes numpy or cupy arrays or Tensors (their `.data`), in place where Paddle's
does; `src`/`dst` are global ranks. Every operation has the group's timeout: on expiry it raises
CollectiveTimeoutError naming the ranks that did not arrive, and the group is unusable after
(GroupBrokenError): a failed Gloo/NCCL context cannot be reused. Operations of one group run in
the order issued; they are serialized per group, so calling from several threads is safe but
not concurrent. Every rank of a group must issue the same operations in the same order.
"""
from __future__ import annotations

import enum
import os
import sys

import numpy as np

from shoal.collective._group import Task, get_backend
from shoal.collective._store import PrefixStore, StoreClient, StoreServer
from shoal.collective.errors import CollectiveError, InvalidArgumentError, NotInitializedError
from shoal.configs.cluster import ClusterEnv, WorkerEnv, parse_endpoint
from shoal.configs.errors import ContractError
from shoal.kernels import backend_of
from shoal.worker.tensor import Tensor

DEFAULT_TIMEOUT = 300.0


class ReduceOp(enum.Enum):
    SUM = "sum"
    MAX = "max"
    MIN = "min"
    PROD = "prod"
    AVG = "avg"


class _Outside:
    """What new_group returns on a rank that is not a member: it knows the ranks, and refuses."""

    def __init__(self, ranks):
        self.ranks, self.rank, self.size = list(ranks), -1, len(ranks)

    def close(self) -> None:
        pass


class _State:
    def __init__(self):
        self.world = None
        self.store_server: StoreServer | None = None
        self.client: StoreClient | None = None
        self.prefix = ""
        self.groups: list = []
        self.backend = None
        self.timeout = DEFAULT_TIMEOUT
        self.host = "127.0.0.1"


_state = _State()
_inits = 0   # worlds this process joined: each rendezvous uses keys of its own


def _default_backend() -> str:
    from shoal.kernels import default_backend
    return "nccl" if default_backend().name == "cupy" else "gloo"


def init_parallel_env(backend: str | None = None, *, timeout: float | None = None):
    """Join the job's collective world (idempotent); returns the world group.

    Reads fleetrun's contract (PADDLE_TRAINER_ID, PADDLE_TRAINERS_NUM, PADDLE_CURRENT_ENDPOINT,
    PADDLE_MASTER, SHOAL_RESTART). With no contract variable set it starts a world of one
    process and says so. `backend` is 'gloo' (CPU) or 'nccl' (GPU), by default nccl when the
    default array backend is cupy; `timeout` (seconds, default 300) bounds the rendezvous and
    every operation of the world group.

    Raises ContractError for a missing or malformed variable, RendezvousError when the ranks
    do not all join within the timeout, BackendUnavailableError when the backend cannot run.
    Blocks until every rank has joined."""
    global _inits
    if _state.world is not None:
        return _state.world
    env = ClusterEnv.detect()
    timeout = _timeout(timeout, DEFAULT_TIMEOUT, "init_parallel_env")
    name = backend or _default_backend()
    cls = get_backend(name)
    if env is None:
        print("shoal.collective: no fleet environment (PADDLE_* unset): a world of one process; "
              "start the script with `fleetrun --nproc_per_node N` for N", file=sys.stderr)
        server = StoreServer("127.0.0.1", 0)
        rank, size, host, master, token, restart = 0, 1, "127.0.0.1", server.endpoint, None, 0
    else:
        if not isinstance(env, WorkerEnv):
            raise ContractError(f"init_parallel_env() in a {env.role.value} process: collectives "
                                f"run on workers (TRAINING_ROLE=TRAINER)", [], ["TRAINING_ROLE"])
        if env.master is None:
            raise ContractError("PADDLE_MASTER is missing: a collective job needs the host:port "
                                "of its rendezvous store (fleetrun --nproc_per_node sets it)",
                                ["PADDLE_MASTER is missing"], ["PADDLE_MASTER"])
        rank, size, master, token, restart = (env.trainer_id, env.trainers_num, env.master,
                                              env.job_token, env.restart)
        host = parse_endpoint(env.current_endpoint)[0]
        families = {":" in parse_endpoint(e)[0] for e in env.trainer_endpoints}
        if len(families) > 1 and (backend or _default_backend()) == "gloo":
            raise ContractError(
                f"PADDLE_TRAINER_ENDPOINTS mixes IPv4 and IPv6 addresses "
                f"({','.join(env.trainer_endpoints)}): Gloo connects ranks of one address family "
                f"only; give every node an IPv4 address (or every node an IPv6 one) in --ips",
                ["PADDLE_TRAINER_ENDPOINTS mixes address families"], ["PADDLE_TRAINER_ENDPOINTS"])
        server = None
        if rank == 0 and os.environ.get("SHOAL_MASTER_SERVED") != "launcher":
            server = StoreServer(*parse_endpoint(master), token=token)
    client = StoreClient(master, token=token, timeout=timeout)
    # every rank of a job joins the same number of times: the n-th joins meet under one prefix
    prefix = f"gen{restart}/i{_inits}/"
    _inits += 1
    try:
        world = cls(PrefixStore(client, prefix + "g0/"), rank=rank, ranks=list(range(size)),
                    host=host, timeout=timeout)
    except BaseException:
        client.close()
        if server is not None:
            server.close()
        raise
    _state.world, _state.store_server, _state.client, _state.prefix = world, server, client, prefix
    _state.groups, _state.backend, _state.timeout, _state.host = [world], name, timeout, host
    return world


def is_initialized() -> bool:
    return _state.world is not None


def destroy_process_group(group=None) -> None:
    """Close `group`, or (None) every group and the world; init_parallel_env may run again."""
    if group is not None:
        if hasattr(group, "close"):
            group.close()
        return
    state, errors = _state, []
    try:
        for g in reversed(state.groups):
            try:
                g.close()
            except Exception as e:  # noqa: BLE001 - close the rest; say what failed after
                errors.append(f"group {g.ranks}: {e}")
        if state.client is not None:
            state.client.close()
        if state.store_server is not None:
            state.store_server.close()
    finally:
        state.__init__()
    if errors:
        raise CollectiveError(f"destroy_process_group: {'; '.join(errors)} (every group is "
                              f"released as far as it can be; init_parallel_env may run again)")


def _timeout(value, default: float, where: str) -> float:
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < 1e7:
        raise InvalidArgumentError(f"{where}(timeout={value!r}): give seconds > 0")
    return float(value)


def _world():
    if _state.world is None:
        raise NotInitializedError("no collective world yet: call shoal.collective.init_parallel_env() "
                                  "(or fleet.init(is_collective=True)) first")
    return _state.world


def _group(group):
    g = _world() if group is None else group
    if g.rank < 0:
        raise InvalidArgumentError(f"this rank ({_world().rank}) is not a member of the group "
                                   f"of ranks {g.ranks}; only its members may use it")
    return g


def get_rank(group=None) -> int:
    """This process's rank: global, or in `group` (-1 when not a member)."""
    if group is not None:
        return group.rank
    return _world().rank


def get_world_size(group=None) -> int:
    return (group if group is not None else _world()).size


def new_group(ranks=None, *, backend: str | None = None, timeout: float | None = None):
    """A group of the given global ranks (all ranks when None), with its own connections.

    Every rank of the world must call new_group, in the same order (members build the group;
    the others get an object that refuses operations). Blocks until the members have joined."""
    world = _world()
    ranks = list(range(world.size)) if ranks is None else sorted({int(r) for r in ranks})
    if not ranks or ranks[0] < 0 or ranks[-1] >= world.size:
        raise InvalidArgumentError(f"new_group(ranks={ranks}): ranks must be a non-empty subset of "
                                   f"0..{world.size - 1}")
    gid = len(_state.groups)
    _timeout(timeout, _state.timeout, "new_group")  # checked on every rank, members or not
    if world.rank not in ranks:
        group = _Outside(ranks)
    else:
        cls = get_backend(backend or _state.backend)
        group = cls(PrefixStore(_state.client, f"{_state.prefix}g{gid}/"), rank=ranks.index(world.rank),
                    ranks=ranks, host=_state.host, timeout=_timeout(timeout, _state.timeout, "new_group"))
    group.id = gid
    _state.groups.append(group)
    return group


# --- arrays -----------------------------------------------------------------------------------

_DTYPES = frozenset(np.dtype(d) for d in ("float16", "float32", "float64", "int8", "uint8",
                                           "int32", "int64"))


def _array(x, what: str, *, writes: bool = False):
    data = x.data if isinstance(x, Tensor) else x
    if not hasattr(data, "dtype") or not hasattr(data, "shape") or isinstance(data, np.generic):
        raise InvalidArgumentError(f"{what}: expected a numpy or cupy array or a Tensor, got "
                                   f"{type(x).__name__}")
    if data.dtype not in _DTYPES:
        raise InvalidArgumentError(f"{what}: dtype {data.dtype} is not supported; use one of "
                                   f"{sorted(str(d) for d in _DTYPES)}")
    if writes and isinstance(data, np.ndarray) and not data.flags.writeable:
        raise InvalidArgumentError(f"{what}: the array is read-only, and the result is written "
                                   f"into it; pass a writable array (e.g. a copy)")
    return data


def _like(orig, array):
    """`array` (a result) as the kind of thing the caller gave: Tensor, numpy or cupy."""
    data = orig.data if isinstance(orig, Tensor) else orig
    out = backend_of(data).xp.asarray(array)
    return Tensor._make(out) if isinstance(orig, Tensor) else out


def _root(group, rank: int, what: str) -> int:
    if rank not in group.ranks:
        raise InvalidArgumentError(f"{what}={rank} is not a rank of the group {group.ranks}")
    return group.ranks.index(rank)


def _op(op) -> str:
    if isinstance(op, ReduceOp):
        return op.value
    if isinstance(op, str) and op.lower() in {o.value for o in ReduceOp}:
        return op.lower()
    raise InvalidArgumentError(f"op={op!r}: use one of {[o.name for o in ReduceOp]} "
                               f"(shoal.collective.ReduceOp)")


def _average(native, size: int) -> None:
    if native.dtype.kind == "f":
        native[...] /= size
    else:
        native[...] //= size  # integers: floor, as numpy's // does


def _xp(native):
    return backend_of(native).xp


def _stacked(group, items, what: str, like=None, op: str = ""):
    """A list of group.size arrays of one shape and dtype, as one native [size, ...] array
    (with `like`: of that array's shape and dtype too, else `op` names the mismatch)."""
    if not isinstance(items, (list, tuple)) or len(items) != group.size:
        raise InvalidArgumentError(f"{what}: expected a list of {group.size} arrays (one per rank "
                                   f"of the group), got {type(items).__name__}"
                                   f"{'' if not hasattr(items, '__len__') else f' of {len(items)}'}")
    arrays = [_array(a, what) for a in items]
    first = arrays[0]
    for i, a in enumerate(arrays):
        if a.shape != first.shape or a.dtype != first.dtype:
            raise InvalidArgumentError(f"{what}[{i}] is {a.dtype}{list(a.shape)} but {what}[0] is "
                                       f"{first.dtype}{list(first.shape)}; all must agree")
    if like is not None and (first.shape != like.shape or first.dtype != like.dtype):
        raise InvalidArgumentError(f"{op}: tensor_list holds {first.dtype}{list(first.shape)} but "
                                   f"tensor is {like.dtype}{list(like.shape)}")
    native, _ = group._to_native(_xp(first).stack(arrays))
    return native


def _fill(group, out_list, orig, result, what: str):
    """Put the [size, ...] `result` into `out_list`: appended when empty, else copied into it."""
    if len(out_list) == 0:
        out_list.extend(_like(orig, result[i].copy()) for i in range(group.size))
        return
    for i, target in enumerate(out_list):
        data = _array(target, what)
        data[...] = backend_of(data).xp.asarray(result[i])


def _check_list(group, out_list, shape, dtype, what: str):
    if not isinstance(out_list, list):
        raise InvalidArgumentError(f"{what}: expected a list (empty, or of {group.size} arrays)")
    if out_list and len(out_list) != group.size:
        raise InvalidArgumentError(f"{what} has {len(out_list)} arrays; give an empty list or "
                                   f"{group.size} (one per rank)")
    for i, t in enumerate(out_list):
        a = _array(t, what)
        if a.shape != tuple(shape) or a.dtype != dtype:
            raise InvalidArgumentError(f"{what}[{i}] is {a.dtype}{list(a.shape)}; expected "
                                       f"{dtype}{list(shape)}")


# --- operations -------------------------------------------------------------------------------

def all_reduce(tensor, op=ReduceOp.SUM, group=None, sync_op: bool = True) -> Task | None:
    """Reduce `tensor` over the group's ranks, in place on every rank (AVG: the sum divided by
    the group's size; integer dtypes divide with floor)."""
    g, data, op = _group(group), _array(tensor, "all_reduce", writes=True), _op(op)
    native, back = g._to_native(data)

    def run():
        g._all_reduce(native, "sum" if op == "avg" else op)
        if op == "avg":
            _average(native, g.size)
    return g.execute("all_reduce", run, sync_op=sync_op, then=back)


def all_reduce_into(inputs: list, out, group=None, scale: float = 1.0,
                    sync_op: bool = True) -> Task | None:
    """Shoal's own (data parallel's bucket): `out` (flat) = the sum over ranks of the
    concatenation of `inputs` (arrays of out's dtype, any shapes, whose sizes add up to out's),
    times `scale`. Where the group can (shared memory), the inputs are read where they are,
    with no copy into `out` first; they must not change until the operation ends."""
    g = _group(group)
    out = _array(out, "all_reduce_into out", writes=True)
    arrays = [_array(a, "all_reduce_into inputs") for a in inputs]
    if out.ndim != 1:
        raise InvalidArgumentError(f"all_reduce_into: out must be flat, got shape {tuple(out.shape)}")
    bad = [str(a.dtype) for a in arrays if a.dtype != out.dtype]
    if bad:
        raise InvalidArgumentError(f"all_reduce_into: inputs of dtype {sorted(set(bad))} for an out "
                                   f"of {out.dtype}; every input needs out's dtype")
    total = sum(int(a.size) for a in arrays)
    if total != out.size:
        raise InvalidArgumentError(f"all_reduce_into: the inputs hold {total} elements, out {out.size}")
    native, back = g._to_native(out)
    natives = [a if isinstance(a, np.ndarray) and a.flags.c_contiguous else g._to_native(a)[0]
               for a in arrays]
    return g.execute("all_reduce", lambda: g._all_reduce_into(natives, native, "sum", float(scale)),
                     sync_op=sync_op, then=back)


def broadcast(tensor, src: int, group=None, sync_op: bool = True) -> Task | None:
    """Copy rank `src`'s `tensor` into every rank's, in place."""
    g, data = _group(group), _array(tensor, "broadcast", writes=True)
    root = _root(g, src, "broadcast src")
    native, back = g._to_native(data)
    return g.execute("broadcast", lambda: g._broadcast(native, root), sync_op=sync_op, then=back)


def reduce(tensor, dst: int, op=ReduceOp.SUM, group=None, sync_op: bool = True) -> Task | None:
    """Reduce `tensor` over the group into rank `dst`'s (in place there; others' unchanged)."""
    g, data, op = _group(group), _array(tensor, "reduce", writes=True), _op(op)
    root = _root(g, dst, "reduce dst")
    native, back = g._to_native(data)
    if g.rank != root:
        native, back = native.copy(), None   # the backend may use a non-root buffer as scratch

    def run():
        g._reduce(native, root, "sum" if op == "avg" else op)
        if op == "avg" and g.rank == root:
            _average(native, g.size)
    return g.execute("reduce", run, sync_op=sync_op, then=back)


def all_gather(tensor_list: list, tensor, group=None, sync_op: bool = True) -> Task | None:
    """Every rank's `tensor`, in rank order, into `tensor_list` (appended when it is empty,
    else copied into its `size` arrays)."""
    g, data = _group(group), _array(tensor, "all_gather")
    _check_list(g, tensor_list, data.shape, data.dtype, "all_gather tensor_list")
    native, _ = g._to_native(data)
    out = _xp(native).empty((g.size,) + tuple(data.shape), dtype=data.dtype)
    return g.execute("all_gather", lambda: g._all_gather(native, out), sync_op=sync_op,
                     then=lambda: _fill(g, tensor_list, tensor, out, "all_gather tensor_list"))


def scatter(tensor, tensor_list=None, src: int = 0, group=None, sync_op: bool = True) -> Task | None:
    """Rank `src`'s `tensor_list[i]` into rank i's `tensor` (tensor_list only needed at src)."""
    g, data = _group(group), _array(tensor, "scatter", writes=True)
    root = _root(g, src, "scatter src")
    native, back = g._to_native(data)
    inputs = None
    if g.rank == root:
        stacked = _stacked(g, tensor_list, "scatter tensor_list", like=data, op="scatter")
        inputs = [stacked[i] for i in range(g.size)]
    return g.execute("scatter", lambda: g._scatter(inputs, native, root), sync_op=sync_op, then=back)


def reduce_scatter(tensor, tensor_list: list, op=ReduceOp.SUM, group=None,
                   sync_op: bool = True) -> Task | None:
    """Rank i's `tensor` = the reduction over ranks of their `tensor_list[i]`."""
    g, data, op = _group(group), _array(tensor, "reduce_scatter", writes=True), _op(op)
    stacked = _stacked(g, tensor_list, "reduce_scatter tensor_list", like=data, op="reduce_scatter")
    native, back = g._to_native(data)

    def run():
        g._reduce_scatter(stacked, native, "sum" if op == "avg" else op)
        if op == "avg":
            _average(native, g.size)
    return g.execute("reduce_scatter", run, sync_op=sync_op, then=back)


def alltoall(in_tensor_list: list, out_tensor_list: list, group=None,
             sync_op: bool = True) -> Task | None:
    """Rank i's `in_tensor_list[j]` into rank j's `out_tensor_list[i]` (appended when empty)."""
    g = _group(group)
    stacked = _stacked(g, in_tensor_list, "alltoall in_tensor_list")
    first = _array(in_tensor_list[0], "alltoall in_tensor_list")
    _check_list(g, out_tensor_list, first.shape, first.dtype, "alltoall out_tensor_list")
    out = _xp(stacked).empty_like(stacked)
    return g.execute("alltoall", lambda: g._alltoall(stacked, out), sync_op=sync_op,
                     then=lambda: _fill(g, out_tensor_list, in_tensor_list[0], out,
                                        "alltoall out_tensor_list"))


def barrier(group=None) -> None:
    """Return once every rank of the group has called barrier."""
    g = _group(group)
    g.execute("barrier", g._barrier)


def send(tensor, dst: int, group=None, sync_op: bool = True, *, tag: int = 0) -> Task | None:
    """Send `tensor` to rank `dst`, which must `recv` an array of the same size and dtype.

    Blocks until `dst` has posted its recv (Gloo sends into the receiver's buffer). A group runs
    its operations one at a time, so `send(..., sync_op=False)` followed by a `recv` on the same
    group waits for the send first: order an exchange (even ranks send first, odd ranks receive
    first) or use `alltoall`; a mismatch ends in CollectiveTimeoutError, not a hang."""
    g, data = _group(group), _array(tensor, "send")
    peer = _root(g, dst, "send dst")
    if peer == g.rank:
        raise InvalidArgumentError(f"send dst={dst} is this rank; send to another rank")
    native, _ = g._to_native(data)
    return g.execute("send", lambda: g._send(native, peer, tag), sync_op=sync_op)


def recv(tensor, src: int, group=None, sync_op: bool = True, *, tag: int = 0) -> Task | None:
    """Receive into `tensor` (in place) what rank `src` sends."""
    g, data = _group(group), _array(tensor, "recv", writes=True)
    peer = _root(g, src, "recv src")
    if peer == g.rank:
        raise InvalidArgumentError(f"recv src={src} is this rank; receive from another rank")
    native, back = g._to_native(data)
    return g.execute("recv", lambda: g._recv(native, peer, tag), sync_op=sync_op, then=back)


"""ShardedDataParallel: a data-parallel layer whose gradients (stage 2) are partitioned by owner.

    sg, dg = sharding_groups(2)                     # hybrid: sharding x data parallel
    model = ShardedDataParallel(MyModel(), stage=2, group=sg, dp_group=dg)
    opt = ShardingOptimizer(Adam(1e-3, parameters=model.parameters()), model)
    loss_fn(model(x), y).backward(); opt.step(); opt.clear_grad()

Every trainable parameter is owned by one rank of the sharding group (see `_plan`). Gradients
are fused into buckets laid out as one segment per rank; a bucket starts its collective as
soon as every gradient in it is ready (bucket i only after the buckets before it, as in
DataParallel, so ranks issue the same sequence). Stage 1 all-reduces the whole bucket and every
parameter gets the averaged gradient. Stage 2 reduce-scatters it: a rank keeps only its own
segment, so the owned parameters' `.grad` are views of it and the others' are None; the full
gradients of a bucket are dropped the moment its collective starts. With a `dp_group` the
result is also averaged over the ranks that hold the same shard in the other sharding groups.
"""
from __future__ import annotations

import contextlib
import weakref

import numpy as np

from shoal.collective import _api
from shoal.collective.errors import InvalidArgumentError
from shoal.collective.sharding._memory import held_bytes
from shoal.collective.sharding._plan import plan
from shoal.kernels import backend_of
from shoal.worker import autograd
from shoal.worker.nn.layer import Layer
from shoal.worker.sparse import SparseGrad

_IN_FLIGHT = 2   # stage 2: reduce-scatters started and not yet waited for, at most


def sharding_groups(sharding_degree: int):
    """(sharding group, data-parallel group) of this rank, for `sharding_degree` ranks a shard.

    Sharding group k holds the consecutive global ranks [k*degree, (k+1)*degree); the data-
    parallel group of a rank holds the ranks at the same position in every sharding group (None
    when there is one sharding group). A collective: every rank of the world must call it, at
    the same point (it builds every group with new_group, in one order).

    Raises InvalidArgumentError when `sharding_degree` does not divide the world size,
    NotInitializedError before init_parallel_env()."""
    if isinstance(sharding_degree, bool) or not isinstance(sharding_degree, int) or \
            sharding_degree < 1:
        raise InvalidArgumentError(f"sharding_groups(sharding_degree={sharding_degree!r}): give "
                                   f"an int >= 1 that divides the world size")
    world = _api._world()
    n, d = world.size, sharding_degree
    if n % d:
        raise InvalidArgumentError(
            f"sharding_degree={d} does not divide the world size {n}: the world is split into "
            f"sharding groups of sharding_degree ranks each; pick a divisor of {n} "
            f"({[k for k in range(1, n + 1) if n % k == 0]})")
    me, mine, dp = world.rank, None, None
    for k in range(n // d):
        g = _api.new_group(list(range(k * d, (k + 1) * d)))
        if me // d == k:
            mine = g
    if n // d > 1:
        for i in range(d):
            g = _api.new_group(list(range(i, n, d)))
            if me % d == i:
                dp = g
    return mine, dp


class ShardedDataParallel(Layer):
    """Wrap `layers` for ZeRO-sharded data-parallel training (stage 1 or 2) over `group`.

    Args:
        layers: the model (a Layer with at least one trainable parameter).
        stage: 1 (optimizer state sharded; gradients all-reduced in full) or 2 (gradients
            reduce-scattered too: a rank keeps only the gradients of its own parameters).
        group: the sharding group (default: the world).
        dp_group: hybrid data parallel: the ranks holding the same shard in the other
            sharding groups (from `sharding_groups`); None when there is one sharding group.
        fuse_grad_size_in_MB: the size of one fused gradient collective (default 32).

    Parameters and buffers are broadcast at construction from the first rank (of the dp group,
    then of the sharding group: global rank 0 in the layout of `sharding_groups`). Pair it with
    a `ShardingOptimizer`, which updates the owned parameters and gathers the rest. A backward
    pass that raises leaves the gradients undefined: clear them before the next step.

    Raises NotInitializedError before init_parallel_env(), InvalidArgumentError for a bad
    argument or ranks that disagree on the layout. Construction is a collective."""

    def __init__(self, layers: Layer, *, stage: int, group=None, dp_group=None,
                 fuse_grad_size_in_MB: float = 32):
        super().__init__()
        if not isinstance(layers, Layer):
            raise InvalidArgumentError(f"ShardedDataParallel(layers): expected a Layer, got "
                                       f"{type(layers).__name__}")
        if isinstance(stage, bool) or stage not in (1, 2):
            raise InvalidArgumentError(f"ShardedDataParallel(stage={stage!r}): give 1 (shard the "
                                       f"optimizer state) or 2 (shard the gradients too)")
        if not fuse_grad_size_in_MB > 0:
            raise InvalidArgumentError(f"fuse_grad_size_in_MB={fuse_grad_size_in_MB}: give a "
                                       f"size > 0")
        params = [p for p in layers.parameters() if p.requires_grad]
        if not params:
            raise InvalidArgumentError(f"ShardedDataParallel: {type(layers).__name__} has no "
                                       f"trainable parameter, so there is nothing to shard; "
                                       f"unfreeze some (trainable=True) or do not wrap it")
        self._layers = layers
        g = _api._group(group)
        dp = None if dp_group is None else _api._group(dp_group)
        if dp is not None and dp.size == 1:
            dp = None
        me = g.ranks[g.rank]
        if dp is not None and set(dp.ranks) & set(g.ranks) != {me}:
            raise InvalidArgumentError(
                f"dp_group {dp.ranks} shares ranks {sorted(set(dp.ranks) & set(g.ranks))} with "
                f"the sharding group {g.ranks}; it must hold this rank and one rank of each "
                f"other sharding group (build both with sharding_groups(degree))")
        for name, value in (("_group", g), ("_dp", dp), ("_stage", int(stage)),
                            ("_no_sync_depth", 0), ("_merge_sync", True), ("_pass_id", None),
                            ("_next", 0), ("_optimizer", lambda: None), ("_hooks", []),
                            ("_completed", []), ("_learned", False)):
            object.__setattr__(self, name, value)
        self._check_layout(params)
        previous = getattr(layers, "_shoal_data_parallel", lambda: None)()
        if previous is not None:  # wrapped before (DataParallel or sharded): its hooks go
            previous._detach()
        object.__setattr__(layers, "_shoal_data_parallel", weakref.ref(self))
        self._broadcast_state()
        buckets, owner = plan(params, g.size, int(fuse_grad_size_in_MB * (1 << 20)))
        where = {id(p): (b, i) for b in buckets for i, p in enumerate(b.params)}
        object.__setattr__(self, "_params", params)
        object.__setattr__(self, "_buckets", buckets)
        object.__setattr__(self, "_owner", owner)
        object.__setattr__(self, "_where", where)
        object.__setattr__(self, "_order", list(range(len(buckets))))   # launch order
        me_ref = weakref.ref(self)

        def hook(param):
            model = me_ref()
            if model is not None:
                model._on_grad(param)
        object.__setattr__(self, "_hooks", [p.register_post_accumulate_grad_hook(hook)
                                            for p in params])

    @classmethod
    def from_config(cls, layers: Layer, sharding_configs, *, fuse_grad_size_in_MB: float = 32):
        """Build it from a strategy's `sharding_configs` (ShardingConfig: sharding_degree, stage,
        hybrid_dp) over the world. Without hybrid_dp the degree must be the world size.
        A collective (it builds the groups)."""
        n, d = _api._world().size, sharding_configs.sharding_degree
        if not sharding_configs.hybrid_dp and d != n:
            raise InvalidArgumentError(
                f"sharding_configs.sharding_degree={d} but the world has {n} ranks: set "
                f"sharding_degree={n}, or hybrid_dp=True to run {n}/{d} data-parallel copies of "
                f"the sharding groups")
        group, dp = sharding_groups(d)
        return cls(layers, stage=sharding_configs.stage, group=group, dp_group=dp,
                   fuse_grad_size_in_MB=fuse_grad_size_in_MB)

    def _detach(self) -> None:
        for h in self._hooks:
            h.remove()
        object.__setattr__(self, "_hooks", [])

    # -- setup -----------------------------------------------------------------------
    def _check_layout(self, params) -> None:
        """Every rank checks, with every other, that they shard the same thing the same way
        (all raise together: a rank that raised alone would leave the others hanging)."""
        sig = np.array([self._group.size, self._group.rank, len(params),
                        sum(int(p.data.size) for p in params)], dtype=np.int64)
        for g, same, what in ((self._group, [0, 2, 3], "sharding"), (self._dp, [1, 2, 3], "dp")):
            if g is None:
                continue
            table: list = []
            _api.all_gather(table, sig, g)
            table = np.stack(table)
            if (table[:, same] != table[0, same]).any():
                raise InvalidArgumentError(
                    f"the ranks of the {what} group {g.ranks} disagree on (sharding size, position "
                    f"in it, trainable parameters, elements): {table.tolist()}; build the same "
                    f"model on every rank and the groups with sharding_groups(degree)")

    def _broadcast_state(self) -> None:
        tensors = list(self._layers.parameters()) + [b for _, b in self._layers.named_buffers()]
        for g in (self._dp, self._group):   # dp first: then the sharding group's first rank
            if g is None:                   # holds global rank 0's values when it broadcasts
                continue
            tasks = [_api.broadcast(t, g.ranks[0], g, sync_op=False) for t in tensors]
            for t in tasks:
                t.wait()

    # -- the layer -------------------------------------------------------------------
    def forward(self, *args, **kwargs):
        return self._layers(*args, **kwargs)

    def state_dict(self):
        """The wrapped layer's state dict (every parameter, in full, on every rank)."""
        return self._layers.state_dict()

    def set_state_dict(self, state_dict, strict: bool = True):
        return self._layers.set_state_dict(state_dict, strict)

    load_dict = set_state_dict

    @property
    def stage(self) -> int:
        return self._stage

    def owned_parameters(self) -> list:
        """The trainable parameters this rank owns (updates), in registration order."""
        me = self._group.rank
        return [p for p in self._params if self._owner[id(p)] == me]

    def held_bytes(self) -> dict:
        """{"params", "grads", "optimizer_state"}: bytes this rank holds now (see held_bytes);
        the state is the bound ShardingOptimizer's (0 before one is bound)."""
        return held_bytes(self, self._optimizer())

    @contextlib.contextmanager
    def no_sync(self):
        """Backward passes inside only accumulate locally (in full); the next one outside
        reduces what accumulated."""
        object.__setattr__(self, "_no_sync_depth", self._no_sync_depth + 1)
        try:
            yield
        finally:
            object.__setattr__(self, "_no_sync_depth", self._no_sync_depth - 1)

    # -- gradients ---------------------------------------------------------------------
    def _on_grad(self, param) -> None:
        if self._no_sync_depth or not self._merge_sync:
            return
        pass_id = autograd.backward_pass()
        if pass_id != self._pass_id:
            if self._pass_id is not None:  # the last pass raised before it ended: drop it
                self._reset(wait=True)
            object.__setattr__(self, "_pass_id", pass_id)
            autograd.queue_callback(self._finish_pass)
        bucket, i = self._where[id(param)]
        bucket.ready.add(i)
        if len(bucket.ready) == len(bucket.params):
            self._completed.append(bucket.index)
        while self._next < len(self._buckets):
            nxt = self._buckets[self._order[self._next]]
            if len(nxt.ready) != len(nxt.params):
                break
            self._start(nxt)

    def _start(self, bucket) -> None:
        g = self._group
        if self._stage == 2 and self._next >= _IN_FLIGHT:
            # bound the copies that started collectives hold: wait for the one _IN_FLIGHT back
            self._buckets[self._order[self._next - _IN_FLIGHT]].task.wait()
        xp = backend_of(bucket.params[0].data).xp
        buf = xp.zeros((g.size, bucket.seg), dtype=bucket.dtype)
        for i, p in enumerate(bucket.params):
            grad = p._grad
            if grad is not None:
                if isinstance(grad, SparseGrad):  # dense models: sparse tables belong on servers
                    grad = grad.to_dense()
                r, off = bucket.slots[i]
                buf[r, off:off + bucket.sizes[i]] = grad.reshape(-1)
                buf[r, bucket.flags[i]] = 1   # a parameter no rank has a gradient for keeps None
            p._grad = None   # the reduced gradient (or nothing) replaces it at the pass's end
        if self._stage == 1:
            bucket.buffer = buf
            bucket.task = _api.all_reduce(buf, "sum", g, sync_op=False)
        else:
            bucket.shard = xp.empty(bucket.seg, dtype=bucket.dtype)
            bucket.task = _api.reduce_scatter(bucket.shard, list(buf), "sum", g, sync_op=False)
            bucket.in_flight = int(buf.nbytes)   # the collective's own copy of the segments
        object.__setattr__(self, "_next", self._next + 1)

    def _finish_pass(self) -> None:
        try:
            while self._next < len(self._buckets):
                self._start(self._buckets[self._order[self._next]])
            reduced = []
            for bucket in self._buckets:
                bucket.task.wait()
                bucket.in_flight = 0
                if self._dp is not None:
                    flat = bucket.buffer if self._stage == 1 else bucket.shard
                    reduced.append(_api.all_reduce(flat, "sum", self._dp, sync_op=False))
            for task in reduced:
                task.wait()
            scale = 1.0 / (self._group.size * (1 if self._dp is None else self._dp.size))
            for bucket in self._buckets:
                self._assign(bucket, scale)
            if not self._learned:
                self._learn_order()
        finally:
            self._reset(wait=False)

    def _learn_order(self) -> None:
        """After the first reduced pass: launch buckets from now on in the order their gradients
        completed (the engine's order, which reverse registration only approximates), as the
        group's first rank saw it, so every rank of the group issues the same sequence."""
        seen = list(dict.fromkeys(self._completed))
        order = np.array(seen + [b.index for b in self._buckets if b.index not in seen],
                         dtype=np.int64)
        _api.broadcast(order, self._group.ranks[0], self._group)
        object.__setattr__(self, "_order", order.tolist())
        object.__setattr__(self, "_learned", True)

    def _assign(self, bucket, scale: float) -> None:
        """The averaged gradients of `bucket` into `.grad`: views of the reduced buffer."""
        me = self._group.rank
        flat = bucket.buffer if self._stage == 1 else bucket.shard[None, :]
        flat *= scale
        mine = range(len(bucket.params)) if self._stage == 1 else bucket.owned(me)
        rows = [bucket.slots[i][0] if self._stage == 1 else 0 for i in mine]
        cols = [bucket.flags[i] for i in mine]
        flags = backend_of(flat).to_numpy(flat[rows, cols]) if cols else np.zeros(0)
        for i, row, flag in zip(mine, rows, flags.tolist()):
            p, off = bucket.params[i], bucket.slots[i][1]
            p._grad = flat[row, off:off + bucket.sizes[i]].reshape(p.data.shape) if flag else None

    def _reset(self, *, wait: bool) -> None:
        """Forget the pass in progress (with `wait`, after its started collectives end: every
        rank started the same ones, so the group stays in step)."""
        try:
            if wait:
                for bucket in self._buckets:
                    if bucket.task is not None:
                        bucket.task.wait()
        finally:
            object.__setattr__(self, "_next", 0)
            object.__setattr__(self, "_pass_id", None)
            object.__setattr__(self, "_completed", [])
            for bucket in self._buckets:
                bucket.ready.clear()
                bucket.buffer = bucket.shard = bucket.task = None
                bucket.in_flight = 0

    # -- after the update -----------------------------------------------------------------
    def _gather_params(self) -> None:
        """Every rank's owned parameters to every rank: one all_gather of segments per bucket."""
        g = self._group
        if g.size == 1:
            return
        me, started = g.rank, []
        for bucket in self._buckets:
            xp = backend_of(bucket.params[0].data).xp
            mine = xp.zeros(bucket.seg, dtype=bucket.dtype)
            for i in bucket.owned(me):
                off = bucket.slots[i][1]
                mine[off:off + bucket.sizes[i]] = bucket.params[i].data.reshape(-1)
            out: list = []
            started.append((bucket, out, _api.all_gather(out, mine, g, sync_op=False)))
        for bucket, out, task in started:
            task.wait()
            for i, p in enumerate(bucket.params):
                r, off = bucket.slots[i]
                if r != me:   # in place: optimizers and user code hold p.data
                    p.data[...] = out[r][off:off + bucket.sizes[i]].reshape(p.data.shape)

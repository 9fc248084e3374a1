"""ShardedDataParallel: a data-parallel layer whose gradients (stage 2) are partitioned by owner.

    sg, dg = sharding_groups(2)                     # hybrid: sharding x data parallel
    model = ShardedDataParallel(MyModel(), stage=2, group=sg, dp_group=dg)
    opt = ShardingOptimizer(Adam(1e-3, parameters=model.parameters()), model)
    loss_fn(model(x), y).backward(); opt.step(); opt.clear_grad()

Every trainable parameter is owned by one rank of the sharding group (see `_plan`). Gradients
are fused into buckets laid out as one segment per owner, back to back (no padding): a
parameter's full gradient is copied into its bucket by its gradient hook and dropped there. A
bucket starts its collective as soon as every gradient in it is ready (bucket i only after the
buckets before it, in an order learned on the first pass, so ranks issue the same sequence).
Stage 1 all-reduces the whole bucket and every parameter gets the averaged gradient. Stage 2
keeps only a rank's own segment: a bucket of one owner is reduced to it, equal segments are
reduce-scattered, unequal ones reduced to their owners one by one (through shared memory, all
of them are all-reduced, which is faster there, and the rest dropped). At most `_IN_FLIGHT`
largest buckets' worth are in flight, and a finished one frees its buffer at the next
gradient hook, so a rank holds its shard plus O(bucket). The owned parameters' `.grad` are views of the shard and
the others' are None. With a `dp_group` the result is also averaged over the ranks that hold
the same shard in the other sharding groups.
"""
from __future__ import annotations


import numpy as np

from shoal.collective import _api
from shoal.collective.errors import InvalidArgumentError
from shoal.collective.sharding._memory import held_bytes
from shoal.collective.sharding._plan import plan
from shoal.kernels import backend_of
from shoal.collective._grad_sync import GradSync
from shoal.worker.nn.layer import Layer, LayerWrapper
from shoal.worker.sparse import SparseGrad

_IN_FLIGHT = 2   # stage 2: largest buckets' worth of collectives started, not finalized, at most


def _shared_memory(group) -> bool:
    """Whether `group` all-reduces through shared memory (gloo with every rank on this host).

    There an all_reduce is so much faster than Gloo's TCP reduce and reduce_scatter (4 MB on 2
    ranks: 0.8 ms against 5.3 ms and 4.7 ms) that stage 2 all-reduces each bucket and keeps
    only its own part; elsewhere (TCP across hosts, NCCL) the real reduce to the owner and
    reduce_scatter move half as much, and are used."""
    return bool(getattr(group, "uses_shm", False))


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


class ShardedDataParallel(GradSync, LayerWrapper):
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
                            ("_completed", []), ("_started", []), ("_learned", False)):
            object.__setattr__(self, name, value)
        self._check_layout(params)
        self._take_over(layers)
        self._broadcast_state()
        buckets, owner = plan(params, g.size, int(fuse_grad_size_in_MB * (1 << 20)))
        where = {id(p): (b, i) for b in buckets for i, p in enumerate(b.params)}
        object.__setattr__(self, "_params", params)
        object.__setattr__(self, "_buckets", buckets)
        object.__setattr__(self, "_owner", owner)
        object.__setattr__(self, "_where", where)
        object.__setattr__(self, "_order", list(range(len(buckets))))   # launch order
        self._hook(params)

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

    # -- gradients ---------------------------------------------------------------------
    def _on_grad(self, param) -> None:
        if not self._reducing_pass():
            return
        self._poll()
        bucket, i = self._where[id(param)]
        self._take(bucket, i)
        bucket.ready.add(i)
        if len(bucket.ready) == len(bucket.params):
            self._completed.append(bucket.index)
        while self._next < len(self._buckets):
            nxt = self._buckets[self._order[self._next]]
            if len(nxt.ready) != len(nxt.params):
                break
            self._start(nxt)

    def _take(self, bucket, i: int) -> None:
        """`params[i]`'s gradient into the bucket's buffer (made on the bucket's first one),
        then dropped: the reduced gradient (or nothing) replaces it at the pass's end."""
        p = bucket.params[i]
        if bucket.buffer is None:
            xp = backend_of(p.data).xp
            buf = xp.empty(bucket.length, dtype=bucket.dtype)
            for lo, hi in bucket.tails:   # flags and padding: the parameters get written
                buf[lo:hi] = 0
            bucket.buffer = buf
        lo, grad = bucket.start(i), p._grad
        if grad is None:   # no gradient on this rank: it contributes zeros
            bucket.buffer[lo:lo + bucket.sizes[i]] = 0
            return
        if isinstance(grad, SparseGrad):  # dense models: sparse tables belong on servers
            grad = grad.to_dense()
        bucket.buffer[lo:lo + bucket.sizes[i]] = grad.reshape(-1)
        bucket.buffer[bucket.flag(i)] = 1   # a parameter no rank has a gradient for keeps None
        p._grad = None

    def _start(self, bucket) -> None:
        """Start `bucket`'s collectives (every parameter not yet taken is taken now)."""
        g, me = self._group, self._group.rank
        if self._stage == 2:
            # bound what started collectives hold to _IN_FLIGHT of the largest bucket: finish
            # the oldest until this one fits (small buckets, biases say, cost little room)
            running = [b for b in self._started if not b.done]
            room = _IN_FLIGHT * max(b.length for b in self._buckets) - bucket.length
            while running and sum(b.length for b in running) > room:
                self._finalize(running.pop(0))
        for i in range(len(bucket.params)):
            if i not in bucket.ready:
                self._take(bucket, i)
        buf = bucket.buffer
        if self._stage == 1 or _shared_memory(g):
            bucket.tasks = [_api.all_reduce(buf, "sum", g, sync_op=False)]
        elif bucket.equal:
            bucket.shard = backend_of(buf).xp.empty(bucket.seg, dtype=bucket.dtype)
            bucket.tasks = [_api.reduce_scatter(bucket.shard, list(buf.reshape(g.size, -1)),
                                                "sum", g, sync_op=False)]
            bucket.buffer, bucket.in_flight = None, int(buf.nbytes)   # it stacked its copy
        else:   # segments of different lengths: each reduced to its owner (Paddle's stage 2)
            mine = bucket.segment(me)
            if bucket.lengths[me]:
                bucket.shard = buf if bucket.owner == me else buf[mine].copy()
            for r in range(g.size):
                if bucket.lengths[r]:
                    part = bucket.shard if r == me else buf[bucket.segment(r)]
                    bucket.tasks.append(_api.reduce(part, g.ranks[r], "sum", g, sync_op=False))
            # a non-root's input was copied by its reduce: the buffer is not needed any more
            bucket.buffer = None
            bucket.in_flight = int(buf.nbytes) - (0 if bucket.shard is None else
                                                  int(bucket.shard.nbytes))
        self._started.append(bucket)
        object.__setattr__(self, "_next", self._next + 1)

    def _finalize(self, bucket) -> None:
        """Wait for `bucket`'s collectives; stage 2 keeps only this rank's part of the result."""
        for task in bucket.tasks:
            task.wait()
        bucket.tasks, bucket.in_flight, bucket.done = [], 0, True
        if self._stage == 1 or bucket.buffer is None:
            return
        me = self._group.rank   # all-reduced whole: keep this rank's segment
        if bucket.owner == me:
            bucket.shard = bucket.buffer
        elif bucket.lengths[me]:
            bucket.shard = bucket.buffer[bucket.segment(me)].copy()
        bucket.buffer = None

    def _poll(self) -> None:
        """Finalize the started buckets whose collectives ended (stage 2: frees their buffers)."""
        if self._stage == 2:
            for b in self._started:
                if not b.done and all(t.is_completed() for t in b.tasks):
                    self._finalize(b)

    def _finish_pass(self) -> None:
        try:
            while self._next < len(self._buckets):
                self._start(self._buckets[self._order[self._next]])
            for bucket in self._started:
                if not bucket.done:
                    self._finalize(bucket)
            if self._dp is not None:   # ranks at one position own the same: the same calls
                flats = [b.buffer if self._stage == 1 else b.shard for b in self._buckets]
                reduced = [_api.all_reduce(f, "sum", self._dp, sync_op=False)
                           for f in flats if f is not None]
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
        """The averaged gradients of `bucket` into `.grad`: views of the reduced buffer (stage
        1) or of this rank's shard (stage 2, owned parameters only)."""
        if self._stage == 1:
            flat, mine = bucket.buffer, range(len(bucket.params))
            starts, flags = [bucket.start(i) for i in mine], [bucket.flag(i) for i in mine]
        else:
            flat, mine = bucket.shard, bucket.owned(self._group.rank)
            starts, flags = [bucket.slots[i][1] for i in mine], [bucket.flags[i] for i in mine]
        if flat is None or not mine:
            return
        flat *= scale
        has = backend_of(flat).to_numpy(flat[flags]).tolist()
        for i, lo, flag in zip(mine, starts, has):
            p = bucket.params[i]
            p._grad = flat[lo:lo + bucket.sizes[i]].reshape(p.data.shape) if flag else None

    def _reset(self, *, wait: bool) -> None:
        """Forget the pass in progress (with `wait`, after its started collectives end: every
        rank started the same ones, so the group stays in step)."""
        try:
            if wait:
                for bucket in self._buckets:
                    for task in bucket.tasks:
                        task.wait()
        finally:
            object.__setattr__(self, "_next", 0)
            object.__setattr__(self, "_pass_id", None)
            object.__setattr__(self, "_completed", [])
            object.__setattr__(self, "_started", [])
            for bucket in self._buckets:
                bucket.ready.clear()
                bucket.buffer = bucket.shard = None
                bucket.tasks, bucket.in_flight, bucket.done = [], 0, False

    # -- after the update -----------------------------------------------------------------
    def _gather_params(self) -> None:
        """Every rank's owned parameters to every rank, all collectives started before any is
        waited for: a lone parameter is broadcast by its owner straight from its own array;
        a bucket of equal segments all-gathers them; otherwise each owner broadcasts its
        segment."""
        g = self._group
        if g.size == 1:
            return
        me, started = g.rank, []
        for bucket in self._buckets:
            if len(bucket.params) == 1:
                task = _api.broadcast(bucket.params[0].data, g.ranks[bucket.owner], g,
                                      sync_op=False)
                started.append((bucket, None, task))
                continue
            xp = backend_of(bucket.params[0].data).xp
            mine = xp.empty(bucket.seg, dtype=bucket.dtype)
            for i in bucket.owned(me):
                off = bucket.slots[i][1]
                mine[off:off + bucket.sizes[i]] = bucket.params[i].data.reshape(-1)
            if bucket.equal:
                out: list = []
                started.append((bucket, out, _api.all_gather(out, mine, g, sync_op=False)))
                continue
            out = [mine if r == me else xp.empty(bucket.lengths[r], dtype=bucket.dtype)
                   for r in range(g.size)]
            for r in range(g.size):
                if bucket.lengths[r]:
                    task = _api.broadcast(out[r][:bucket.lengths[r]], g.ranks[r], g,
                                          sync_op=False)
                    started.append((bucket, out, task))
        for bucket, out, task in started:
            task.wait()
        unpacked = set()
        for bucket, out, _ in started:
            if out is None or id(bucket) in unpacked:
                continue
            unpacked.add(id(bucket))
            for i, p in enumerate(bucket.params):
                r, off = bucket.slots[i]
                if r != me:   # in place: optimizers and user code hold p.data
                    p.data[...] = out[r][off:off + bucket.sizes[i]].reshape(p.data.shape)

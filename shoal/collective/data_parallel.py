"""DataParallel: replicas of a layer on every rank, gradients averaged during backward.

    model = DataParallel(MyModel())          # rank 0's parameters are broadcast to every rank
    loss = loss_fn(model(x), y); loss.backward()   # buckets all-reduced as they complete
    opt.step(); opt.clear_grad()

At construction the parameters and buffers are broadcast from the group's first rank, so
replicas never start from different weights. Gradients are fused into buckets of
`fuse_grad_size_in_MB` (parameters in reverse registration order, roughly the order backward
produces them); a bucket is all-reduced asynchronously as soon as every gradient in it is
ready, while backward goes on, and the buckets are always reduced in the same order on every
rank (a bucket is started only after the buckets before it) so ranks never disagree on the
sequence of collectives. At the end of backward the remaining buckets start (a parameter that
got no gradient contributes zeros), every bucket is waited for, and each parameter's `.grad`
becomes the average over ranks: a view of its bucket's flat buffer, which the next backward
reuses only once no `.grad` (or anything else) still refers to it (after clear_grad, say), so a
gradient handed out is never overwritten. `no_sync()` skips all of it for gradient
accumulation: the next backward outside it reduces the accumulated gradients.
`check_every=N` compares a checksum of every parameter across ranks every N forwards and raises
ReplicaDriftError when a replica differs.
"""
from __future__ import annotations

import hashlib
import sys

import numpy as np

from shoal.collective import _api
from shoal.collective.errors import InvalidArgumentError, ReplicaDriftError
from shoal.kernels import backend_of
from shoal.collective._grad_sync import GradSync
from shoal.worker import autograd
from shoal.worker.nn.layer import Layer, LayerWrapper
from shoal.worker.sparse import SparseGrad


class _Bucket:
    def __init__(self, index: int, params: list):
        self.index, self.params = index, params
        self.sizes = [int(p.data.size) for p in params]
        self.dtype = params[0].dtype
        self.ready: set[int] = set()
        self.buffer = None   # the flat gradients (+ one flag each) of the pass in progress
        self.pieces = None   # what its all-reduce reads: the gradients as backward left them
        self.task = None
        self.spare = None    # last pass's buffer, reused once nothing else refers to it

    def take_buffer(self, xp, n: int):
        """A flat array of `n` elements for this pass: last pass's when nothing outside this
        bucket still refers to it (every `.grad` view of it was dropped, e.g. by clear_grad),
        else a new one, so a gradient handed out earlier is never overwritten."""
        spare, self.spare = self.spare, None
        # references: `spare` here and getrefcount's argument; a view (a `.grad`) adds one
        if isinstance(spare, np.ndarray) and sys.getrefcount(spare) <= 2:
            return spare
        return xp.empty(n, dtype=self.dtype)


class DataParallel(GradSync, LayerWrapper):
    """Wrap `layers` for data-parallel training over `group` (the world by default).

    Args:
        layers: the model (a Layer).
        group: the process group (default: the world of init_parallel_env()).
        fuse_grad_size_in_MB: the size of one fused gradient all-reduce (default 32).
        check_every: compare parameter checksums across ranks every N forwards (0: never).

    Raises NotInitializedError before init_parallel_env(), InvalidArgumentError for a bad
    argument. Construction blocks until every rank of the group has built its replica."""

    def __init__(self, layers: Layer, *, group=None, fuse_grad_size_in_MB: float = 32,
                 check_every: int = 0):
        super().__init__()
        if not isinstance(layers, Layer):
            raise InvalidArgumentError(f"DataParallel(layers): expected a Layer, got "
                                       f"{type(layers).__name__}")
        if not fuse_grad_size_in_MB > 0:
            raise InvalidArgumentError(f"fuse_grad_size_in_MB={fuse_grad_size_in_MB}: give a size > 0")
        if int(check_every) < 0:
            raise InvalidArgumentError(f"check_every={check_every}: give 0 (never) or N >= 1")
        self._layers = layers
        object.__setattr__(self, "_group", _api._group(group))
        object.__setattr__(self, "_check_every", int(check_every))
        object.__setattr__(self, "_forwards", 0)
        object.__setattr__(self, "_no_sync_depth", 0)   # inside no_sync() blocks
        object.__setattr__(self, "_merge_sync", True)   # gradient merge: False in micro-steps
        object.__setattr__(self, "_pass_id", None)      # the backward pass being reduced
        object.__setattr__(self, "_next", 0)   # the next bucket to start
        self._take_over(layers)
        self._broadcast_state()
        params = [p for p in layers.parameters() if p.requires_grad]
        object.__setattr__(self, "_buckets", self._bucketize(params, fuse_grad_size_in_MB))
        where = {}
        for b in self._buckets:
            for i, p in enumerate(b.params):
                where[id(p)] = (b, i)
        object.__setattr__(self, "_where", where)
        self._hook(params)

    # -- setup -----------------------------------------------------------------------
    def _broadcast_state(self) -> None:
        root = self._group.ranks[0]
        tensors = list(self._layers.parameters()) + [b for _, b in self._layers.named_buffers()]
        tasks = [_api.broadcast(t, root, self._group, sync_op=False) for t in tensors]
        for t in tasks:
            t.wait()

    @staticmethod
    def _bucketize(params, size_mb) -> list[_Bucket]:
        limit = int(size_mb * (1 << 20))
        buckets, current, used = [], [], 0
        for p in reversed(params):
            nbytes = p.data.size * p.data.itemsize
            if current and (used + nbytes > limit or p.dtype != current[0].dtype or
                            backend_of(p.data) is not backend_of(current[0].data)):
                buckets.append(_Bucket(len(buckets), current))
                current, used = [], 0
            current.append(p)
            used += nbytes
        if current:
            buckets.append(_Bucket(len(buckets), current))
        return buckets

    # -- the layer -------------------------------------------------------------------
    def forward(self, *args, **kwargs):
        # forwards that can train (grad mode, train mode) are the ones every rank runs alike
        if self._check_every and self.training and autograd.is_grad_enabled():
            object.__setattr__(self, "_forwards", self._forwards + 1)
            if self._forwards % self._check_every == 0:
                self.check_replicas()
        return self._layers(*args, **kwargs)

    # -- gradients ---------------------------------------------------------------------
    def _on_grad(self, param) -> None:
        if not self._reducing_pass():
            return
        bucket, i = self._where[id(param)]
        bucket.ready.add(i)
        # the last bucket completes as backward ends: _finish_pass reduces it on this thread
        # (no hand-off to the group's worker thread and back while nothing is left to overlap)
        while self._next < len(self._buckets) - 1 and \
                len(self._buckets[self._next].ready) == len(self._buckets[self._next].params):
            self._start(self._buckets[self._next])

    def _start(self, bucket: _Bucket, sync: bool = False) -> None:
        """Start the all-reduce of the bucket's gradients, averaged, into its flat buffer: read
        where backward left them (through shared memory: no copy into the bucket first)."""
        xp = backend_of(bucket.params[0].data).xp
        k = len(bucket.params)
        flat = bucket.take_buffer(xp, sum(bucket.sizes) + k)
        # one flag per parameter rides along: a parameter no rank has a gradient for keeps None
        flags = xp.zeros(k, dtype=bucket.dtype)
        pieces = []
        for i, (p, n) in enumerate(zip(bucket.params, bucket.sizes)):
            g = p._grad
            if g is None:
                g = xp.zeros(n, dtype=bucket.dtype)
            else:
                if isinstance(g, SparseGrad):  # dense models: sparse tables belong on servers
                    g = g.to_dense()
                flags[i] = 1
            pieces.append(g.reshape(-1))  # backward never writes a gradient it handed out
        pieces.append(flags)
        bucket.buffer, bucket.pieces = flat, pieces
        bucket.task = _api.all_reduce_into(pieces, flat, self._group, scale=1.0 / self._group.size,
                                           sync_op=sync)
        object.__setattr__(self, "_next", self._next + 1)

    def _finish_pass(self) -> None:
        try:
            while self._next < len(self._buckets):
                self._start(self._buckets[self._next], sync=self._next == len(self._buckets) - 1)
            for bucket in self._buckets:
                if bucket.task is not None:  # None: reduced synchronously
                    bucket.task.wait()
                flat, off = bucket.buffer, 0
                flags = flat[-len(bucket.params):]
                for p, n, flag in zip(bucket.params, bucket.sizes, flags.tolist()):
                    p._grad = flat[off:off + n].reshape(p.data.shape) if flag else None
                    off += n
        finally:
            self._reset(wait=False)

    def _reset(self, *, wait: bool) -> None:
        """Forget the pass in progress (with `wait`, after its started all-reduces end: every
        rank started the same ones, so the group stays in step)."""
        try:
            if wait:
                for bucket in self._buckets:
                    if bucket.task is not None:
                        bucket.task.wait()
        finally:
            object.__setattr__(self, "_next", 0)
            object.__setattr__(self, "_pass_id", None)
            for bucket in self._buckets:
                bucket.ready.clear()
                if bucket.buffer is not None:  # the `.grad`s may be views of it: see take_buffer
                    bucket.spare = bucket.buffer
                bucket.buffer = bucket.task = bucket.pieces = None

    # -- drift -------------------------------------------------------------------------
    def check_replicas(self) -> None:
        """Raise ReplicaDriftError if any rank's parameters differ from the group's first rank.

        A collective: every rank of the group must call it at the same point."""
        named = list(self._layers.named_parameters())
        sums = np.empty(len(named), dtype=np.int64)
        for i, (_, p) in enumerate(named):
            host = np.ascontiguousarray(backend_of(p.data).to_numpy(p.data))
            sums[i] = np.frombuffer(hashlib.blake2b(host.tobytes(), digest_size=8).digest(),
                                    np.int64)[0]
        gathered: list = []
        _api.all_gather(gathered, sums, self._group)
        table = np.stack(gathered)
        differ = table != table[0]
        if differ.any():
            ranks = [self._group.ranks[r] for r in np.flatnonzero(differ.any(axis=1))]
            names = [named[i][0] for i in np.flatnonzero(differ.any(axis=0))][:5]
            raise ReplicaDriftError(
                f"data-parallel replicas drifted: rank(s) {ranks} hold parameters that differ from "
                f"rank {self._group.ranks[0]}'s (first of them: {names}); something updated one "
                f"replica alone (an optimizer step outside DataParallel, a non-deterministic op, "
                f"or different data in a parameter-changing layer)")


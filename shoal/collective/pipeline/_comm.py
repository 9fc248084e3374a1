"""The pipeline's communication: the links to the neighbouring stages (asynchronous sends, at
most a few in flight; receives posted ahead), the per-batch header (dtype, shape) of the
activations, a broadcast of an array of any shape, and the data-parallel gradient average fused
into one buffer per dtype.

A link is one direction to one neighbour over one group: an `Outbox` only sends, an `Inbox` only
receives, so the two ends issue the same messages in the same order and a group never holds a
send and a receive of the other direction behind each other (when each direction has its own
group: `Links`)."""
from __future__ import annotations

import collections
import dataclasses

import numpy as np

from shoal.collective import _api
from shoal.collective.errors import InvalidArgumentError
from shoal.kernels import backend_of, default_backend
from shoal.worker.sparse import SparseGrad

_MAX_NDIM = 8
_HEADER = 2 + _MAX_NDIM
_CODES = tuple(np.dtype(d) for d in ("float32", "float64", "float16", "int64", "int32", "int8",
                                      "uint8"))
SENDS_IN_FLIGHT = 2   # per link: a third send first waits for the oldest to be taken


def _header(array, what: str) -> np.ndarray:
    if array.dtype not in _CODES:
        raise InvalidArgumentError(f"{what}: dtype {array.dtype} cannot cross a pipeline stage; "
                                   f"use one of {[str(d) for d in _CODES]} (cast it in the layer)")
    if array.ndim > _MAX_NDIM:
        raise InvalidArgumentError(f"{what}: {array.ndim} dimensions; at most {_MAX_NDIM} cross "
                                   f"a pipeline stage (reshape it in the layer)")
    head = np.zeros(_HEADER, np.int64)
    head[0], head[1] = _CODES.index(array.dtype), array.ndim
    head[2:2 + array.ndim] = array.shape
    return head


def _describe(head: np.ndarray) -> str:
    ndim = int(head[1])
    return f"{_CODES[int(head[0])]}{[int(d) for d in head[2:2 + ndim]]}"


def _empty_from(head: np.ndarray, xp):
    ndim = int(head[1])
    return xp.empty(tuple(int(d) for d in head[2:2 + ndim]), dtype=_CODES[int(head[0])])


@dataclasses.dataclass(frozen=True)
class Links:
    """The groups a stage talks to its neighbours through, each holding exactly this rank and
    one neighbour: activations come in over `fwd_in` and go out over `fwd_out`, gradients come
    in over `bwd_in` and go out over `bwd_out` (None at the ends of the pipeline)."""
    fwd_in: object = None
    fwd_out: object = None
    bwd_in: object = None
    bwd_out: object = None


def build_links(pipelines: list[list[int]], timeout: float | None = None) -> list[tuple]:
    """Two groups (forward, backward) per pair of adjacent stages of every pipeline (lists of
    global ranks in stage order), made with new_group: a collective over the world, so every
    rank calls it with the same `pipelines`, in the same place. Returns [(fwd, bwd)] per pair,
    in the order (pipeline, stage); a rank outside a pair gets new_group's refusing stand-ins."""
    return [(_api.new_group([ranks[s], ranks[s + 1]], timeout=timeout),
             _api.new_group([ranks[s], ranks[s + 1]], timeout=timeout))
            for ranks in pipelines for s in range(len(ranks) - 1)]


class Outbox:
    """Sends to global rank `dst` over `group` without blocking the caller: at most `bound`
    sends in flight (the next waits for the oldest). Each array is kept referenced until its
    send is done; the caller must not modify it before `drain()` (or a later send) returned.
    A send's failure surfaces in the call that waits for it."""

    def __init__(self, group, dst: int, bound: int = SENDS_IN_FLIGHT):
        self.group, self.dst, self._bound = group, dst, bound
        self._pending: collections.deque = collections.deque()

    def send(self, array) -> None:
        while len(self._pending) >= self._bound:
            self._pending.popleft()[0].wait()
        self._pending.append((_api.send(array, self.dst, self.group, sync_op=False), array))

    def drain(self) -> None:
        """Block until every send issued is done (its error raised if it failed)."""
        while self._pending:
            self._pending[0][0].wait()
            self._pending.popleft()


class Inbox:
    """Receives from global rank `src` over `group` into buffers posted ahead, first in first
    out: `post(buffer)` starts a receive, `take()` waits for the oldest and returns its buffer."""

    def __init__(self, group, src: int):
        self.group, self.src = group, src
        self._posted: collections.deque = collections.deque()

    def __len__(self) -> int:
        return len(self._posted)

    def post(self, buffer) -> None:
        self._posted.append((_api.recv(buffer, self.src, self.group, sync_op=False), buffer))

    def oldest_arrived(self) -> bool:
        return bool(self._posted) and self._posted[0][0].is_completed()

    def take(self):
        task, buffer = self._posted[0]
        task.wait()
        self._posted.popleft()
        return buffer


class ActivationSender:
    """An Outbox for activations. Per batch, the header (dtype, shape) goes before the batch's
    first activation; every later activation of the batch must match it. The receiver guesses
    that a batch repeats the last one's header and posts the first activation's receive with
    it at once: when the header changed, a filler of the last header's shape goes between the
    header and the activation, to fill that guess (both ends follow the same rule)."""

    def __init__(self, outbox: Outbox, what: str):
        self.outbox, self.what = outbox, what
        self._head: np.ndarray | None = None   # this batch's
        self._last: np.ndarray | None = None   # the last batch's (what the receiver guesses)

    def begin_batch(self) -> None:
        self._head = None

    def send(self, array, micro_batch: int) -> None:
        """Send micro-batch `micro_batch`'s activation (asynchronously, see Outbox); raises
        InvalidArgumentError (nothing sent) when it does not match the batch's header."""
        head = _header(array, self.what)
        if self._head is None:
            self.outbox.send(head)
            if self._last is not None and not np.array_equal(head, self._last):
                self.outbox.send(_empty_from(self._last, default_backend().xp))
            self._head = self._last = head
        elif not np.array_equal(head, self._head):
            raise InvalidArgumentError(
                f"{self.what} for micro-batch {micro_batch} is {_describe(head)} but this "
                f"batch's first was {_describe(self._head)}; a stage must return the same "
                f"dtype and shape for every micro-batch of a batch")
        self.outbox.send(array)


class ActivationReceiver:
    """An Inbox for what an ActivationSender sends. The batch's header is received first
    (posted by `begin_batch(ahead=True)`, else by the first `take`), with the first
    activation's receive guessed from the last batch's header; once the header is in,
    `post()` posts further activations ahead, in buffers of its shape."""

    def __init__(self, inbox: Inbox):
        self.inbox = inbox
        self._head: np.ndarray | None = None   # this batch's, once in
        self._last: np.ndarray | None = None   # the last batch's
        self._head_posted = self._guess = False
        self._spare = 0   # a guessed receive that proved right and post() has not counted yet

    def begin_batch(self, ahead: bool) -> None:
        """Forget the batch's header; with `ahead`, post the receive of this batch's now."""
        assert len(self.inbox) == 0, "an earlier batch left receives posted"
        self._head, self._head_posted, self._guess, self._spare = None, False, False, 0
        if ahead:
            self._post_head()

    def _post_head(self) -> None:
        self.inbox.post(np.empty(_HEADER, np.int64))
        self._head_posted = True
        if self._last is not None:
            self.inbox.post(_empty_from(self._last, default_backend().xp))
            self._guess = True

    def _settle(self, block: bool) -> bool:
        """Whether the header is known (taking it when it has arrived, or with `block`)."""
        if self._head is None:
            if not self._head_posted:
                if not block:
                    return False
                self._post_head()
            if not (block or self.inbox.oldest_arrived()):
                return False
            head = self.inbox.take()
            self._head_posted = False
            if self._guess:
                self._guess = False
                if np.array_equal(head, self._last):
                    self._spare = 1
                else:
                    self.inbox.take()   # the sender's filler for the wrong guess
            self._head = self._last = head
        return True

    def posted(self) -> int:
        """Activation receives posted ahead and counted by post()."""
        return len(self.inbox) - self._head_posted - self._guess - self._spare

    def post(self, block: bool = False) -> bool:
        """Post one activation receive; False (nothing posted) while the header is not in."""
        if not self._settle(block):
            return False
        if self._spare:
            self._spare = 0
        else:
            self.inbox.post(_empty_from(self._head, default_backend().xp))
        return True

    def take(self):
        """The next activation (posting its receive first when it was not posted ahead)."""
        if self.posted() == 0:
            self.post(block=True)
        return self.inbox.take()


def broadcast_array(array, src: int, group, what: str):
    """`array` (writable, contiguous) of global rank `src` on every rank of `group` (the
    others pass None and get a new array)."""
    head = _header(array, what) if array is not None else np.empty(_HEADER, np.int64)
    _api.broadcast(head, src, group)
    out = array if array is not None else _empty_from(head, default_backend().xp)
    _api.broadcast(out, src, group)
    return out


def average_grads(params, group) -> None:
    """Every parameter's gradient averaged over `group`: one all-reduce per (backend, dtype),
    in the order the dtypes first appear (the same on every rank of a stage). A parameter no
    rank has a gradient for keeps None (a flag per parameter rides in its buffer)."""
    buckets: dict = {}
    for p in params:
        buckets.setdefault((backend_of(p.data).name, np.dtype(p.dtype)), []).append(p)
    for (_, dtype), ps in buckets.items():
        xp = backend_of(ps[0].data).xp
        has = xp.zeros(len(ps), dtype=dtype)
        parts = []
        for i, p in enumerate(ps):
            g = p._grad
            if g is None:
                g = xp.zeros(p.data.shape, dtype=dtype)
            else:
                has[i] = 1
                g = g.to_dense() if isinstance(g, SparseGrad) else g
            parts.append(g.reshape(-1))
        flat = xp.concatenate(parts + [has])
        _api.all_reduce(flat, "sum", group)
        flags = flat[-len(ps):].tolist()
        flat *= 1.0 / group.size
        off = 0
        for p, flag in zip(ps, flags):
            n = int(p.data.size)
            p._grad = flat[off:off + n].reshape(p.data.shape) if flag else None
            off += n

"""Sparse embedding layers whose tables live outside the worker (on parameter servers).

The seam between worker/ and ps/ (DESIGN.md, "the sparse seam"): a layer
holds no weights; it asks a `SparseBackend` for the rows of its batch's keys
and hands the backend the gradient rows during backward. fleet injects the
backend (`bind_sparse_backend(model, backend)`, done by `fleet.init_worker()`
or by local mode); worker/ never imports ps/.

Keys are uint64 feature ids. A forward pulls the batch's unique keys once per
call; backward turns the output gradient into (unique keys, gradient rows) —
never a vocabulary-sized array — plus the CTR statistics the accessor needs:
one show per occurrence and, when the caller passes `labels`, one click per
occurrence of a positive sample.
"""
from __future__ import annotations

import copy
from typing import Protocol, runtime_checkable

import numpy as np

from shoal.kernels import backend_of, get_backend
from shoal.worker.autograd import Function, is_grad_enabled
from shoal.worker.data.batch import is_unit_offsets
from shoal.worker.errors import DTypeError, EngineError, ShapeError
from shoal.worker.nn.layer import Layer
from shoal.worker.tensor import Tensor


@runtime_checkable
class SparseBackend(Protocol):
    """What a sparse layer needs from whoever holds its table (ps/'s communicator).

    `pull` returns float32 rows [len(keys), dim] in the order of `keys` (the
    layer passes unique keys). With `training=False` it is read-only: it
    creates no row and changes no statistic. `push` hands over gradient rows
    [len(keys), dim] with float32 shows and clicks [len(keys)]; it may return
    before they are applied (the communicator's mode decides).
    """

    def pull(self, table: str, keys: np.ndarray, *, training: bool) -> np.ndarray: ...

    def push(self, table: str, keys: np.ndarray, grads: np.ndarray, *, shows: np.ndarray,
             clicks: np.ndarray) -> None: ...


class NoSparseBackendError(EngineError):
    """A sparse layer ran before any backend was bound to it."""


class _Pool(Function):
    """Gather rows of the pulled unique-key block and pool them into bags.

    forward: out[bag] = sum_j scale_j * rows[inverse_j] over the occurrences j of a bag.
    backward: the rows' gradient is the segment sum over `inverse` of the
    occurrences' gradients; it is handed to `on_grad` (the push) and not
    accumulated anywhere on the worker.
    """

    def forward(self, rows, *, inverse, bag, scale, n_bags, direct, on_grad):
        self.inverse, self.bag, self.scale, self.on_grad = inverse, bag, scale, on_grad
        self.n_rows, self.direct = rows.shape[0], direct
        be = backend_of(rows)
        if direct:  # one occurrence per bag, already in bag order: a plain gather
            return be.gather_rows(rows, inverse)
        out = be.xp.zeros((n_bags, rows.shape[1]), rows.dtype)
        be.gather_add_rows_(out, bag, rows, inverse, scale)
        return out

    def backward(self, g):
        be = backend_of(g)
        g = be.xp.ascontiguousarray(g)
        grad_rows = be.xp.zeros((self.n_rows, g.shape[1]), g.dtype)
        be.gather_add_rows_(grad_rows, self.inverse, g, None if self.direct else self.bag, self.scale)
        self.on_grad(grad_rows)
        return None


def _ragged(x, where: str) -> tuple[np.ndarray, np.ndarray]:
    """(values uint64 [nnz], offsets int64 [B+1]) from a Ragged-like or a (values, offsets) pair."""
    if hasattr(x, "values") and hasattr(x, "offsets"):
        values, offsets = x.values, x.offsets
    elif isinstance(x, tuple) and len(x) == 2:
        values, offsets = x
    else:
        raise DTypeError(f"{where}: expected a Ragged slot (values, offsets), got {type(x).__name__}")
    values, offsets = np.asarray(values), np.asarray(offsets)
    if values.dtype != np.uint64 or values.ndim != 1:
        raise DTypeError(f"{where}: feature ids must be a 1-D uint64 array, got {values.dtype} "
                         f"{list(values.shape)}")
    if offsets.dtype == np.int64 and offsets.ndim == 1 and len(offsets) == len(values) + 1 \
            and is_unit_offsets(offsets):
        return values, offsets  # the common single-id slot (shared offsets: checked in O(1))
    if (offsets.ndim != 1 or offsets.dtype.kind not in "iu" or len(offsets) < 1 or offsets[0] != 0
            or offsets[-1] != len(values) or (np.diff(offsets) < 0).any()):
        raise ShapeError(f"{where}: offsets must be a non-decreasing int array from 0 to "
                         f"len(values)={len(values)}, got {offsets[:5]}... (length {len(offsets)})")
    return values, offsets.astype(np.int64, copy=False)


class _SparseLayer(Layer):
    """What SparseEmbedding and EmbeddingBag share: the table, the backend, the pull and the push."""

    def __init__(self, table: str, dim: int):
        super().__init__()
        if not isinstance(table, str) or not table or "/" in table:
            raise ValueError(f"{type(self).__name__}: table={table!r} must be a non-empty name "
                             f"without '/'")
        if not isinstance(dim, int) or isinstance(dim, bool) or dim < 1:
            raise ValueError(f"{type(self).__name__}({table!r}): dim={dim!r} must be a positive int")
        self.table, self.dim = table, dim
        self.sparse_backend: SparseBackend | None = None
        self._be = get_backend("numpy")  # keys and pulled rows are host arrays

    def __deepcopy__(self, memo):
        # a copy talks to the same tables: the backend (sockets, threads) is shared, not copied
        memo[id(self.sparse_backend)] = self.sparse_backend
        new = type(self).__new__(type(self))
        memo[id(self)] = new
        for k, v in vars(self).items():
            object.__setattr__(new, k, copy.deepcopy(v, memo))
        return new

    def extra_repr(self) -> str:
        return f"table={self.table!r}, dim={self.dim}"

    def _pusher(self, backend, uniq, inverse, occurrence_labels):
        """The push of this forward's gradient rows, with one show per occurrence and a click per
        occurrence in a positive sample."""
        shows = np.bincount(inverse, minlength=len(uniq)).astype(np.float32)
        clicks = (np.zeros(len(uniq), np.float32) if occurrence_labels is None else
                  np.bincount(inverse, weights=occurrence_labels, minlength=len(uniq)).astype(np.float32))
        table = self.table
        return lambda grad_rows: backend.push(table, uniq, grad_rows, shows=shows, clicks=clicks)

    def _lookup(self, keys: np.ndarray, bag: np.ndarray, n_bags: int, scale, direct: bool,
                occurrence_labels, deduped=None) -> Tensor:
        backend = self.sparse_backend
        if backend is None:
            raise NoSparseBackendError(
                f"{type(self).__name__}({self.table!r}) has no sparse backend: call "
                f"fleet.init_worker() (or fleet.init() in local mode) before the first forward")
        training = self.training and is_grad_enabled()
        uniq, inverse = deduped if deduped is not None else self._be.unique_inverse(keys)
        rows = np.asarray(backend.pull(self.table, uniq, training=training), dtype=np.float32)
        if rows.shape != (len(uniq), self.dim):
            raise ShapeError(f"{type(self).__name__}({self.table!r}): the backend returned rows "
                             f"{list(rows.shape)} for {len(uniq)} keys of dim {self.dim}")
        block = Tensor(rows, requires_grad=training)
        inverse = inverse.reshape(-1)
        on_grad = self._pusher(backend, uniq, inverse, occurrence_labels) if training else None
        return _Pool.apply(block, inverse=inverse, bag=bag, scale=scale, n_bags=n_bags,
                           direct=direct, on_grad=on_grad)


def _labels(labels, n: int, where: str):
    if labels is None:
        return None
    lab = np.asarray(labels.numpy() if isinstance(labels, Tensor) else labels, np.float64).reshape(-1)
    if lab.shape != (n,):
        raise ShapeError(f"{where}: labels {list(np.shape(labels))} do not give one label per "
                         f"sample of {n}")
    return lab


class SparseEmbedding(_SparseLayer):
    """One row per id: `SparseEmbedding("emb", 8)(ids)` maps uint64 ids [*shape] to [*shape, 8].

    Args:
        table: the sparse table's name (several layers may share one).
        dim: the row width; the table's spec uses it.

    forward(ids, labels=None): `labels` [B] (the first axis of `ids` is the
    batch) make each occurrence of a positive sample count as a click.
    Eval mode (or no_grad) pulls read-only and pushes nothing.
    """

    def forward(self, ids, labels=None) -> Tensor:
        ids = np.asarray(ids.numpy() if isinstance(ids, Tensor) else ids)
        if ids.dtype != np.uint64:
            raise DTypeError(f"SparseEmbedding({self.table!r}): ids must be uint64 feature ids, "
                             f"got {ids.dtype}")
        flat = ids.reshape(-1)
        occ_labels = None
        if labels is not None:
            if ids.ndim == 0:
                raise ShapeError(f"SparseEmbedding({self.table!r}): labels need ids with a batch axis")
            per_sample = ids.size // max(ids.shape[0], 1)
            occ_labels = np.repeat(_labels(labels, ids.shape[0], f"SparseEmbedding({self.table!r})"),
                                   per_sample)
        out = self._lookup(flat, np.arange(len(flat)), len(flat), None, True, occ_labels)
        return out.reshape(list(ids.shape) + [self.dim])


_POOLINGS = ("sum", "mean", "sqrtn")


class EmbeddingBag(_SparseLayer):
    """Pooled rows of multi-hot ragged slots (Paddle's sequence pooling over a sparse slot).

    Args:
        table: the sparse table's name.
        dim: the row width.
        pooling: 'sum', 'mean' (divide by the bag's length) or 'sqrtn'
            (divide by its square root). An empty bag outputs zeros.

    forward(slots, labels=None): `slots` is one Ragged (values uint64 [nnz],
    offsets int64 [B+1]) -> [B, dim], or a list of S Ragged slots of the same
    batch sharing this table -> [B, S, dim], pulled in one request.
    """

    def __init__(self, table: str, dim: int, pooling: str = "sum"):
        super().__init__(table, dim)
        if pooling not in _POOLINGS:
            raise ValueError(f"EmbeddingBag({table!r}): pooling={pooling!r}; choose one of "
                             f"{list(_POOLINGS)}")
        self.pooling = pooling
        self._dedup_cache: list = []  # (slots, prepared, deduped) of unique_keys, for the forward

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, pooling={self.pooling!r}"

    def _prepare(self, parts: list):
        """(keys, bag, n, s, direct, scale, rows_of) of the occurrences in `parts`."""
        where = f"EmbeddingBag({self.table!r})"
        ragged = [_ragged(p, f"{where} slot {i}") for i, p in enumerate(parts)]
        n = len(ragged[0][1]) - 1
        if any(len(off) - 1 != n for _, off in ragged):
            raise ShapeError(f"{where}: the slots hold different batch sizes "
                             f"{[len(off) - 1 for _, off in ragged]}")
        s = len(ragged)
        if all(len(v) == n and is_unit_offsets(off) for v, off in ragged):
            # one id per bag: keys in bag order ([B, S] row-major) and pooling is a plain gather
            keys = np.stack([v for v, _ in ragged], axis=1).reshape(-1)
            bag = np.arange(n * s)
            return keys, bag, n, s, True, None, bag // s
        lengths = np.stack([np.diff(off) for _, off in ragged], axis=1)  # [B, S]
        keys = np.concatenate([v for v, _ in ragged])
        rows_of = np.concatenate([np.repeat(np.arange(n), lengths[:, i]) for i in range(s)])
        slot_of = np.repeat(np.arange(s), [len(v) for v, _ in ragged])
        bag = rows_of * s + slot_of
        scale = None
        if self.pooling != "sum":
            per_bag = lengths.reshape(-1).astype(np.float32)[bag]
            scale = (1.0 / per_bag if self.pooling == "mean" else 1.0 / np.sqrt(per_bag)).astype(np.float32)
        return keys, bag, n, s, False, scale, rows_of

    def _parts(self, slots) -> tuple[list, bool]:
        """(the slots as a list, whether one slot was given rather than a list of them)."""
        single = not isinstance(slots, (list, tuple)) or (
            isinstance(slots, tuple) and len(slots) == 2 and isinstance(slots[0], np.ndarray))
        parts = [slots] if single else list(slots)
        if not parts:
            raise ShapeError(f"EmbeddingBag({self.table!r}): got an empty list of slots")
        return parts, single

    def _deduped(self, parts: list):
        """(_prepare's result, (unique keys, inverse)) for `parts`. A prefetching loader asks for
        the next batch's keys before its forward runs: the work done then is kept (for the last
        two slot lists, recognised by identity) so the forward does not do it again."""
        cache = self._dedup_cache
        for entry in cache:
            if len(entry[0]) == len(parts) and all(a is b for a, b in zip(entry[0], parts)):
                cache.remove(entry)
                return entry[1], entry[2]
        prepared = self._prepare(parts)
        return prepared, self._be.unique_inverse(prepared[0])

    def forward(self, slots, labels=None) -> Tensor:
        parts, single = self._parts(slots)
        self.last_inputs = parts  # lets a prefetching loader learn which slots feed this table
        (keys, bag, n, s, direct, scale, rows_of), deduped = self._deduped(parts)
        occ_labels = None if labels is None else \
            _labels(labels, n, f"EmbeddingBag({self.table!r})")[rows_of]
        out = self._lookup(keys, bag, n * s, scale, direct, occ_labels, deduped)
        return out if single else out.reshape([n, s, self.dim])

    def unique_keys(self, slots) -> np.ndarray:
        """The unique keys a forward over `slots` pulls, in its order (what a prefetch asks for)."""
        parts = self._parts(slots)[0]
        prepared, deduped = self._deduped(parts)
        cache = self._dedup_cache
        cache.append((parts, prepared, deduped))
        del cache[:-2]
        return deduped[0]


def sparse_layers(model: Layer) -> list[_SparseLayer]:
    """Every SparseEmbedding / EmbeddingBag in `model` (itself included), in registration order."""
    found = [model] if isinstance(model, _SparseLayer) else []
    return found + [m for m in model.sublayers() if isinstance(m, _SparseLayer)]


def bind_sparse_backend(model: Layer, backend: SparseBackend | None) -> list[_SparseLayer]:
    """Point every sparse layer of `model` at `backend` (None unbinds); returns those layers."""
    if backend is not None and not isinstance(backend, SparseBackend):
        raise TypeError(f"bind_sparse_backend: {type(backend).__name__} has no pull/push methods")
    layers = sparse_layers(model)
    for layer in layers:
        layer.sparse_backend = backend
    return layers


__all__ = ["SparseBackend", "SparseEmbedding", "EmbeddingBag", "sparse_layers",
           "bind_sparse_backend", "NoSparseBackendError"]

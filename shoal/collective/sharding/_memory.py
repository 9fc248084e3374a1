"""held_bytes: the memory a rank holds for training, counted once per real allocation."""
from __future__ import annotations

import numpy as np

from shoal.worker.sparse import SparseGrad


def _root(a):
    """The array that owns `a`'s memory (a view counts as the memory it looks into)."""
    while True:
        base = getattr(a, "base", None)
        if base is None or not hasattr(base, "nbytes") or not hasattr(base, "dtype"):
            return a
        a = base


def _nbytes(arrays) -> int:
    seen: dict[int, int] = {}
    for a in arrays:
        if a is None:
            continue
        if isinstance(a, SparseGrad):
            parts = [a.ids, a.rows]
        else:
            parts = [a]
        for part in parts:
            if hasattr(part, "nbytes") and hasattr(part, "dtype"):
                root = _root(part)
                seen[id(root)] = int(root.nbytes)
    return sum(seen.values())


def held_bytes(model, optimizer=None) -> dict:
    """{"params": int, "grads": int, "optimizer_state": int}: the bytes this rank holds now.

    `model` is a Layer, a DataParallel or a ShardedDataParallel; `optimizer` any shoal optimizer,
    possibly wrapped (ShardingOptimizer, TransformedOptimizer), or None. Parameters: their
    arrays. Gradients: every parameter's `.grad` plus the fused buckets of a backward pass in
    progress (DataParallel's all-reduce buffers; sharding's buffers, reduced shards and the
    copies its started collectives hold). Optimizer state: the inner optimizer's state arrays
    (moments, master weights). A view is counted as the allocation it looks into, once.
    Cheap enough to call from gradient hooks; not thread-safe against a running step."""
    params = [p.data for p in model.parameters()]
    grads, in_flight = [p._grad for p in model.parameters()], 0
    for bucket in getattr(model, "_buckets", ()):
        grads += [getattr(bucket, "buffer", None), getattr(bucket, "shard", None)]
        if hasattr(bucket, "in_flight_bytes"):
            in_flight += bucket.in_flight_bytes()
    state = []
    if optimizer is not None:
        for st in getattr(optimizer, "_state", {}).values():
            state += [v for v in st.values()
                      if hasattr(v, "nbytes") and not isinstance(v, (int, float, np.generic))]
    return {"params": _nbytes(params), "grads": _nbytes(grads) + in_flight,
            "optimizer_state": _nbytes(state)}

"""The pipeline's communication: arrays sent with a header (dtype, shape), a broadcast of an
array of any shape, and the data-parallel gradient average fused into one buffer per dtype."""
from __future__ import annotations

import numpy as np

from shoal.collective import _api
from shoal.collective.errors import InvalidArgumentError
from shoal.kernels import backend_of, default_backend
from shoal.worker.sparse import SparseGrad

_MAX_NDIM = 8
_CODES = tuple(np.dtype(d) for d in ("float32", "float64", "float16", "int64", "int32", "int8",
                                      "uint8"))


def _header(array, what: str) -> np.ndarray:
    if array.dtype not in _CODES:
        raise InvalidArgumentError(f"{what}: dtype {array.dtype} cannot cross a pipeline stage; "
                                   f"use one of {[str(d) for d in _CODES]} (cast it in the layer)")
    if array.ndim > _MAX_NDIM:
        raise InvalidArgumentError(f"{what}: {array.ndim} dimensions; at most {_MAX_NDIM} cross "
                                   f"a pipeline stage (reshape it in the layer)")
    head = np.zeros(2 + _MAX_NDIM, np.int64)
    head[0], head[1] = _CODES.index(array.dtype), array.ndim
    head[2:2 + array.ndim] = array.shape
    return head


def _empty_from(head: np.ndarray, xp):
    ndim = int(head[1])
    return xp.empty(tuple(int(d) for d in head[2:2 + ndim]), dtype=_CODES[int(head[0])])


def send_array(array, dst: int, group, what: str) -> None:
    """Send the header (dtype, shape) then `array` to global rank `dst`; blocks until taken."""
    _api.send(_header(array, what), dst, group)
    _api.send(array, dst, group)


def recv_array(src: int, group, xp=None):
    """Receive what `send_array` sent from global rank `src` (a new array of `xp`, by default
    the default backend's)."""
    head = np.empty(2 + _MAX_NDIM, np.int64)
    _api.recv(head, src, group)
    out = _empty_from(head, xp or default_backend().xp)
    _api.recv(out, src, group)
    return out


def broadcast_array(array, src: int, group, what: str):
    """`array` (writable, contiguous) of global rank `src` on every rank of `group` (the
    others pass None and get a new array)."""
    head = _header(array, what) if array is not None else np.empty(2 + _MAX_NDIM, np.int64)
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

"""The numpy backend: always there, so everything runs without a GPU.

Optimizer updates of float32 C-contiguous arrays (every engine parameter and
dense PS table) run as fused native loops (csrc/fused.cpp): one read and one
write per operand instead of numpy's ~11 passes with temporaries. Other
dtypes and layouts take the generic numpy bodies of `Backend`.
"""
from __future__ import annotations

import numpy as np

from shoal.kernels._backend import Backend

try:
    from shoal.kernels import _fused
except ImportError as e:  # pragma: no cover - a broken install, not a mode
    raise ImportError("shoal.kernels._fused is not built: install Shoal with `pip install -e .` "
                      "(it compiles csrc/ with pybind11)") from e

_F32 = np.dtype(np.float32)
_I64 = np.dtype(np.int64)
_U64 = np.dtype(np.uint64)


def _fusable(*arrays) -> bool:
    shape = arrays[0].shape
    return all(type(a) is np.ndarray and a.dtype == _F32 and a.flags.c_contiguous
               and a.shape == shape for a in arrays) and arrays[0].flags.writeable


class NumpyBackend(Backend):
    name = "numpy"

    @classmethod
    def available(cls) -> bool:
        return True

    @property
    def xp(self):
        return np

    def array_types(self) -> tuple[type, ...]:
        return (np.ndarray,)

    def to_numpy(self, a) -> np.ndarray:
        return np.asarray(a)

    def _make_rng(self, seed):
        return np.random.default_rng(seed)

    def ctr_pull(self, values, rows, dim, unseen_col=-1):
        out = np.empty((len(rows), dim), np.float32)
        _fused.ctr_pull(values, np.ascontiguousarray(rows, np.int64), out, None, dim, unseen_col)
        return out

    def ctr_push(self, values, rows, grads, shows, clicks, rule, dim, state_cols, stat_cols, lr,
                 g0, lo, hi, nonclk, clk, scale_by_show, beta1, beta2, eps):
        _fused.ctr_push(values, np.ascontiguousarray(rows, np.int64),
                        np.ascontiguousarray(grads, np.float32), np.ascontiguousarray(shows, np.float32),
                        np.ascontiguousarray(clicks, np.float32), rule, dim, list(state_cols),
                        list(stat_cols), lr, g0, lo, hi, nonclk, clk, scale_by_show, beta1, beta2, eps)

    def unique_inverse(self, keys):
        if type(keys) is np.ndarray and keys.dtype == _U64 and keys.ndim == 1:
            return _fused.unique_inverse(keys)
        return super().unique_inverse(keys)

    def gather_add_rows_(self, out, out_idx, src, src_idx=None, scale=None) -> None:
        if (type(out) is np.ndarray and type(src) is np.ndarray and out.dtype == _F32 and src.dtype == _F32
                and out.flags.c_contiguous and src.flags.c_contiguous and out.flags.writeable
                and out.ndim == 2 and src.ndim == 2 and out_idx.dtype == _I64 and out_idx.flags.c_contiguous
                and (src_idx is None or (src_idx.dtype == _I64 and src_idx.flags.c_contiguous))
                and (scale is None or (scale.dtype == _F32 and scale.flags.c_contiguous))):
            return _fused.gather_add_rows(out, out_idx, src, src_idx, scale)
        return super().gather_add_rows_(out, out_idx, src, src_idx, scale)

    def all_finite(self, a) -> bool:
        if type(a) is np.ndarray and a.dtype == _F32 and a.flags.c_contiguous:
            return _fused.all_finite(a)
        return super().all_finite(a)

    def sgd_(self, param, grad, lr):
        if _fusable(param, grad):
            return _fused.sgd(param, grad, lr)
        return super().sgd_(param, grad, lr)

    def momentum_(self, param, grad, velocity, lr, momentum, nesterov=False):
        if _fusable(param, grad, velocity):
            return _fused.momentum(param, grad, velocity, lr, momentum, nesterov)
        return super().momentum_(param, grad, velocity, lr, momentum, nesterov)

    def adam_(self, param, grad, m, v, lr, beta1, beta2, eps, step, weight_decay=0.0):
        if _fusable(param, grad, m, v):
            return _fused.adam(param, grad, m, v, lr, beta1, beta2, eps, step, weight_decay)
        return super().adam_(param, grad, m, v, lr, beta1, beta2, eps, step, weight_decay)

    def adagrad_(self, param, grad, moment, lr, eps):
        if _fusable(param, grad, moment):
            return _fused.adagrad(param, grad, moment, lr, eps)
        return super().adagrad_(param, grad, moment, lr, eps)

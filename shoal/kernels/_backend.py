"""The array backend ABC: `xp` plus fused kernels, written once over `xp`.

A backend is numpy or cupy seen through one interface. Generic bodies here use
only the array API the two share; a backend overrides a kernel where its
library offers something faster (cupy: fused elementwise kernels).
"""
from __future__ import annotations

import math
from abc import ABC, abstractmethod
from typing import Any

import numpy as np

from shoal.kernels._errors import KernelShapeError


class Backend(ABC):
    """An array library (`xp`) and the fused kernels the engine and the PS use.

    All optimizer updates are in place on the arrays given and return None.
    Hyperparameters are Python floats so that float32 arrays stay float32.
    """

    name: str = ""
    requirement: str = ""  # what it takes to make available() true, for error messages

    def __init__(self) -> None:
        self._rng = None

    # -- identity ------------------------------------------------------------
    @classmethod
    @abstractmethod
    def available(cls) -> bool:
        """Whether this backend can run on this machine."""

    @property
    @abstractmethod
    def xp(self) -> Any:
        """The array module (numpy or cupy)."""

    @abstractmethod
    def array_types(self) -> tuple[type, ...]:
        """The array classes this backend owns."""

    @abstractmethod
    def to_numpy(self, a) -> np.ndarray:
        """A host copy (or view, for numpy) of `a`."""

    def asarray(self, a, dtype=None):
        """`a` as an array of this backend (no copy when it already is one)."""
        return self.xp.asarray(a, dtype=dtype)

    # -- random numbers ------------------------------------------------------
    @abstractmethod
    def _make_rng(self, seed: int | None):
        """A fresh generator of this backend seeded with `seed`."""

    def seed(self, seed: int | None) -> None:
        """Reseed this backend's generator (used by dropout and initializers)."""
        self._rng = self._make_rng(seed)

    @property
    def rng(self):
        if self._rng is None:
            self._rng = self._make_rng(None)
        return self._rng

    def get_rng_state(self):
        """A snapshot of this backend's generator, for `set_rng_state` (recompute replays the
        dropout masks of a forward with it)."""
        return self.rng.bit_generator.state

    def set_rng_state(self, state) -> None:
        """Put the generator back where `get_rng_state` was taken."""
        self.rng.bit_generator.state = state

    def uniform(self, shape, low: float = 0.0, high: float = 1.0, dtype="float32"):
        return self.rng.uniform(low, high, size=shape).astype(dtype, copy=False)

    def normal(self, shape, mean: float = 0.0, std: float = 1.0, dtype="float32"):
        return self.rng.normal(mean, std, size=shape).astype(dtype, copy=False)

    # -- rows of tables ------------------------------------------------------
    def unique(self, keys):
        """(sorted unique keys, inverse) with ``uniq[inverse] == keys``."""
        return self.xp.unique(keys, return_inverse=True)

    def unique_inverse(self, keys):
        """(unique keys, inverse) with ``uniq[inverse] == keys``; the order of `uniq` is the
        backend's (numpy: first occurrence, by hashing; the generic body: sorted)."""
        uniq, inverse = self.xp.unique(keys, return_inverse=True)
        return uniq, inverse.reshape(-1)

    def gather_add_rows_(self, out, out_idx, src, src_idx=None, scale=None) -> None:
        """``out[out_idx[j]] += scale[j] * src[src_idx[j]]`` for every j, in place (duplicates add).

        `src_idx` None means row j of `src`; `scale` None means 1. The one kernel
        of embedding bags: pooling (out = bags) and its backward (out = rows).
        """
        rows = src if src_idx is None else self.xp.take(src, src_idx, axis=0)
        if scale is not None:
            rows = rows * scale[:, None]
        self.index_add_(out, out_idx, rows)

    def segment_sum(self, keys, rows):
        """Merge rows that share a key: (sorted unique keys, summed rows).

        `keys` is 1-D with one entry per row of `rows` (any trailing shape).
        """
        xp = self.xp
        _check_rows(keys, rows, "segment_sum")
        if keys.shape[0] == 0:
            return keys.copy(), rows.copy()
        order = xp.argsort(keys, kind="stable")
        sorted_keys = keys[order]
        is_start = xp.empty(sorted_keys.shape[0], dtype=bool)
        is_start[0] = True
        xp.not_equal(sorted_keys[1:], sorted_keys[:-1], out=is_start[1:])
        starts = xp.flatnonzero(is_start)
        return sorted_keys[starts], self._reduce_sorted(rows[order], starts)

    def _reduce_sorted(self, sorted_rows, starts):
        return self.xp.add.reduceat(sorted_rows, starts, axis=0)

    def gather_rows(self, table, idx):
        """``table[idx]`` for row indices `idx` (any shape), as a new array."""
        return self.xp.take(table, idx, axis=0)

    def scatter_add_rows(self, table, idx, rows) -> None:
        """``table[idx] += rows`` in place, adding every duplicate of an index."""
        idx = idx.reshape(-1)
        rows = rows.reshape((idx.shape[0],) + table.shape[1:])
        uniq, summed = self.segment_sum(idx, rows)
        table[uniq] += summed

    def index_add_(self, target, index, values) -> None:
        """``target[index] += values`` in place for any numpy-style index, duplicates adding."""
        self.xp.add.at(target, index, values)

    def all_finite(self, a) -> bool:
        """True when no element of `a` is NaN or infinite."""
        return bool(self.xp.isfinite(a).all())

    # -- optimizer updates (dense, in place) ---------------------------------
    def sgd_(self, param, grad, lr: float) -> None:
        param -= lr * grad

    def momentum_(self, param, grad, velocity, lr: float, momentum: float,
                  nesterov: bool = False) -> None:
        velocity *= momentum
        velocity += grad
        if nesterov:
            param -= lr * (grad + momentum * velocity)
        else:
            param -= lr * velocity

    def adam_(self, param, grad, m, v, lr: float, beta1: float, beta2: float,
              eps: float, step: int, weight_decay: float = 0.0) -> None:
        """Adam; a non-zero `weight_decay` is decoupled (AdamW)."""
        xp = self.xp
        if weight_decay:
            param *= 1.0 - lr * weight_decay
        m *= beta1
        m += (1.0 - beta1) * grad
        v *= beta2
        sq = grad * grad
        sq *= 1.0 - beta2
        v += sq
        bias1 = 1.0 - beta1 ** step
        bias2 = 1.0 - beta2 ** step
        denom = xp.sqrt(v, out=sq)
        denom *= 1.0 / math.sqrt(bias2)
        denom += eps
        xp.divide(m, denom, out=denom)
        denom *= lr / bias1
        param -= denom

    def adagrad_(self, param, grad, moment, lr: float, eps: float) -> None:
        xp = self.xp
        moment += grad * grad
        denom = xp.sqrt(moment)
        denom += eps
        xp.divide(grad, denom, out=denom)
        denom *= lr
        param -= denom

    def _norm(self, a):
        xp = self.xp
        return xp.sqrt(xp.sum(a * a))

    def _trust(self, num, den, ratio):
        """`ratio` where both norms are positive, else 1 (a 0-d array, no sync)."""
        return self.xp.where((num > 0) & (den > 0), ratio, 1.0)

    def lamb_(self, param, grad, m, v, lr: float, beta1: float, beta2: float,
              eps: float, step: int, weight_decay: float) -> None:
        """LAMB: the Adam direction plus decay, scaled by ||param|| / ||update||."""
        xp = self.xp
        m *= beta1
        m += (1.0 - beta1) * grad
        v *= beta2
        v += (1.0 - beta2) * (grad * grad)
        bias1 = 1.0 - beta1 ** step
        bias2 = 1.0 - beta2 ** step
        update = xp.sqrt(v * (1.0 / bias2))
        update += eps
        xp.divide(m * (1.0 / bias1), update, out=update)
        if weight_decay:
            update += weight_decay * param
        p_norm = self._norm(param)
        u_norm = self._norm(update)
        trust = self._trust(p_norm, u_norm, p_norm / xp.maximum(u_norm, 1e-30))
        update *= lr * trust
        param -= update

    def lars_(self, param, grad, velocity, lr: float, momentum: float,
              lars_coeff: float, weight_decay: float, eps: float) -> None:
        """LARS momentum: a layer-wise lr of coeff * ||p|| / (||g|| + wd ||p|| + eps)."""
        xp = self.xp
        p_norm = self._norm(param)
        g_norm = self._norm(grad)
        ratio = lars_coeff * p_norm / xp.maximum(g_norm + weight_decay * p_norm + eps, 1e-30)
        local_lr = lr * self._trust(p_norm, g_norm, ratio)
        velocity *= momentum
        step = grad + weight_decay * param if weight_decay else grad.copy()
        step *= local_lr
        velocity += step
        param -= velocity

    # -- CTR rows (a sparse table's records: embedding, rule state, statistics) ----------
    def ctr_pull(self, values, rows, dim: int, unseen_col: int = -1):
        """values[rows, :dim] as a new [n, dim] array, zeros where rows < 0; with unseen_col >= 0
        the rows' unseen-days column is reset (a training pull saw them). `rows` unique."""
        xp = self.xp
        out = xp.zeros((rows.shape[0], dim), values.dtype)
        ok = rows >= 0
        r = rows[ok]
        out[ok] = values[r, :dim]
        if unseen_col >= 0:
            values[r, unseen_col] = 0.0
        return out

    def ctr_push(self, values, rows, grads, shows, clicks, rule: int, dim: int, state_cols,
                 stat_cols, lr: float, g0: float, lo: float, hi: float, nonclk: float, clk: float,
                 scale_by_show: bool, beta1: float, beta2: float, eps: float) -> None:
        """The CTR accessor's push on records `values[rows]` (unique rows, all >= 0), in place:
        show/click/delta-score statistics, then the rule (0 naive, 1 adagrad, 2 std_adagrad,
        3 adam) on the gradient divided by the show, with weight bounds [lo, hi]. The same
        arithmetic as the native kernel (csrc/fused.cpp ctr_push); `state_cols` and `stat_cols`
        as there."""
        xp = self.xp
        block = values[rows]
        show, click, delta, unseen = stat_cols
        block[:, show] += shows
        block[:, click] += clicks
        block[:, delta] += (shows - clicks) * nonclk + clicks * clk
        block[:, unseen] = 0.0
        g = grads / xp.maximum(shows, 1.0)[:, None] if scale_by_show else grads
        w = block[:, :dim]
        if rule == 0:
            w -= lr * g
        elif rule == 1:
            g2 = block[:, state_cols[0]]
            w -= (lr * xp.sqrt(g0 / (g0 + g2)))[:, None] * g
            block[:, state_cols[0]] += (g * g).sum(axis=1) / dim
        elif rule == 2:
            g2 = block[:, state_cols[0]:state_cols[0] + dim]
            w -= lr * g * xp.sqrt(g0 / (g0 + g2))
            g2 += g * g
        elif rule == 3:
            m = block[:, state_cols[0]:state_cols[0] + dim]
            v = block[:, state_cols[1]:state_cols[1] + dim]
            p1, p2 = block[:, state_cols[2]], block[:, state_cols[3]]
            corr2 = xp.sqrt(1.0 - p2)
            m *= beta1
            m += (1.0 - beta1) * g
            v *= beta2
            v += (1.0 - beta2) * g * g
            w -= (lr * corr2 / (1.0 - p1))[:, None] * m / (xp.sqrt(v) + eps * corr2[:, None])
            block[:, state_cols[2]] *= beta1
            block[:, state_cols[3]] *= beta2
        else:
            raise ValueError(f"ctr_push: rule {rule} is not one of 0 naive, 1 adagrad, "
                             f"2 std_adagrad, 3 adam")
        xp.clip(w, lo, hi, out=w)
        values[rows] = block

    # -- sparse (row-wise) updates -------------------------------------------
    def rows_update_(self, kernel: str, param, ids, grad_rows, *states, **hparams) -> None:
        """Run the dense update `kernel` on the rows `ids` of `param` and `states` only.

        `ids` must be unique (merge duplicates with `segment_sum` first). Rows
        not named are left untouched (lazy update, as for embedding tables).
        """
        _check_rows(ids, grad_rows, kernel)
        p_rows = self.gather_rows(param, ids)
        s_rows = [self.gather_rows(s, ids) for s in states]
        getattr(self, kernel)(p_rows, grad_rows, *s_rows, **hparams)
        param[ids] = p_rows
        for s, r in zip(states, s_rows):
            s[ids] = r


def _check_rows(keys, rows, where: str) -> None:
    if keys.ndim != 1 or rows.ndim < 1 or rows.shape[0] != keys.shape[0]:
        raise KernelShapeError(
            f"{where}: keys must be 1-D with one entry per row, got keys of shape "
            f"{tuple(keys.shape)} and rows of shape {tuple(rows.shape)}; flatten the "
            f"keys and reshape rows to (len(keys), ...)")

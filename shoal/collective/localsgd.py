"""LocalSGD: train locally, average the parameters every k steps (Lin et al. 2018; Paddle's
`strategy.localsgd`).

A step transform for TransformedOptimizer. Before `begin_step` the job is plain data
parallel (DataParallel all-reduces every backward); from `begin_step` on, backward passes stop
all-reducing (`wants_sync` is False) and each rank updates its replica with its own gradients;
after every `k_steps`-th local update the parameters are averaged over the group, fused into one
all-reduce per dtype. Optimizer state (momenta) stays local, as in Paddle.

    opt = TransformedOptimizer(SGD(0.1, parameters=model.parameters()),
                               [localsgd(k_steps=4, begin_step=10)], model=dp_model)

With k_steps=1 and plain SGD, LocalSGD equals data parallel: the average of the local SGD steps
is the SGD step on the averaged gradient.
"""
from __future__ import annotations

import numpy as np

from shoal.collective import _api
from shoal.collective.errors import InvalidArgumentError
from shoal.kernels import backend_of


class localsgd:
    """Average parameters over `group` every `k_steps` updates, from update `begin_step` on
    (updates counted from 1). Blocking: the averaging update waits for every rank of the group
    (bounded by the collective timeout)."""

    def __init__(self, k_steps: int, begin_step: int = 1, *, group=None):
        for name, v in (("k_steps", k_steps), ("begin_step", begin_step)):
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise InvalidArgumentError(f"localsgd({name}={v!r}): give an int >= 1")
        self.k_steps, self.begin_step, self.group = k_steps, begin_step, group
        self.step = 0          # updates applied so far
        self.averages = 0      # parameter averages done so far

    def local(self, step: int) -> bool:
        """Whether update number `step` (from 1) is a local one (no gradient all-reduce)."""
        return step >= self.begin_step

    def wants_sync(self) -> bool:
        return not self.local(self.step + 1)

    def __call__(self, params) -> bool:
        return True

    def after_step(self, params, optimizer=None) -> None:
        self.step += 1
        if self.local(self.step) and (self.step - self.begin_step + 1) % self.k_steps == 0:
            average_parameters(params, self.group, masters=_masters(optimizer))
            self.averages += 1

    def state_dict(self) -> dict:
        return {"step": self.step, "averages": self.averages}

    def set_state_dict(self, state: dict) -> None:
        self.step, self.averages = int(state["step"]), int(state.get("averages", 0))


def _masters(optimizer) -> dict:
    """id(parameter) -> its float32 master weight, for an optimizer (or a wrapper of one) with
    multi_precision (AMP O2); empty otherwise."""
    seen = optimizer
    for _ in range(8):
        if seen is None or "_state" in getattr(seen, "__dict__", {}):
            break
        seen = getattr(seen, "inner", None)
    state = getattr(seen, "_state", None) or {}
    return {k: st["master"] for k, st in state.items() if "master" in st}


def average_parameters(params, group=None, *, masters: dict | None = None) -> None:
    """Replace every parameter by its mean over `group`: one fused all-reduce per dtype.

    A parameter with a master weight in `masters` (id -> float32 array, AMP O2) is averaged
    through its master, which is the copy the next update starts from; the parameter then
    takes the averaged master's value."""
    masters = masters or {}
    by_dtype: dict = {}
    for p in params:
        arr = masters.get(id(p), p.data)
        by_dtype.setdefault(np.dtype(arr.dtype), []).append((p, arr))
    for same in by_dtype.values():
        xp = backend_of(same[0][1]).xp
        flat = xp.concatenate([a.reshape(-1) for _, a in same])
        _api.all_reduce(flat, op=_api.ReduceOp.AVG, group=group)
        pos = 0
        for p, a in same:
            n = a.size
            a[...] = flat[pos:pos + n].reshape(a.shape)
            if a is not p.data:
                p.data[...] = a.astype(p.dtype)
            pos += n

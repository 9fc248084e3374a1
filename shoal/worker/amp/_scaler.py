"""GradScaler: loss scaling for float16 training (Paddle's `paddle.amp.GradScaler`).

    scaler = shoal.amp.GradScaler(init_loss_scaling=1024)
    with shoal.amp.auto_cast():
        loss = F.cross_entropy(model(x), y)
    scaler.scale(loss).backward()       # gradients of loss * scale: small ones survive float16
    scaler.step(opt)                    # unscale; update only if every gradient is finite
    scaler.update()                     # grow or shrink the scale
    opt.clear_grad()

Dynamic scaling follows Paddle's update_loss_scaling op: after `incr_every_n_steps`
consecutive finite steps the scale is multiplied by `incr_ratio` (kept if that overflows
float32); after `decr_every_n_nan_or_inf` consecutive non-finite steps it is multiplied by
`decr_ratio` (never below 1). A finite step resets the bad counter, a non-finite one the
good counter, and a counter that reaches its limit starts again from 0.
"""
from __future__ import annotations

import enum
import math
from collections.abc import Callable

import numpy as np

from shoal.kernels import backend_of
from shoal.worker.errors import AmpError
from shoal.worker.sparse import SparseGrad

_F32 = np.dtype("float32")


class _OptState(enum.Enum):
    INIT = 0      # nothing done to this optimizer since the last update()
    UNSCALED = 1  # its gradients are unscaled and checked
    STEPPED = 2   # step() ran (or was skipped) for it


def base_optimizer(optimizer, where: str = "GradScaler"):
    """The engine Optimizer under wrappers (TransformedOptimizer, sharding): the object that
    holds `_params` itself, found through `.inner`."""
    seen = optimizer
    for _ in range(8):  # wrappers nest a few levels at most; a cycle must not hang
        if "_params" in getattr(seen, "__dict__", {}):
            return seen
        inner = getattr(seen, "inner", None)
        if inner is None:
            break
        seen = inner
    raise AmpError(f"{where}: cannot find the parameters of {type(optimizer).__name__}: "
                   f"expected an engine Optimizer (with ._params) or a wrapper exposing it as "
                   f".inner")


def optimizer_params(optimizer) -> list:
    """The parameters an optimizer (or a wrapper of one) updates."""
    return base_optimizer(optimizer)._params


def _check(name: str, value, ok: bool, want: str):
    if not ok:
        raise AmpError(f"GradScaler: {name}={value!r} is invalid; {want}")


def _count(name: str, value) -> int:
    _check(name, value, isinstance(value, (int, np.integer)) and not isinstance(value, bool)
           and value >= 1, "give an int >= 1")
    return int(value)


class GradScaler:
    """Scale the loss, unscale and check the gradients, skip non-finite steps.

    Args:
        enable: False makes every method a pass-through (scale returns the loss, step steps).
        init_loss_scaling: the first scale (> 0, finite).
        incr_ratio: the growth factor (> 1).
        decr_ratio: the back-off factor (in (0, 1)).
        incr_every_n_steps: finite steps in a row before growing (>= 1).
        decr_every_n_nan_or_inf: non-finite steps in a row before backing off (>= 1).
        use_dynamic_loss_scaling: False keeps the scale fixed (steps are still skipped).
        found_inf_reduce: called with a numpy float32 array of shape (1,) (1.0: this rank
            found inf/nan) and returning it reduced with max over the ranks that share the
            step; with gradients partitioned over ranks this makes every rank skip alike.

    Raises AmpError for a bad argument. Not thread-safe: one thread drives a scaler.
    `found_inf` is whether the last unscale_ found a non-finite gradient.
    """

    def __init__(self, enable: bool = True, init_loss_scaling: float = 32768.0,
                 incr_ratio: float = 2.0, decr_ratio: float = 0.8,
                 incr_every_n_steps: int = 1000, decr_every_n_nan_or_inf: int = 2,
                 use_dynamic_loss_scaling: bool = True,
                 found_inf_reduce: Callable[[np.ndarray], np.ndarray] | None = None):
        num = (int, float, np.floating, np.integer)
        _check("init_loss_scaling", init_loss_scaling, isinstance(init_loss_scaling, num)
               and math.isfinite(init_loss_scaling) and init_loss_scaling > 0,
               "give a finite scale > 0, e.g. 32768.0")
        _check("incr_ratio", incr_ratio, isinstance(incr_ratio, num) and incr_ratio > 1
               and math.isfinite(incr_ratio), "give a growth factor > 1, e.g. 2.0")
        _check("decr_ratio", decr_ratio, isinstance(decr_ratio, num) and 0 < decr_ratio < 1,
               "give a back-off factor in (0, 1), e.g. 0.5")
        _check("found_inf_reduce", found_inf_reduce,
               found_inf_reduce is None or callable(found_inf_reduce),
               "give a callable reducing a float32 array of shape (1,) with max over ranks")
        self._enable = bool(enable)
        self._scale = float(np.float32(init_loss_scaling))
        self._incr_ratio, self._decr_ratio = float(incr_ratio), float(decr_ratio)
        self._incr_every = _count("incr_every_n_steps", incr_every_n_steps)
        self._decr_every = _count("decr_every_n_nan_or_inf", decr_every_n_nan_or_inf)
        self._dynamic = bool(use_dynamic_loss_scaling)
        self._reduce = found_inf_reduce
        self._incr_count = self._decr_count = 0
        self._found_inf = False
        self._states: dict[int, _OptState] = {}
        self._found: dict[int, bool] = {}  # per optimizer unscaled since the last update()

    # -- facts -------------------------------------------------------------------------
    def is_enable(self) -> bool:
        return self._enable

    def is_use_dynamic_loss_scaling(self) -> bool:
        return self._dynamic

    def get_loss_scaling(self) -> float:
        """The current scale (a Python float)."""
        return self._scale

    @property
    def found_inf(self) -> bool:
        """Whether the last unscale_ found an inf or nan gradient (on any rank when reduced)."""
        return self._found_inf

    # -- the step ------------------------------------------------------------------------
    def scale(self, loss):
        """`loss * scale` as a float32 Tensor (a float16 loss is cast first, so the product
        cannot overflow float16); the loss itself when disabled."""
        if not self._enable:
            return loss
        if loss.dtype != _F32 and loss.dtype.kind == "f" and loss.dtype.itemsize < 4:
            loss = loss.astype(_F32)
        return loss * self._scale

    def unscale_(self, optimizer) -> None:
        """Divide every gradient of `optimizer`'s parameters by the scale (in float32; the
        new gradient is a float32 array) and check that all are finite.

        Once per optimizer between update() calls; a second call raises AmpError. With
        `found_inf_reduce` the finding is reduced over ranks (a collective: every rank calls).
        """
        if not self._enable:
            return
        state = self._states.get(id(optimizer), _OptState.INIT)
        if state is not _OptState.INIT:
            raise AmpError(f"GradScaler.unscale_: already {state.name.lower()} this optimizer "
                           f"since the last update(); call update() once per step, after step()")
        inv = 1.0 / self._scale
        finite = True
        for p in optimizer_params(optimizer):
            g = p._grad
            if g is None:
                continue
            if isinstance(g, SparseGrad):
                rows = g.rows.astype(_F32) * inv
                p._grad = SparseGrad(g.ids, rows, g.shape)
            else:
                rows = p._grad = g.astype(_F32) * inv   # a new array: gradients may be aliased
            finite = finite and backend_of(rows).all_finite(rows)
        found = np.array([0.0 if finite else 1.0], dtype=_F32)
        if self._reduce is not None:
            found = np.asarray(self._reduce(found), dtype=_F32)
            if found.shape != (1,):
                raise AmpError(f"GradScaler: found_inf_reduce returned shape {found.shape}; it "
                               f"must return the (1,) array it was given, reduced with max")
        self._found_inf = self._found[id(optimizer)] = bool(found[0] > 0)
        self._states[id(optimizer)] = _OptState.UNSCALED

    def step(self, optimizer) -> None:
        """unscale_ (unless done this step), then `optimizer.step()` if every gradient is
        finite; otherwise nothing changes (parameters, optimizer state, its step count).
        Once per optimizer between update() calls."""
        if not self._enable:
            optimizer.step()
            return
        state = self._states.get(id(optimizer), _OptState.INIT)
        if state is _OptState.STEPPED:
            raise AmpError("GradScaler.step: step() was already called for this optimizer "
                           "since the last update(); call update() after each step")
        if state is _OptState.INIT:
            self.unscale_(optimizer)
        if not self._found[id(optimizer)]:
            optimizer.step()
        self._states[id(optimizer)] = _OptState.STEPPED

    def update(self) -> None:
        """Adjust the scale from the last step's finding (dynamic scaling only) and start a
        new step. A step counts as non-finite when any optimizer unscaled since the last
        update found inf/nan; without an unscale_ since then, the counters do not move."""
        found, observed = any(self._found.values()), bool(self._found)
        self._states, self._found = {}, {}
        if not (self._enable and self._dynamic and observed):
            return
        if found:
            self._incr_count = 0
            self._decr_count += 1
            if self._decr_count == self._decr_every:
                self._scale = max(float(np.float32(self._scale * self._decr_ratio)), 1.0)
                self._decr_count = 0
        else:
            self._decr_count = 0
            self._incr_count += 1
            if self._incr_count == self._incr_every:
                grown = float(np.float32(self._scale * self._incr_ratio))
                if math.isfinite(grown):
                    self._scale = grown
                self._incr_count = 0

    def minimize(self, optimizer, scaled_loss=None) -> None:
        """step(optimizer) then update(); backward() of the scaled loss must have run (as in
        Paddle, `scaled_loss` is taken for the signature only)."""
        self.step(optimizer)
        self.update()

    # -- state -----------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """The scale, ratios, limits and counters (empty when disabled, as in Paddle)."""
        if not self._enable:
            return {}
        return {"scale": self._scale, "incr_ratio": self._incr_ratio,
                "decr_ratio": self._decr_ratio, "incr_every_n_steps": self._incr_every,
                "decr_every_n_nan_or_inf": self._decr_every, "incr_count": self._incr_count,
                "decr_count": self._decr_count, "use_dynamic_loss_scaling": self._dynamic}

    def load_state_dict(self, state_dict: dict) -> None:
        """Restore what state_dict() returned; checks every value before changing anything."""
        keys = ("scale", "incr_ratio", "decr_ratio", "incr_every_n_steps",
                "decr_every_n_nan_or_inf", "incr_count", "decr_count", "use_dynamic_loss_scaling")
        if not state_dict:
            raise AmpError("GradScaler.load_state_dict: the state dict is empty (saved from a "
                           "disabled GradScaler?); give the dict of an enabled one's state_dict()")
        missing = [k for k in keys if k not in state_dict]
        if missing:
            raise AmpError(f"GradScaler.load_state_dict: missing keys {missing}; expected "
                           f"{list(keys)}")
        s = {k: state_dict[k] for k in keys}
        check = GradScaler(True, float(s["scale"]), float(s["incr_ratio"]),
                           float(s["decr_ratio"]), int(s["incr_every_n_steps"]),
                           int(s["decr_every_n_nan_or_inf"]))  # raises on a bad value
        for name in ("incr_count", "decr_count"):
            _check(name, s[name], int(s[name]) >= 0, "give a count >= 0")
        self._scale, self._incr_ratio, self._decr_ratio = (check._scale, check._incr_ratio,
                                                           check._decr_ratio)
        self._incr_every, self._decr_every = check._incr_every, check._decr_every
        self._incr_count, self._decr_count = int(s["incr_count"]), int(s["decr_count"])
        self._dynamic = bool(s["use_dynamic_loss_scaling"])

    set_state_dict = load_state_dict

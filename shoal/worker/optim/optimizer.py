"""The optimizer base: parameters, learning rate, weight decay, clipping, state.

A concrete optimizer names its backend kernel, its per-parameter state slots
and how to turn its settings into the kernel's keyword arguments; the base
class does the rest for dense and row-sparse (embedding) gradients alike.
"""
from __future__ import annotations

import math
from typing import Callable, Iterable

import numpy as np

from shoal.kernels import backend_of
from shoal.worker.errors import ShapeError, StateDictError
from shoal.worker.optim.lr import LRScheduler
from shoal.worker.sparse import SparseGrad
from shoal.worker.tensor import Tensor

_F16, _F32 = np.dtype("float16"), np.dtype("float32")


class ClipGradByGlobalNorm:
    """Scale all gradients by clip_norm / max(global_norm, clip_norm).

    The global norm is taken over every gradient together (row-sparse ones
    after merging duplicate rows), as in Paddle's ClipGradByGlobalNorm.
    """

    def __init__(self, clip_norm: float):
        if not clip_norm > 0:
            raise ValueError(f"ClipGradByGlobalNorm: clip_norm={clip_norm} must be positive")
        self.clip_norm = float(clip_norm)

    def __call__(self, params_grads: list) -> list:
        if not params_grads:
            return params_grads
        merged = [(p, g.merged() if isinstance(g, SparseGrad) else g) for p, g in params_grads]
        xp = backend_of(params_grads[0][1].rows if isinstance(params_grads[0][1], SparseGrad)
                        else params_grads[0][1]).xp
        total = None
        for _, g in merged:
            arr = g.rows if isinstance(g, SparseGrad) else g
            sq = xp.sum(arr * arr)
            total = sq if total is None else total + sq
        scale = self.clip_norm / xp.maximum(xp.sqrt(total), self.clip_norm)
        return [(p, _scaled(g, scale)) for p, g in merged]

    def __repr__(self) -> str:
        return f"ClipGradByGlobalNorm(clip_norm={self.clip_norm})"


def _scaled(g, scale):
    if isinstance(g, SparseGrad):
        return SparseGrad(g.ids, g.rows * scale.astype(g.rows.dtype), g.shape)
    return g * scale.astype(g.dtype)


def exclusion(names: Iterable[str] | None = None,
              fn: Callable[[Tensor], bool] | None = None) -> Callable[[Tensor], bool]:
    """A predicate: True for parameters that take no weight decay (a name substring
    from `names` matches, or `fn(param)` says so)."""
    names = tuple(names or ())

    def excluded(p: Tensor) -> bool:
        return bool(fn and fn(p)) or any(n in (p.name or "") for n in names)
    return excluded


class Optimizer:
    """Base class of the engine's optimizers.

    Args:
        learning_rate: a float or an LRScheduler.
        parameters: the tensors to update (required in eager mode), e.g. model.parameters().
        weight_decay: L2 coefficient added to the gradient (``g + wd * p``).
        grad_clip: e.g. ClipGradByGlobalNorm(1.0), applied before the update.
        multi_precision: keep a float32 master copy of every float16 parameter (set by
            `shoal.amp.decorate(level="O2")`): the update runs on the master with a float32
            gradient and its state slots in float32, then the master is written back into
            the parameter rounded to float16. state_dict carries it as "<index>.master".

    `step()` updates every parameter that has a gradient and leaves the
    gradients in place; `clear_grad()` drops them (gradients accumulate across
    backward() calls until then). Not thread-safe: one thread steps an optimizer.
    """

    kernel = ""          # the Backend method that updates one array in place
    slots: tuple = ()    # per-parameter state arrays, created as zeros (or `_init_slot`)
    coupled_decay = True  # add weight_decay * p to the gradient before the kernel
    lazy_mode = True      # row-sparse gradients touch only their rows (False: densify first)

    def __init__(self, learning_rate=0.001, parameters=None, weight_decay=None, grad_clip=None,
                 *, multi_precision: bool = False):
        if parameters is None:
            raise ValueError(f"{type(self).__name__}: parameters= is required in eager mode; "
                             f"pass model.parameters()")
        params = list(parameters)
        for i, p in enumerate(params):
            if not isinstance(p, Tensor):
                raise TypeError(f"{type(self).__name__}: parameters[{i}] is a "
                                f"{type(p).__name__}, not a Tensor")
        if len({id(p) for p in params}) != len(params):
            raise ValueError(f"{type(self).__name__}: a parameter appears twice in parameters")
        if not isinstance(learning_rate, (int, float, LRScheduler)) or (
                not isinstance(learning_rate, LRScheduler) and learning_rate < 0):
            raise ValueError(f"{type(self).__name__}: learning_rate={learning_rate!r} must be a "
                             f"non-negative number or an LRScheduler")
        if grad_clip is not None and not callable(grad_clip):
            raise TypeError(f"{type(self).__name__}: grad_clip={grad_clip!r} is not a clip "
                            f"object such as ClipGradByGlobalNorm(1.0)")
        self._params = params
        self._lr = learning_rate
        self.weight_decay = float(getattr(weight_decay, "coeff", weight_decay) or 0.0)
        self.grad_clip = grad_clip
        self.multi_precision = bool(multi_precision)
        self._state: dict[int, dict] = {}

    # -- learning rate --------------------------------------------------------
    def get_lr(self) -> float:
        return self._lr() if isinstance(self._lr, LRScheduler) else float(self._lr)

    def set_lr(self, value: float) -> None:
        if isinstance(self._lr, LRScheduler):
            raise TypeError(f"{type(self).__name__}.set_lr: the learning rate is driven by "
                            f"{type(self._lr).__name__}; call its step() instead")
        if not isinstance(value, (int, float)) or value < 0:
            raise ValueError(f"set_lr({value!r}): the learning rate must be a non-negative number")
        self._lr = float(value)

    @property
    def lr_scheduler(self) -> LRScheduler | None:
        return self._lr if isinstance(self._lr, LRScheduler) else None

    # -- stepping --------------------------------------------------------------
    def clear_grad(self, set_to_zero: bool = False) -> None:
        """Drop every parameter's gradient (or zero it in place with `set_to_zero`)."""
        for p in self._params:
            if set_to_zero and p._grad is not None and not isinstance(p._grad, SparseGrad):
                p._grad = p._grad * 0
            else:
                p._grad = None

    def step(self) -> None:
        """Apply one update to every trainable parameter that has a gradient."""
        pairs = [(p, p._grad) for p in self._params
                 if p._grad is not None and getattr(p, "trainable", True)]
        if self.grad_clip is not None:
            pairs = self.grad_clip(pairs)
        lr = self.get_lr()
        for p, g in pairs:
            self._update(p, g, lr)

    def minimize(self, loss: Tensor) -> None:
        """backward() of `loss`, then step()."""
        loss.backward()
        self.step()

    def _init_slot(self, name: str, p: Tensor):
        return p.backend.xp.zeros_like(p.data)

    def _wants_master(self, p: Tensor) -> bool:
        return self.multi_precision and p.dtype == _F16

    def _slots_of(self, p: Tensor) -> dict:
        st = self._state.get(id(p))
        if st is None:
            st, like = {}, p
            if self._wants_master(p):
                st["master"] = p.data.astype(_F32)
                like = Tensor._make(st["master"])   # the slots take the master's dtype
            st.update({name: self._init_slot(name, like) for name in self.slots})
            st["step"] = 0
            self._state[id(p)] = st
        elif self._wants_master(p) and "master" not in st:
            # state loaded without a master (saved before decorate): start it from the weights
            st["master"] = p.data.astype(_F32)
        return st

    def _hparams(self, p: Tensor, lr: float, step: int) -> dict:
        """The kernel's keyword arguments for parameter `p`."""
        raise NotImplementedError

    def _update(self, p: Tensor, g, lr: float) -> None:
        st = self._slots_of(p)
        st["step"] += 1
        be = backend_of(p.data)
        kw = self._hparams(p, lr, st["step"])
        states = [st[s] for s in self.slots]
        master = st.get("master")
        weights = p.data if master is None else master
        wd = self.weight_decay if self.coupled_decay else 0.0
        if isinstance(g, SparseGrad) and not self.lazy_mode:
            g = g.to_dense()
        if isinstance(g, SparseGrad):
            g = g.merged()
            rows = g.rows if master is None else g.rows.astype(_F32, copy=False)
            if wd:
                rows = rows + wd * be.gather_rows(weights, g.ids)
            be.rows_update_(self.kernel, weights, g.ids, rows, *states, **kw)
            if master is not None:
                p.data[g.ids] = be.gather_rows(master, g.ids)   # rounded to float16 on store
        else:
            if master is not None:
                g = g.astype(_F32, copy=False)
            if wd:
                g = g + wd * weights
            getattr(be, self.kernel)(weights, g, *states, **kw)
            if master is not None:
                be.xp.copyto(p.data, master, casting="same_kind")   # in place: p stays p

    # -- state -----------------------------------------------------------------
    def state_dict(self) -> dict:
        """{"state": {"<index>.<slot>": array, "<index>.step": int}, "LR_Scheduler": ...}.

        Parameters are named by their position in `parameters`, so the state
        loads into the same model built again (in this process or another).
        """
        state = {}
        for i, p in enumerate(self._params):
            st = self._state.get(id(p))
            if st is None:
                continue
            for k, v in st.items():
                state[f"{i}.{k}"] = v
        out = {"state": state, "num_params": len(self._params)}
        if self.lr_scheduler is not None:
            out["LR_Scheduler"] = self.lr_scheduler.state_dict()
        else:
            out["lr"] = float(self._lr)
        return out

    def set_state_dict(self, state_dict: dict) -> None:
        """Load what `state_dict()` returned; checks everything before changing anything."""
        where = f"{type(self).__name__}.set_state_dict"
        if not isinstance(state_dict, dict) or "state" not in state_dict:
            raise StateDictError(f"{where}: expected the dict of an optimizer's state_dict(), "
                                 f"with keys 'state' and 'num_params'")
        n = state_dict.get("num_params")
        if n != len(self._params):
            raise StateDictError(f"{where}: the state is for {n} parameters but this optimizer "
                                 f"has {len(self._params)}; build it over the same model")
        new: dict[int, dict] = {}
        for key, v in state_dict["state"].items():
            idx, _, slot = str(key).partition(".")
            if not idx.isdigit() or int(idx) >= len(self._params) or \
                    slot not in self.slots + ("step", "master"):
                raise StateDictError(f"{where}: unexpected key {key!r}; {type(self).__name__} "
                                     f"keeps {list(self.slots) + ['step']} per parameter (and "
                                     f"'master' for float16 ones with multi_precision)")
            p = self._params[int(idx)]
            if slot == "master" and not self._wants_master(p):
                raise StateDictError(
                    f"{where}: {key!r} is a float32 master weight but parameter {idx} "
                    f"({p.name}) is {p.dtype} with multi_precision={self.multi_precision}; "
                    f"decorate the model and optimizer with shoal.amp.decorate(level='O2') "
                    f"before loading an O2 optimizer's state")
            if slot != "step":
                arr = v.data if isinstance(v, Tensor) else v
                if tuple(arr.shape) != p.shape:
                    raise ShapeError(f"{where}: {key!r} has shape {tuple(arr.shape)} but parameter "
                                     f"{idx} ({p.name}) has shape {p.shape}")
                # a copy: the source optimizer keeps updating its own arrays in place; with a
                # master weight the slots are float32 as well
                dtype = _F32 if self._wants_master(p) else p.dtype
                v = p.backend.xp.array(backend_of(arr).to_numpy(arr), dtype=dtype, copy=True)
            new.setdefault(int(idx), {})[slot] = int(v) if slot == "step" else v
        for idx, st in new.items():
            missing = set(self.slots + ("step",)) - set(st)
            if missing:
                raise StateDictError(f"{where}: parameter {idx} lacks {sorted(missing)}")
        if self.lr_scheduler is not None and "LR_Scheduler" in state_dict:
            self.lr_scheduler.set_state_dict(state_dict["LR_Scheduler"])
        elif self.lr_scheduler is None and "lr" in state_dict:
            self._lr = float(state_dict["lr"])
        self._state = {id(self._params[i]): st for i, st in new.items()}


def check_beta(name: str, value: float, where: str) -> float:
    if not 0.0 <= value < 1.0:
        raise ValueError(f"{where}: {name}={value} must lie in [0, 1)")
    return float(value)


def check_positive(name: str, value: float, where: str, allow_zero: bool = False) -> float:
    if not (value >= 0 if allow_zero else value > 0) or math.isnan(value):
        raise ValueError(f"{where}: {name}={value} must be {'non-negative' if allow_zero else 'positive'}")
    return float(value)

"""ShardingOptimizer: the user's optimizer, updating only the parameters this rank owns.

    model = ShardedDataParallel(net, stage=2)
    opt = ShardingOptimizer(Adam(1e-3, parameters=model.parameters()), model)
    loss.backward(); opt.step(); opt.clear_grad()

`step()` drops the gradients of parameters owned elsewhere, so the inner optimizer (which
creates its state lazily, for parameters that have a gradient) keeps state only for this rank's
shard; global-norm clipping is taken over the shards of every rank; after the update the
parameters are gathered back onto every rank (ShardedDataParallel._gather_params).
"""
from __future__ import annotations

import math
import weakref

import numpy as np

from shoal.collective import _api
from shoal.collective.errors import InvalidArgumentError
from shoal.collective.sharding._memory import held_bytes
from shoal.collective.sharding._model import ShardedDataParallel
from shoal.kernels import backend_of
from shoal.worker.optim.optimizer import ClipGradByGlobalNorm, Optimizer
from shoal.worker.sparse import SparseGrad


class ShardingOptimizer:
    """`optimizer` (any shoal Optimizer over the model's parameters), sharded by `model`'s owners.

    Args:
        optimizer: e.g. Adam(1e-3, parameters=model.parameters()).
        model: the ShardedDataParallel it updates; or None, then call `bind(model)` before the
            first step (fleet may wrap the optimizer before the model).

    `step()` is a collective over the model's sharding group (every rank must call it, with
    the same gradients reduced): it updates the owned parameters and all-gathers the others.
    After it the gradients of parameters owned elsewhere are None (stage 1 too). Other
    attributes (get_lr, set_lr, lr_scheduler, ...) are the inner optimizer's. Not thread-safe.

    Raises InvalidArgumentError for something that is not a shoal Optimizer, for a model that is
    not a ShardedDataParallel or that lacks some of the optimizer's parameters."""

    def __init__(self, optimizer, model=None):
        if not isinstance(optimizer, Optimizer):
            raise InvalidArgumentError(
                f"ShardingOptimizer(optimizer): expected a shoal optimizer (SGD, Momentum, Adam, "
                f"AdamW, Lamb, Lars, ...), got {type(optimizer).__name__}; wrap the plain "
                f"optimizer, and put TransformedOptimizer around the ShardingOptimizer")
        self._inner, self._model = optimizer, None
        if model is not None:
            self.bind(model)

    def bind(self, model: ShardedDataParallel) -> ShardingOptimizer:
        """Shard by `model` (a ShardedDataParallel whose parameters include every one of the
        optimizer's); returns self."""
        if not isinstance(model, ShardedDataParallel):
            raise InvalidArgumentError(f"ShardingOptimizer.bind(model): expected a "
                                       f"ShardedDataParallel, got {type(model).__name__}; wrap "
                                       f"the model first: ShardedDataParallel(model, stage=...)")
        known = {id(p) for p in model.parameters()}
        foreign = [p.name or f"#{i}" for i, p in enumerate(self._inner._params)
                   if id(p) not in known]
        if foreign:
            raise InvalidArgumentError(
                f"ShardingOptimizer: {len(foreign)} of the optimizer's parameters are not the "
                f"model's (first: {foreign[:3]}); a sharded optimizer updates only the "
                f"parameters its model shards: build it over model.parameters() of the "
                f"ShardedDataParallel it is bound to")
        self._model = model
        object.__setattr__(model, "_optimizer", weakref.ref(self))
        return self

    def __getattr__(self, name):
        inner = self.__dict__.get("_inner")
        if inner is None or name.startswith("__"):
            raise AttributeError(name)
        return getattr(inner, name)

    @property
    def inner(self) -> Optimizer:
        return self._inner

    @property
    def _params(self) -> list:
        return self._inner._params

    def _bound(self, what: str) -> ShardedDataParallel:
        if self._model is None:
            raise InvalidArgumentError(f"ShardingOptimizer.{what}(): no model bound; pass "
                                       f"model= or call bind(sharded_model) first")
        return self._model

    # -- stepping --------------------------------------------------------------------
    def step(self) -> None:
        """Update this rank's parameters, then gather every parameter onto every rank."""
        model = self._bound("step")
        me, owner = model._group.rank, model._owner
        for p in self._inner._params:
            if owner.get(id(p), me) != me:   # owned elsewhere (untrainable ones have no owner)
                p._grad = None
        clip = self._inner.grad_clip
        if isinstance(clip, ClipGradByGlobalNorm):
            self._clip_global(clip, model)
            self._inner.grad_clip = None
            try:
                self._inner.step()
            finally:
                self._inner.grad_clip = clip
        else:
            self._inner.step()
        model._gather_params()

    def _clip_global(self, clip: ClipGradByGlobalNorm, model: ShardedDataParallel) -> None:
        """ClipGradByGlobalNorm over the sharding group: each rank's squared norm of its shard,
        summed (dp replicas hold the same averaged shard, so the sharding group is enough)."""
        pairs = [(p, p._grad.merged() if isinstance(p._grad, SparseGrad) else p._grad)
                 for p in self._inner._params
                 if p._grad is not None and getattr(p, "trainable", True)]
        local = 0.0
        for _, g in pairs:
            arr = g.rows if isinstance(g, SparseGrad) else g
            local += float(backend_of(arr).xp.sum(arr * arr, dtype=np.float64))
        total = np.array([local], dtype=np.float64)
        _api.all_reduce(total, "sum", model._group)
        scale = clip.clip_norm / max(math.sqrt(float(total[0])), clip.clip_norm)
        for p, g in pairs:
            if isinstance(g, SparseGrad):
                p._grad = SparseGrad(g.ids, g.rows * g.rows.dtype.type(scale), g.shape)
            else:
                p._grad = g * g.dtype.type(scale)

    def clear_grad(self, set_to_zero: bool = False) -> None:
        self._inner.clear_grad(set_to_zero)

    def minimize(self, loss) -> None:
        loss.backward()
        self.step()

    # -- state -----------------------------------------------------------------------
    def _layout(self, model: ShardedDataParallel) -> dict:
        g, dp = model._group, model._dp
        return {"sharding_size": g.size, "sharding_rank": g.rank,
                "dp_size": 1 if dp is None else dp.size,
                "owners": [model._owner.get(id(p), -1) for p in self._inner._params]}

    def state_dict(self) -> dict:
        """The inner optimizer's state_dict (this rank's shard only: state exists for the owned
        parameters) plus "sharding": the layout it belongs to (sizes, this rank's position,
        the owner of each of the optimizer's parameters)."""
        out = dict(self._inner.state_dict())
        out["sharding"] = self._layout(self._bound("state_dict"))
        return out

    def set_state_dict(self, state_dict: dict) -> None:
        """Load what `state_dict()` returned on the same rank of the same layout.

        Raises InvalidArgumentError when the state was saved by another rank, another sharding
        or dp size, or another ownership of the parameters; nothing is changed then."""
        model = self._bound("set_state_dict")
        if not isinstance(state_dict, dict) or "sharding" not in state_dict:
            raise InvalidArgumentError(
                "ShardingOptimizer.set_state_dict: the dict has no 'sharding' entry: it is not a "
                "ShardingOptimizer's state_dict(); load a plain optimizer's state into the inner "
                "optimizer of an unsharded run instead")
        saved, here = state_dict["sharding"], self._layout(model)
        differ = [k for k in here if saved.get(k) != here[k]]
        if differ:
            shown = {k: (saved.get(k), here[k]) for k in differ if k != "owners"}
            raise InvalidArgumentError(
                f"ShardingOptimizer.set_state_dict: the state was saved under another sharding "
                f"layout ({', '.join(differ)} differ; saved vs here: {shown}); a rank's shard "
                f"loads only on the same rank of the same world with the same model: resume "
                f"with the same sharding_degree, world size and model, each rank loading its own "
                f"file")
        inner = dict(state_dict)
        del inner["sharding"]
        self._inner.set_state_dict(inner)

    def held_bytes(self) -> dict:
        """{"params", "grads", "optimizer_state"}: bytes this rank holds now (see held_bytes)."""
        return held_bytes(self._bound("held_bytes"), self._inner)

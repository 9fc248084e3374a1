"""strategy.amp's optimizer piece: a step transform around shoal.amp.GradScaler.

In the chain it runs after gradient_merge (so a merge of k passes is unscaled once, with the
scale those k passes used) and before sharding's owned update. Every rank must skip the same
steps, and with pipeline or sharding a rank sees only its own stage's or shard's gradients, so
the "found inf" flag is reduced (max) over the world, four bytes per applied step.
"""
from __future__ import annotations

import numpy as np

from shoal.configs._collective import AmpConfig
from shoal.fleet.errors import FleetError


class _Params:
    """What GradScaler.unscale_ needs of an optimizer: its parameters."""

    def __init__(self, params):
        self._params = params


def _max_over_world(flag: np.ndarray) -> np.ndarray:
    import shoal.collective as dist
    if dist.get_world_size() > 1:
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return flag


class AmpStep:
    """Unscale the gradients, skip the update when one holds inf/nan, adapt the loss scale.

    The loss must have been scaled before backward (`opt.scale(loss).backward()` or
    `opt.minimize(loss)`); a step on unscaled gradients raises FleetError."""

    def __init__(self, cfg: AmpConfig):
        from shoal.worker.amp import GradScaler
        self.scaler = GradScaler(
            init_loss_scaling=cfg.init_loss_scaling, incr_ratio=cfg.incr_ratio,
            decr_ratio=cfg.decr_ratio, incr_every_n_steps=cfg.incr_every_n_steps,
            decr_every_n_nan_or_inf=cfg.decr_every_n_nan_or_inf,
            use_dynamic_loss_scaling=cfg.use_dynamic_loss_scaling,
            found_inf_reduce=_max_over_world)
        self._scaled = False
        self.skipped = 0

    def scale(self, loss):
        self._scaled = True
        return self.scaler.scale(loss)

    def __call__(self, params) -> bool:
        if not self._scaled:
            raise FleetError("strategy.amp is on but the loss was not scaled before backward: "
                             "call opt.minimize(loss), or opt.scale(loss).backward() then "
                             "opt.step()")
        self._scaled = False
        self.scaler.unscale_(_Params(params))
        finite = not self.scaler.found_inf
        self.scaler.update()
        self.skipped += not finite
        return finite

    def state_dict(self) -> dict:
        return {"scaler": self.scaler.state_dict(), "skipped": self.skipped}

    def set_state_dict(self, state: dict) -> None:
        self.scaler.load_state_dict(state["scaler"])
        self.skipped = int(state.get("skipped", 0))

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
from shoal.worker.nn.layer import Layer, LayerWrapper


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

    def mark_scaled(self) -> None:
        """The gradients of this step come from a scaled loss elsewhere (another stage)."""
        self._scaled = True

    def check(self) -> None:
        if not self._scaled:
            raise FleetError("strategy.amp is on but the loss was not scaled before backward: "
                             "call opt.minimize(loss), or opt.scale(loss).backward() then "
                             "opt.step()")

    def __call__(self, params) -> bool:
        self._scaled = False
        self.scaler.unscale_(_Params(params))
        finite = not self.scaler.found_inf
        self.scaler.update()
        if not finite:   # the step is skipped for good: inf gradients must not accumulate on
            self.skipped += 1
            for p in params:
                p._grad = None
        return finite

    def state_dict(self) -> dict:
        return {"scaler": self.scaler.state_dict(), "skipped": self.skipped}

    def set_state_dict(self, state: dict) -> None:
        self.scaler.load_state_dict(state["scaler"])
        self.skipped = int(state.get("skipped", 0))


class AutoCastLayer(LayerWrapper):
    """`layers` whose forward runs under shoal.amp.auto_cast with the strategy's level and lists;
    float16 outputs come back as float32, so the loss computed outside the model runs in
    float32 too. State dicts have the wrapped layer's keys."""

    def __init__(self, layers: Layer, cfg: AmpConfig):
        super().__init__()
        self._layers = layers
        object.__setattr__(self, "_cast", _cast(cfg))

    def forward(self, *args, **kwargs):
        with self._cast:
            out = self._layers(*args, **kwargs)
        if isinstance(out, (tuple, list)):
            return type(out)(_float32(o) for o in out)
        if isinstance(out, dict):
            return {k: _float32(v) for k, v in out.items()}
        return _float32(out)


def _float32(t):
    dtype = getattr(t, "dtype", None)
    if dtype is not None and dtype == np.float16:
        return t.astype(np.float32)
    return t


def _cast(cfg: AmpConfig):
    from shoal.worker import amp
    return amp.auto_cast(level="O2" if cfg.use_pure_fp16 else "O1",
                         custom_white_list=cfg.custom_white_list,
                         custom_black_list=cfg.custom_black_list)


def autocast_pipeline_layer(layer, cfg: AmpConfig):
    """A PipelineLayer whose stage forward and loss_fn run under auto_cast (in place: the
    pipeline executor calls both; activations cross stages in float16)."""
    object.__setattr__(layer, "forward", _cast(cfg)(layer.forward))
    if layer.loss_fn is not None:
        object.__setattr__(layer, "loss_fn", _cast(cfg)(layer.loss_fn))
    return layer

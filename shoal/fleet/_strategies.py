"""The collective strategies as pieces, applied in the order shoal.configs._composition lists.

`wrap_model` runs the model pieces of every enabled strategy (MODEL_ORDER), then data parallel
unless pipeline or sharding already reduce the gradients; `wrap_optimizer` runs the optimizer
pieces (OPTIMIZER_ORDER): swaps (lars, lamb), the ones that change the optimizer itself
(sharding), and step transforms (gradient_merge, amp, localsgd) chained by a
TransformedOptimizer in that order. Each piece is a small function in a dispatch table; which
pieces run, and in which order, is decided only by the strategy and _composition.
"""
from __future__ import annotations

from shoal.configs import DistributedStrategy
from shoal.configs._composition import MODEL_ORDER, OPTIMIZER_ORDER
from shoal.fleet.errors import FleetError


class Wiring:
    """What the pieces share while one job's model and optimizer are wrapped."""

    def __init__(self, strategy: DistributedStrategy, world: int):
        self.s, self.world = strategy, world
        self.model = None            # the outermost model wrapper
        self.sharded = None          # ShardedDataParallel, when sharding is on
        self.pipeline = None         # PipelineParallel, when pipeline is on
        self.groups = None           # (sharding group, dp group) of hybrid sharding


# -- model pieces -------------------------------------------------------------------------

def _recompute(w: Wiring, model):
    from shoal.worker.recompute import apply_recompute
    names = list(w.s.recompute_configs.checkpoints)
    if not names:
        raise FleetError("strategy.recompute is on but recompute_configs.checkpoints is empty: "
                         "name the layers to recompute ([n for n, _ in "
                         "model.named_sublayers()] lists them)")
    if w.s.pipeline:   # the names are the whole model's: this stage recomputes its own
        names = _stage_names(model, names)
    return apply_recompute(model, names)


def _stage_names(layer, names: list[str]) -> list[str]:
    """The checkpoint names this pipeline stage holds; names of another stage's layers are
    dropped, any other name is kept (so apply_recompute refuses it)."""
    from shoal.collective.pipeline import PipelineLayer
    if not isinstance(layer, PipelineLayer):
        return names
    mine = {n for n, _ in layer.named_sublayers()}
    n_layers = layer.bounds[-1]
    return [n for n in names if n in mine or not
            (n.split(".")[0].isdigit() and int(n.split(".")[0]) < n_layers)]


def _amp_model(w: Wiring, model):
    from shoal.fleet._amp import AutoCastLayer, autocast_pipeline_layer
    from shoal.worker import amp
    if w.s.amp_configs.use_pure_fp16:
        model = amp.decorate(model, level="O2")
    if w.s.pipeline:   # the stage's forward and the last stage's loss run under auto_cast
        return autocast_pipeline_layer(model, w.s.amp_configs)
    return AutoCastLayer(model, w.s.amp_configs)


def _pipeline(w: Wiring, model):
    from shoal.collective.pipeline import PipelineParallel
    stages = model.num_stages
    if w.world % stages:
        raise FleetError(f"strategy.pipeline: {stages} pipeline stages do not divide the "
                         f"{w.world} ranks; start a multiple of {stages} ranks "
                         f"(fleetrun --nproc_per_node)")
    cfg = w.s.pipeline_configs
    w.pipeline = PipelineParallel.from_world(
        model, dp_degree=w.world // stages, micro_batch_size=cfg.micro_batch_size,
        accumulate_steps=cfg.accumulate_steps, schedule_mode=cfg.schedule_mode)
    return w.pipeline


def _sharding(w: Wiring, model):
    from shoal.collective.sharding import ShardedDataParallel, sharding_groups
    cfg = w.s.sharding_configs
    degree = cfg.sharding_degree
    if degree > w.world or w.world % degree or (degree != w.world and not cfg.hybrid_dp):
        fix = (f"set sharding_configs.sharding_degree to {w.world} (every rank), or to a divisor "
               f"of {w.world} with sharding_configs.hybrid_dp: true")
        raise FleetError(f"strategy.sharding: sharding_configs.sharding_degree={degree} does not "
                         f"fit {w.world} ranks{' without hybrid_dp' if not w.world % degree else ''}"
                         f"; {fix}")
    group = dp_group = None
    if degree != w.world:
        group, dp_group = w.groups = sharding_groups(degree)
    w.sharded = ShardedDataParallel(model, stage=cfg.stage, group=group, dp_group=dp_group,
                                    fuse_grad_size_in_MB=_bucket_mb(w.s))
    return w.sharded


_MODEL_PIECES = {"recompute": _recompute, "amp": _amp_model, "pipeline": _pipeline,
                 "sharding": _sharding}
assert tuple(_MODEL_PIECES) == MODEL_ORDER


def _bucket_mb(s: DistributedStrategy) -> float:
    return s.fuse_grad_size_in_MB if s.fuse_all_reduce_ops else 1e-9  # unfused: one per parameter


def wrap_model(w: Wiring, model):
    """`model` with every enabled model piece applied in MODEL_ORDER, then DataParallel unless
    pipeline or sharding reduce the gradients themselves."""
    from shoal.collective import DataParallel
    if w.s.pipeline:
        from shoal.collective.pipeline import PipelineLayer
        if not isinstance(model, PipelineLayer):
            raise FleetError(f"strategy.pipeline: fleet.distributed_model needs a PipelineLayer "
                             f"(shoal.collective.PipelineLayer(layers, num_stages=...)), got "
                             f"{type(model).__name__}")
    for name in MODEL_ORDER:
        if getattr(w.s, name):
            model = _MODEL_PIECES[name](w, model)
    if w.pipeline is None and w.sharded is None:
        model = DataParallel(model, fuse_grad_size_in_MB=_bucket_mb(w.s))
    w.model = model
    return model


# -- optimizer pieces ---------------------------------------------------------------------

def _swap(optimizer, want: type, field: str, decay_field: str):
    if type(optimizer) is not want:
        raise FleetError(f"strategy.{field}: {field.upper()} replaces a {want.__name__} optimizer, "
                         f"got {type(optimizer).__name__}; build shoal.optimizer.{want.__name__}"
                         f"(...) or switch {field} off")
    if optimizer._state:
        raise FleetError(f"strategy.{field}: the {want.__name__} optimizer has already stepped; "
                         f"call fleet.distributed_optimizer before training")
    if optimizer.weight_decay:
        raise FleetError(f"strategy.{field}: the {want.__name__} optimizer has weight_decay="
                         f"{optimizer.weight_decay:g}, which {field.upper()} does not apply; set "
                         f"{field}_configs.{decay_field} instead and build the optimizer without "
                         f"weight_decay")


def _carried(new, old):
    """The settings the replacement keeps from the user's optimizer (AMP O2's master weights)."""
    new.multi_precision = getattr(old, "multi_precision", False)
    return new


def _lars(w: Wiring, opt, transforms):
    from shoal.worker.optim import Lars, Momentum
    _swap(opt, Momentum, "lars", "lars_weight_decay")
    if opt.use_nesterov:
        raise FleetError("strategy.lars: the Momentum optimizer has use_nesterov=True, which "
                         "LARS does not do; build Momentum without it or switch lars off")
    c = w.s.lars_configs
    return _carried(Lars(opt._lr, momentum=opt.momentum, lars_coeff=c.lars_coeff,
                         lars_weight_decay=c.lars_weight_decay, parameters=opt._params,
                         grad_clip=opt.grad_clip,
                         exclude_from_weight_decay=c.exclude_from_weight_decay,
                         epsilon=c.epsilon), opt)


def _lamb(w: Wiring, opt, transforms):
    from shoal.worker.optim import Adam, Lamb
    _swap(opt, Adam, "lamb", "lamb_weight_decay")
    c = w.s.lamb_configs
    new = Lamb(opt._lr, lamb_weight_decay=c.lamb_weight_decay, beta1=opt.beta1,
               beta2=opt.beta2, epsilon=opt.epsilon, parameters=opt._params,
               grad_clip=opt.grad_clip, exclude_from_weight_decay=c.exclude_from_weight_decay)
    new.lazy_mode = opt.lazy_mode
    return _carried(new, opt)


def _gradient_merge(w: Wiring, opt, transforms):
    from shoal.collective.transforms import gradient_merge
    c = w.s.gradient_merge_configs
    transforms.append(gradient_merge(c.k_steps, c.avg))
    return opt


def _amp_optimizer(w: Wiring, opt, transforms):
    from shoal.fleet._amp import AmpStep
    if w.s.amp_configs.use_pure_fp16:
        from shoal.worker import amp
        opt = amp.decorate([], opt, level="O2")[1]
    transforms.append(AmpStep(w.s.amp_configs))
    return opt


def _sharding_optimizer(w: Wiring, opt, transforms):
    from shoal.collective.sharding import ShardingOptimizer
    return ShardingOptimizer(opt, w.sharded)


def _localsgd(w: Wiring, opt, transforms):
    from shoal.collective.localsgd import localsgd
    c = w.s.localsgd_configs
    transforms.append(localsgd(c.k_steps, c.begin_step))
    return opt


_OPTIMIZER_PIECES = {"lars": _lars, "lamb": _lamb, "gradient_merge": _gradient_merge,
                     "amp": _amp_optimizer, "sharding": _sharding_optimizer,
                     "localsgd": _localsgd}
assert tuple(_OPTIMIZER_PIECES) == OPTIMIZER_ORDER


def wrap_optimizer(w: Wiring, optimizer):
    """`optimizer` with every enabled optimizer piece applied in OPTIMIZER_ORDER, inside a
    TransformedOptimizer that runs the step transforms in that order."""
    from shoal.collective.transforms import TransformedOptimizer
    if w.sharded is None and w.s.sharding:
        raise FleetError("strategy.sharding: call fleet.distributed_model(model) before "
                         "fleet.distributed_optimizer(optimizer): the sharded model decides "
                         "which rank owns which parameter")
    transforms: list = []
    for name in OPTIMIZER_ORDER:
        if getattr(w.s, name):
            optimizer = _OPTIMIZER_PIECES[name](w, optimizer, transforms)
    return TransformedOptimizer(optimizer, transforms, model=w.model)

"""Rank functions for the AMP data-parallel test (run by spawn); `train_reference` runs
in-process. O2 (float16 parameters, float32 masters) with a GradScaler; on INF_STEP one rank
(or the reference) sees an inf gradient, so the step must be skipped everywhere."""
from __future__ import annotations

import numpy as np

GLOBAL_BATCH, IN, HIDDEN, OUT = 32, 6, 16, 3
STEPS, INF_STEP, LR = 6, 2, 0.1


def data(step: int):
    rng = np.random.default_rng(200 + step)
    x = rng.normal(size=(GLOBAL_BATCH, IN)).astype(np.float32)
    return x, rng.integers(0, OUT, size=GLOBAL_BATCH).astype(np.int64)


def build(seed: int):
    import shoal
    import shoal.nn as nn
    shoal.seed(seed)
    return nn.Sequential(nn.Linear(IN, HIDDEN), nn.Tanh(), nn.Linear(HIDDEN, OUT))


def _train(model, opt, scaler, xs_ys, poison: bool) -> dict:
    import shoal
    import shoal.nn.functional as F
    scales, found = [], []
    for s in range(STEPS):
        x, y = xs_ys(s)
        with shoal.amp.auto_cast(level="O2"):
            loss = F.cross_entropy(model(shoal.to_tensor(x)), shoal.to_tensor(y))
        scaler.scale(loss).backward()
        if s == INF_STEP and poison:
            w = model.parameters()[0]
            w._grad = w._grad.copy()
            w._grad[0, 0] = np.inf
        scaler.step(opt)
        scaler.update()
        opt.clear_grad()
        scales.append(scaler.get_loss_scaling())
        found.append(scaler.found_inf)
    base = opt.inner if hasattr(opt, "inner") else opt
    st = base.state_dict()["state"]
    out = {k: v.numpy() for k, v in model.state_dict().items()}
    out.update({f"master.{i}": st[f"{i}.master"] for i in range(len(model.parameters()))})
    out["scales"], out["found"] = np.array(scales), np.array(found)
    out["steps"] = np.array([st[f"{i}.step"] for i in range(len(model.parameters()))])
    return out


def _parts(model):
    import shoal
    opt = shoal.optimizer.Momentum(LR, momentum=0.9, parameters=model.parameters())
    return shoal.amp.decorate(model, opt, level="O2")


def train_reference() -> dict:
    """One process, the whole global batch each step."""
    import shoal
    model, opt = _parts(build(seed=0))
    scaler = shoal.amp.GradScaler(init_loss_scaling=1024.0, decr_every_n_nan_or_inf=1,
                                  incr_every_n_steps=2)
    return _train(model, opt, scaler, data, poison=True)


def train_dp() -> dict:
    """Each rank its half of the global batch; rank 1 alone sees the inf, the found-inf
    reduction makes rank 0 skip the same step."""
    import shoal
    import shoal.collective as dist
    dist.init_parallel_env(timeout=30)
    r, w = dist.get_rank(), dist.get_world_size()
    model, opt = _parts(build(seed=r))   # decorate before DataParallel
    model = dist.DataParallel(model, fuse_grad_size_in_MB=0.001)
    opt = dist.TransformedOptimizer(opt, [], model=model)   # the scaler finds ._params inside
    per = GLOBAL_BATCH // w

    def reduce_max(found):
        dist.all_reduce(found, "max")
        return found
    scaler = shoal.amp.GradScaler(init_loss_scaling=1024.0, decr_every_n_nan_or_inf=1,
                                  incr_every_n_steps=2, found_inf_reduce=reduce_max)

    def shard(s):
        x, y = data(s)
        return x[r * per:(r + 1) * per], y[r * per:(r + 1) * per]
    out = _train(model, opt, scaler, shard, poison=(r == 1))
    out["bucket_dtypes"] = np.array([str(b.dtype) for b in model._buckets])
    dist.destroy_process_group()
    return out

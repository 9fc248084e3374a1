"""Rank functions for the fleet strategy tests (run by spawn) and their one-process references."""
from __future__ import annotations

import numpy as np

from tests.collective.dp_ranks import GLOBAL_BATCH, build, data


def _flat(model) -> dict:
    return {k: v.numpy().copy() for k, v in model.state_dict().items()}


def _strategy(**fields):
    from shoal.configs import DistributedStrategy
    return DistributedStrategy(**fields)


def swapped(kind: str, steps: int) -> dict:
    """fleet with lars (Momentum given) or lamb (Adam given) on the ranks' halves of the batch."""
    import shoal
    import shoal.fleet as fleet
    import shoal.nn.functional as F
    configs = {"lars": {"lars_coeff": 0.01, "lars_weight_decay": 0.01, "epsilon": 1e-9,
                        "exclude_from_weight_decay": ["b_0"]},
               "lamb": {"lamb_weight_decay": 0.05, "exclude_from_weight_decay": ["b_0"]}}[kind]
    fleet.init(is_collective=True, strategy=_strategy(**{kind: True, f"{kind}_configs": configs}),
               collective_timeout=30)
    r, w = fleet.worker_index(), fleet.worker_num()
    model = fleet.distributed_model(build(seed=0))
    user = (shoal.optimizer.Momentum(0.1, momentum=0.9, parameters=model.parameters())
            if kind == "lars" else shoal.optimizer.Adam(0.01, parameters=model.parameters()))
    opt = fleet.distributed_optimizer(user)
    per = GLOBAL_BATCH // w
    for s in range(steps):
        x, y = data(s)
        F.mse_loss(model(shoal.to_tensor(x[r * per:(r + 1) * per]), side=True),
                   shoal.to_tensor(y[r * per:(r + 1) * per])).backward()
        opt.step()
        opt.clear_grad()
    out = _flat(model)
    out["inner"] = type(opt.inner).__name__
    fleet.stop_worker()
    return out


def swapped_reference(kind: str, steps: int) -> dict:
    """One process, the global batch, and the hand-written numpy LARS / LAMB update."""
    import shoal
    import shoal.nn.functional as F
    from tests.kernels.test_optimizer_kernels import ref_lamb, ref_lars
    model = build(seed=0)
    params = model.parameters()
    slots = [[np.zeros(p.shape, np.float32), np.zeros(p.shape, np.float32)] for p in params]
    for s in range(steps):
        x, y = data(s)
        F.mse_loss(model(shoal.to_tensor(x), side=True), shoal.to_tensor(y)).backward()
        for p, st in zip(params, slots):
            g, cur = p.grad.numpy(), p.data
            if kind == "lars":
                wd = 0.0 if "b_0" in p.name else 0.01
                new, st[0] = ref_lars(cur, g, st[0], 0.1, 0.9, 0.01, wd, 1e-9)
            else:
                wd = 0.0 if "b_0" in p.name else 0.05
                new, st[0], st[1] = ref_lamb(cur, g, st[0], st[1], 0.01, 0.9, 0.999, 1e-6, s + 1, wd)
            p.data[...] = new
            p._grad = None
    return _flat(model)


def wrong_optimizer(kind: str) -> str:
    import shoal
    import shoal.fleet as fleet
    from shoal.fleet.errors import FleetError
    fleet.init(is_collective=True, strategy=_strategy(**{kind: True}), collective_timeout=30)
    model = fleet.distributed_model(build(seed=0))
    try:
        fleet.distributed_optimizer(shoal.optimizer.SGD(0.1, parameters=model.parameters()))
        return "no error"
    except FleetError as e:
        return str(e)
    finally:
        fleet.stop_worker()


def local_sgd(k_steps: int, begin_step: int, steps: int) -> list[dict]:
    """fleet with localsgd and SGD; each rank trains on its own half; params after every step."""
    import shoal
    import shoal.fleet as fleet
    import shoal.nn.functional as F
    fleet.init(is_collective=True, collective_timeout=30, strategy=_strategy(
        localsgd=True, localsgd_configs={"k_steps": k_steps, "begin_step": begin_step}))
    r, w = fleet.worker_index(), fleet.worker_num()
    model = fleet.distributed_model(build(seed=r))        # rank 0's weights are broadcast
    opt = fleet.distributed_optimizer(shoal.optimizer.SGD(0.1, parameters=model.parameters()))
    per = GLOBAL_BATCH // w
    history = []
    for s in range(steps):
        x, y = data(s)
        before = model._group._seq
        F.mse_loss(model(shoal.to_tensor(x[r * per:(r + 1) * per]), side=True),
                   shoal.to_tensor(y[r * per:(r + 1) * per])).backward()
        reduced = model._group._seq - before
        opt.step()
        opt.clear_grad()
        history.append({**_flat(model), "grad_reductions": reduced})
    fleet.stop_worker()
    return history


def local_sgd_reference(k_steps: int, begin_step: int, steps: int, world: int = 2) -> list[dict]:
    """`world` replicas in one process: the global-batch step before begin_step; from it on,
    each replica steps on its own shard and the replicas are averaged every k_steps steps."""
    import shoal
    import shoal.nn.functional as F
    models = [build(seed=0) for _ in range(world)]
    per = GLOBAL_BATCH // world
    history = []
    for s in range(1, steps + 1):
        x, y = data(s - 1)
        grads = []
        for r, m in enumerate(models):
            F.mse_loss(m(shoal.to_tensor(x[r * per:(r + 1) * per]), side=True),
                       shoal.to_tensor(y[r * per:(r + 1) * per])).backward()
            grads.append([p.grad.numpy() for p in m.parameters()])
        for r, m in enumerate(models):
            for i, p in enumerate(m.parameters()):
                g = grads[r][i] if s >= begin_step else sum(gs[i] for gs in grads) / world
                p.data[...] = p.data - np.float32(0.1) * g
                p._grad = None
        if s >= begin_step and (s - begin_step + 1) % k_steps == 0:
            for ps in zip(*(m.parameters() for m in models)):
                mean = sum(p.data for p in ps) / world
                for p in ps:
                    p.data[...] = mean
        history.append([_flat(m) for m in models])
    return history


def amp_overflow() -> dict:
    """fleet with amp (O1): rank 1's batch of step 1 holds an inf; every rank skips that step
    alone, and the steps after it apply."""
    import shoal
    import shoal.fleet as fleet
    import shoal.nn.functional as F
    fleet.init(is_collective=True, collective_timeout=30, strategy=_strategy(
        amp=True, amp_configs={"init_loss_scaling": 1024.0, "decr_every_n_nan_or_inf": 1}))
    r, w = fleet.worker_index(), fleet.worker_num()
    model = fleet.distributed_model(build(seed=0))
    opt = fleet.distributed_optimizer(shoal.optimizer.SGD(0.1, parameters=model.parameters()))
    amp_step = [t for t in opt._transforms if hasattr(t, "scaler")][0]
    scale0 = amp_step.scaler.get_loss_scaling()
    per = GLOBAL_BATCH // w
    applied = []
    for s in range(5):
        x, y = data(s)
        x = x[r * per:(r + 1) * per].copy()
        if s == 1 and r == 1:
            x[0, 0] = np.inf
        loss = F.mse_loss(model(shoal.to_tensor(x), side=True),
                          shoal.to_tensor(y[r * per:(r + 1) * per]))
        opt.minimize(loss)
        applied.append(not amp_step.scaler.found_inf)
        opt.clear_grad()
    out = {**_flat(model), "skipped": amp_step.skipped, "applied": applied, "scale0": scale0,
           "scale": amp_step.scaler.get_loss_scaling()}
    fleet.stop_worker()
    return out


def localsgd_o2() -> dict:
    """amp O2 + localsgd every step: after each average the float32 masters agree."""
    import shoal
    import shoal.fleet as fleet
    import shoal.nn.functional as F
    fleet.init(is_collective=True, collective_timeout=30, strategy=_strategy(
        amp=True, amp_configs={"use_pure_fp16": True}, localsgd=True,
        localsgd_configs={"k_steps": 1, "begin_step": 1}))
    r, w = fleet.worker_index(), fleet.worker_num()
    model = fleet.distributed_model(build(seed=0))
    opt = fleet.distributed_optimizer(shoal.optimizer.SGD(0.1, parameters=model.parameters()))
    per = GLOBAL_BATCH // w
    for s in range(3):
        x, y = data(s)
        out = model(shoal.to_tensor(x[r * per:(r + 1) * per]), side=True)
        opt.minimize(F.mse_loss(out, shoal.to_tensor(y[r * per:(r + 1) * per])))
        opt.clear_grad()
    masters = {k: v for k, v in opt.inner.state_dict()["state"].items() if k.endswith(".master")}
    result = {**_flat(model), "masters": {k: np.asarray(v).copy() for k, v in masters.items()}}
    fleet.stop_worker()
    return result


def swap_refused(kind: str, kw: dict) -> str:
    import shoal
    import shoal.fleet as fleet
    from shoal.fleet.errors import FleetError
    fleet.init(is_collective=True, strategy=_strategy(**{kind: True}), collective_timeout=30)
    model = fleet.distributed_model(build(seed=0))
    make = shoal.optimizer.Momentum if kind == "lars" else shoal.optimizer.Adam
    try:
        fleet.distributed_optimizer(make(0.1, parameters=model.parameters(), **kw))
        return "no error"
    except FleetError as e:
        return str(e)
    finally:
        fleet.stop_worker()


def same_strategy_twice() -> str:
    import shoal
    import shoal.fleet as fleet
    from shoal.configs import DistributedStrategy
    fleet.init(is_collective=True, strategy=DistributedStrategy.load("gradient_merge"),
               collective_timeout=30)
    model = fleet.distributed_model(build(seed=0))
    try:
        fleet.distributed_optimizer(shoal.optimizer.SGD(0.1, parameters=model.parameters()),
                                    DistributedStrategy.load("gradient_merge"))
        return "ok"
    except Exception as e:   # noqa: BLE001 - the test shows what was raised
        return f"{type(e).__name__}: {e}"
    finally:
        fleet.stop_worker()

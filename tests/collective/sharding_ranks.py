"""Rank functions for the sharding tests (run by spawn): each trains plain DataParallel and the
sharded model side by side, from the same weights on the same data, and returns both."""
from __future__ import annotations

import os

import numpy as np

IN, HIDDEN, OUT = 6, 10, 3


def _init(shm: bool) -> None:
    """init_parallel_env, with the group's shared memory off where `shm` is False (then stage
    2 reduces over Gloo: reduce to the owner, reduce_scatter)."""
    import shoal.collective as dist
    os.environ["SHOAL_SHM"] = "1" if shm else "0"
    dist.init_parallel_env(timeout=60)


def data(step: int, batch: int):
    rng = np.random.default_rng(200 + step)
    return (rng.normal(size=(batch, IN)).astype(np.float32),
            rng.normal(size=(batch, OUT)).astype(np.float32))


def build(seed: int):
    import shoal
    import shoal.nn as nn

    class Net(nn.Layer):
        def __init__(self):
            super().__init__()
            self.fc1, self.fc2 = nn.Linear(IN, HIDDEN), nn.Linear(HIDDEN, HIDDEN)
            self.fc3, self.side = nn.Linear(HIDDEN, OUT), nn.Linear(IN, OUT)

        def forward(self, x, side=True):
            y = self.fc3(shoal.relu(self.fc2(shoal.relu(self.fc1(x)))))
            return y + self.side(x) if side else y
    shoal.seed(seed)
    return Net()


def _clip(norm):
    import shoal
    return None if norm is None else shoal.optimizer.ClipGradByGlobalNorm(norm)


def _train(model, opt, rank, world, steps, batch, micro=1) -> list[int]:
    """`steps` updates of `micro` micro-batches each; rank 1 skips the side branch on step 0
    (its gradient there comes from rank 0 alone: the others contribute zeros). Returns the
    number of collectives each backward issued on the model's group."""
    import shoal
    import shoal.nn.functional as F
    per, seqs = batch // world // micro, []
    for s in range(steps):
        x, y = data(s, batch)
        for m in range(micro):
            lo = (rank * micro + m) * per
            out = model(shoal.to_tensor(x[lo:lo + per]), side=(s > 0 or rank == 0))
            before = model._group._seq
            F.mse_loss(out, shoal.to_tensor(y[lo:lo + per])).backward()
            seqs.append(model._group._seq - before)
            opt.step()
            opt.clear_grad()
    return seqs


def _state(model) -> dict:
    return {k: v.numpy() for k, v in model.state_dict().items()}


def compare(configs: list, steps: int = 5, batch: int = 12, hybrid_degree: int = 0,
            shm: bool = True) -> list:
    """For each (stage, clip_norm, fuse_mb): DataParallel+Adam and sharded+Adam, `steps` steps.
    With `hybrid_degree`, sharding over groups of that many ranks, data parallel across them."""
    import shoal
    import shoal.collective as dist
    _init(shm)
    r, w = dist.get_rank(), dist.get_world_size()
    group = dp_group = None
    if hybrid_degree:
        group, dp_group = dist.sharding_groups(hybrid_degree)
    results = []
    for stage, clip, fuse_mb in configs:
        dp = dist.DataParallel(build(seed=r), fuse_grad_size_in_MB=fuse_mb)
        dp_opt = shoal.optimizer.Adam(0.01, parameters=dp.parameters(), grad_clip=_clip(clip))
        _train(dp, dp_opt, r, w, steps, batch)
        sh = dist.ShardedDataParallel(build(seed=r), stage=stage, group=group,
                                      dp_group=dp_group, fuse_grad_size_in_MB=fuse_mb)
        opt = dist.ShardingOptimizer(
            shoal.optimizer.Adam(0.01, parameters=sh.parameters(), grad_clip=_clip(clip)), sh)
        _train(sh, opt, r, w, steps, batch)
        names = {id(p): n for n, p in sh._layers.named_parameters()}
        sd = opt.state_dict()
        out = {"dp": _state(dp), "sh": _state(sh),
               "owned": sorted(names[id(p)] for p in sh.owned_parameters()),
               "state_params": sorted(names[id(opt.inner._params[int(k.split('.')[0])])]
                                      for k in sd["state"] if k.endswith(".step")),
               "buckets": len(sh._buckets), "shm": bool(getattr(sh._group, "uses_shm", False))}
        opt.set_state_dict(sd)   # the same layout loads
        layout = sd["sharding"]
        bad = dict(sd, sharding=dict(layout, sharding_rank=1 - layout["sharding_rank"]))
        try:
            opt.set_state_dict(bad)
            out["bad_load"] = "loaded"
        except dist.InvalidArgumentError as e:
            out["bad_load"] = str(e)
        results.append(out)
    dist.destroy_process_group()
    return results


def merged(stage: int, k: int = 2, steps: int = 3, batch: int = 8) -> dict:
    """gradient_merge(k) around DataParallel+Adam and around ShardingOptimizer(Adam)."""
    import shoal
    import shoal.collective as dist
    from shoal.collective import TransformedOptimizer, gradient_merge
    dist.init_parallel_env(timeout=60)
    r, w = dist.get_rank(), dist.get_world_size()
    dp = dist.DataParallel(build(seed=r))
    dp_opt = TransformedOptimizer(shoal.optimizer.Adam(0.01, parameters=dp.parameters()),
                                  [gradient_merge(k)], model=dp)
    _train(dp, dp_opt, r, w, steps, batch, micro=k)
    sh = dist.ShardedDataParallel(build(seed=r), stage=stage, fuse_grad_size_in_MB=0.0003)
    inner = dist.ShardingOptimizer(shoal.optimizer.Adam(0.01, parameters=sh.parameters()))
    opt = TransformedOptimizer(inner.bind(sh), [gradient_merge(k)], model=sh)
    seqs = _train(sh, opt, r, w, steps, batch, micro=k)
    out = {"dp": _state(dp), "sh": _state(sh), "seqs": seqs}
    dist.destroy_process_group()
    return out


def accumulated(stage: int, steps: int = 3, batch: int = 8) -> dict:
    """Two micro-batches an update, the first inside no_sync(): DataParallel and sharded."""
    import shoal
    import shoal.collective as dist
    import shoal.nn.functional as F
    dist.init_parallel_env(timeout=60)
    r, w = dist.get_rank(), dist.get_world_size()
    out = {}
    for kind in ("dp", "sh"):
        if kind == "dp":
            model = dist.DataParallel(build(seed=r))
            opt = shoal.optimizer.Adam(0.01, parameters=model.parameters())
        else:
            model = dist.ShardedDataParallel(build(seed=r), stage=stage,
                                             fuse_grad_size_in_MB=0.0003)
            opt = dist.ShardingOptimizer(shoal.optimizer.Adam(0.01, parameters=model.parameters()),
                                         model)
        per, seqs = batch // w // 2, []
        for s in range(steps):
            x, y = data(s, batch)
            for m in range(2):
                lo = (r * 2 + m) * per
                xs, ys = shoal.to_tensor(x[lo:lo + per]), shoal.to_tensor(y[lo:lo + per])
                before = model._group._seq
                if m == 0:
                    with model.no_sync():
                        F.mse_loss(model(xs), ys).backward()
                else:
                    F.mse_loss(model(xs), ys).backward()
                seqs.append(model._group._seq - before)
            opt.step()
            opt.clear_grad()
        out[kind], out[kind + "_seqs"] = _state(model), seqs
    dist.destroy_process_group()
    return out


def memory(steps: int = 3, layers: int = 12, width: int = 24, shm: bool = True) -> dict:
    """Peak held bytes (sampled from gradient hooks during backward, and after it, from the
    second step on) of plain DataParallel and of stage 2, both with Adam and small buckets."""
    import shoal
    import shoal.collective as dist
    import shoal.nn as nn
    import shoal.nn.functional as F
    _init(shm)
    r = dist.get_rank()
    fuse_mb = 2.5 * width * width * 4 / (1 << 20)   # about two weights a bucket

    def net():
        shoal.seed(0)
        return nn.Sequential(*[nn.Linear(width, width, bias_attr=False) for _ in range(layers)])
    peaks = {}
    for kind in ("dp", "stage2"):
        if kind == "dp":
            model = dist.DataParallel(net(), fuse_grad_size_in_MB=fuse_mb)
            opt = shoal.optimizer.Adam(0.01, parameters=model.parameters())
            probe = lambda: dist.held_bytes(model, opt)   # noqa: E731
        else:
            model = dist.ShardedDataParallel(net(), stage=2, fuse_grad_size_in_MB=fuse_mb)
            opt = dist.ShardingOptimizer(shoal.optimizer.Adam(0.01, parameters=model.parameters()),
                                         model)
            probe = opt.held_bytes
        samples = []
        hooks = [p.register_post_accumulate_grad_hook(lambda _p: samples.append(probe()))
                 for p in model.parameters()]
        rng = np.random.default_rng(r)
        for step in range(steps):
            if step == 1:   # step 0 warms up: the launch order is learned, Adam's state made
                samples.clear()
            x = shoal.to_tensor(rng.normal(size=(4, width)).astype(np.float32))
            F.mse_loss(model(x), shoal.to_tensor(np.zeros((4, width), np.float32))).backward()
            samples.append(probe())
            opt.step()
            samples.append(probe())
            opt.clear_grad()
        for h in hooks:
            h.remove()
        peaks[kind] = {"grads+state": max(s["grads"] + s["optimizer_state"] for s in samples),
                       "params": max(s["params"] for s in samples),
                       "state": samples[-1]["optimizer_state"]}
    peaks["param_bytes"] = layers * width * width * 4
    dist.destroy_process_group()
    return peaks


def bad_inputs() -> dict:
    """The typed errors that need a world (the others are checked in-process)."""
    import shoal
    import shoal.collective as dist
    dist.init_parallel_env(timeout=60)
    out = {}
    try:
        dist.sharding_groups(3)
    except dist.InvalidArgumentError as e:
        out["degree"] = str(e)
    model = dist.ShardedDataParallel(build(seed=0), stage=2)
    other = build(seed=0)
    try:
        dist.ShardingOptimizer(shoal.optimizer.Adam(0.01, parameters=other.parameters()), model)
    except dist.InvalidArgumentError as e:
        out["foreign"] = str(e)
    try:
        dist.ShardingOptimizer(shoal.optimizer.Adam(0.01, parameters=model.parameters())).step()
    except dist.InvalidArgumentError as e:
        out["unbound"] = str(e)
    from shoal.configs import ShardingConfig
    try:
        dist.ShardedDataParallel.from_config(build(seed=0), ShardingConfig(sharding_degree=1))
    except dist.InvalidArgumentError as e:
        out["no_hybrid"] = str(e)
    built = dist.ShardedDataParallel.from_config(build(seed=0), ShardingConfig(sharding_degree=2,
                                                                               stage=2))
    out["from_config"] = (built.stage, built._group.size, built._dp is None)
    dist.destroy_process_group()
    return out


def _peaks(model, opt, probe, steps: int, width: int, rank: int) -> dict:
    """Train `steps` steps on random data; the peak of `probe()` (held bytes) sampled after
    every gradient hook and after each backward and update, from the second step on."""
    import shoal
    import shoal.nn.functional as F
    samples = []
    hooks = [p.register_post_accumulate_grad_hook(lambda _p: samples.append(probe()))
             for p in model.parameters()]
    rng = np.random.default_rng(rank)
    after_backward = None
    for step in range(steps):
        if step == 1:   # step 0 warms up: the launch order is learned, Adam's state made
            samples.clear()
        x = shoal.to_tensor(rng.normal(size=(8, width)).astype(np.float32))
        F.mse_loss(model(x), shoal.to_tensor(np.zeros((8, width), np.float32))).backward()
        after_backward = probe()
        samples.append(after_backward)
        opt.step()
        samples.append(probe())
        opt.clear_grad()
    for h in hooks:
        h.remove()
    return {"grads+state": max(s["grads"] + s["optimizer_state"] for s in samples),
            "grads": max(s["grads"] for s in samples),
            "grads_after_backward": after_backward["grads"]}


def big(shm: bool, steps: int = 4, layers: int = 6, width: int = 48) -> dict:
    """A model whose every weight is bigger than the bucket limit (a bucket of its own, with
    one owner), biases included: DataParallel, stage 1 and stage 2 from the same weights on
    the same data; their final weights, peaks of held bytes and the bucket layout."""
    import shoal
    import shoal.collective as dist
    import shoal.nn as nn
    _init(shm)
    r = dist.get_rank()
    fuse_mb = 0.5 * width * width * 4 / (1 << 20)   # half a weight

    def net():
        shoal.seed(0)
        return nn.Sequential(*[nn.Linear(width, width) for _ in range(layers)])
    out = {}
    for kind in ("dp", "stage1", "stage2"):
        if kind == "dp":
            model = dist.DataParallel(net(), fuse_grad_size_in_MB=fuse_mb)
            opt = shoal.optimizer.Adam(0.01, parameters=model.parameters())
            probe = lambda: dist.held_bytes(model, opt)   # noqa: E731
        else:
            model = dist.ShardedDataParallel(net(), stage=int(kind[-1]),
                                             fuse_grad_size_in_MB=fuse_mb)
            opt = dist.ShardingOptimizer(shoal.optimizer.Adam(0.01, parameters=model.parameters()),
                                         model)
            probe = opt.held_bytes
            out[kind + "_owned_bytes"] = sum(p.data.nbytes for p in model.owned_parameters())
            out[kind + "_owned_params"] = len(model.owned_parameters())
            out["bucket_owners"] = [b.owner for b in model._buckets]
            out["bucket_bytes"] = max(b.length * 4 for b in model._buckets)
        out[kind] = _peaks(model, opt, probe, steps, width, r)
        out[kind + "_state"] = _state(model)
    dist.destroy_process_group()
    return out

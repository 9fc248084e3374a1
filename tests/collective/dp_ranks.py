"""Rank functions for the data-parallel tests (run by spawn); `train_reference` runs in-process."""
from __future__ import annotations

import numpy as np

GLOBAL_BATCH, IN, HIDDEN, OUT = 16, 5, 8, 3


def data(step: int):
    rng = np.random.default_rng(100 + step)
    return (rng.normal(size=(GLOBAL_BATCH, IN)).astype(np.float32),
            rng.normal(size=(GLOBAL_BATCH, OUT)).astype(np.float32))


def build(seed: int, unused_branch: bool = False):
    import shoal
    import shoal.nn as nn

    class Net(nn.Layer):
        def __init__(self):
            super().__init__()
            self.fc1, self.fc2 = nn.Linear(IN, HIDDEN), nn.Linear(HIDDEN, OUT)
            self.side = nn.Linear(IN, OUT)   # used only when the forward asks for it

        def forward(self, x, side=False):
            y = self.fc2(shoal.relu(self.fc1(x)))
            return y + self.side(x) if side else y
    shoal.seed(seed)
    return Net()


def train_reference(steps: int, lr: float = 0.1) -> dict:
    """One process, the whole global batch each step."""
    import shoal
    import shoal.nn.functional as F
    model = build(seed=0)
    opt = shoal.optimizer.SGD(lr, parameters=model.parameters())
    for s in range(steps):
        x, y = data(s)
        loss = F.mse_loss(model(shoal.to_tensor(x), side=True), shoal.to_tensor(y))
        loss.backward()
        opt.step()
        opt.clear_grad()
    return {k: v.numpy() for k, v in model.state_dict().items()}


def train_dp(steps: int, fuse_mb: float, lr: float = 0.1) -> dict:
    """Each rank its slice of the global batch; rank 1 skips the side branch on step 0."""
    import shoal
    import shoal.collective as dist
    import shoal.nn.functional as F
    dist.init_parallel_env(timeout=30)
    r, w = dist.get_rank(), dist.get_world_size()
    model = dist.DataParallel(build(seed=r), fuse_grad_size_in_MB=fuse_mb)  # rank 0's weights win
    opt = shoal.optimizer.SGD(lr, parameters=model.parameters())
    per = GLOBAL_BATCH // w
    for s in range(steps):
        x, y = data(s)
        xs, ys = shoal.to_tensor(x[r * per:(r + 1) * per]), shoal.to_tensor(y[r * per:(r + 1) * per])
        loss = F.mse_loss(model(xs, side=True), ys)
        loss.backward()
        opt.step()
        opt.clear_grad()
    out = {k: v.numpy() for k, v in model.state_dict().items()}
    out["buckets"] = len(model._buckets)
    dist.destroy_process_group()
    return out


def train_merged_fleet(micro: int, lr: float = 0.1) -> dict:
    """fleet collective mode with gradient_merge k=micro: one update from `micro` micro-batches."""
    import shoal
    import shoal.fleet as fleet
    import shoal.nn.functional as F
    from shoal.configs import DistributedStrategy
    strategy = DistributedStrategy(gradient_merge=True, gradient_merge_configs={"k_steps": micro})
    fleet.init(is_collective=True, strategy=strategy, collective_timeout=30)
    r, w = fleet.worker_index(), fleet.worker_num()
    model = fleet.distributed_model(build(seed=r))
    opt = fleet.distributed_optimizer(shoal.optimizer.SGD(lr, parameters=model.parameters()))
    x, y = data(0)
    per = GLOBAL_BATCH // w // micro
    reductions = []
    for m in range(micro):
        lo = (r * micro + m) * per
        xs, ys = shoal.to_tensor(x[lo:lo + per]), shoal.to_tensor(y[lo:lo + per])
        before = model._group._seq
        F.mse_loss(model(xs, side=True), ys).backward()
        reductions.append(model._group._seq - before)
        opt.step()
        opt.clear_grad()
    out = {k: v.numpy() for k, v in model.state_dict().items()}
    out["reductions"] = reductions
    fleet.stop_worker()
    return out


def drifting(check_every: int) -> dict:
    import shoal
    import shoal.collective as dist
    import shoal.nn.functional as F
    dist.init_parallel_env(timeout=30)
    r = dist.get_rank()
    model = dist.DataParallel(build(seed=0), check_every=check_every)
    x, y = data(0)
    out = {"steps": 0}
    try:
        for s in range(4):
            F.mse_loss(model(shoal.to_tensor(x)), shoal.to_tensor(y)).backward()
            model.clear_gradients()
            out["steps"] = s + 1
            if s == 0 and r == 1:
                model._layers.fc2.bias.data[0] += 1e-3   # an update one replica alone made
    except dist.ReplicaDriftError as e:
        out["error"] = str(e)
    dist.destroy_process_group()
    return out


def robust_passes() -> dict:
    """A backward pass that raises on every rank, then normal steps; no_sync inside gradient
    merge; a parameter no rank uses keeps no gradient (Adam leaves it alone)."""
    import shoal
    import shoal.collective as dist
    import shoal.nn.functional as F
    from shoal.collective import TransformedOptimizer, gradient_merge
    dist.init_parallel_env(timeout=30)
    r, w = dist.get_rank(), dist.get_world_size()
    model = dist.DataParallel(build(seed=r), fuse_grad_size_in_MB=0.0002)
    x, y = data(0)
    xs, ys = shoal.to_tensor(x[r::w]), shoal.to_tensor(y[r::w])
    out = {}

    class Boom(shoal.Function):
        def forward(self, a):
            return a.copy()

        def backward(self, g):
            raise RuntimeError("backward fails on purpose")
    try:  # fc2's gradient is ready (its bucket started) before fc1's path raises
        hidden = shoal.relu(model._layers.fc1(xs))
        y_hat = model._layers.fc2(Boom.apply(hidden))
        F.mse_loss(y_hat, ys).backward()
    except RuntimeError as e:
        out["raised"] = str(e)
    model.clear_gradients()
    side = model._layers.side.weight.numpy().copy()
    opt = TransformedOptimizer(shoal.optimizer.Adam(0.1, parameters=model.parameters()),
                               [gradient_merge(2)], model=model)
    for _ in range(4):
        with model.no_sync():  # nested inside merge: the merge still decides the last pass
            pass
        F.mse_loss(model(xs), ys).backward()  # side branch unused on every rank
        opt.step()
        opt.clear_grad()
    out["state"] = {k: v.numpy() for k, v in model.state_dict().items()}
    out["side_unchanged"] = bool(np.array_equal(side, model._layers.side.weight.numpy()))
    dist.destroy_process_group()
    return out

"""Rank functions for the recompute + DataParallel test (run by spawn)."""
from __future__ import annotations

import numpy as np

BATCH, D = 8, 6
CHECKPOINTS = ["blocks.0", "blocks.1"]


def build():
    import shoal
    import shoal.nn as nn

    class Block(nn.Layer):
        def __init__(self):
            super().__init__()
            self.fc1, self.drop, self.fc2 = nn.Linear(D, D), nn.Dropout(0.25), nn.Linear(D, D)

        def forward(self, x):
            return x + self.fc2(self.drop(shoal.tanh(self.fc1(x))))

    class Net(nn.Layer):
        """blocks.1 runs twice; blocks.0.fc1 is used inside its block and outside it too."""

        def __init__(self):
            super().__init__()
            self.blocks = nn.LayerList([Block(), Block()])
            self.head = nn.Linear(D, 2)

        def forward(self, x):
            h = self.blocks[1](self.blocks[1](self.blocks[0](x)))
            return self.head(h + self.blocks[0].fc1(x))

    shoal.seed(0)
    return Net()


def train(recomputed: bool, steps: int, fuse_mb: float) -> dict:
    import shoal
    import shoal.collective as dist
    import shoal.nn.functional as F
    from shoal.worker.recompute import apply_recompute
    model = build()
    if recomputed:
        apply_recompute(model, CHECKPOINTS)
    dp = dist.DataParallel(model, fuse_grad_size_in_MB=fuse_mb)
    opt = shoal.optimizer.SGD(0.1, parameters=dp.parameters())
    r = dist.get_rank()
    shoal.seed(10 + r)        # each rank its own dropout masks, the same in both runs
    losses = []
    for s in range(steps):
        rng = np.random.default_rng(100 * s + r)
        x = shoal.to_tensor(rng.normal(size=(BATCH, D)))
        y = shoal.to_tensor(rng.normal(size=(BATCH, 2)))
        loss = F.mse_loss(dp(x), y)
        loss.backward()
        losses.append(loss.item())
        opt.step()
        opt.clear_grad()
    out = {k: v.numpy() for k, v in dp.state_dict().items()}
    out["losses"] = np.array(losses)
    out["buckets"] = len(dp._buckets)
    return out


def both(steps: int, fuse_mb: float) -> dict:
    """DataParallel without recompute, then with it, on the same group."""
    import shoal.collective as dist
    dist.init_parallel_env(timeout=30)
    out = {"plain": train(False, steps, fuse_mb), "recomputed": train(True, steps, fuse_mb)}
    dist.destroy_process_group()
    return out

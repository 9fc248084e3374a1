"""Rank functions for the pipeline tests (run by spawn); `train_reference` runs in-process."""
from __future__ import annotations

import time

import numpy as np

BATCH, MICRO, IN, HIDDEN, OUT = 16, 4, 5, 8, 3


def data(step: int):
    rng = np.random.default_rng(200 + step)
    return (rng.normal(size=(BATCH, IN)).astype(np.float32),
            rng.normal(size=(BATCH, OUT)).astype(np.float32))


def build_layers(seed: int) -> list:
    import shoal
    import shoal.nn as nn
    shoal.seed(seed)
    return [nn.Linear(IN, HIDDEN), nn.Tanh(), nn.Linear(HIDDEN, HIDDEN), nn.ReLU(),
            nn.Linear(HIDDEN, OUT)]


def train_reference(steps: int, lr: float = 0.1) -> dict:
    """The unpipelined model, one process, the whole batch each step."""
    import shoal
    import shoal.nn as nn
    import shoal.nn.functional as F
    model = nn.Sequential(*build_layers(0))
    opt = shoal.optimizer.Momentum(lr, parameters=model.parameters())
    losses = []
    for s in range(steps):
        x, y = data(s)
        loss = F.mse_loss(model(shoal.to_tensor(x)), shoal.to_tensor(y))
        losses.append(float(loss.item()))
        loss.backward()
        opt.step()
        opt.clear_grad()
    x, y = data(steps)
    with shoal.no_grad():
        out = model(shoal.to_tensor(x))
        eval_loss = float(F.mse_loss(out, shoal.to_tensor(y)).item())
    return {"state": {k: v.numpy() for k, v in model.state_dict().items()}, "losses": losses,
            "eval_loss": eval_loss, "eval_out": out.numpy()}


def train_pipeline(steps: int, mode: str, dp: int, cuts, lr: float = 0.1) -> dict:
    """2 stages (x dp replicas, each its slice of the batch; replica d built from seed d)."""
    import shoal
    import shoal.collective as dist
    import shoal.nn.functional as F
    from shoal.collective.pipeline import SCHEDULES, ScheduleMode
    dist.init_parallel_env(timeout=60)
    rank, stages = dist.get_rank(), dist.get_world_size() // dp
    dp_index = rank // stages
    pipe = dist.PipelineLayer(build_layers(seed=dp_index), num_stages=stages, seg_method=cuts,
                              loss_fn=F.mse_loss)
    per = BATCH // dp
    model = dist.PipelineParallel.from_world(pipe, dp, micro_batch_size=per // MICRO,
                                             accumulate_steps=MICRO, schedule_mode=mode)
    opt = shoal.optimizer.Momentum(lr, parameters=model.parameters())
    losses = []
    for s in range(steps):
        x, y = data(s)
        losses.append(model.train_batch((x[dp_index * per:(dp_index + 1) * per],
                                         y[dp_index * per:(dp_index + 1) * per]), opt))
    timeline = model.last_timeline
    expected = [i.name for i in SCHEDULES[ScheduleMode.parse(mode)](pipe.stage, stages, MICRO)]
    x, y = data(steps)
    xs, ys = x[dp_index * per:(dp_index + 1) * per], y[dp_index * per:(dp_index + 1) * per]
    eval_loss = model.eval_batch((xs, ys))
    eval_out = model.eval_batch(xs, compute_loss=False)
    out = {"state": {k: v.numpy() for k, v in model.state_dict().items()}, "losses": losses,
           "stage": pipe.stage, "dp_index": dp_index, "eval_loss": eval_loss,
           "eval_out": eval_out, "ran": [name for name, *_ in timeline["instructions"]],
           "expected": expected, "wall_s": timeline["wall_s"],
           "compute_s": timeline["compute_s"]}
    dist.destroy_process_group()
    return out


def dead_stage(timeout: float) -> dict:
    """Stage 1 never takes part in the batch: stage 0's send must time out, not hang."""
    import shoal.collective as dist
    import shoal.nn.functional as F
    dist.init_parallel_env(timeout=timeout)
    pipe = dist.PipelineLayer(build_layers(0), num_stages=2, loss_fn=F.mse_loss)
    model = dist.PipelineParallel(pipe, micro_batch_size=4, accumulate_steps=4)
    out = {"error": None}
    if pipe.stage == 1:
        time.sleep(timeout + 3)
    else:
        import shoal
        opt = shoal.optimizer.SGD(0.1, parameters=model.parameters())
        start = time.monotonic()
        try:
            model.train_batch(data(0), opt)
        except dist.CollectiveError as e:
            out["error"] = type(e).__name__
        out["waited"] = time.monotonic() - start
    dist.destroy_process_group()
    return out


class HalvingScaler:
    """A duck-typed GradScaler: scale x2, unscale in step, count the updates."""

    def __init__(self):
        self.scaled = self.updates = 0

    def scale(self, loss):
        self.scaled += 1
        return loss * 2.0

    def step(self, optimizer):
        for p in optimizer._params:
            if p._grad is not None:
                p._grad = p._grad * 0.5
        optimizer.step()

    def update(self):
        self.updates += 1

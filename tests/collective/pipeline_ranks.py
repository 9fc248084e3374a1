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
           "compute_s": timeline["compute_s"],
           "links": [None if g is None else (g.id, list(g.ranks)) for g in
                     (model._links.fwd_in, model._links.fwd_out, model._links.bwd_in,
                      model._links.bwd_out)] if stages > 1 else [],
           "pp_id": model.pp_group.id, "ahead": model._ahead}
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
        try:   # the failed batch's messages may still be in flight: no further batch
            model.train_batch(data(1), opt)
        except dist.CollectiveError as e:
            out["again"] = type(e).__name__
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


# batches of (dtype, shape, count): the header repeats, changes (shape, then dtype), repeats
CHANNEL_BATCHES = [("float32", (4, 3), 3), ("float32", (4, 3), 2), ("float64", (2, 5), 2),
                   ("float64", (2, 5), 1), ("float32", (4, 3), 2), ("int64", (4, 3), 1)]


def channel_array(batch: int, mb: int):
    dtype, shape, _ = CHANNEL_BATCHES[batch]
    return (np.arange(int(np.prod(shape))).reshape(shape) + 100 * batch + mb).astype(dtype)


def channel(ahead: bool) -> dict:
    """Rank 0 sends CHANNEL_BATCHES through an ActivationSender, rank 1 receives them through
    an ActivationReceiver (posting ahead or not), over one link group of each direction."""
    import shoal.collective as dist
    from shoal.collective.pipeline import _comm
    dist.init_parallel_env(timeout=30)
    rank = dist.get_rank()
    (fwd, _), = _comm.build_links([[0, 1]])
    out = {"received": [], "error": None}
    if rank == 0:
        sender = _comm.ActivationSender(_comm.Outbox(fwd, 1), "test output")
        for b, (_, _, n) in enumerate(CHANNEL_BATCHES):
            sender.begin_batch()
            for mb in range(n):
                sender.send(channel_array(b, mb), mb)
            sender.outbox.drain()
        sender.begin_batch()
        sender.send(np.zeros((4, 3), np.int64), 0)
        try:   # a micro-batch that does not match its batch's header: refused before sending
            sender.send(np.zeros((5, 3), np.int64), 1)
        except dist.InvalidArgumentError as e:
            out["error"] = str(e)
        sender.outbox.drain()
    else:
        receiver = _comm.ActivationReceiver(_comm.Inbox(fwd, 0))
        for b, (_, _, n) in enumerate(CHANNEL_BATCHES + [("int64", (4, 3), 1)]):
            receiver.begin_batch(ahead)
            got = []
            for mb in range(n):
                if ahead:
                    receiver.post(block=mb == 0)
                got.append(receiver.take())
            out["received"].append(got)
    dist.destroy_process_group()
    return out


def subgroup_pipeline(steps: int) -> dict:
    """Ranks 0 and 1 of a world of 3 are a 2-stage pipeline over pp_group = new_group([0, 1])
    (not the world, no links given: both directions share pp_group); rank 2 only builds the
    group with them."""
    import shoal
    import shoal.collective as dist
    import shoal.nn.functional as F
    dist.init_parallel_env(timeout=60)
    pp = dist.new_group([0, 1])
    if dist.get_rank() == 2:
        dist.destroy_process_group()
        return {}
    pipe = dist.PipelineLayer(build_layers(0), num_stages=2, seg_method=[2], loss_fn=F.mse_loss)
    model = dist.PipelineParallel(pipe, micro_batch_size=MICRO, accumulate_steps=BATCH // MICRO,
                                  pp_group=pp)
    opt = shoal.optimizer.Momentum(0.1, parameters=model.parameters())
    losses = [model.train_batch(data(s), opt) for s in range(steps)]
    x, y = data(steps)
    out = {"state": {k: v.numpy() for k, v in model.state_dict().items()}, "losses": losses,
           "eval_loss": model.eval_batch((x, y)), "eval_out": model.eval_batch(x, False),
           "ahead": model._ahead}
    dist.destroy_process_group()
    return out

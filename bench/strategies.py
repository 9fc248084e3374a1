"""Per-strategy memory and step time on 2 ranks, against plain data parallel in the same run.

Every case trains the same MLP (--layers Linear(width, width)+ReLU blocks and a classifier,
Adam, softmax cross entropy, --batch samples per rank per step) through fleet's own wiring
(shoal.fleet._strategies: the pieces a DistributedStrategy switches on, in
shoal.configs._composition's order) on 2 ranks started by spawn(), one BLAS thread each:

  dp                plain DataParallel (the reference of every ratio)
  sharding_stage1   ZeRO stage 1 over both ranks
  sharding_stage2   ZeRO stage 2 over both ranks
  amp_o1, amp_o2    mixed precision (on CPU numpy float16 is slow: the time ratio says so)
  recompute         every hidden block recomputed in backward
  gradient_merge    k=2 (a step is one micro-step)
  localsgd          k=4 from step 1
  lamb              Adam swapped for LAMB
  pipeline_1f1b, pipeline_fthenb   2 stages x --micro micro-batches on the same global batch

Memory: the bytes of parameters, gradients (fused buckets and shards in flight included) and
optimizer state (moments, master weights) each rank holds, sampled after every parameter's
gradient hook during backward and after the update (shoal.collective.sharding.held_bytes);
the peak over a step. `activations`: the bytes the loss's graph keeps for backward
(autograd.graph_stats; not sampled for the pipeline cases), where recompute saves. Time: steps of the cases alternate in blocks, the order flipped each
round; the median block's seconds per step. The pipeline's bubble fraction is measured per
stage from PipelineParallel.last_timeline against the theoretical (p - 1) / (m + p - 1):
1 - (time in Forward and Backward) / (the schedule's span, from the batch's start to the end of
the stage's last Forward or Backward), the mean over the stages; the loss broadcast and the
optimizer step after the flush are outside the schedule (`with_step_and_loss_broadcast` gives
the figure over the whole train_batch). The theory assumes stages of equal cost: --layers
hidden blocks split evenly, the first stage's backward skips its input's gradient and the last
holds the classifier and the loss, so the more layers, the closer the two stages' costs.

One JSON line per figure on stdout (DESIGN.md's format):

    {"bench": "strategies", "case": "sharding_stage2_grad_state_bytes", "value": <bytes>,
     "unit": "bytes/rank", "reference": "dp", "ratio": <value / dp's>, ...}
    {"bench": "strategies", "case": "sharding_stage2_step", "value": <s>, "unit": "s/step",
     "reference": "dp", "ratio": ...}
    {"bench": "strategies", "case": "pipeline_1f1b_bubble_p2_m8", "value": <fraction>,
     "unit": "fraction", "reference": "theory", "ratio": <value / theory>, "theory": 0.111}

Usage: python bench/strategies.py [--quick] [--width 1024] [--layers 8] [--batch 256]
       [--micro 8] [--rounds 6] [--steps 3] [--fuse-mb 2] [--cases dp,sharding_stage2,...]
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import numpy as np

BENCH = "strategies"
WORLD = 2
N_CLASSES = 10
_COMPUTE = ("Forward", "Backward")

CASES = {
    "dp": {},
    "sharding_stage1": {"sharding": True, "sharding_configs": {"sharding_degree": 2, "stage": 1}},
    "sharding_stage2": {"sharding": True, "sharding_configs": {"sharding_degree": 2, "stage": 2}},
    "amp_o1": {"amp": True},
    "amp_o2": {"amp": True, "amp_configs": {"use_pure_fp16": True}},
    "recompute": {"recompute": True},
    "gradient_merge": {"gradient_merge": True, "gradient_merge_configs": {"k_steps": 2}},
    "localsgd": {"localsgd": True, "localsgd_configs": {"k_steps": 4, "begin_step": 1}},
    "lamb": {"lamb": True},
    "pipeline_1f1b": {"pipeline": True, "pipeline_configs": {"schedule_mode": "1F1B"}},
    "pipeline_fthenb": {"pipeline": True, "pipeline_configs": {"schedule_mode": "FThenB"}},
}


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--width", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=8, help="hidden Linear+ReLU blocks (even)")
    ap.add_argument("--batch", type=int, default=256, help="samples per rank per step")
    ap.add_argument("--micro", type=int, default=8, help="pipeline micro-batches per step")
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--steps", type=int, default=3, help="steps per timed block")
    ap.add_argument("--fuse-mb", type=int, default=2, help="gradient bucket size in MB (all cases)")
    ap.add_argument("--cases", default=",".join(CASES))
    ap.add_argument("--quick", action="store_true", help="a small model, few rounds")
    args = ap.parse_args(argv)
    if args.quick:
        args.width, args.rounds, args.steps = 256, 2, 2
    unknown = [c for c in args.cases.split(",") if c not in CASES]
    if unknown:
        ap.error(f"--cases: unknown {unknown}; known: {', '.join(CASES)}")
    if args.layers % 2 or args.layers < 2:
        ap.error("--layers must be even (two pipeline stages of equal size)")
    if (WORLD * args.batch) % args.micro:
        ap.error(f"--micro {args.micro} must divide the global batch {WORLD * args.batch}")
    return args


def strategy(case: str, args):
    from shoal.configs import DistributedStrategy
    fields = json.loads(json.dumps(CASES[case]))
    fields["fuse_grad_size_in_MB"] = args.fuse_mb
    if case == "recompute":
        fields["recompute_configs"] = {"checkpoints": [f"{i}" for i in range(args.layers)]}
    if case.startswith("pipeline"):
        fields["pipeline_configs"].update(micro_batch_size=WORLD * args.batch // args.micro,
                                          accumulate_steps=args.micro)
    return DistributedStrategy(**fields)


def blocks(args):
    """The layers: `layers` blocks of Linear+ReLU, then the classifier (merged into the last
    block so the two pipeline stages hold the same number of width x width weights)."""
    import shoal.nn as nn
    out = [nn.Sequential(nn.Linear(args.width, args.width), nn.ReLU())
           for _ in range(args.layers - 1)]
    out.append(nn.Sequential(nn.Linear(args.width, args.width), nn.ReLU(),
                             nn.Linear(args.width, N_CLASSES)))
    return out


class Case:
    """One strategy's model, optimizer and measurements on this rank."""

    def __init__(self, name: str, args, rank: int):
        import shoal
        import shoal.nn as nn
        import shoal.nn.functional as F
        from shoal.fleet._strategies import Wiring, wrap_model, wrap_optimizer
        self.name, self.args, self.F = name, args, F
        s = strategy(name, args)
        shoal.seed(0)
        if s.pipeline:
            from shoal.collective import PipelineLayer
            layer = PipelineLayer(blocks(args), num_stages=WORLD,
                                  loss_fn=lambda out, y: F.cross_entropy(out, y))
        else:
            layer = nn.Sequential(*blocks(args))
        self.w = Wiring(s, WORLD)
        self.model = wrap_model(self.w, layer)
        self.opt = wrap_optimizer(self.w, shoal.optimizer.Adam(1e-4, parameters=self.model.parameters()))
        self.base = self.opt
        while not hasattr(self.base, "_state"):
            self.base = self.base.inner
        self.peak = {"params": 0, "grads": 0, "optimizer_state": 0, "grad_state": 0}
        self.sampling = False
        for p in self.model.parameters():
            p.register_post_accumulate_grad_hook(lambda _: self.sample())
        rng = np.random.default_rng(1 + rank)
        n = WORLD * args.batch if s.pipeline else args.batch
        self.x = rng.normal(size=(n, args.width)).astype(np.float32)
        self.y = rng.integers(0, N_CLASSES, n).astype(np.int64)
        self.times: list[float] = []
        self.bubbles: list[float] = []
        self.wall_bubbles: list[float] = []
        self.activations = 0

    def sample(self) -> None:
        if not self.sampling:
            return
        from shoal.collective.sharding import held_bytes
        now = held_bytes(self.model, self.base)
        now["grad_state"] = now["grads"] + now["optimizer_state"]
        for k, v in now.items():
            self.peak[k] = max(self.peak[k], v)

    def step(self) -> None:
        import shoal
        from shoal.worker.autograd import graph_stats
        if self.w.pipeline is not None:
            self.model.train_batch((self.x, self.y), self.opt)
            t = self.model.last_timeline
            span = max(t1 for name, _, _, t1 in t["instructions"] if name in _COMPUTE)
            self.bubbles.append(1.0 - t["compute_s"] / span)
            self.wall_bubbles.append(1.0 - t["compute_s"] / t["wall_s"])
            self.sample()
            return
        loss = self.F.cross_entropy(self.model(shoal.to_tensor(self.x)), shoal.to_tensor(self.y))
        if self.sampling:   # what the graph keeps for backward (recompute's saving)
            self.activations = max(self.activations, graph_stats(loss)["saved_bytes"])
        self.opt.minimize(loss)
        self.sample()
        self.opt.clear_grad()

    def block(self, steps: int, measure_memory: bool) -> None:
        import shoal.collective as dist
        dist.barrier()
        self.sampling = measure_memory
        t0 = time.perf_counter()
        for _ in range(steps):
            self.step()
        self.times.append((time.perf_counter() - t0) / steps)
        self.sampling = False


def rank_main(args) -> dict:
    import shoal.collective as dist
    dist.init_parallel_env(timeout=300)
    rank = dist.get_rank()
    cases = [Case(name, args, rank) for name in args.cases.split(",")]
    for c in cases:                      # warm-up: optimizer state created, buffers allocated
        c.block(1, measure_memory=False)
    for r in range(args.rounds):
        for c in (cases if r % 2 == 0 else cases[::-1]):
            slow = c.name.startswith("amp")   # numpy float16 is ~200x slower on CPU than
            if slow and 0 < r < args.rounds - 1:  # float32: one step in the first and last round
                continue
            c.block(1 if slow else args.steps, measure_memory=(r == args.rounds - 1))
    out = {c.name: {"step_s": statistics.median(c.times), "peak": c.peak,
                    "activations": c.activations,
                    "bubble": statistics.median(c.bubbles) if c.bubbles else None,
                    "wall_bubble": statistics.median(c.wall_bubbles) if c.bubbles else None}
           for c in cases}
    dist.destroy_process_group()
    return out


def emit(case: str, value, unit: str, reference: str, ratio, **extra) -> None:
    line = {"bench": BENCH, "case": case, "value": value, "unit": unit, "reference": reference,
            "ratio": None if ratio is None else round(ratio, 4), **extra}
    print(json.dumps(line), flush=True)


def main(argv=None) -> int:
    import os
    args = parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    from shoal.launcher._spawn import spawn
    results = spawn(rank_main, (args,), nprocs=WORLD, timeout=3600)
    ref = results[0].get("dp")
    p, m = WORLD, args.micro
    theory = (p - 1) / (m + p - 1)
    for case in args.cases.split(","):
        per_rank = [r[case] for r in results]
        if case.startswith("pipeline"):
            bubbles = [r["bubble"] for r in per_rank]
            value = statistics.mean(bubbles)
            emit(f"{case}_bubble_p{p}_m{m}", round(value, 4), "fraction", "theory",
                 value / theory, theory=round(theory, 4),
                 per_stage=[round(b, 4) for b in bubbles], within_0_05=abs(value - theory) <= 0.05,
                 with_step_and_loss_broadcast=round(
                     statistics.mean(r["wall_bubble"] for r in per_rank), 4))
        peak = max(r["peak"]["grad_state"] for r in per_rank)
        ref_peak = max(r["dp"]["peak"]["grad_state"] for r in results) if ref else None
        emit(f"{case}_grad_state_bytes", peak, "bytes/rank", "dp",
             peak / ref_peak if ref_peak else None,
             params=max(r["peak"]["params"] for r in per_rank),
             grads=max(r["peak"]["grads"] for r in per_rank),
             optimizer_state=max(r["peak"]["optimizer_state"] for r in per_rank),
             activations=max(r["activations"] for r in per_rank))
        step = max(r["step_s"] for r in per_rank)
        ref_step = max(r["dp"]["step_s"] for r in results) if ref else None
        emit(f"{case}_step", round(step, 6), "s/step", "dp", step / ref_step if ref_step else None)
    return 0


if __name__ == "__main__":
    sys.exit(main())

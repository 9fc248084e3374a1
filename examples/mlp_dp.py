"""Data-parallel MLP training with fleet's collective mode, in Paddle's fleet style.

A synthetic classification task (8 classes in 32 dimensions, each class a mixture of two
Gaussian clusters, so a linear model falls short), generated in-process with numpy and the same
on every rank for a given --seed. Each step draws one global batch of --batch-size examples
(the same draw on every rank); rank i trains on its 1/N shard of it. `fleet.distributed_model`
wraps the MLP in DataParallel (rank 0's weights broadcast, gradients all-reduced and averaged
during backward), so N ranks train exactly the model one process would on the global batch.
Rank 0 prints the loss (averaged over ranks) every --log-every steps and ends with
`final accuracy: 0.xx` on a held-out set, counted over every rank's share of it.

    python examples/mlp_dp.py                                # one process (a world of one)
    fleetrun --nproc_per_node 2 examples/mlp_dp.py           # two data-parallel workers
    fleetrun --nproc_per_node 2 examples/mlp_dp.py --strategy collective_dp --steps 500

Every collective preset runs it (`fleetrun --nproc_per_node 2 --strategy <preset>
examples/mlp_dp.py`): sharding_stage1/2, amp_o1/o2, recompute (its checkpoints name this
model's hidden blocks, body.0 and body.1), gradient_merge, localsgd, lars (the example then
builds Momentum: LARS replaces a Momentum optimizer), lamb; pipeline_1f1b/fthenb cut the
same layers into one stage per rank and train with `model.train_batch`, a step being
micro_batch_size * accumulate_steps samples per pipeline (the strategy's, not --batch-size).
"""
from __future__ import annotations

import argparse
import sys

import numpy as np

import shoal
import shoal.collective as dist
import shoal.fleet as fleet
import shoal.nn as nn
import shoal.nn.functional as F
from shoal.configs import DistributedStrategy

N_FEATURES, N_CLASSES, CLUSTERS_PER_CLASS = 32, 8, 2
SPREAD = 0.7   # cluster centres' scale against unit noise: ~0.94 accuracy after 300 steps


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch-size", type=int, default=256,
                    help="the global batch of one step, split evenly over the ranks")
    ap.add_argument("--lr", type=float, default=3e-3, help="Adam's learning rate")
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--strategy", help="a preset name (e.g. collective_dp) or a YAML file; "
                                       "default: fleetrun's --strategy, else the defaults")
    ap.add_argument("--samples", type=int, default=20_000, help="synthetic training examples")
    ap.add_argument("--test-samples", type=int, default=4_000, help="held-out examples")
    ap.add_argument("--log-every", type=int, default=50)
    ap.add_argument("--seed", type=int, default=0)
    return ap.parse_args(argv)


def synthetic(n_train: int, n_test: int, seed: int):
    """(x_train, y_train, x_test, y_test): float32 features, int64 labels; deterministic."""
    rng = np.random.default_rng(seed)
    centers = rng.normal(0.0, 1.0, (N_CLASSES * CLUSTERS_PER_CLASS, N_FEATURES)) * SPREAD

    def draw(n: int, rng: np.random.Generator):
        cluster = rng.integers(0, len(centers), n)
        x = centers[cluster] + rng.normal(0.0, 1.0, (n, N_FEATURES))
        return x.astype(np.float32), (cluster % N_CLASSES).astype(np.int64)
    return (*draw(n_train, np.random.default_rng(seed + 1)),
            *draw(n_test, np.random.default_rng(seed + 2)))


def blocks(hidden: int) -> list:
    """Two hidden blocks (Linear + ReLU) and the classifier."""
    return [nn.Sequential(nn.Linear(N_FEATURES, hidden), nn.ReLU()),
            nn.Sequential(nn.Linear(hidden, hidden), nn.ReLU()),
            nn.Linear(hidden, N_CLASSES)]


class MLP(nn.Layer):
    def __init__(self, hidden: int):
        super().__init__()
        self.body = nn.Sequential(*blocks(hidden))

    def forward(self, x):
        return self.body(x)


def build(args, world: int):
    """(model, optimizer) as fleet wraps them for the strategy in force."""
    s = fleet.strategy()
    if s.pipeline:
        from shoal.collective import PipelineLayer
        model = PipelineLayer(blocks(args.hidden), num_stages=world,
                              loss_fn=lambda out, y: F.cross_entropy(out, y))
    else:
        model = MLP(args.hidden)
    model = fleet.distributed_model(model)
    if s.lars:   # LARS replaces a Momentum optimizer; its trust ratio (lars_coeff 0.001 times
        # |w| / |g|) scales each step down, so LARS recipes give it a large base rate
        opt = shoal.optimizer.Momentum(args.lr * 1000, momentum=0.9, parameters=model.parameters())
    else:
        opt = shoal.optimizer.Adam(args.lr, parameters=model.parameters())
    return model, fleet.distributed_optimizer(opt)


def global_accuracy(model, x: np.ndarray, y: np.ndarray) -> float:
    """Accuracy over the whole held-out set: each rank scores its share, counts are summed."""
    rank, world = fleet.worker_index(), fleet.worker_num()
    mine = slice(rank, None, world)
    if hasattr(model, "eval_batch"):   # a pipeline: every stage gets the last one's outputs
        n = model.micro_batch_size * model.accumulate_steps
        mine = slice(0, len(x) // n * n)
        pred = np.concatenate([model.eval_batch(x[i:i + n], compute_loss=False).argmax(axis=1)
                               for i in range(0, mine.stop, n)])
        if rank:   # the stages of one pipeline hold the same predictions: count them once
            mine, pred = slice(0, 0), pred[:0]
    else:
        model.eval()
        with shoal.no_grad():
            pred = model(shoal.to_tensor(x[mine])).numpy().argmax(axis=1)
        model.train()
    counts = np.array([(pred == y[mine]).sum(), len(pred)], dtype=np.int64)
    dist.all_reduce(counts)
    return float(counts[0] / counts[1])


def run(argv=None) -> dict:
    """Train and evaluate; returns {"accuracy", "loss", "params" (name -> numpy array), "model",
    "optimizer" (the class names fleet's wrappers ended with)}."""
    args = parse_args(argv)
    strategy = DistributedStrategy.load(args.strategy) if args.strategy else None
    fleet.init(is_collective=True, strategy=strategy)
    rank, world = fleet.worker_index(), fleet.worker_num()
    pipe = fleet.strategy().pipeline_configs if fleet.strategy().pipeline else None
    if pipe is not None:   # one pipeline over every rank: each rank reads the whole batch
        args.batch_size = pipe.micro_batch_size * pipe.accumulate_steps
    elif args.batch_size % world:
        sys.exit(f"mlp_dp: --batch-size {args.batch_size} does not split evenly over {world} "
                 f"ranks; give a multiple of {world}")
    per_rank = args.batch_size if pipe is not None else args.batch_size // world
    x_train, y_train, x_test, y_test = synthetic(args.samples, args.test_samples, args.seed)

    shoal.seed(args.seed)
    model, opt = build(args, world)
    if rank == 0:
        print(f"{world} rank(s), global batch {args.batch_size} ({per_rank} per rank), "
              f"{args.steps} steps", flush=True)

    order, pos = np.random.default_rng(args.seed + 3).permutation(len(x_train)), 0
    epoch_rng = np.random.default_rng(args.seed + 4)   # the same draws on every rank
    loss_avg = float("nan")
    for step in range(1, args.steps + 1):
        if pos + args.batch_size > len(order):
            order, pos = epoch_rng.permutation(len(x_train)), 0
        lo = pos if pipe is not None else pos + rank * per_rank
        shard = order[lo:lo + per_rank]
        pos += args.batch_size
        if pipe is not None:
            loss = model.train_batch((x_train[shard], y_train[shard]), opt)
        else:
            loss = F.cross_entropy(model(shoal.to_tensor(x_train[shard])),
                                   shoal.to_tensor(y_train[shard]))
            opt.minimize(loss)     # backward (of the scaled loss under amp), then the step
            opt.clear_grad()
            loss = loss.item()
        if step % args.log_every == 0 or step == args.steps:
            mean = np.array([loss], dtype=np.float64)
            dist.all_reduce(mean, op=dist.ReduceOp.AVG)
            loss_avg = float(mean[0])
            if rank == 0:
                print(f"step {step:4d}  loss {loss_avg:.4f}", flush=True)

    if fleet.strategy().localsgd:   # the replicas drift between averages: end on their mean
        from shoal.collective.localsgd import average_parameters
        average_parameters(model.parameters())
    accuracy = global_accuracy(model, x_test, y_test)
    params = {k: v.numpy().copy() for k, v in model.state_dict().items()}
    fleet.stop_worker()
    if rank == 0:
        print(f"final accuracy: {accuracy:.2f}", flush=True)
    return {"accuracy": accuracy, "loss": loss_avg, "params": params,
            "model": type(model).__name__, "optimizer": type(opt.inner).__name__}


def main(argv=None) -> int:
    run(argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())

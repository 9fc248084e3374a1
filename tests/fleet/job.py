"""A small PS training job for the fleet tests: run as a worker or server process (role from env).

    python job.py --out OUT.npz --mode sync --steps 20 --batch 16 [--rule adagrad] [--sgd1]

The data are a pure function of --data-seed: step s of a job with W workers uses samples
[s*W*B, (s+1)*W*B), worker w the w-th B of them, so a 1-worker run with batch W*B sees exactly
what W workers with batch B see together. The output holds the dense values, the table rows of
every key (read-only pull), the losses, and what this worker pushed (for the flush check).
"""
from __future__ import annotations

import argparse
import time

import numpy as np

import shoal
import shoal.fleet as fleet
import shoal.nn as nn
import shoal.nn.functional as F
from shoal.configs import DistributedStrategy
from shoal.configs.cluster import ClusterEnv
from shoal.ps.client import PSClient
from shoal.worker.metrics import Auc, all_reduce_metrics
from shoal.worker.nn.sparse import EmbeddingBag

N_SLOTS, VOCAB, DIM, N_DENSE = 3, 50, 4, 2


class Model(nn.Layer):
    def __init__(self):
        super().__init__()
        self.emb = EmbeddingBag("emb", DIM, pooling="sum")
        self.fc1 = nn.Linear(N_SLOTS * DIM + N_DENSE, 8)
        self.fc2 = nn.Linear(8, 1)

    def forward(self, slots, dense, labels):
        e = self.emb(slots, labels=labels)
        x = shoal.concat([e.reshape([e.shape[0], N_SLOTS * DIM]), dense], axis=1)
        return self.fc2(F.relu(self.fc1(x))).reshape([-1])


def data(seed: int, n: int):
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, VOCAB, (n, N_SLOTS)) + np.arange(N_SLOTS) * 1000
    lengths = rng.integers(1, 3, (n, N_SLOTS))   # multi-hot: 1 or 2 ids per slot
    extra = rng.integers(0, VOCAB, (n, N_SLOTS)) + np.arange(N_SLOTS) * 1000
    dense = rng.random((n, N_DENSE)).astype(np.float32)
    logit = (ids % 7 - 3).sum(1) * 0.8 + 2 * dense[:, 0] - 1.0
    labels = (rng.random(n) < 1 / (1 + np.exp(-logit))).astype(np.float32)
    return ids, extra, lengths, dense, labels


def batch(d, rows):
    ids, extra, lengths, dense, labels = d
    slots = []
    for s in range(N_SLOTS):
        ln = lengths[rows, s]
        both = np.stack([ids[rows, s], extra[rows, s]], axis=1)
        values = both[np.arange(2)[None, :] < ln[:, None]].astype(np.uint64)
        slots.append((values, np.concatenate([[0], np.cumsum(ln)]).astype(np.int64)))
    return slots, shoal.to_tensor(dense[rows]), labels[rows]


class Recorder:
    """Forwards to the communicator and sums what was pushed, per key (the flush check)."""

    def __init__(self, inner):
        self.inner, self.sums, self.shows = inner, {}, {}

    def pull(self, table, keys, *, training):
        return self.inner.pull(table, keys, training=training)

    def push(self, table, keys, grads, *, shows, clicks):
        for k, g, s in zip(keys.tolist(), grads, shows.tolist()):
            self.sums[k] = self.sums.get(k, 0) + g.astype(np.float64)
            self.shows[k] = self.shows.get(k, 0) + s
        self.inner.push(table, keys, grads, shows=shows, clicks=clicks)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--mode", default="sync", choices=["sync", "async", "half_async", "geo", "pass"])
    ap.add_argument("--pass-steps", type=int, default=4, help="pass mode: steps per pass")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--data-seed", type=int, default=1)
    ap.add_argument("--rule", default="adagrad")
    ap.add_argument("--sgd1", action="store_true", help="SGD at lr 1 everywhere (the flush check)")
    ap.add_argument("--k-steps", type=int, default=5)
    ap.add_argument("--rpc-timeout", type=float, default=30.0)
    ap.add_argument("--eval", type=int, default=0, help="held-out samples per worker for AUC")
    ap.add_argument("--save", help="save_persistables here after training")
    ap.add_argument("--server-load", help="servers: init_server(this checkpoint)")
    ap.add_argument("--read-after-stop", action="store_true",
                    help="no explicit flush: read the tables after stop_worker(stop_servers=False)")
    ap.add_argument("--sleep", type=float, default=0.0, help="seconds to sleep per step")
    args = ap.parse_args()

    cfg = {"a_sync": args.mode != "sync",
           "a_sync_configs": {"k_steps": args.k_steps if args.mode == "geo" else -1,
                              "half_async": args.mode == "half_async",
                              "use_ps_gpu": args.mode == "pass"},
           "sparse_table": {"default": {"rule": {"name": "naive" if args.sgd1 else args.rule,
                                                 "learning_rate": 1.0 if args.sgd1 else 0.05,
                                                 "initial_range": 0.1},
                                        "accessor": {"scale_by_show": not args.sgd1}}}}
    strategy = DistributedStrategy.from_dict(cfg)
    shoal.seed(7)
    fleet.init(strategy=strategy, rpc_timeout=args.rpc_timeout)
    model = Model()
    opt = shoal.optimizer.SGD(1.0, parameters=model.parameters()) if args.sgd1 else \
        shoal.optimizer.Adam(0.01, parameters=model.parameters())
    opt = fleet.distributed_optimizer(opt)
    if fleet.is_server():
        fleet.init_server(args.server_load)
        fleet.run_server()
        return
    fleet.init_worker(model)
    rec = Recorder(model.emb.sparse_backend)
    model.emb.sparse_backend = rec
    w, n_workers, b = fleet.worker_index(), fleet.worker_num(), args.batch
    d = data(args.data_seed, args.steps * n_workers * b)
    dense_pushed = np.zeros(opt.flat.size, np.float64)
    keys = np.unique(np.concatenate([d[0].reshape(-1), d[1].reshape(-1)])).astype(np.uint64)
    client = rec.inner.client
    rows0 = client.pull_sparse("emb", keys, training=True)  # creates every row at its initial value
    dense0 = client.pull_dense("dense")
    fleet.barrier_worker()
    losses = []
    print(f"worker {w}: training", flush=True)
    for step in range(args.steps):
        start = step * n_workers * b + w * b
        if args.mode == "pass" and step % args.pass_steps == 0:  # this worker's samples of the pass
            last = min(step + args.pass_steps, args.steps)
            mine = np.concatenate([np.arange(s * n_workers * b + w * b, s * n_workers * b + (w + 1) * b)
                                   for s in range(step, last)])
            fleet.begin_pass(keys={"emb": np.concatenate([
                values for values, _ in batch(d, mine)[0]])})
        slots, dense, labels = batch(d, np.arange(start, start + b))
        logit = model(slots, dense, labels)
        loss = F.binary_cross_entropy_with_logits(logit, shoal.to_tensor(labels))
        loss.backward()
        dense_pushed += opt.flat.grads(opt.inner)
        opt.step()
        opt.clear_grad()
        losses.append(float(loss.numpy()))
        if args.mode == "pass" and ((step + 1) % args.pass_steps == 0 or step + 1 == args.steps):
            fleet.end_pass()
        if args.sleep:
            time.sleep(args.sleep)
    if args.read_after_stop:  # stop_worker's own flush is what gets every gradient to the servers
        rows, dense_now = read_after_stop(client, keys, w, n_workers)
        np.savez(args.out, keys=keys, rows=rows, dense=dense_now, rows0=rows0, dense0=dense0,
                 **recorded(rec, opt, dense_pushed))
        return
    fleet.flush()
    fleet.barrier_worker()
    if args.save:
        fleet.save_persistables(args.save)
    auc = np.nan
    if args.eval:
        model.eval()
        metric = Auc()
        de = data(args.data_seed + 1000, args.eval * n_workers)
        rows_before = sum(t["tables"]["emb"]["rows"] for t in client.stats())
        for start in range(w * args.eval, (w + 1) * args.eval, 256):
            idx = np.arange(start, min(start + 256, (w + 1) * args.eval))
            slots, dense, labels = batch(de, idx)
            with shoal.no_grad():
                metric.update(F.sigmoid(model(slots, dense, labels)).numpy(), labels)
        auc = all_reduce_metrics({"auc": metric}, fleet.reduce_sum)["auc"]
        assert sum(t["tables"]["emb"]["rows"] for t in client.stats()) == rows_before, \
            "evaluation grew the table"
        fleet.barrier_worker()
    rows = client.pull_sparse("emb", keys, training=False)
    dense_now = client.pull_dense("dense")
    fleet.stop_worker()
    np.savez(args.out, keys=keys, rows=rows, dense=dense_now, losses=np.array(losses),
             rows0=rows0, dense0=dense0, auc=auc, **recorded(rec, opt, dense_pushed))


def recorded(rec, opt, dense_pushed) -> dict:
    pushed_keys = np.array(sorted(rec.sums), np.uint64)
    pushed = np.array([rec.sums[k] for k in pushed_keys.tolist()]).reshape(-1, DIM)
    shows = np.array([rec.shows[k] for k in pushed_keys.tolist()], np.float64)
    return {"pushed_keys": pushed_keys, "pushed": pushed, "pushed_shows": shows,
            "dense_pushed": dense_pushed}


def read_after_stop(old_client, keys, w: int, n_workers: int):
    """stop_worker without stopping the servers, then read the tables through a new client (all
    workers have flushed once stop_worker returns); worker 0 stops the servers at the end."""
    fleet.stop_worker(stop_servers=False)
    env = ClusterEnv.detect()
    with PSClient(list(env.pservers), env.job_token, timeout=30) as client:
        for spec in old_client.specs.values():
            client.register_table(spec)
        client.barrier("all-stopped", n_workers)
        tables = client.pull_sparse("emb", keys, training=False), client.pull_dense("dense")
        client.barrier("all-read", n_workers)
        if w == 0:
            client.stop_servers()
    return tables


if __name__ == "__main__":
    main()

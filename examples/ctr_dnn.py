"""CTR-DNN on parameter servers: Paddle's click-through-rate model, trained eagerly by Shoal.

26 sparse slots share one embedding table (dim 9, sum-pooled per slot), concatenated with
13 dense features, into an MLP 400-400-400 with 2 outputs; Adam, batch 512. By default the
job generates (once, cached) a synthetic Criteo-like set of 600k train / 100k test samples,
trains one epoch, evaluates the held-out part with read-only pulls, and ends with the line
`final test AUC: 0.xxxx`.

    python examples/ctr_dnn.py                         # local mode: one process
    fleetrun --server_num 2 --worker_num 2 examples/ctr_dnn.py --strategy ps_async
    fleetrun --server_num 2 --worker_num 2 examples/ctr_dnn.py --strategy ps_pass   # pass mode
    python examples/ctr_dnn.py --data DIR              # DIR/train/*, DIR/test/* in MultiSlot text
    python examples/ctr_dnn.py --save ckpt --steps 200 && python examples/ctr_dnn.py --resume ckpt

Every process (servers too) runs this script; the role comes from the environment contract.
Rank 0 shows a progress bar (examples/s, loss, AUC), writes metrics as JSON lines into
--log-dir, and prints a per-step time breakdown (data, pull wait, compute, push wait).
"""
from __future__ import annotations

import time

_T_START = time.time()  # local mode counts launch-to-first-step from here (fleetrun sets SHOAL_LAUNCH_T0)

import argparse
import glob
import json
import os
import resource
import sys

import numpy as np

import shoal
import shoal.fleet as fleet
import shoal.nn as nn
import shoal.nn.functional as F
from shoal.configs import DistributedStrategy
from shoal.worker.data import InMemoryDataset, SlotList
from shoal.worker.data.synthetic import ensure_synthetic_ctr
from shoal.worker.metrics import Accuracy, Auc, LogLoss, Mean, all_reduce_metrics
from shoal.worker.nn.sparse import EmbeddingBag
from shoal.worker.progress import StepTimer, TrainingProgress

N_DENSE, N_SPARSE, EMB_DIM = 13, 26, 9


class CTRDNN(nn.Layer):
    """Paddle's ctr_dnn: shared sparse table, 13 dense features, MLP 400-400-400, 2 classes."""

    def __init__(self, hidden=(400, 400, 400), table: str = "SparseFeatFactors"):
        super().__init__()
        self.slots = [f"C{i + 1}" for i in range(N_SPARSE)]
        self.embedding = EmbeddingBag(table, EMB_DIM, pooling="sum")
        layers, width = [], N_SPARSE * EMB_DIM + N_DENSE
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU()]
            width = h
        self.mlp = nn.Sequential(*layers, nn.Linear(width, 2))

    def forward(self, batch, labels=None):
        emb = self.embedding([batch.sparse[s] for s in self.slots], labels=labels)
        x = shoal.concat([emb.reshape([batch.size, N_SPARSE * EMB_DIM]),
                          shoal.to_tensor(batch.dense["dense"])], axis=1)
        return self.mlp(x)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", help="directory with train/ and test/ MultiSlot files "
                                   "(default: generate the synthetic set into --cache)")
    ap.add_argument("--cache", default=os.environ.get("SHOAL_DATA_CACHE",
                                                      os.path.expanduser("~/.cache/shoal/synthetic_ctr")),
                    help="where the synthetic set is generated and kept (default %(default)s)")
    ap.add_argument("--samples", type=int, default=600_000, help="synthetic training samples")
    ap.add_argument("--test-samples", type=int, default=100_000, help="synthetic test samples")
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--steps", type=int, default=0, help="stop after this many steps (0: the epochs)")
    ap.add_argument("--batch", type=int, default=512)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--strategy", help="a preset name (ps_sync, ps_async, ps_half_async, ps_geo, ps_pass) "
                                       "or a YAML file; default: fleetrun's --strategy, else async")
    ap.add_argument("--save", help="save_persistables into this directory at the end")
    ap.add_argument("--resume", help="continue from a directory written by --save")
    ap.add_argument("--log-dir", default=os.environ.get("SHOAL_LOG_DIR", "log"))
    ap.add_argument("--metrics-out", help="write the final figures of this process as JSON here "
                                          "({role} and {rank} in the path are filled in)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2, help="data parser threads")
    return ap.parse_args(argv)


def data_files(args) -> tuple[list[str], list[str]]:
    if args.data:
        train = sorted(glob.glob(os.path.join(args.data, "train", "*")))
        test = sorted(glob.glob(os.path.join(args.data, "test", "*")))
        if not train or not test:
            sys.exit(f"ctr_dnn: --data {args.data} needs files in {args.data}/train/ and "
                     f"{args.data}/test/ (MultiSlot text, the layout of ../shared/data)")
        return train, test
    made = ensure_synthetic_ctr(args.cache, n_train=args.samples, n_test=args.test_samples,
                                seed=args.seed, n_files=8)
    return made.train, made.test


def dataset(files, args) -> InMemoryDataset:
    ds = InMemoryDataset(batch_size=args.batch, thread_num=args.threads, use_var=SlotList.ctr())
    ds.set_filelist(files, worker_index=fleet.worker_index(), worker_num=fleet.worker_num())
    return ds


def load(files, args, shuffle: bool) -> InMemoryDataset:
    ds = dataset(files, args)
    ds.load_into_memory()
    if shuffle:
        ds.local_shuffle(seed=args.seed + fleet.worker_index())
    return ds


def peak_rss_mb() -> float:
    """This process's peak resident memory. VmHWM, not getrusage: ru_maxrss survives exec, so a
    child would report its launcher's peak if that was higher."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def train(args, ds, model, opt, progress, timer, start_step: int) -> tuple[int, float, dict]:
    t_load = time.perf_counter()
    ds.wait_preload_done()  # started before init_worker: parsing overlapped connecting
    ds.local_shuffle(seed=args.seed + fleet.worker_index())
    load_seconds = time.perf_counter() - t_load
    comm = fleet.communicator()
    auc, loss_mean = Auc(), Mean()
    step, first_step_at, examples = start_step, None, 0
    per_epoch = ds.num_batches()
    t_start = time.perf_counter()
    last = args.epochs * per_epoch if not args.steps else min(args.steps, args.epochs * per_epoch)
    for epoch in range(start_step // per_epoch, args.epochs if start_step < last else 0):
        skip = start_step - epoch * per_epoch if epoch == start_step // per_epoch else 0
        stop = min(per_epoch, last - epoch * per_epoch)
        # pass mode (ps_pass): the batches this epoch trains are one pass; other modes: nothing
        fleet.begin_pass(ds, samples=slice(skip * args.batch, stop * args.batch))
        batches = fleet.prefetched(ds.batches(skip=skip), model)
        t_data = time.perf_counter()
        for batch in batches:
            t0 = time.perf_counter()
            timer.add("data", t0 - t_data)
            waits0 = comm.waits.pull_wait, comm.waits.push_wait
            labels = batch.dense["label"].reshape(-1).astype(np.int64)
            logits = model(batch, labels=labels)
            loss = F.cross_entropy(logits, shoal.to_tensor(labels))
            loss.backward()
            opt.step()
            opt.clear_grad()
            pull_wait = comm.waits.pull_wait - waits0[0]
            push_wait = comm.waits.push_wait - waits0[1]
            timer.add("pull_wait", pull_wait)
            timer.add("push_wait", push_wait)
            timer.add("compute", time.perf_counter() - t0 - pull_wait - push_wait)
            timer.add_step(time.perf_counter() - t_data)
            if first_step_at is None:
                first_step_at = time.time()
            probs = F.softmax(logits.detach(), axis=1).numpy()[:, 1]
            loss_value = float(loss.numpy())
            auc.update(probs, labels)
            loss_mean.update(loss_value, weights=batch.size)
            step += 1
            examples += batch.size
            progress.update(batch.size, loss=loss_value, auc=auc.accumulate())
            if step % 100 == 0:
                progress.log(step=step, loss=loss_mean.accumulate(), train_auc=auc.accumulate())
            t_data = time.perf_counter()
            if args.steps and step >= args.steps:
                break
        t0 = time.perf_counter()
        fleet.end_pass()  # pass mode: write the pass back (its time counts as push wait)
        timer.add("push_wait", time.perf_counter() - t0)
        if args.steps and step >= args.steps:
            break
    elapsed = time.perf_counter() - t_start
    ds.release_memory()
    figures = {"train_auc": auc.accumulate(), "train_loss": loss_mean.accumulate(),
               "examples": examples, "train_seconds": elapsed, "load_seconds": load_seconds,
               "train_examples_per_s": examples / elapsed if elapsed > 0 else 0.0}
    if first_step_at is not None:
        launch_t0 = float(os.environ.get("SHOAL_LAUNCH_T0", _T_START))
        figures["launch_to_first_step_s"] = first_step_at - launch_t0
    return step, elapsed, figures


def evaluate(args, model) -> dict[str, float]:
    """Test AUC, accuracy and logloss over every worker's share (one reduce for all three)."""
    _, test_files = data_files(args)
    ds = load(test_files, args, shuffle=False)
    model.eval()
    metrics = {"test_auc": Auc(), "test_accuracy": Accuracy(), "test_logloss": LogLoss()}
    with shoal.no_grad():
        for batch in ds.batches():
            probs = F.softmax(model(batch), axis=1).numpy()[:, 1]
            labels = batch.dense["label"].reshape(-1)
            for m in metrics.values():
                m.update(probs, labels)
    model.train()
    ds.release_memory()
    return all_reduce_metrics(metrics, fleet.reduce_sum, name="test-metrics")


def main(argv=None) -> int:
    args = parse_args(argv)
    strategy = DistributedStrategy.load(args.strategy) if args.strategy else None
    fleet.init(strategy=strategy)
    shoal.seed(args.seed)
    model = CTRDNN()
    opt = fleet.distributed_optimizer(shoal.optimizer.Adam(args.lr, parameters=model.parameters()))
    if fleet.is_server():
        fleet.init_server()
        fleet.run_server()
        if args.metrics_out:
            with open(args.metrics_out.format(role="server", rank=fleet.server_index()), "w") as f:
                json.dump({"role": "server", "rank": fleet.server_index(),
                           "peak_rss_mb": peak_rss_mb()}, f)
        return 0

    train_files, _ = data_files(args)  # generate (or find) the data
    train_set = dataset(train_files, args)
    train_set.preload_into_memory()  # parses on its own threads while the worker connects
    fleet.init_worker(model)
    rank = fleet.worker_index()
    start_step = 0
    if args.resume:
        extra = fleet.load_model(args.resume)
        start_step = int(extra.get("step", 0))
    start_step += fleet.restart_step()  # a restarted worker of a sync job: where the others are
    timer = StepTimer()
    log_path = os.path.join(args.log_dir, "metrics.jsonl") if rank == 0 else None
    with TrainingProgress(None, rank=rank, log_path=log_path) as progress:
        step, elapsed, figures = train(args, train_set, model, opt, progress, timer, start_step)
        if args.save:
            fleet.save_persistables(args.save, extra={"step": step})
        else:
            fleet.flush()  # evaluate the model the servers hold, with every gradient applied
        figures.update(evaluate(args, model))
        figures.update(step=step, mode=fleet.communicator().mode.value,
                       workers=fleet.worker_num(), servers=fleet.server_num(),
                       peak_rss_mb=peak_rss_mb(), breakdown=timer.summary())
        progress.log(**{k: v for k, v in figures.items() if k not in ("breakdown", "examples")})
        progress.print(timer.table("per-step time (worker 0)"))
    fleet.stop_worker()
    if args.metrics_out:
        with open(args.metrics_out.format(role="worker", rank=rank), "w") as f:
            json.dump(dict(figures, role="worker", rank=rank), f)
    if rank == 0:
        print(f"trained {figures['examples']} examples in {elapsed:.1f}s "
              f"({figures['train_examples_per_s']:.0f} examples/s on worker 0), "
              f"train AUC {figures['train_auc']:.4f}")
        print(f"test accuracy {figures['test_accuracy']:.4f}, logloss {figures['test_logloss']:.4f}")
        print(f"final test AUC: {figures['test_auc']:.4f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

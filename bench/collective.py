"""Collective bandwidth and data-parallel scaling on 2 ranks (Gloo over loopback).

(a) all_reduce and all_gather of float32 messages (4 KiB, 256 KiB, 4 MiB, 64 MiB by default)
    through shoal.collective's API on 2 ranks started by shoal.launcher's spawn(). Algorithmic
    bandwidth = bytes / median time, where bytes is the size of the result each rank ends with
    (nccl-tests' convention): the message for all_reduce, world x the message for all_gather
    (the case names the message, i.e. each rank's input). Reference, in the same processes: a
    numpy copy (np.copyto) of those same bytes, the physical ceiling; and, when `import torch`
    works, torch.distributed's gloo on the same ranks (FileStore rendezvous). The sides run in
    alternating blocks, the order flipped each round, both ranks in step (a barrier before each
    block); medians of 30-200 trials by size, from rank 0. When the world's all_reduce goes
    through shared memory (ranks on one host; SHOAL_SHM=0 turns it off), a second side
    `shoal_tcp` all-reduces through a group of the same ranks made with SHOAL_SHM=0 (Gloo over
    loopback), interleaved the same way: the all_reduce and all_gather lines gain one with that
    reference.
(b) data-parallel scaling: an MLP 784-1024-1024-10 (ReLU), batch 256 per rank, SGD, softmax
    cross entropy, through Shoal's engine (shoal.nn.Linear, shoal.optimizer.SGD) wrapped in
    shoal.collective.DataParallel on 2 ranks, against the same model without DataParallel in one
    process (rank 0 of the same job, while rank 1 waits in a barrier), one BLAS thread per rank on
    both sides. A third side, both ranks training their own model at once with no communication,
    gives the ceiling the machine itself allows two ranks (`no_comm_ratio`). Blocks of steps
    alternate between the sides; examples/s from the median block. Rank 0's per-phase times
    (forward, backward including the gradient all-reduce, update) go to stderr, with the
    all-reduce of the gradients' size alone, the part of backward spent waiting for the
    buckets' all-reduces (Task.wait, timed by this bench) and, over shared memory, how much of
    the all-reduces went to waiting for a peer that arrived late at a barrier.

Two `nice -n 19` busy loops run during the measurement by default (--no-busy: none): on these
2-vCPU machines an idle vCPU adds ~4 ms of wake-up latency to 10-50% of the collectives
(../shared/notes/gloo-binding.md). Other jobs on the machine skew everything: the CPU they used
during each phase goes to stderr and into each line as `others_cpu_pct`. One JSON line per
figure on stdout (DESIGN.md's format):

    {"bench": "collective", "case": "all_reduce_4KiB", "value": <GB/s>, "unit": "GB/s",
     "reference": "numpy_memcpy", "ratio": <value / reference>, "us": <median µs>, ...}
    {"bench": "collective", "case": "dp_scaling_mlp", "value": <2-rank examples/s>,
     "unit": "examples/s", "reference": "one_rank", "ratio": <2-rank / 1-rank>, ...}

Usage: python bench/collective.py [--quick] [--sizes 4KiB,64MiB] [--no-busy] [--skip-dp]
       [--dp-rounds 8] [--dp-steps 8] [--fuse-mb 32]
"""
from __future__ import annotations

import argparse
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

BENCH = "collective"
WORLD = 2
DEFAULT_SIZES = "4KiB,256KiB,4MiB,64MiB"
MLP = (784, 1024, 1024, 10)
_UNITS = {"B": 1, "KiB": 1 << 10, "MiB": 1 << 20, "GiB": 1 << 30}


# --- the plan -----------------------------------------------------------------------------

def parse_size(text: str) -> int:
    m = re.fullmatch(r"\s*(\d+)\s*(B|KiB|MiB|GiB)\s*", text)
    if not m:
        raise argparse.ArgumentTypeError(f"size {text!r}: write it like 4KiB, 256KiB, 4MiB or 64MiB")
    nbytes = int(m.group(1)) * _UNITS[m.group(2)]
    if nbytes < 4 or nbytes % 4:
        raise argparse.ArgumentTypeError(f"size {text!r}: a whole number of float32 values (>= 4 B)")
    return nbytes


def label(nbytes: int) -> str:
    for unit in ("GiB", "MiB", "KiB"):
        if nbytes % _UNITS[unit] == 0:
            return f"{nbytes // _UNITS[unit]}{unit}"
    return f"{nbytes}B"


def trials_for(nbytes: int, quick: bool) -> tuple[int, int]:
    """(trials per side, trials per block): more trials for small messages, whose medians need them."""
    if quick:
        return (40, 4) if nbytes <= (1 << 20) else (20, 2)
    if nbytes <= (256 << 10):
        return 200, 10
    if nbytes <= (4 << 20):
        return 100, 5
    return 30, 3


# --- rank side: collectives ---------------------------------------------------------------

def _torch_gloo(init_file: str, rank: int, world: int):
    """torch.distributed initialised with gloo on a FileStore, or None when torch is missing."""
    try:
        import torch
        import torch.distributed as tdist
    except ImportError:
        return None
    torch.set_num_threads(1)
    tdist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                             world_size=world)
    return tdist


def _tcp_group(dist):
    """A group of every rank whose all_reduce stays on Gloo's TCP (made with SHOAL_SHM=0)."""
    old = os.environ.get("SHOAL_SHM")
    os.environ["SHOAL_SHM"] = "0"
    try:
        return dist.new_group()
    finally:
        if old is None:
            del os.environ["SHOAL_SHM"]
        else:
            os.environ["SHOAL_SHM"] = old


def _sides(op: str, nbytes: int, rank: int, world: int, dist, tdist, tcp=None) -> dict:
    """name -> a function doing one trial; each side's result checked once beforehand."""
    n = nbytes // 4
    out_bytes = nbytes if op == "all_reduce" else nbytes * world
    src = np.ones(out_bytes // 4, np.float32)
    dst = np.empty_like(src)
    sides = {"numpy_memcpy": lambda: np.copyto(dst, src)}

    x = np.full(n, rank + 1, np.float32)
    if op == "all_reduce":
        dist.all_reduce(x)
        assert np.all(x == world * (world + 1) / 2), "shoal all_reduce returned a wrong sum"
        x[:] = 0   # zeros stay zeros: repeated in-place sums neither overflow nor go denormal
        sides["shoal"] = lambda: dist.all_reduce(x)
        if tcp is not None:
            xt = np.full(n, rank + 1, np.float32)
            dist.all_reduce(xt, group=tcp)
            assert np.all(xt == world * (world + 1) / 2), "shoal all_reduce (tcp): wrong sum"
            xt[:] = 0
            sides["shoal_tcp"] = lambda: dist.all_reduce(xt, group=tcp)
    else:
        outs = [np.empty(n, np.float32) for _ in range(world)]
        dist.all_gather(outs, x)
        assert all(np.all(o == i + 1) for i, o in enumerate(outs)), "shoal all_gather: wrong data"
        sides["shoal"] = lambda: dist.all_gather(outs, x)
        if tcp is not None:
            touts_ = [np.empty(n, np.float32) for _ in range(world)]
            dist.all_gather(touts_, x, group=tcp)
            assert all(np.all(o == i + 1) for i, o in enumerate(touts_)), "all_gather (tcp): wrong"
            sides["shoal_tcp"] = lambda: dist.all_gather(touts_, x, group=tcp)
    if tdist is not None:
        import torch
        tx = torch.full((n,), float(rank + 1), dtype=torch.float32)
        if op == "all_reduce":
            tdist.all_reduce(tx)
            assert bool((tx == world * (world + 1) / 2).all()), "torch all_reduce: wrong sum"
            tx.zero_()
            sides["torch_gloo"] = lambda: tdist.all_reduce(tx)
        else:
            touts = [torch.empty(n, dtype=torch.float32) for _ in range(world)]
            tdist.all_gather(touts, tx)
            sides["torch_gloo"] = lambda: tdist.all_gather(touts, tx)
    return sides


def collective_rank(plan: list, torch_file: str | None) -> dict:
    """One rank of (a): {case: {side: [seconds per trial]}} (every rank runs the same plan)."""
    import shoal.collective as dist
    group = dist.init_parallel_env(timeout=120)
    rank, world = dist.get_rank(), dist.get_world_size()
    tdist = _torch_gloo(torch_file, rank, world) if torch_file else None
    uses_shm = bool(getattr(group, "uses_shm", False))
    tcp = _tcp_group(dist) if uses_shm else None
    results = {"transport": "shm" if uses_shm else "tcp"}
    perf = time.perf_counter
    for op in ("all_reduce", "all_gather"):
        for nbytes, trials, block in plan:
            sides = _sides(op, nbytes, rank, world, dist, tdist, tcp)
            names = list(sides)
            for fn in sides.values():   # warm up every path (page faults, connections, caches)
                for _ in range(3):
                    fn()
            times = {name: [] for name in names}
            for r in range(trials // block):
                for name in (names if r % 2 == 0 else names[::-1]):
                    fn, out = sides[name], times[name]
                    dist.barrier()
                    for _ in range(block):
                        t0 = perf()
                        fn()
                        out.append(perf() - t0)
            results[f"{op}_{label(nbytes)}"] = times
            if rank == 0:
                print(f"  {op} {label(nbytes)}: " + ", ".join(
                    f"{k} {statistics.median(v) * 1e6:.1f} us (p10-p90 "
                    f"{np.percentile(v, 10) * 1e6:.0f}-{np.percentile(v, 90) * 1e6:.0f})"
                    for k, v in times.items()), file=sys.stderr, flush=True)
    if tdist is not None:
        tdist.destroy_process_group()
    dist.destroy_process_group()
    return results


# --- rank side: data parallel --------------------------------------------------------------

def _mlp(seed: int):
    import shoal
    import shoal.nn as nn
    shoal.seed(seed)
    layers = []
    for i in range(len(MLP) - 1):
        layers.append(nn.Linear(MLP[i], MLP[i + 1]))
        if i < len(MLP) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


def dp_rank(rounds: int, steps: int, batch: int, fuse_mb: float, seed: int = 0) -> dict:
    """One rank of (b): per-block seconds of three sides, and the per-step phase times (forward,
    backward, update) of each: "dp" (both ranks, DataParallel), "one" (rank 0 alone without
    DataParallel while rank 1 waits) and "apart" (both ranks at once, each its own model without
    DataParallel: no communication, so the ceiling the machine allows two ranks)."""
    import shoal
    import shoal.collective as dist
    import shoal.nn.functional as F
    from shoal.collective import _group
    group = dist.init_parallel_env(timeout=300)
    rank = dist.get_rank()
    waited = [0.0]   # seconds the caller spent in Task.wait (DataParallel's bucket waits)
    untimed_wait = _group.Task.wait

    def timed_wait(self, timeout=None):
        t0 = time.perf_counter()
        try:
            return untimed_wait(self, timeout)
        finally:
            waited[0] += time.perf_counter() - t0
    _group.Task.wait = timed_wait
    rng = np.random.default_rng(seed + rank)  # each rank its own shard of the global batch
    x = shoal.to_tensor(rng.standard_normal((batch, MLP[0])).astype(np.float32))
    y = shoal.to_tensor(rng.integers(0, MLP[-1], batch).astype(np.int64))
    dp = dist.DataParallel(_mlp(seed), fuse_grad_size_in_MB=fuse_mb)
    dp_opt = shoal.optimizer.SGD(1e-3, parameters=dp.parameters())
    solo = _mlp(seed)
    solo_opt = shoal.optimizer.SGD(1e-3, parameters=solo.parameters())
    sides = ("dp", "one", "apart")
    phases = {side: [] for side in sides}
    blocks = {side: [] for side in sides}
    perf = time.perf_counter

    shm = getattr(group, "_shm", None)

    def late() -> float:
        """Seconds the group's shared-memory waits lasted past their spin (peers arriving late)."""
        return shm.wait_stats()[3] if shm is not None else 0.0

    def step(model, opt, record):
        t0, l0 = perf(), late()
        loss = F.cross_entropy(model(x), y)
        t1, w0 = perf(), waited[0]
        loss.backward()
        t2, w1 = perf(), waited[0]
        opt.step()
        opt.clear_grad()
        t3 = perf()
        record.append((t1 - t0, t2 - t1, t3 - t2, w1 - w0, late() - l0))

    idle_cpu = []   # rank 1's CPU seconds while it waits for rank 0's one-rank block
    for r in range(rounds + 1):   # round 0 warms every side up, uncounted
        for side in (sides if r % 2 == 0 else sides[::-1]):
            dist.barrier()
            c0, t0 = time.process_time(), perf()
            record = phases[side] if r else []
            if side == "dp":
                for _ in range(steps):
                    step(dp, dp_opt, record)
            elif side == "apart" or rank == 0:
                for _ in range(steps):
                    step(solo, solo_opt, record)
            elapsed = perf() - t0
            dist.barrier()
            if r and side == "one" and rank != 0:
                idle_cpu.append(time.process_time() - c0)
            if r:
                blocks[side].append(elapsed)

    # the gradients' all-reduce alone, at their total size, for the breakdown
    nbytes = sum(int(p.data.size) * 4 for p in dp.parameters())
    buf = np.zeros(nbytes // 4, np.float32)
    ar = []
    for i in range(23):
        dist.barrier()
        t0 = perf()
        dist.all_reduce(buf)
        if i >= 3:
            ar.append(perf() - t0)
    threads = len(os.listdir("/proc/self/task"))
    buckets = len(dp._buckets)
    transport = "shm" if getattr(group, "uses_shm", False) else "tcp"
    _group.Task.wait = untimed_wait
    dist.destroy_process_group()
    return {"blocks": blocks, "phases": phases, "idle_cpu": idle_cpu, "grad_bytes": nbytes,
            "allreduce_s": statistics.median(ar), "threads": threads, "buckets": buckets,
            "transport": transport,
            "blas_env": os.environ.get("OPENBLAS_NUM_THREADS")}


# --- parent side ----------------------------------------------------------------------------

def emit(case: str, value: float, unit: str, reference: str, ratio: float, **extra) -> None:
    print(json.dumps({"bench": BENCH, "case": case, "value": round(value, 4), "unit": unit,
                      "reference": reference, "ratio": round(ratio, 3), **extra}), flush=True)


def start_busy_loops(n: int = 2) -> list:
    """n lowest-priority spinning processes that keep the vCPUs from sleeping."""
    return [subprocess.Popen(["nice", "-n", "19", sys.executable, "-c", "while True: pass"],
                             stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
            for _ in range(n)]


def stop_busy_loops(procs: list) -> None:
    for p in procs:
        try:
            os.kill(p.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        p.wait()


class MachineLoad:
    """CPU the rest of the machine used during a phase: /proc/stat's busy time less this
    process's, its reaped children's (the ranks) and the busy loops' (`pids`). Other jobs on
    the machine skew every figure; the report says how much there was."""

    def __init__(self, pids=()):
        self.pids = list(pids)
        self.t0, self.stat0, self.ours0 = time.monotonic(), self._stat(), self._ours()

    @staticmethod
    def _stat() -> tuple[float, float]:
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
        hz = os.sysconf("SC_CLK_TCK")
        # user + nice + system: irq and softirq time (loopback TCP's packet processing, ours
        # but charged to no process) and steal stay out
        return (v[0] + v[1] + v[2]) / hz, v[7] / hz

    def _ours(self) -> float:
        import resource
        total = sum(u.ru_utime + u.ru_stime for u in (resource.getrusage(resource.RUSAGE_SELF),
                                                      resource.getrusage(resource.RUSAGE_CHILDREN)))
        for pid in self.pids:   # live (unreaped) children: from /proc
            try:
                with open(f"/proc/{pid}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
                total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
            except OSError:
                pass
        return total

    def others(self) -> float:
        """The share (0-1) of the machine's CPU that other processes used since construction."""
        wall = time.monotonic() - self.t0
        busy = self._stat()[0] - self.stat0[0]
        return max(0.0, busy - (self._ours() - self.ours0)) / (wall * (os.cpu_count() or 1))

    def report(self) -> str:
        share = self.others()
        warn = "  <- another job was running: these figures are skewed" if share > 0.05 else ""
        return f"other processes used {100 * share:.0f}% of the machine's CPU{warn}"


def torch_available() -> bool:
    try:
        import torch.distributed as tdist
    except ImportError:
        return False
    return tdist.is_available()


def run_collectives(plan: list, spawn, busy_pids) -> None:
    torch_file = None
    if torch_available():
        fd, torch_file = tempfile.mkstemp(prefix="shoal-bench-torch-store-")
        os.close(fd)
        os.unlink(torch_file)   # torch's FileStore creates it
    else:
        print("torch is not importable: the torch_gloo reference column is skipped",
              file=sys.stderr)
    load = MachineLoad(busy_pids)
    try:
        results = spawn(collective_rank, (plan, torch_file), nprocs=WORLD, timeout=900)[0]
        transport = results.pop("transport")
        others = load.others()
        print(f"collectives: {load.report()}", file=sys.stderr)
    finally:
        if torch_file and os.path.exists(torch_file):
            os.unlink(torch_file)
    for op in ("all_reduce", "all_gather"):
        for nbytes, _, _ in plan:
            case = f"{op}_{label(nbytes)}"
            med = {side: statistics.median(t) for side, t in results[case].items()}
            moved = nbytes * (WORLD if op == "all_gather" else 1)
            gbs = {side: moved / t / 1e9 for side, t in med.items()}
            trials = len(results[case]["shoal"])
            emit(case, gbs["shoal"], "GB/s", "numpy_memcpy", gbs["shoal"] / gbs["numpy_memcpy"],
                 us=round(med["shoal"] * 1e6, 1), reference_value=round(gbs["numpy_memcpy"], 3),
                 trials=trials, transport=transport, others_cpu_pct=round(100 * others, 1))
            if "shoal_tcp" in gbs:
                emit(case, gbs["shoal"], "GB/s", "shoal_tcp", gbs["shoal"] / gbs["shoal_tcp"],
                     us=round(med["shoal"] * 1e6, 1), reference_value=round(gbs["shoal_tcp"], 3),
                     reference_us=round(med["shoal_tcp"] * 1e6, 1), trials=trials,
                     transport=transport, others_cpu_pct=round(100 * others, 1))
            if "torch_gloo" in gbs:
                emit(case, gbs["shoal"], "GB/s", "torch_gloo", gbs["shoal"] / gbs["torch_gloo"],
                     us=round(med["shoal"] * 1e6, 1), reference_value=round(gbs["torch_gloo"], 3),
                     reference_us=round(med["torch_gloo"] * 1e6, 1), trials=trials,
                     others_cpu_pct=round(100 * others, 1))


def run_dp(args, spawn, busy_pids) -> None:
    load = MachineLoad(busy_pids)
    out = spawn(dp_rank, (args.dp_rounds, args.dp_steps, args.batch, args.fuse_mb), nprocs=WORLD,
                timeout=900)
    others = load.others()
    print(f"data parallel: {load.report()}", file=sys.stderr)
    r0, steps = out[0], args.dp_steps
    per_step = {side: statistics.median(b) / steps for side, b in r0["blocks"].items()}
    eps = {"dp": WORLD * args.batch / per_step["dp"], "one": args.batch / per_step["one"],
           "apart": WORLD * args.batch / max(per_step["apart"],
                                             statistics.median(out[1]["blocks"]["apart"]) / steps)}
    emit("dp_scaling_mlp", eps["dp"], "examples/s", "one_rank", eps["dp"] / eps["one"],
         reference_value=round(eps["one"], 1), mlp="x".join(map(str, MLP)),
         batch_per_rank=args.batch, one_rank_mode="one process without DataParallel",
         buckets=r0["buckets"], no_comm_ratio=round(eps["apart"] / eps["one"], 3),
         transport=r0["transport"], fuse_mb=args.fuse_mb,
         others_cpu_pct=round(100 * others, 1))

    def ms(rows, i):
        return statistics.median(row[i] for row in rows) * 1e3
    print(f"dp_scaling_mlp: 2 ranks {eps['dp']:.0f} examples/s ({per_step['dp'] * 1e3:.1f} ms/step), "
          f"1 rank {eps['one']:.0f} examples/s ({per_step['one'] * 1e3:.1f} ms/step), ratio "
          f"{eps['dp'] / eps['one']:.3f} (target >= 1.6); both ranks computing without any "
          f"communication: {eps['apart'] / eps['one']:.3f} (the machine's ceiling)", file=sys.stderr)
    names = {"dp": "2 ranks, DataParallel", "one": "1 rank", "apart": "2 ranks, no communication"}
    for side, rows in r0["phases"].items():
        print(f"  rank 0, {names[side]:>26}: forward {ms(rows, 0):5.1f} ms, backward "
              f"{ms(rows, 1):5.1f} ms (all-reduce wait {ms(rows, 3):4.1f} ms, of it shm waits for "
              f"a late peer {ms(rows, 4):4.1f} ms), update "
              f"{ms(rows, 2):4.1f} ms (medians of {len(rows)} steps)", file=sys.stderr)
    print(f"  gradients {r0['grad_bytes'] / 2**20:.1f} MiB in {r0['buckets']} bucket(s); their "
          f"all_reduce ({r0['transport']}) alone {r0['allreduce_s'] * 1e3:.1f} ms; threads per rank "
          f"{[o['threads'] for o in out]} (OPENBLAS_NUM_THREADS={r0['blas_env']}); rank 1 used "
          f"{statistics.median(out[1]['idle_cpu']) * 1e3:.1f} ms CPU per one-rank block of "
          f"{per_step['one'] * steps * 1e3:.0f} ms while waiting", file=sys.stderr)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer sizes and trials (a smoke run)")
    ap.add_argument("--sizes", help=f"message sizes, comma-separated (default {DEFAULT_SIZES}; "
                                    f"--quick: 4KiB,4MiB)")
    ap.add_argument("--no-busy", action="store_true", help="no nice -n 19 busy loops")
    ap.add_argument("--skip-collectives", action="store_true")
    ap.add_argument("--skip-dp", action="store_true")
    ap.add_argument("--dp-rounds", type=int, help="alternating blocks per side (default 8; quick 2)")
    ap.add_argument("--dp-steps", type=int, help="training steps per block (default 8; quick 3)")
    ap.add_argument("--batch", type=int, default=256, help="examples per rank and step")
    ap.add_argument("--fuse-mb", type=float, default=32.0,
                    help="DataParallel's fuse_grad_size_in_MB (default %(default)s, fleet's)")
    args = ap.parse_args(argv)
    sizes = [parse_size(s) for s in (args.sizes or ("4KiB,4MiB" if args.quick else
                                                     DEFAULT_SIZES)).split(",")]
    args.dp_rounds = args.dp_rounds or (2 if args.quick else 8)
    args.dp_steps = args.dp_steps or (3 if args.quick else 8)
    plan = [(n, *trials_for(n, args.quick)) for n in sizes]

    # One BLAS thread per rank. Set here, not through spawn's env=: a child applies env= after
    # it has imported numpy (unpickling spawn's entry point imports shoal), when OpenBLAS has
    # already read OPENBLAS_NUM_THREADS; what this process's environment holds is inherited
    # before any import.
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = "1"
    from shoal.launcher._spawn import spawn

    def spawn1(func, a, **kw):
        return spawn(func, a, env={"OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}, **kw)

    before = MachineLoad()
    time.sleep(1.0)
    print(f"before starting: {before.report()}", file=sys.stderr)
    busy = [] if args.no_busy else start_busy_loops(2)
    print(f"collective bench: {WORLD} ranks, sizes {[label(n) for n in sizes]}, busy loops "
          f"{[p.pid for p in busy] or 'off'}", file=sys.stderr, flush=True)
    t0, pids = time.perf_counter(), [p.pid for p in busy]
    try:
        if not args.skip_collectives:
            run_collectives(plan, spawn1, pids)
        if not args.skip_dp:
            run_dp(args, spawn1, pids)
    finally:
        stop_busy_loops(busy)
    print(f"done in {time.perf_counter() - t0:.0f}s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""A collective job script for the launcher tests: every rank joins the world, records the
environment it received, all-reduces its rank, then does what argv asks on rank `who`
("-" for none):

ok      every rank finishes normally
raise   `who` raises (after writing the time it fails at)
sigkill `who` SIGKILLs itself
once    `who` SIGKILLs itself in generation 0 only (SHOAL_RESTART=0); the restarted job finishes
"""
import json
import os
import signal
import sys
import time

import numpy as np

import shoal.collective as dist

out, action, who = sys.argv[1], sys.argv[2], int(sys.argv[3]) if sys.argv[3] != "-" else -1
dist.init_parallel_env(timeout=30)
rank, generation = dist.get_rank(), os.environ.get("SHOAL_RESTART")
keep = ("TRAINING_ROLE", "PADDLE_", "SHOAL_", "POD_IP", "OMP_NUM_THREADS", "CUDA_VISIBLE_DEVICES")
with open(os.path.join(out, f"rank{rank}.gen{generation}.json"), "w") as f:
    json.dump(dict({k: v for k, v in os.environ.items() if k.startswith(keep)}, pid=os.getpid()), f)
x = np.array([rank], np.int64)
dist.all_reduce(x)
print(f"rank {rank} of {dist.get_world_size()} sums {int(x[0])}")
if rank == who and (action == "raise" or action == "sigkill"):
    with open(os.path.join(out, "failed_at"), "w") as f:
        f.write(repr(time.time()))
    if action == "raise":
        raise RuntimeError(f"rank {rank} fails on purpose")
    os.kill(os.getpid(), signal.SIGKILL)
if rank == who and action == "once" and generation == "0":
    os.kill(os.getpid(), signal.SIGKILL)
dist.barrier()
dist.destroy_process_group()

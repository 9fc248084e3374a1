"""A job script for the fleetrun tests: records the environment each role receives, then does
what argv asks on the process named by `who` (server0, worker1, ...; "-" for none):

ok        every process finishes normally
raise     `who` raises (after writing the time it fails at)
sigkill   `who` SIGKILLs itself
hang      the workers never finish
spawn     every worker starts a grandchild that ignores SIGTERM; `who` then exits 3
late-fail `who` (a server) exits 1 a second after it was told to stop
once      the workers train 12 steps of a tiny dense model; `who` SIGKILLs itself at step 5 in
          its first run only (SHOAL_RESTART=0); the restarted one resumes at fleet.restart_step()
"""
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np

import shoal
import shoal.fleet as fleet
import shoal.nn as nn

out, action, who = sys.argv[1], sys.argv[2], sys.argv[3]
fleet.init()
role = "server" if fleet.is_server() else "worker"
rank = fleet.server_index() if fleet.is_server() else fleet.worker_index()
me = f"{role}{rank}"
keep = ("TRAINING_ROLE", "PADDLE_", "SHOAL_", "POD_IP", "OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS",
        "CUDA_VISIBLE_DEVICES")
with open(os.path.join(out, f"{me}.json"), "w") as f:
    json.dump(dict({k: v for k, v in os.environ.items() if k.startswith(keep)}, pid=os.getpid()), f)
print(f"{role} {rank} up")  # no flush: fleetrun makes children's output unbuffered


def failing_now():
    with open(os.path.join(out, "failed_at"), "w") as f:
        f.write(repr(time.time()))


if me == who and action == "raise":
    failing_now()
    raise RuntimeError(f"{me} fails on purpose")
if me == who and action == "sigkill":
    failing_now()
    os.kill(os.getpid(), signal.SIGKILL)
if role == "worker" and action in ("spawn", "spawn-hang"):
    child = subprocess.Popen([sys.executable, "-c", "import signal, time; "
                              "signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(600)"])
    with open(os.path.join(out, f"grandchild{rank}"), "w") as f:
        f.write(str(child.pid))
model = nn.Linear(2, 1) if action == "once" else nn.Layer()
opt = fleet.distributed_optimizer(shoal.optimizer.SGD(0.1, parameters=model.parameters())) \
    if action == "once" else None
if fleet.is_server():
    fleet.init_server()
    fleet.run_server()
    if me == who and action == "late-fail":
        time.sleep(1)
        print("saving the last checkpoint failed")
        sys.exit(1)
    sys.exit(0)
fleet.init_worker(model)
if action == "once":
    first = fleet.restart_step()
    x = shoal.to_tensor(np.ones((4, 2), np.float32))
    for step in range(first, 12):
        if me == who and os.environ.get("SHOAL_RESTART") == "0" and step == 5:
            time.sleep(0.3)
            os.kill(os.getpid(), signal.SIGKILL)
        (model(x) ** 2).mean().backward()
        opt.step()
        opt.clear_grad()
    with open(os.path.join(out, f"{me}.done.{os.environ['SHOAL_RESTART']}"), "w") as f:
        f.write(str(first))
if action in ("hang", "spawn-hang"):
    while True:
        time.sleep(0.1)
if me == who and action == "spawn":
    failing_now()
    sys.exit(3)
fleet.stop_worker()

"""A job script for the fleetrun tests: records the environment each role receives, then does
what argv asks (ok | raise | sigkill | hang) on the worker or server named by --who."""
import json
import os
import signal
import sys
import time

import shoal.fleet as fleet
import shoal.nn as nn

out, action, who = sys.argv[1], sys.argv[2], sys.argv[3]
fleet.init()
role = "server" if fleet.is_server() else "worker"
rank = fleet.server_index() if fleet.is_server() else fleet.worker_index()
keep = ("TRAINING_ROLE", "PADDLE_", "SHOAL_", "POD_IP", "OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS")
with open(os.path.join(out, f"{role}{rank}.json"), "w") as f:
    json.dump({k: v for k, v in os.environ.items() if k.startswith(keep)}, f)
print(f"{role} {rank} up", flush=True)
me = f"{role}{rank}"
if me == who:
    if action == "raise":
        raise RuntimeError(f"{me} fails on purpose")
    if action == "sigkill":
        os.kill(os.getpid(), signal.SIGKILL)
if fleet.is_server():
    fleet.init_server()
    fleet.run_server()
    sys.exit(0)
fleet.init_worker(nn.Layer())
if action == "hang":
    while True:
        time.sleep(0.1)
fleet.stop_worker()

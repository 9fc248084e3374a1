"""global_shuffle across the workers of a PS job: each worker loads its files, shuffles with the
others through fleet, and saves the (C1 id, label, first dense) of the samples it ends up with."""
import sys

import numpy as np

import shoal.fleet as fleet
from shoal.worker.data import InMemoryDataset, SlotList

out, files = sys.argv[1], sys.argv[2:]
fleet.init()
if fleet.is_server():
    fleet.init_server()
    fleet.run_server()
    sys.exit(0)
fleet.init_worker(fleet.distributed_model(__import__("shoal").nn.Layer()))
ds = InMemoryDataset(batch_size=64, use_var=SlotList.ctr())
ds.set_filelist(files, worker_index=fleet.worker_index(), worker_num=fleet.worker_num())
ds.load_into_memory()
before = len(ds)
ds.global_shuffle(fleet, seed=3)
block = ds.block
np.savez(out.format(rank=fleet.worker_index()), c1=block.sparse["C1"].values,
         c26=block.sparse["C26"].values, label=block.dense["label"][:, 0],
         dense=block.dense["dense"][:, 0], before=before)
fleet.stop_worker()

"""Worker-to-worker all_to_all of sample blocks (InMemoryDataset.global_shuffle's transport).

Samples go directly between workers over the PS transport (ps/rpc: ZeroMQ
with the job token). Each worker serves a small RPC server bound to port 0
on the host of its PADDLE_CURRENT_ENDPOINT (never a probed port) and
publishes the endpoint it really got through a sum-reduce on server 0; every
round then sends part j straight to worker j and waits, bounded by the RPC
timeout, for one part from every other worker.
"""
from __future__ import annotations

import threading
import time

import numpy as np

from shoal.configs.cluster import parse_endpoint
from shoal.fleet.errors import FleetError
from shoal.ps.rpc import RpcClient, RpcServer
from shoal.worker.data import Batch, Ragged

_ENDPOINT_BYTES = 128
_MAX_PART_BYTES = 1 << 31  # a shuffle part is one message; big datasets move a lot at once


def _pack(block: Batch) -> tuple[dict, list[np.ndarray]]:
    arrays = []
    for s in block.slots:
        if s.dense:
            arrays.append(np.ascontiguousarray(block.dense[s.name]))
        else:
            r = block.sparse[s.name]
            arrays += [np.ascontiguousarray(r.values), np.ascontiguousarray(r.offsets)]
    return {"size": block.size}, arrays


def _unpack(header: dict, arrays: list, like: Batch) -> Batch:
    dense, sparse, i = {}, {}, 0
    for s in like.slots:
        if s.dense:
            dense[s.name] = np.array(arrays[i]).reshape(header["size"], s.dim)
            i += 1
        else:
            sparse[s.name] = Ragged(np.array(arrays[i]), np.array(arrays[i + 1]))
            i += 2
    if i != len(arrays):
        raise FleetError(f"global_shuffle: a part has {len(arrays)} arrays; this worker's slots "
                         f"need {i} (do all workers read with the same use_var?)")
    return Batch(dense, sparse, like.slots, size=header["size"])


class Exchange:
    """all_to_all(parts) -> received, between the workers of one job. Every worker must call it
    the same number of times (a collective). Not thread-safe: one training thread calls it."""

    def __init__(self, runtime):
        self.rt = runtime
        env = runtime.env
        self.rank, self.n = runtime.worker_index(), runtime.worker_num()
        host = parse_endpoint(env.current_endpoint)[0] if env is not None else "127.0.0.1"
        self._cond = threading.Condition()
        self._inbox: dict[tuple[int, int], tuple[dict, list]] = {}
        self._server = RpcServer(f"tcp://{host}:0", token=env.job_token, auth=env.auth.value,
                                 handlers={"shuffle_part": self._receive}, n_threads=2,
                                 max_bytes=_MAX_PART_BYTES)
        self.endpoint = self._server.start()
        self._peers = self._publish()
        self._client = RpcClient(self._peers, env.job_token, auth=env.auth.value,
                                 timeout=runtime.rpc_timeout, max_bytes=_MAX_PART_BYTES)
        self._round = 0

    def _publish(self) -> list[str]:
        mine = self.endpoint.encode()
        if len(mine) > _ENDPOINT_BYTES:
            raise FleetError(f"worker endpoint {self.endpoint!r} is longer than {_ENDPOINT_BYTES} bytes")
        table = np.zeros((self.n, _ENDPOINT_BYTES), np.int64)
        table[self.rank, :len(mine)] = np.frombuffer(mine, np.uint8)
        table = self.rt.reduce("worker-endpoints", table)
        return [bytes(row[row > 0].astype(np.uint8)).decode() for row in table]

    def _receive(self, header, arrays):
        key = (header.get("round"), header.get("sender"))
        if not all(isinstance(k, int) for k in key):
            raise FleetError(f"shuffle_part: header needs int 'round' and 'sender', got {key!r}")
        with self._cond:
            self._inbox[key] = (header, [np.array(a) for a in arrays])
            self._cond.notify_all()
        return {}, []

    def __call__(self, parts: list[Batch]) -> list[Batch]:
        if len(parts) != self.n:
            raise FleetError(f"all_to_all: {len(parts)} parts for {self.n} workers")
        rnd = self._round
        self._round += 1
        handles = []
        for j, part in enumerate(parts):
            if j != self.rank:
                header, arrays = _pack(part)
                handles.append(self._client.call_async(j, "shuffle_part",
                                                       dict(header, round=rnd, sender=self.rank), arrays))
        for h in handles:
            h.wait()
        deadline = time.monotonic() + self.rt.rpc_timeout
        with self._cond:
            while True:
                missing = [j for j in range(self.n) if j != self.rank and (rnd, j) not in self._inbox]
                if not missing:
                    break
                left = deadline - time.monotonic()
                if left <= 0:
                    raise FleetError(f"global_shuffle: worker {self.rank} got no part from worker(s) "
                                     f"{missing} within {self.rt.rpc_timeout}s (did every worker call "
                                     f"global_shuffle?)")
                self._cond.wait(left)
            got = {j: self._inbox.pop((rnd, j)) for j in range(self.n) if j != self.rank}
        return [parts[j] if j == self.rank else _unpack(*got[j], parts[self.rank])
                for j in range(self.n)]

    def close(self) -> None:
        self._client.close()
        self._server.stop(drain_timeout=2.0)

"""The sharding plan: which rank owns which parameter, and how buckets lay gradients out.

Pure and deterministic (no communication): every rank computes the same plan from the same
parameters, so the plan itself never has to be sent.
"""
from __future__ import annotations

from shoal.kernels import backend_of


class Bucket:
    """Parameters fused into one collective, laid out as `nranks` segments of `seg` elements.

    Segment r holds rank r's owned parameters of the bucket (flattened, in bucket order), then
    one has-gradient flag per such parameter, then zeros up to `seg` (segments are padded to
    the longest). `slots[i]` = (owner, offset in the owner's segment) of `params[i]`;
    `flags[i]` = the offset of its flag in the same segment."""

    def __init__(self, index: int, params: list, owners: list[int], nranks: int):
        self.index, self.params, self.owners = index, params, owners
        self.sizes = [int(p.data.size) for p in params]
        self.dtype = params[0].dtype
        used, count = [0] * nranks, [0] * nranks
        for n, r in zip(self.sizes, owners):
            used[r] += n
            count[r] += 1
        self.seg = max(1, max(u + c for u, c in zip(used, count)))
        fill, flag = [0] * nranks, list(used)
        self.slots, self.flags = [], []
        for n, r in zip(self.sizes, owners):
            self.slots.append((r, fill[r]))
            self.flags.append(flag[r])
            fill[r] += n
            flag[r] += 1
        # the state of the backward pass in progress
        self.ready: set[int] = set()
        self.buffer = None     # stage 1: the [nranks, seg] buffer being all-reduced
        self.shard = None      # stage 2: this rank's reduced segment
        self.task = None
        self.in_flight = 0     # bytes a started collective holds that no attribute here does

    def in_flight_bytes(self) -> int:
        """What the started collective still holds (its input is freed once it has run)."""
        return self.in_flight if self.task is not None and not self.task.is_completed() else 0

    def owned(self, rank: int) -> list[int]:
        """Indices (into `params`) of the parameters rank `rank` owns."""
        return [i for i, r in enumerate(self.owners) if r == rank]


def plan(params: list, nranks: int, limit_bytes: int) -> tuple[list[Bucket], dict[int, int]]:
    """(buckets, owner of each parameter by id) for `params` over `nranks` ranks.

    Buckets take parameters in reverse registration order (roughly the order backward produces
    their gradients) up to `limit_bytes`, and break where the dtype or array backend changes.
    Within a bucket, parameters go largest first to the rank holding the fewest bytes of the
    bucket (then of all buckets so far, then the lowest rank): segments stay near equal, so
    padding is small, and the ranks' totals stay balanced. Whole parameters only."""
    groups, current, used = [], [], 0
    for p in reversed(params):
        nbytes = p.data.size * p.data.itemsize
        if current and (used + nbytes > limit_bytes or p.dtype != current[0].dtype or
                        backend_of(p.data) is not backend_of(current[0].data)):
            groups.append(current)
            current, used = [], 0
        current.append(p)
        used += nbytes
    if current:
        groups.append(current)
    total = [0] * nranks
    buckets, owner = [], {}
    for index, members in enumerate(groups):
        local = [0] * nranks
        owners = [0] * len(members)
        order = sorted(range(len(members)), key=lambda i: (-members[i].data.size, i))
        for i in order:
            r = min(range(nranks), key=lambda k: (local[k], total[k], k))
            owners[i] = r
            n = members[i].data.size * members[i].data.itemsize
            local[r] += n
            total[r] += n
            owner[id(members[i])] = r
        buckets.append(Bucket(index, members, owners, nranks))
    return buckets, owner

"""The sharding plan: which rank owns which parameter, and how buckets lay gradients out.

Pure and deterministic (no communication): every rank computes the same plan from the same
parameters, so the plan itself never has to be sent.
"""
from __future__ import annotations

from shoal.kernels import backend_of


class Bucket:
    """Parameters fused into one collective, laid out as one segment per rank, back to back.

    Segment r holds rank r's owned parameters of the bucket (flattened, in bucket order), then
    one has-gradient flag per such parameter; it is `lengths[r]` elements long (0 for a rank
    owning none) and starts at `offsets[r]`. No padding: segments of different lengths are
    reduced to their owners one by one, equal ones reduce-scattered. `slots[i]` = (owner,
    offset in the owner's segment) of `params[i]`; `flags[i]` = the offset of its flag in the
    same segment; `start(i)` / `flag(i)` are those offsets in the whole buffer. `owner` is the
    rank owning every parameter of the bucket, or None; `seg` the longest segment."""

    def __init__(self, index: int, params: list, owners: list[int], nranks: int):
        self.index, self.params, self.owners = index, params, owners
        self.sizes = [int(p.data.size) for p in params]
        self.dtype = params[0].dtype
        self.owner = owners[0] if len(set(owners)) == 1 else None
        used, count = [0] * nranks, [0] * nranks
        for n, r in zip(self.sizes, owners):
            used[r] += n
            count[r] += 1
        self.lengths = [u + c for u, c in zip(used, count)]
        self.offsets = [sum(self.lengths[:r]) for r in range(nranks)]
        self.length = sum(self.lengths)
        self.seg = max(self.lengths)
        self.equal = len(set(self.lengths)) == 1   # reduce_scatter / all_gather fit
        self.tails = [(o + u, o + n) for o, u, n in zip(self.offsets, used, self.lengths) if n]
        fill, flag = [0] * nranks, list(used)
        self.slots, self.flags = [], []
        for n, r in zip(self.sizes, owners):
            self.slots.append((r, fill[r]))
            self.flags.append(flag[r])
            fill[r] += n
            flag[r] += 1
        # the state of the backward pass in progress
        self.ready: set[int] = set()
        self.buffer = None     # the whole bucket, being filled or reduced
        self.shard = None      # stage 2: this rank's reduced segment (None when it owns none)
        self.tasks: list = []  # the started collectives, until the bucket is finalized
        self.done = False      # its collectives ended and its result is in place
        self.in_flight = 0     # bytes started collectives hold that no attribute here does

    def segment(self, rank: int) -> slice:
        """Where rank `rank`'s segment lies in the buffer."""
        return slice(self.offsets[rank], self.offsets[rank] + self.lengths[rank])

    def start(self, i: int) -> int:
        return self.offsets[self.slots[i][0]] + self.slots[i][1]

    def flag(self, i: int) -> int:
        return self.offsets[self.slots[i][0]] + self.flags[i]

    def in_flight_bytes(self) -> int:
        """What the started collective still holds (its input is freed once it has run)."""
        return self.in_flight if any(not t.is_completed() for t in self.tasks) else 0

    def owned(self, rank: int) -> list[int]:
        """Indices (into `params`) of the parameters rank `rank` owns."""
        return [i for i, r in enumerate(self.owners) if r == rank]


def _groups(params: list, limit_bytes: int) -> list[list]:
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
    return groups


def plan(params: list, nranks: int, limit_bytes: int) -> tuple[list[Bucket], dict[int, int]]:
    """(buckets, owner of each parameter by id) for `params` over `nranks` ranks.

    Buckets take parameters in reverse registration order (roughly the order backward produces
    their gradients) up to `limit_bytes`, and break where the dtype or array backend changes.
    Within a bucket, parameters go largest first to the rank holding the fewest bytes of the
    bucket (then of all buckets so far, then the lowest rank): segments stay near equal and
    the ranks' totals balanced; a parameter bigger than its share makes a bucket of its own
    with one owner. Whole parameters only."""
    total = [0] * nranks
    buckets, owner = [], {}
    for index, members in enumerate(_groups(params, limit_bytes)):
        local = [0] * nranks
        owners = [0] * len(members)
        for i in sorted(range(len(members)), key=lambda i: (-members[i].data.size, i)):
            r = min(range(nranks), key=lambda k: (local[k], total[k], k))
            owners[i] = r
            n = members[i].data.size * members[i].data.itemsize
            local[r] += n
            total[r] += n
            owner[id(members[i])] = r
        buckets.append(Bucket(index, members, owners, nranks))
    return buckets, owner

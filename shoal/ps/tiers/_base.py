"""The storage-tier ABC and its registry: where a sparse shard keeps the rows its RAM arena spilled.

A tier is a store of fixed-width float32 records keyed by uint64 (one record
per row: the shard's row layout plus its embedx flag). Every method is
vectorized over a numpy key array; none loops in Python per key. A tier
serves one shard, under that shard's lock: it is not thread-safe by itself.
"""
from __future__ import annotations

import abc
from collections.abc import Iterator

import numpy as np

from shoal.ps.errors import TableError


class StorageTier(abc.ABC):
    """Cold rows of one shard: uint64 key -> float32 record of `width`.

    Contract: each key is stored at most once; `put` says whether its keys are
    new or overwritten, and `delete` takes keys that are present (the caller
    knows which from `get`), so `len` stays exact without extra reads.
    """

    name: str = ""

    def __init__(self, width: int):
        self.width = width

    @classmethod
    @abc.abstractmethod
    def open(cls, *, width: int, table: str, shard: int, server: int,
             path: str | None, empty: bool = False) -> StorageTier:
        """The tier of shard `shard` of `table` on server `server` (`path`: the spec's ssd_path).

        With `empty` it starts with no records, whatever an earlier process left there (dropped
        without a per-key pass); without it, a durable tier holds what it held before."""

    @abc.abstractmethod
    def get(self, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(found bool [n], records float32 [n, width]) for unique `keys`; rows of absent keys are
        zeros. Read-only."""

    @abc.abstractmethod
    def put(self, keys: np.ndarray, records: np.ndarray, *, fresh: bool) -> None:
        """Write `records` [n, width] for unique `keys`, as one batch: with `fresh` none of the
        keys is stored yet (a spill), without it all are (an overwrite)."""

    @abc.abstractmethod
    def delete(self, keys: np.ndarray) -> None:
        """Remove unique `keys`, all of which are present, as one batch."""

    @abc.abstractmethod
    def batches(self, size: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Every (keys, records) in chunks of at most `size`, from a snapshot taken when iteration
        starts: the caller may put and delete while it iterates."""

    @abc.abstractmethod
    def __len__(self) -> int:
        """Number of keys stored."""

    def nbytes(self) -> int:
        """Bytes of the records (keys included), as stored before any compression."""
        return len(self) * (4 * self.width + 8)

    def close(self) -> None:
        """Release files and handles; the tier is unusable afterwards. Idempotent."""


_TIERS: dict[str, type[StorageTier]] = {}


def register_tier(name: str, cls: type[StorageTier]) -> None:
    """Make `cls` the tier `name` (the spec's `storage` value)."""
    if not (isinstance(cls, type) and issubclass(cls, StorageTier)):
        raise TypeError(f"register_tier({name!r}, {cls!r}): a tier must subclass StorageTier")
    cls.name = name
    _TIERS[name] = cls


def tier_names() -> tuple[str, ...]:
    """The registered tier names, in registration order."""
    return tuple(_TIERS)


def make_tier(name: str, *, width: int, table: str, shard: int, server: int,
              path: str | None, empty: bool = False) -> StorageTier:
    """The tier `name` for shard `shard` of table `table` on server `server` (see
    StorageTier.open for `empty`).

    Raises TableError for an unknown name (listing the known ones) or a tier that cannot open.
    """
    cls = _TIERS.get(name)
    if cls is None:
        raise TableError(f"table {table!r}: storage tier {name!r} is not registered; known tiers: "
                         f"{list(_TIERS)} (register one with shoal.ps.tiers.register_tier)")
    return cls.open(width=width, table=table, shard=shard, server=server, path=path,
                    empty=empty)

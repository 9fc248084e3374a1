"""The storage-tier ABC and its registry: where a sparse shard keeps the rows its RAM arena spilled.

A tier is a store of fixed-width float32 records keyed by uint64 (one record
per row: the shard's row layout plus its embedx flag). Every method is
vectorized over a numpy key array; none loops in Python per key. A tier
serves one shard, under that shard's lock: it is not thread-safe by itself.
A tier starts empty, whatever an earlier process left at its place: the
records are the spill of one table process (see shoal.ps.tiers.tiered for
why a restarted server starts from its checkpoint instead).
"""
from __future__ import annotations

import abc
from collections.abc import Iterator

import numpy as np

from shoal.ps.errors import TableError


class StorageTier(abc.ABC):
    """Cold rows of one shard: uint64 key -> float32 record of `width`.

    Contract: each key is stored at most once (a put of a stored key replaces
    its record), and membership is answered in RAM: `contains` and the
    absent keys of `get` cost no disk read.
    """

    name: str = ""

    def __init__(self, width: int):
        self.width = width

    @classmethod
    @abc.abstractmethod
    def open(cls, *, width: int, table: str, shard: int, server: int,
             path: str | None) -> StorageTier:
        """The tier of shard `shard` of `table` on server `server` (`path`: the spec's ssd_path),
        empty (what an earlier process left there is dropped without a per-key pass)."""

    @abc.abstractmethod
    def contains(self, keys: np.ndarray) -> np.ndarray:
        """bool [n]: which of `keys` are stored. Read-only; no disk read."""

    @abc.abstractmethod
    def get(self, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(found bool [n], records float32 [n, width]) for unique `keys`; rows of absent keys are
        zeros. Read-only."""

    @abc.abstractmethod
    def take(self, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """`get` and `delete` of unique `keys` in one: (found, records) of the keys it held, which
        it then holds no more (a promotion)."""

    @abc.abstractmethod
    def put(self, keys: np.ndarray, records: np.ndarray) -> None:
        """Write `records` [n, width] for unique `keys` (new or stored ones), as one batch."""

    @abc.abstractmethod
    def delete(self, keys: np.ndarray) -> None:
        """Remove unique `keys` (absent ones are ignored), as one batch."""

    @abc.abstractmethod
    def batches(self, size: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Every (keys, records) in chunks of about `size`, from a snapshot taken when iteration
        starts: the caller may put and delete the keys already yielded while it iterates."""

    @abc.abstractmethod
    def __len__(self) -> int:
        """Number of keys stored."""

    def nbytes(self) -> int:
        """Bytes of the records (keys included), as stored before any compression."""
        return len(self) * (4 * self.width + 8)

    @abc.abstractmethod
    def ram_bytes(self) -> int:
        """Bytes of RAM the tier holds itself (its index; for a RAM tier, the records too)."""

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
              path: str | None) -> StorageTier:
    """The tier `name`, empty, for shard `shard` of table `table` on server `server`.

    Raises TableError for an unknown name (listing the known ones) or a tier that cannot open.
    """
    cls = _TIERS.get(name)
    if cls is None:
        raise TableError(f"table {table!r}: storage tier {name!r} is not registered; known tiers: "
                         f"{list(_TIERS)} (register one with shoal.ps.tiers.register_tier)")
    return cls.open(width=width, table=table, shard=shard, server=server, path=path)

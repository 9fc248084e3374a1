"""Slot lists: the columns of a MultiSlot line, in order (Paddle's ``use_var``)."""
from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Literal, overload

import numpy as np

from shoal.worker.data.errors import DataError

DType = Literal["float", "uint64"]
_NUMPY = {"float": np.dtype(np.float32), "uint64": np.dtype(np.uint64)}


@dataclass(frozen=True)
class Slot:
    """One slot of a MultiSlot line: ``<count> <values...>``.

    Args:
        name: the slot's name (unique within a slot list; no whitespace).
        dtype: "float" (parsed as float32) or "uint64" (feature ids, parsed
            exactly: no float round trip).
        dense: a dense slot has a fixed count (``dim``) and becomes a float32
            [B, dim] array of a Batch; a sparse slot has any count >= 1 per
            line (Paddle's MultiSlot refuses empty slots: pad them with a
            default id) and becomes a Ragged column.
        dim: the fixed count of a dense slot; None for a sparse slot.

    Raises:
        DataError: an unknown dtype, a dense slot without dim >= 1, a sparse
            slot with a dim, or a dense uint64 slot (fixed-count ids are a
            sparse uint64 slot: Batch.dense holds float32 only).

    Example:
        >>> Slot("dense", "float", dense=True, dim=13)
        >>> Slot("C1", "uint64")
    """

    name: str
    dtype: DType
    dense: bool = False
    dim: int | None = None

    def __post_init__(self):
        if not isinstance(self.name, str) or not self.name or any(c.isspace() for c in self.name):
            raise DataError(f"Slot name {self.name!r}: expected a non-empty string without whitespace")
        if self.dtype not in _NUMPY:
            raise DataError(f"Slot {self.name!r}: dtype {self.dtype!r} is not one of {sorted(_NUMPY)}")
        if self.dense:
            if isinstance(self.dim, bool) or not isinstance(self.dim, (int, np.integer)) or self.dim < 1:
                raise DataError(f"Slot {self.name!r}: a dense slot needs an int dim >= 1, got dim={self.dim!r}")
            if self.dtype != "float":
                raise DataError(f"Slot {self.name!r}: dense slots hold float features; a fixed-count id slot "
                                "is a sparse uint64 slot (dense=False)")
            object.__setattr__(self, "dim", int(self.dim))
        elif self.dim is not None:
            raise DataError(f"Slot {self.name!r}: a sparse slot takes no dim (got dim={self.dim!r}); "
                            "set dense=True for a fixed-count float slot")

    @property
    def numpy_dtype(self) -> np.dtype:
        """float32 or uint64."""
        return _NUMPY[self.dtype]


class SlotList:
    """The ordered slots of a MultiSlot line; immutable, indexable by position or name.

    Example:
        >>> slots = SlotList.ctr()          # label, dense (13 floats), C1..C26 ids
        >>> slots["C1"].dtype, len(slots)
        ('uint64', 28)
    """

    __slots__ = ("_slots", "_index")

    def __init__(self, slots: Iterable[Slot]):
        self._slots = tuple(slots)
        if not self._slots:
            raise DataError("a SlotList needs at least one Slot")
        for s in self._slots:
            if not isinstance(s, Slot):
                raise DataError(f"SlotList takes Slot objects, got {type(s).__name__}: {s!r}")
        self._index = {s.name: i for i, s in enumerate(self._slots)}
        if len(self._index) != len(self._slots):
            seen, dup = set(), []
            for s in self._slots:
                (dup.append(s.name) if s.name in seen else seen.add(s.name))
            raise DataError(f"SlotList: duplicate slot names {sorted(set(dup))}")

    @classmethod
    def ctr(cls, n_dense: int = 13, n_sparse: int = 26) -> "SlotList":
        """The Criteo-like CTR layout of the sample data: "label" (float, dense, dim 1),
        "dense" (float, dense, dim n_dense), then "C1".."C<n_sparse>" (uint64, sparse)."""
        slots = [Slot("label", "float", dense=True, dim=1)]
        if n_dense:
            slots.append(Slot("dense", "float", dense=True, dim=n_dense))
        slots += [Slot(f"C{i + 1}", "uint64") for i in range(n_sparse)]
        return cls(slots)

    @classmethod
    def of(cls, slots: "SlotList | Iterable[Slot]") -> "SlotList":
        """`slots` as a SlotList (a list of Slot objects is accepted too)."""
        return slots if isinstance(slots, SlotList) else cls(slots)

    @property
    def names(self) -> list[str]:
        return [s.name for s in self._slots]

    @property
    def dense(self) -> list[Slot]:
        """The dense slots, in line order."""
        return [s for s in self._slots if s.dense]

    @property
    def sparse(self) -> list[Slot]:
        """The sparse slots, in line order."""
        return [s for s in self._slots if not s.dense]

    def index(self, name: str) -> int:
        try:
            return self._index[name]
        except KeyError:
            raise DataError(f"no slot named {name!r}; the slots are {self.names}") from None

    @overload
    def __getitem__(self, key: int | str) -> Slot: ...
    @overload
    def __getitem__(self, key: slice) -> "SlotList": ...

    def __getitem__(self, key):
        if isinstance(key, str):
            return self._slots[self.index(key)]
        if isinstance(key, slice):
            return SlotList(self._slots[key])
        return self._slots[key]

    def __contains__(self, name: object) -> bool:
        return name in self._index

    def __iter__(self) -> Iterator[Slot]:
        return iter(self._slots)

    def __len__(self) -> int:
        return len(self._slots)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, SlotList) and self._slots == other._slots

    def __hash__(self) -> int:
        return hash(self._slots)

    def __repr__(self) -> str:
        def one(s: Slot) -> str:
            return f"{s.name}:{s.dtype}[{s.dim}]" if s.dense else f"{s.name}:{s.dtype}"
        shown = [one(s) for s in self._slots]
        if len(shown) > 8:
            shown = shown[:5] + [f"... {len(shown) - 7} more"] + shown[-2:]
        return f"SlotList({', '.join(shown)})"

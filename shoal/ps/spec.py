"""Table specs: what `create_table` sends and a checkpoint's manifest records.

Plain frozen dataclasses (they cross the wire as msgpack maps): the strategy
layer (configs/) builds them from a DistributedStrategy. `from_dict` rejects
unknown keys and bad values with TableError naming the field and the fix.
Defaults follow Paddle's CtrCommonAccessor and sparse_sgd_rule.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any

from shoal.ps.errors import TableError


def _fields(cls) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(cls)}


def _from_dict(cls, data: dict[str, Any]):
    if not isinstance(data, dict):
        raise TableError(f"{cls.__name__}: expected a mapping of fields, got {type(data).__name__}")
    known = _fields(cls)
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise TableError(f"{cls.__name__}: unknown field(s) {unknown}; valid fields are "
                         f"{sorted(known)}")
    kwargs = {}
    for name, value in data.items():
        if name == "weight_bounds" and isinstance(value, list):
            value = tuple(value)
        kwargs[name] = value
    try:
        return cls(**kwargs)
    except TypeError as e:
        raise TableError(f"{cls.__name__}: {e}") from e


def _check(cond: bool, table: str, field: str, value, want: str) -> None:
    if not cond:
        raise TableError(f"table {table!r}: {field}={value!r} is invalid; {want}")


def _check_name(name) -> None:
    _check(isinstance(name, str) and name != "" and "/" not in name, name, "name", name,
           "give a non-empty string without '/' (checkpoints use it as a separator)")


def _number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


SPARSE_RULES = ("naive", "adagrad", "std_adagrad", "adam")
ENTRIES = ("none", "count_filter", "probability", "show_click")
DENSE_RULES = ("sgd", "adam", "sum")
STORAGES = ("memory", "ssd")            # the tiers of shoal.ps.tiers (a test checks they agree)
EVICTIONS = ("unseen_days", "lfu")


@dataclasses.dataclass(frozen=True)
class SparseTableSpec:
    """A sparse table: uint64 key -> float32 row of `dim`, with CTR statistics.

    With `embedx_threshold` set, a row is Paddle's split layout: a 1-wide
    `embed_w` created at admission and a (dim-1)-wide `embedx` created only
    once the row's show/click score reaches the threshold (reads as zeros
    until then).
    """

    name: str
    dim: int
    rule: str = "adagrad"
    learning_rate: float = 0.05
    initial_g2sum: float = 3.0
    initial_range: float = 1e-4
    weight_bounds: tuple = (-10.0, 10.0)
    beta1: float = 0.9
    beta2: float = 0.999
    epsilon: float = 1e-8
    scale_by_show: bool = True          # divide a pushed gradient by its show, as Paddle's CTR accessor
    embedx_threshold: float | None = None
    nonclk_coeff: float = 0.1
    click_coeff: float = 1.0
    base_threshold: float = 1.5
    delta_threshold: float = 0.25
    delta_keep_days: float = 16
    show_click_decay_rate: float = 0.98
    delete_threshold: float = 0.8
    delete_after_unseen_days: float = 30
    entry: str = "none"
    entry_count: int = 1                # count_filter: rows after this many training sightings
    entry_probability: float = 1.0      # probability: chance of admission per training sighting
    entry_threshold: float = 0.0        # show_click: score a pending key must reach
    seed: int = 0
    shards: int = 4                     # lock-separated shards inside one server
    # tiers: with memory_budget_mb, rows past the budget go to the `storage` tier (None: all in RAM)
    storage: str = "memory"             # memory: a compact RAM store; ssd: RocksDB under ssd_path
    memory_budget_mb: float | None = None   # RAM for hot rows on each server (key index included)
    ssd_path: str | None = None         # storage ssd: the directory of the servers' RocksDB
    eviction: str = "unseen_days"       # coldest first: unseen_days (then score), or lfu (shows)

    def __post_init__(self):
        n = self.name
        _check_name(n)
        _check(isinstance(self.dim, int) and not isinstance(self.dim, bool) and self.dim >= 1,
               n, "dim", self.dim, "use a positive int")
        _check(self.rule in SPARSE_RULES, n, "rule", self.rule, f"choose one of {list(SPARSE_RULES)}")
        _check(self.entry in ENTRIES, n, "entry", self.entry, f"choose one of {list(ENTRIES)}")
        for f in ("learning_rate", "initial_g2sum", "initial_range", "epsilon", "nonclk_coeff",
                  "click_coeff", "base_threshold", "delta_threshold", "delta_keep_days",
                  "delete_threshold", "delete_after_unseen_days", "entry_threshold"):
            v = getattr(self, f)
            _check(_number(v) and v >= 0, n, f, v, "use a finite non-negative number")
        for f in ("beta1", "beta2"):
            v = getattr(self, f)
            _check(_number(v) and 0 <= v < 1, n, f, v, "use a number in [0, 1)")
        _check(_number(self.show_click_decay_rate) and 0 < self.show_click_decay_rate <= 1, n,
               "show_click_decay_rate", self.show_click_decay_rate, "use a number in (0, 1]")
        wb = self.weight_bounds
        _check(isinstance(wb, tuple) and len(wb) == 2 and all(_number(x) for x in wb)
               and wb[0] < wb[1], n, "weight_bounds", wb, "give [min, max] with min < max")
        if self.embedx_threshold is not None:
            _check(_number(self.embedx_threshold) and self.embedx_threshold >= 0, n,
                   "embedx_threshold", self.embedx_threshold, "use a non-negative number or None")
            _check(self.dim >= 2, n, "dim", self.dim, "the split embed_w/embedx layout needs dim >= 2")
        _check(isinstance(self.entry_count, int) and self.entry_count >= 1, n, "entry_count",
               self.entry_count, "use an int >= 1")
        _check(_number(self.entry_probability) and 0 < self.entry_probability <= 1, n,
               "entry_probability", self.entry_probability, "use a number in (0, 1]")
        _check(isinstance(self.seed, int) and 0 <= self.seed < 2 ** 63, n, "seed", self.seed,
               "use a non-negative int")
        _check(isinstance(self.shards, int) and 1 <= self.shards <= 256, n, "shards", self.shards,
               "use an int in [1, 256]")
        _check(isinstance(self.scale_by_show, bool), n, "scale_by_show", self.scale_by_show,
               "use true or false")
        _check(self.storage in STORAGES, n, "storage", self.storage, f"choose one of {list(STORAGES)}")
        _check(self.eviction in EVICTIONS, n, "eviction", self.eviction,
               f"choose one of {list(EVICTIONS)}")
        _check(self.memory_budget_mb is None or (_number(self.memory_budget_mb)
                                                 and self.memory_budget_mb > 0), n,
               "memory_budget_mb", self.memory_budget_mb, "use a positive number of MiB, or None "
               "to keep every row in RAM")
        _check(self.ssd_path is None or (isinstance(self.ssd_path, str) and self.ssd_path != ""), n,
               "ssd_path", self.ssd_path, "give a directory path or None")
        if self.storage == "ssd":
            _check(self.ssd_path is not None, n, "ssd_path", self.ssd_path,
                   "storage 'ssd' needs a directory for RocksDB (each server uses "
                   "<ssd_path>/server-<index>)")
            _check(self.memory_budget_mb is not None, n, "memory_budget_mb", self.memory_budget_mb,
                   "storage 'ssd' spills rows past a RAM budget: set memory_budget_mb")

    kind = "sparse"

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["weight_bounds"] = list(self.weight_bounds)
        return d

    @classmethod
    def from_dict(cls, data: dict) -> SparseTableSpec:
        return _from_dict(cls, data)

    def score(self, show, click):
        """Paddle's show/click score: (show - click) * nonclk_coeff + click * click_coeff."""
        return (show - click) * self.nonclk_coeff + click * self.click_coeff


@dataclasses.dataclass(frozen=True)
class DenseTableSpec:
    """A dense float32 vector of `size`, split evenly over the servers, with a server-side rule
    ('sgd', 'adam', or 'sum' for GEO deltas)."""

    name: str
    size: int
    rule: str = "sgd"
    learning_rate: float = 0.01
    beta1: float = 0.9
    beta2: float = 0.999
    epsilon: float = 1e-8

    def __post_init__(self):
        n = self.name
        _check_name(n)
        _check(isinstance(self.size, int) and not isinstance(self.size, bool) and self.size >= 1,
               n, "size", self.size, "use a positive int")
        _check(self.rule in DENSE_RULES, n, "rule", self.rule, f"choose one of {list(DENSE_RULES)}")
        _check(_number(self.learning_rate) and self.learning_rate >= 0, n, "learning_rate",
               self.learning_rate, "use a finite non-negative number")
        for f in ("beta1", "beta2"):
            v = getattr(self, f)
            _check(_number(v) and 0 <= v < 1, n, f, v, "use a number in [0, 1)")
        _check(_number(self.epsilon) and self.epsilon > 0, n, "epsilon", self.epsilon,
               "use a positive number")

    kind = "dense"

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> DenseTableSpec:
        return _from_dict(cls, data)

    def bounds(self, server: int, n_servers: int) -> tuple[int, int]:
        """[start, end) of this vector held by `server` of `n_servers` (an even split)."""
        base, extra = divmod(self.size, n_servers)
        start = server * base + min(server, extra)
        return start, start + base + (1 if server < extra else 0)


# A dense table's learning rate travels with every push (the worker's LR scheduler drives it),
# so it is no part of what makes two specs the same table.
_NOT_IDENTITY = {"dense": {"learning_rate"}, "sparse": set()}


def spec_conflicts(have, want) -> dict:
    """{field: (have, want)} for the fields where two specs of one table disagree ({} if none)."""
    if have.kind != want.kind:
        return {"kind": (have.kind, want.kind)}
    a, b = spec_to_dict(have), spec_to_dict(want)
    skip = _NOT_IDENTITY[have.kind]
    return {k: (a.get(k), b.get(k)) for k in sorted(set(a) | set(b)) if k not in skip and a.get(k) != b.get(k)}


def spec_from_dict(data: dict):
    """A SparseTableSpec or DenseTableSpec from {"kind": "sparse"|"dense", ...fields}."""
    if not isinstance(data, dict) or data.get("kind") not in ("sparse", "dense"):
        raise TableError(f"table spec must be a mapping with kind 'sparse' or 'dense', got "
                         f"{data!r:.200}")
    fields = {k: v for k, v in data.items() if k != "kind"}
    cls = SparseTableSpec if data["kind"] == "sparse" else DenseTableSpec
    return cls.from_dict(fields)


def spec_to_dict(spec) -> dict:
    return {"kind": spec.kind, **spec.to_dict()}

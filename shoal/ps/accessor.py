"""Sparse update rules (Paddle's sparse_sgd_rule) and entry (admission) policies.

Both are small ABCs with registries (STYLE.md §5). A rule updates gathered
rows in place: `w` is [n, width] float32, each state array [n, k]; nothing
loops over keys. An entry policy decides which absent keys get a row.
"""
from __future__ import annotations

from abc import ABC, abstractmethod

import numpy as np

from shoal.ps.errors import TableError


class SparseRule(ABC):
    """How one part of a row (width columns) learns: its state and its update."""

    name = ""

    def __init__(self, spec):
        self.spec = spec
        self.lr = np.float32(spec.learning_rate)
        self.lo, self.hi = (np.float32(b) for b in spec.weight_bounds)

    @abstractmethod
    def state_widths(self, width: int) -> dict[str, int]:
        """Name -> columns of each per-row state array for a part of `width` columns."""

    def init_state(self, name: str, n: int, k: int) -> np.ndarray:
        return np.zeros((n, k), dtype=np.float32)

    @abstractmethod
    def update(self, w: np.ndarray, state: dict[str, np.ndarray], grad: np.ndarray) -> None:
        """Apply one step to gathered rows `w` and `state` (in place), then bound `w`."""

    def _bound(self, w: np.ndarray) -> None:
        np.clip(w, self.lo, self.hi, out=w)


class NaiveSGD(SparseRule):
    """w -= lr * g."""

    name = "naive"

    def state_widths(self, width):
        return {}

    def update(self, w, state, grad):
        w -= self.lr * grad
        self._bound(w)


class AdaGrad(SparseRule):
    """One g2sum per row: w -= lr * g * sqrt(g0 / (g0 + g2sum)); g2sum += mean(g^2)."""

    name = "adagrad"

    def state_widths(self, width):
        return {"g2sum": 1}

    def update(self, w, state, grad):
        g0 = np.float32(self.spec.initial_g2sum)
        g2sum = state["g2sum"]
        w -= (self.lr * np.sqrt(g0 / (g0 + g2sum))) * grad
        self._bound(w)
        g2sum += (grad * grad).mean(axis=1, keepdims=True)


class StdAdaGrad(SparseRule):
    """Per-element g2sum: w_i -= lr * g_i * sqrt(g0 / (g0 + g2sum_i)); g2sum_i += g_i^2."""

    name = "std_adagrad"

    def state_widths(self, width):
        return {"g2sum": width}

    def update(self, w, state, grad):
        g0 = np.float32(self.spec.initial_g2sum)
        g2sum = state["g2sum"]
        w -= self.lr * grad * np.sqrt(g0 / (g0 + g2sum))
        self._bound(w)
        g2sum += grad * grad


class Adam(SparseRule):
    """Per-element moments and per-row beta powers (Paddle's SparseAdamSGDRule)."""

    name = "adam"

    def state_widths(self, width):
        return {"m": width, "v": width, "beta1_pow": 1, "beta2_pow": 1}

    def init_state(self, name, n, k):
        start = {"beta1_pow": self.spec.beta1, "beta2_pow": self.spec.beta2}.get(name, 0.0)
        return np.full((n, k), start, dtype=np.float32)

    def update(self, w, state, grad):
        b1, b2 = np.float32(self.spec.beta1), np.float32(self.spec.beta2)
        eps = np.float32(self.spec.epsilon)
        m, v, p1, p2 = state["m"], state["v"], state["beta1_pow"], state["beta2_pow"]
        m *= b1
        m += (1 - b1) * grad
        v *= b2
        v += (1 - b2) * grad * grad
        corr2 = np.sqrt(1 - p2)
        w -= (self.lr * corr2 / (1 - p1)) * m / (np.sqrt(v) + eps * corr2)
        self._bound(w)
        p1 *= b1
        p2 *= b2


RULES: dict[str, type[SparseRule]] = {cls.name: cls for cls in (NaiveSGD, AdaGrad, StdAdaGrad, Adam)}


def make_rule(spec) -> SparseRule:
    cls = RULES.get(spec.rule)
    if cls is None:
        raise TableError(f"table {spec.name!r}: unknown sparse rule {spec.rule!r}; registered "
                         f"rules are {sorted(RULES)}")
    return cls(spec)


# -- entry (admission) ----------------------------------------------------------------
class Pending:
    """What a shard remembers of keys that have no row yet: sightings, show, click, unseen days."""

    FIELDS = ("count", "show", "click", "unseen")

    def __init__(self, keymap_cls):
        self.map = keymap_cls()
        self.cols = {f: np.zeros(0, dtype=np.float32) for f in self.FIELDS}

    def rows_for(self, keys: np.ndarray) -> np.ndarray:
        rows, new = self.map.get_or_insert(keys)
        bound = self.map.row_bound
        cap = len(self.cols["count"])
        if bound > cap:
            grown = max(bound, 2 * cap, 1024)
            for f, a in self.cols.items():
                self.cols[f] = np.concatenate([a, np.zeros(grown - cap, dtype=np.float32)])
        for a in self.cols.values():
            a[rows[new]] = 0.0
        return rows

    def forget(self, keys: np.ndarray) -> None:
        self.map.erase(keys)

    def __len__(self) -> int:
        return len(self.map)


class Entry(ABC):
    """Decides, at a training pull, which absent keys get a row."""

    name = ""
    uses_pending = False

    def __init__(self, spec, rng: np.random.Generator):
        self.spec, self.rng = spec, rng

    @abstractmethod
    def admit(self, keys: np.ndarray, pending: Pending | None) -> np.ndarray:
        """A bool mask over `keys` (all absent, unique): True gets a row now."""


class AdmitAll(Entry):
    name = "none"

    def admit(self, keys, pending):
        return np.ones(len(keys), dtype=bool)


class CountFilter(Entry):
    """A key gets a row at its `entry_count`-th training sighting."""

    name = "count_filter"
    uses_pending = True

    def admit(self, keys, pending):
        rows = pending.rows_for(keys)
        pending.cols["count"][rows] += 1
        pending.cols["unseen"][rows] = 0
        return pending.cols["count"][rows] >= self.spec.entry_count


class Probability(Entry):
    """Each training sighting of an absent key admits it with `entry_probability`."""

    name = "probability"

    def admit(self, keys, pending):
        return self.rng.random(len(keys)) < self.spec.entry_probability


class ShowClick(Entry):
    """A key gets a row once the show/click score pushed for it reaches `entry_threshold`."""

    name = "show_click"
    uses_pending = True

    def admit(self, keys, pending):
        rows = pending.rows_for(keys)
        pending.cols["unseen"][rows] = 0
        score = self.spec.score(pending.cols["show"][rows], pending.cols["click"][rows])
        return score >= self.spec.entry_threshold


ENTRIES: dict[str, type[Entry]] = {cls.name: cls for cls in (AdmitAll, CountFilter, Probability, ShowClick)}


def make_entry(spec, rng: np.random.Generator) -> Entry:
    cls = ENTRIES.get(spec.entry)
    if cls is None:
        raise TableError(f"table {spec.name!r}: unknown entry policy {spec.entry!r}; registered "
                         f"policies are {sorted(ENTRIES)}")
    return cls(spec, rng)

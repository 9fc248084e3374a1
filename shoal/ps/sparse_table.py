"""The sparse table of one server: lock-separated shards of rows in a growable arena.

Each shard maps uint64 keys to row ids with the native KeyMap and keeps the
rows as a structure of arrays (embedding, rule state, show, click, delta
score, unseen days, embedx flag). Freed rows are reused. Every call is
vectorized over its keys; a shard's updates never interleave (one lock per
shard) and different shards can be worked on by different threads.
"""
from __future__ import annotations

import threading

import numpy as np

from shoal.kernels import get_backend
from shoal.ps._keymap import KeyMap
from shoal.ps.accessor import Pending, make_entry, make_rule
from shoal.ps.errors import TableError
from shoal.ps.partition import shard_of, uniform_rows
from shoal.ps.spec import SparseTableSpec

_STATS = ("show", "click", "delta_score", "unseen_days")


class SparseShard:
    """One lock's worth of a sparse table. Not thread-safe by itself: callers hold `lock`."""

    def __init__(self, spec: SparseTableSpec, index: int):
        self.spec = spec
        self.lock = threading.Lock()
        self.map = KeyMap()
        self.rule = make_rule(spec)
        self.entry = make_entry(spec, np.random.default_rng([spec.seed, index]))
        self.pending = Pending(KeyMap) if self.entry.uses_pending else None
        self.split = spec.embedx_threshold is not None
        # parts of a row: (name, first column, width); the split layout has two
        self.parts = [("embed", 0, 1), ("embedx", 1, spec.dim - 1)] if self.split \
            else [("embed", 0, spec.dim)]
        self.cap = 0
        self.emb = np.zeros((0, spec.dim), np.float32)
        self.stats = {s: np.zeros(0, np.float32) for s in _STATS}
        self.has_embedx = np.zeros(0, bool)
        self.row_keys = np.zeros(0, np.uint64)  # the key of each row (for lazy embedx init)
        self.state = {(part, name): np.zeros((0, k), np.float32)
                      for part, _, width in self.parts
                      for name, k in self.rule.state_widths(width).items()}

    # -- arena -------------------------------------------------------------------
    def _grow(self, bound: int) -> None:
        if bound <= self.cap:
            return
        cap = max(bound, 2 * self.cap, 1024)

        def grown(a):
            out = np.zeros((cap,) + a.shape[1:], a.dtype)
            out[:len(a)] = a
            return out
        self.emb = grown(self.emb)
        self.stats = {k: grown(v) for k, v in self.stats.items()}
        self.has_embedx = grown(self.has_embedx)
        self.row_keys = grown(self.row_keys)
        self.state = {k: grown(v) for k, v in self.state.items()}
        self.cap = cap

    def _init_rows(self, keys: np.ndarray, rows: np.ndarray) -> None:
        """Fresh values for new rows: a pure function of (table seed, key)."""
        spec = self.spec
        spec_range = spec.initial_range
        self._grow(self.map.row_bound)
        self.row_keys[rows] = keys
        if self.split:
            self.emb[rows] = 0.0  # embed_w starts at zero, embedx does not exist yet (Paddle)
            self.has_embedx[rows] = False
        else:
            self.emb[rows] = uniform_rows(spec.seed, keys, spec.dim, -spec_range, spec_range)
        for s in self.stats.values():
            s[rows] = 0.0
        for (part, name), arr in self.state.items():
            arr[rows] = self.rule.init_state(name, len(rows), arr.shape[1])

    def _create_embedx(self, keys: np.ndarray, rows: np.ndarray) -> None:
        spec = self.spec
        self.emb[rows, 1:] = uniform_rows(spec.seed, keys, spec.dim - 1, -spec.initial_range,
                                          spec.initial_range, offset=1)
        self.has_embedx[rows] = True
        for (part, name), arr in self.state.items():
            if part == "embedx":
                arr[rows] = self.rule.init_state(name, len(rows), arr.shape[1])

    # -- requests ------------------------------------------------------------------
    def pull(self, keys: np.ndarray, training: bool) -> np.ndarray:
        """Rows for unique `keys`; with `training`, absent keys the entry admits get rows."""
        rows = self.map.lookup(keys)
        if training:
            absent = np.flatnonzero(rows < 0)
            if len(absent):
                akeys = keys[absent]
                admit = self.entry.admit(akeys, self.pending)
                new_rows, is_new = self.map.get_or_insert(akeys, admit)
                created = new_rows >= 0
                if created.any():
                    self._init_rows(akeys[is_new], new_rows[is_new])
                    if self.pending is not None:
                        self.pending.forget(akeys[created])
                rows[absent] = new_rows
            present = rows >= 0
            self.stats["unseen_days"][rows[present]] = 0.0
        out = np.zeros((len(keys), self.spec.dim), np.float32)
        present = np.flatnonzero(rows >= 0)
        out[present] = self.emb[rows[present]]
        return out

    def push(self, keys: np.ndarray, grads: np.ndarray, shows: np.ndarray, clicks: np.ndarray) -> None:
        """Apply merged gradients (unique keys) with their shows and clicks."""
        spec = self.spec
        rows = self.map.lookup(keys)
        has = rows >= 0
        if self.pending is not None and not has.all():
            miss = ~has
            prow = self.pending.rows_for(keys[miss])
            self.pending.cols["show"][prow] += shows[miss]
            self.pending.cols["click"][prow] += clicks[miss]
        if not has.any():
            return
        r, g, s, c = rows[has], grads[has], shows[has], clicks[has]
        st = self.stats
        st["show"][r] += s
        st["click"][r] += c
        st["delta_score"][r] += spec.score(s, c)
        st["unseen_days"][r] = 0.0
        if spec.scale_by_show:
            g = g / np.maximum(s, 1.0)[:, None]
        for part, start, width in self.parts:
            sel = r if part == "embed" else r[self.has_embedx[r]]
            gp = g[:, start:start + width] if part == "embed" else \
                g[self.has_embedx[r], start:start + width]
            if len(sel) == 0:
                continue
            w = self.emb[sel, start:start + width]
            state = {name: self.state[(p, name)][sel] for (p, name) in self.state if p == part}
            self.rule.update(w, state, gp)
            self.emb[sel, start:start + width] = w
            for name, arr in state.items():
                self.state[(part, name)][sel] = arr
        if self.split:
            grow = r[~self.has_embedx[r]]
            grow = grow[spec.score(st["show"][grow], st["click"][grow]) >= spec.embedx_threshold]
            if len(grow):
                self._create_embedx(self._keys_of(grow), grow)

    def add_delta(self, keys: np.ndarray, deltas: np.ndarray) -> None:
        """GEO: add trained-minus-pulled deltas to the rows that exist (others have none to add to)."""
        rows = self.map.lookup(keys)
        has = rows >= 0
        if has.any():
            r = rows[has]
            w = self.emb[r] + deltas[has]
            if self.split:
                w[~self.has_embedx[r], 1:] = 0.0  # no embedx yet: it stays absent
            self.rule._bound(w)
            self.emb[r] = w
            self.stats["unseen_days"][r] = 0.0

    def _keys_of(self, rows: np.ndarray) -> np.ndarray:
        return self.row_keys[rows]

    def shrink(self) -> int:
        """Decay show/click and delete rows past the delete thresholds; returns rows deleted."""
        spec = self.spec
        keys, rows = self.map.items()
        st = self.stats
        st["show"][rows] *= np.float32(spec.show_click_decay_rate)
        st["click"][rows] *= np.float32(spec.show_click_decay_rate)
        score = spec.score(st["show"][rows], st["click"][rows])
        dead = (score < spec.delete_threshold) | (st["unseen_days"][rows] > spec.delete_after_unseen_days)
        self.map.erase(keys[dead])
        if self.pending is not None:
            pk, pr = self.pending.map.items()
            pc = self.pending.cols
            pc["show"][pr] *= np.float32(spec.show_click_decay_rate)
            pc["click"][pr] *= np.float32(spec.show_click_decay_rate)
            self.pending.forget(pk[pc["unseen"][pr] > spec.delete_after_unseen_days])
        return int(dead.sum())

    def day_tick(self) -> None:
        """One day passes: unseen_days += 1 for every row (and pending key)."""
        _, rows = self.map.items()
        self.stats["unseen_days"][rows] += 1.0
        if self.pending is not None:
            _, pr = self.pending.map.items()
            self.pending.cols["unseen"][pr] += 1.0

    # -- save / load -----------------------------------------------------------------
    def export(self, mode: int) -> dict[str, np.ndarray]:
        """The rows a save of `mode` writes (0 all, 1 delta, 2 base), as named arrays.

        Mode 1 resets the delta score of the rows it writes (Paddle's
        CtrCommonAccessor), so the next delta holds only what changed since.
        """
        spec = self.spec
        keys, rows = self.map.items()
        st = self.stats
        if mode in (1, 2):
            score = spec.score(st["show"][rows], st["click"][rows])
            keep = (score >= spec.base_threshold) & (st["unseen_days"][rows] <= spec.delta_keep_days)
            if mode == 1:
                keep &= st["delta_score"][rows] >= spec.delta_threshold
            keys, rows = keys[keep], rows[keep]
        out = {"keys": keys, "emb": self.emb[rows], "has_embedx": self.has_embedx[rows]}
        out.update({f"stat.{k}": v[rows] for k, v in st.items()})
        out.update({f"state.{p}.{n}": a[rows] for (p, n), a in self.state.items()})
        if mode == 1:
            st["delta_score"][rows] = 0.0
        return out

    def load_rows(self, data: dict[str, np.ndarray]) -> None:
        """Insert or overwrite the rows in `data` (as `export` wrote them)."""
        keys = data["keys"]
        if len(keys) == 0:
            return
        rows, _ = self.map.get_or_insert(keys)
        self._grow(self.map.row_bound)
        self.row_keys[rows] = keys
        self.emb[rows] = data["emb"]
        self.has_embedx[rows] = data["has_embedx"]
        for k, v in self.stats.items():
            v[rows] = data[f"stat.{k}"]
        for (p, n), a in self.state.items():
            a[rows] = data[f"state.{p}.{n}"]
        if self.pending is not None:
            self.pending.forget(keys)

    def checksum(self) -> float:
        keys, rows = self.map.items()
        order = np.argsort(keys)
        return float(np.float64(self.emb[rows[order]].astype(np.float64).sum())
                     + np.float64(self.stats["show"][rows].astype(np.float64).sum()))


class SparseTable:
    """This server's part of a sparse table, split over `spec.shards` locked shards.

    `pull`, `push`, `shrink`, `day_tick`, `export` and `load_rows` are
    thread-safe: each takes the lock of every shard it touches, one at a time.
    """

    def __init__(self, spec: SparseTableSpec):
        self.spec = spec
        self.shards = [SparseShard(spec, i) for i in range(spec.shards)]
        self._be = get_backend("numpy")

    def _check_keys(self, keys, op: str) -> np.ndarray:
        if not isinstance(keys, np.ndarray) or keys.dtype != np.uint64 or keys.ndim != 1:
            raise TableError(f"{op} on table {self.spec.name!r}: keys must be a 1-D uint64 array, "
                             f"got {getattr(keys, 'dtype', type(keys).__name__)} of shape "
                             f"{getattr(keys, 'shape', None)}")
        return keys

    def _check_rows(self, arr, n: int, op: str, name: str, shape=None) -> None:
        shape = (n, self.spec.dim) if shape is None else shape
        if not isinstance(arr, np.ndarray) or arr.dtype != np.float32 or arr.shape != shape:
            raise TableError(f"{op} on table {self.spec.name!r}: {name} must be float32 of shape "
                             f"{shape}, got {getattr(arr, 'dtype', type(arr).__name__)} "
                             f"{getattr(arr, 'shape', '')}")
        if not np.isfinite(arr).all():
            raise TableError(f"{op} on table {self.spec.name!r}: {name} holds NaN or inf; "
                             f"nothing was applied")

    def _groups(self, keys: np.ndarray):
        """(shard, positions in keys) for every shard that has keys."""
        if len(self.shards) == 1:
            yield self.shards[0], slice(None)
            return
        sid = shard_of(keys, len(self.shards))
        order = np.argsort(sid, kind="stable")
        bounds = np.searchsorted(sid[order], np.arange(len(self.shards) + 1))
        for i, shard in enumerate(self.shards):
            if bounds[i + 1] > bounds[i]:
                yield shard, order[bounds[i]:bounds[i + 1]]

    def pull(self, keys: np.ndarray, training: bool = True) -> np.ndarray:
        """Rows [n, dim] for `keys` (any order, duplicates allowed).

        With `training`, absent keys admitted by the entry policy get rows;
        without it the pull is read-only: no row created, no statistic touched.
        Keys without a row read as zeros.
        """
        keys = self._check_keys(keys, "pull_sparse")
        uniq, inverse = np.unique(keys, return_inverse=True)
        out = np.empty((len(uniq), self.spec.dim), np.float32)
        for shard, pos in self._groups(uniq):
            with shard.lock:
                out[pos] = shard.pull(uniq[pos], training)
        return out[inverse]

    def push(self, keys: np.ndarray, grads: np.ndarray, shows: np.ndarray | None = None,
             clicks: np.ndarray | None = None) -> None:
        """Apply gradients [n, dim] with shows and clicks [n] (duplicate keys are summed).

        Everything is validated before any row changes.
        """
        keys = self._check_keys(keys, "push_sparse")
        n, dim = len(keys), self.spec.dim
        shows = np.ones(n, np.float32) if shows is None else shows
        clicks = np.zeros(n, np.float32) if clicks is None else clicks
        self._check_rows(grads, n, "push_sparse", "grads")
        self._check_rows(shows, n, "push_sparse", "shows", (n,))
        self._check_rows(clicks, n, "push_sparse", "clicks", (n,))
        packed = np.concatenate([grads, shows[:, None], clicks[:, None]], axis=1)
        uniq, merged = self._be.segment_sum(keys, packed)
        g = np.ascontiguousarray(merged[:, :dim])
        s, c = merged[:, dim], merged[:, dim + 1]
        for shard, pos in self._groups(uniq):
            with shard.lock:
                shard.push(uniq[pos], g[pos], s[pos], c[pos])

    def add_delta(self, keys: np.ndarray, deltas: np.ndarray) -> None:
        """GEO: add deltas [n, dim] to the rows of `keys` that exist (duplicates are summed)."""
        keys = self._check_keys(keys, "push_delta")
        self._check_rows(deltas, len(keys), "push_delta", "deltas")
        uniq, merged = self._be.segment_sum(keys, deltas)
        for shard, pos in self._groups(uniq):
            with shard.lock:
                shard.add_delta(uniq[pos], merged[pos])

    def shrink(self) -> int:
        deleted = 0
        for shard in self.shards:
            with shard.lock:
                deleted += shard.shrink()
        return deleted

    def day_tick(self) -> None:
        for shard in self.shards:
            with shard.lock:
                shard.day_tick()

    def export(self, mode: int) -> dict[str, np.ndarray]:
        parts = []
        for shard in self.shards:
            with shard.lock:
                parts.append(shard.export(mode))
        return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}

    def load_rows(self, data: dict[str, np.ndarray]) -> None:
        keys = data["keys"]
        for shard, pos in self._groups(keys):
            with shard.lock:
                shard.load_rows({k: v[pos] for k, v in data.items()})

    def __len__(self) -> int:
        return sum(len(s.map) for s in self.shards)

    def stats(self) -> dict:
        return {"rows": len(self), "pending": sum(len(s.pending) for s in self.shards if s.pending),
                "bytes": int(sum(s.emb.nbytes + sum(a.nbytes for a in s.state.values())
                                 + sum(a.nbytes for a in s.stats.values()) for s in self.shards))}

    def checksum(self) -> float:
        """A number that changes when any row or show count changes (for tests and audits)."""
        total = 0.0
        for shard in self.shards:
            with shard.lock:
                total += shard.checksum()
        return total

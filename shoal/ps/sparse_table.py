"""The sparse table of one server: lock-separated shards of rows in a growable arena.

Each shard maps uint64 keys to row ids with the native KeyMap and keeps the
rows as a structure of arrays (embedding, rule state, show, click, delta
score, unseen days, embedx flag). Freed rows are reused. Every call is
vectorized over its keys; a shard's updates never interleave (one lock per
shard) and different shards can be worked on by different threads. With
`memory_budget_mb` a shard keeps only its hot rows in the arena and the rest
in a storage tier (shoal.ps.tiers.tiered); without it, the arena is all.
"""
from __future__ import annotations

import threading

import numpy as np

from shoal.kernels import ctr_pull, ctr_push, get_backend, mapped_zeros
from shoal.ps._keymap import KeyMap, merge_rows, unique_inverse
from shoal.ps import pass_records
from shoal.ps.accessor import Pending, make_entry, make_rule
from shoal.ps.errors import TableError
from shoal.ps.partition import shard_of, uniform_rows
from shoal.ps.spec import SparseTableSpec
from shoal.ps.tiers.tiered import ColdRows

_STATS = ("show", "click", "delta_score", "unseen_days")


# rule -> (kernel id, state columns in the kernel's order) of kernels._fused.ctr_push
_NATIVE_RULES = {"naive": (0, ()), "adagrad": (1, ("g2sum",)), "std_adagrad": (2, ("g2sum",)),
                 "adam": (3, ("m", "v", "beta1_pow", "beta2_pow"))}


class SparseShard:
    """One lock's worth of a sparse table. Not thread-safe by itself: callers hold `lock`.

    A row is one float32 record in `values` (Paddle's feature-value idea):
    the embedding, then each part's rule state, then show, click, delta score
    and unseen days, so a push gathers and scatters each row once.
    """

    def __init__(self, spec: SparseTableSpec, index: int, server: int = 0):
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
        self.cols: dict[str, tuple[int, int]] = {"emb": (0, spec.dim)}
        width = spec.dim
        for part, _, w in self.parts:
            for name, k in self.rule.state_widths(w).items():
                self.cols[f"state.{part}.{name}"] = (width, k)
                width += k
        for stat in _STATS:
            self.cols[f"stat.{stat}"] = (width, 1)
            width += 1
        self.width = width
        self.show, self.click, self.delta, self.unseen = (self.cols[f"stat.{s}"][0] for s in _STATS)
        self._native = self._native_args()
        self.cap = 0
        self.values = np.zeros((0, width), np.float32)
        self.has_embedx = np.zeros(0, bool)
        self.row_keys = np.zeros(0, np.uint64)  # the key of each row (for lazy embedx init)
        self.cold = None if spec.memory_budget_mb is None else ColdRows(self, index, server)

    def _native_args(self) -> tuple | None:
        """The fused push kernel's settings for this layout (None: the numpy path, for the split
        embed_w/embedx layout, whose two parts learn separately)."""
        spec = self.spec
        if self.split or spec.rule not in _NATIVE_RULES:
            return None
        states = [self.cols[f"state.embed.{n}"][0] for n in _NATIVE_RULES[spec.rule][1]]
        stats = [self.cols[f"stat.{st}"][0] for st in _STATS]
        lo, hi = spec.weight_bounds
        return (_NATIVE_RULES[spec.rule][0], spec.dim, states, stats, spec.learning_rate,
                spec.initial_g2sum, lo, hi, spec.nonclk_coeff, spec.click_coeff, spec.scale_by_show,
                spec.beta1, spec.beta2, spec.epsilon)

    def _view(self, block: np.ndarray, name: str) -> np.ndarray:
        start, k = self.cols[name]
        return block[:, start:start + k]

    def _states(self, block: np.ndarray, part: str) -> dict[str, np.ndarray]:
        prefix = f"state.{part}."
        return {n[len(prefix):]: self._view(block, n) for n in self.cols if n.startswith(prefix)}

    # -- arena -------------------------------------------------------------------
    def _grow(self, bound: int) -> None:
        if bound <= self.cap:
            return
        cap = max(2 * self.cap, 1024)
        if self.cold is not None:  # rows past the budget leave the arena: do not grow past it
            cap = min(cap, self.cold.budget_rows + 1)
        cap = max(bound, cap)

        def grown(a):
            out = mapped_zeros((cap,) + a.shape[1:], a.dtype)
            out[:len(a)] = a
            return out
        self.values = grown(self.values)
        self.has_embedx = grown(self.has_embedx)
        self.row_keys = grown(self.row_keys)
        self.cap = cap

    def use_arena(self, values: np.ndarray, has_embedx: np.ndarray, row_keys: np.ndarray) -> None:
        """Work on these arrays as the arena (a pass table keeps its own, grown by itself)."""
        self.values, self.has_embedx, self.row_keys, self.cap = values, has_embedx, row_keys, len(values)

    def _init_state(self, block: np.ndarray, part: str) -> None:
        for name, view in self._states(block, part).items():
            view[...] = self.rule.init_state(name, len(block), view.shape[1])

    def _init_rows(self, keys: np.ndarray, rows: np.ndarray) -> None:
        """Fresh values for new rows: a pure function of (table seed, key)."""
        spec = self.spec
        self._grow(self.map.row_bound)
        self.row_keys[rows] = keys
        block = np.zeros((len(rows), self.width), np.float32)
        if not self.split:  # the split layout starts embed_w at zero, without embedx (Paddle)
            block[:, :spec.dim] = uniform_rows(spec.seed, keys, spec.dim, -spec.initial_range,
                                               spec.initial_range)
        self._init_state(block, "embed")
        self.values[rows] = block
        self.has_embedx[rows] = False

    def _create_embedx(self, rows: np.ndarray) -> None:
        spec = self.spec
        block = self.values[rows]
        block[:, 1:spec.dim] = uniform_rows(spec.seed, self.row_keys[rows], spec.dim - 1,
                                            -spec.initial_range, spec.initial_range, offset=1)
        self._init_state(block, "embedx")
        self.values[rows] = block
        self.has_embedx[rows] = True

    # -- requests ------------------------------------------------------------------
    def pull_into(self, keys: np.ndarray, training: bool, out: np.ndarray, pos) -> None:
        """Rows for unique `keys` into out[pos]; with `training`, absent keys the entry admits get
        rows (and every row seen has its unseen days reset). Keys without a row read as zeros."""
        rows = self.map.lookup(keys)
        cold = None
        if self.cold is not None and len(self.cold.tier):
            cold = np.flatnonzero(rows < 0)
        if training:
            self._admit(keys, rows, cold)
        ctr_pull(self.values, rows, out, pos, self.spec.dim, self.unseen if training else -1)
        if self.cold is not None:
            if cold is not None and not training and len(cold):
                found, emb = self.cold.read(keys[cold])
                at = cold[found]
                out[at if pos is None else np.asarray(pos)[at]] = emb[found]
            if training:
                self.cold.spill(rows)

    def _admit(self, keys: np.ndarray, rows: np.ndarray, cold: np.ndarray | None) -> None:
        """A training access: fill rows[i] < 0 with the promoted cold row (`cold`: the positions
        that missed the arena, None when the tier is empty) or a new row the entry admits."""
        if cold is not None:
            rows[cold] = self.cold.promote(keys[cold])
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

    def pull(self, keys: np.ndarray, training: bool) -> np.ndarray:
        """Rows [len(keys), dim] for unique `keys` (see pull_into)."""
        out = np.empty((len(keys), self.spec.dim), np.float32)
        self.pull_into(keys, training, out, None)
        return out

    def push(self, keys: np.ndarray, grads: np.ndarray, shows: np.ndarray, clicks: np.ndarray) -> None:
        """Apply merged gradients (unique keys) with their shows and clicks."""
        rows = self.map.lookup(keys)
        if self.cold is not None:
            self._promote_into(keys, rows)
        has = rows >= 0
        if not has.all():
            if self.pending is not None:
                miss = ~has
                prow = self.pending.rows_for(keys[miss])
                self.pending.cols["show"][prow] += shows[miss]
                self.pending.cols["click"][prow] += clicks[miss]
            if not has.any():
                return
            rows, grads, shows, clicks = rows[has], grads[has], shows[has], clicks[has]
        self.apply_rows(rows, grads, shows, clicks)
        if self.cold is not None:
            self.cold.spill(rows)

    def apply_rows(self, rows: np.ndarray, grads: np.ndarray, shows: np.ndarray,
                   clicks: np.ndarray) -> None:
        """The accessor's push on arena rows (unique, all present): statistics, then the rule."""
        if self._native is not None:
            ctr_push(self.values, np.ascontiguousarray(rows), np.ascontiguousarray(grads, np.float32),
                     np.ascontiguousarray(shows, np.float32), np.ascontiguousarray(clicks, np.float32),
                     *self._native)
        else:
            self._push_numpy(rows, grads, shows, clicks)

    def _promote_into(self, keys: np.ndarray, rows: np.ndarray) -> None:
        """rows[i] for the cold ones of `keys` (their rows read -1), promoted to the arena."""
        if len(self.cold.tier):
            miss = np.flatnonzero(rows < 0)
            if len(miss):
                rows[miss] = self.cold.promote(keys[miss])

    def _push_numpy(self, rows, grads, shows, clicks) -> None:
        spec = self.spec
        block = self.values[rows]
        block[:, self.show] += shows
        block[:, self.click] += clicks
        block[:, self.delta] += spec.score(shows, clicks)
        block[:, self.unseen] = 0.0
        if spec.scale_by_show:
            grads = grads / np.maximum(shows, 1.0)[:, None]
        if not self.split:
            self.rule.update(block[:, :spec.dim], self._states(block, "embed"), grads)
        else:
            self.rule.update(block[:, :1], self._states(block, "embed"), grads[:, :1])
            with_x = self.has_embedx[rows]
            if with_x.any():
                sub = block[with_x]
                self.rule.update(sub[:, 1:spec.dim], self._states(sub, "embedx"), grads[with_x, 1:])
                block[with_x] = sub
        self.values[rows] = block
        if self.split:
            score = spec.score(block[:, self.show], block[:, self.click])
            grow = rows[~self.has_embedx[rows] & (score >= spec.embedx_threshold)]
            if len(grow):
                self._create_embedx(grow)

    def add_delta(self, keys: np.ndarray, deltas: np.ndarray, shows: np.ndarray | None = None,
                  clicks: np.ndarray | None = None) -> None:
        """GEO: add trained-minus-pulled deltas to the rows that exist (others have none to add to),
        with the shows and clicks the worker saw since its last sync."""
        rows = self.map.lookup(keys)
        if self.cold is not None:
            self._promote_into(keys, rows)
        has = rows >= 0
        if has.any():
            r = rows[has]
            w = self.values[r, :self.spec.dim] + deltas[has]
            if self.split:
                w[~self.has_embedx[r], 1:] = 0.0  # no embedx yet: it stays absent
            self.rule._bound(w)
            self.values[r, :self.spec.dim] = w
            self.values[r, self.unseen] = 0.0
            if shows is not None:
                s, c = shows[has], clicks[has]
                self.values[r, self.show] += s
                self.values[r, self.click] += c
                self.values[r, self.delta] += self.spec.score(s, c)
        if self.cold is not None:
            self.cold.spill(rows)

    def shrink(self) -> int:
        """Decay show/click and delete rows past the delete thresholds; returns rows deleted."""
        spec = self.spec
        keys, rows = self.map.items()
        v = self.values
        decay = np.float32(spec.show_click_decay_rate)
        v[rows, self.show] *= decay
        v[rows, self.click] *= decay
        score = spec.score(v[rows, self.show], v[rows, self.click])
        dead = (score < spec.delete_threshold) | (v[rows, self.unseen] > spec.delete_after_unseen_days)
        self.map.erase(keys[dead])
        if self.pending is not None:
            pk, pr = self.pending.map.items()
            pc = self.pending.cols
            pc["show"][pr] *= decay
            pc["click"][pr] *= decay
            self.pending.forget(pk[pc["unseen"][pr] > spec.delete_after_unseen_days])
        return int(dead.sum()) + (self.cold.shrink() if self.cold is not None else 0)

    def day_tick(self) -> None:
        """One day passes: unseen_days += 1 for every row (and pending key)."""
        _, rows = self.map.items()
        self.values[rows, self.unseen] += 1.0
        if self.pending is not None:
            _, pr = self.pending.map.items()
            self.pending.cols["unseen"][pr] += 1.0
        if self.cold is not None:
            self.cold.day_tick()

    # -- save / load -----------------------------------------------------------------
    def export(self, mode: int) -> dict[str, np.ndarray]:
        """The rows a save of `mode` writes (0 all, 1 delta, 2 base), as named arrays.

        Mode 1 resets the delta score of the rows it writes (Paddle's
        CtrCommonAccessor), so the next delta holds only what changed since.
        """
        keys, rows = self.map.items()
        v = self.values
        keep = self._keep(v[rows], mode)
        if keep is not None:
            keys, rows = keys[keep], rows[keep]
        out = self._named(keys, v[rows], self.has_embedx[rows])
        if mode == 1:
            v[rows, self.delta] = 0.0
        if self.cold is not None:
            parts = [out] + self.cold.export(mode)
            out = {k: np.concatenate([p[k] for p in parts]) for k in out}
        return out

    def _keep(self, block: np.ndarray, mode: int) -> np.ndarray | None:
        """Which rows of `block` a save of `mode` writes (None: all)."""
        if mode not in (1, 2):
            return None
        spec = self.spec
        score = spec.score(block[:, self.show], block[:, self.click])
        keep = (score >= spec.base_threshold) & (block[:, self.unseen] <= spec.delta_keep_days)
        if mode == 1:
            keep &= block[:, self.delta] >= spec.delta_threshold
        return keep

    def _named(self, keys: np.ndarray, block: np.ndarray, has_embedx: np.ndarray) -> dict:
        """Rows as the named arrays of a save."""
        out = {"keys": keys, "has_embedx": has_embedx}
        for name in self.cols:
            view = self._view(block, name)
            out[name] = view[:, 0].copy() if name.startswith("stat.") else np.ascontiguousarray(view)
        return out

    def load_rows(self, data: dict[str, np.ndarray]) -> None:
        """Insert or overwrite the rows in `data` (as `export` wrote them)."""
        keys = data["keys"]
        if len(keys) == 0:
            return
        missing = [n for n in self.cols if n not in data]
        if missing:
            raise TableError(f"table {self.spec.name!r}: checkpoint rows lack {missing} (saved "
                             f"with another rule or layout?)")
        block = np.empty((len(keys), self.width), np.float32)
        for name in self.cols:
            arr = data[name]
            self._view(block, name)[...] = arr[:, None] if arr.ndim == 1 else arr
        if self.cold is not None:
            self.cold.forget(keys)
        rows, _ = self.map.get_or_insert(keys)
        self._grow(self.map.row_bound)
        self.row_keys[rows] = keys
        self.values[rows] = block
        self.has_embedx[rows] = data["has_embedx"]
        if self.pending is not None:
            self.pending.forget(keys)
        if self.cold is not None:
            self.cold.spill(rows)

    def checksum(self) -> float:
        _, rows = self.map.items()
        hot = float(self.values[rows].astype(np.float64).sum())
        return hot + (self.cold.checksum() if self.cold is not None else 0.0)

    def __len__(self) -> int:
        return len(self.map) + (len(self.cold.tier) if self.cold is not None else 0)


class SparseTable:
    """This server's part of a sparse table, split over `spec.shards` locked shards.

    `pull`, `push`, `shrink`, `day_tick`, `export` and `load_rows` are
    thread-safe: each takes the lock of every shard it touches, one at a time.
    """

    def __init__(self, spec: SparseTableSpec, server: int = 0):
        """`server`: this server's index (a tiered table's RocksDB is <ssd_path>/server-<index>)."""
        self.spec = spec
        self.shards = []
        try:
            for i in range(spec.shards):
                self.shards.append(SparseShard(spec, i, server))
        except BaseException:
            self.close()
            raise
        self._be = get_backend("numpy")

    def _check_keys(self, keys, op: str) -> np.ndarray:
        if not isinstance(keys, np.ndarray) or keys.dtype != np.uint64 or keys.ndim != 1:
            raise TableError(f"{op} on table {self.spec.name!r}: keys must be a 1-D uint64 array, "
                             f"got {getattr(keys, 'dtype', type(keys).__name__)} of shape "
                             f"{getattr(keys, 'shape', None)}")
        return keys

    def _check_rows(self, arr, n: int, op: str, name: str, shape=None, finite=True) -> None:
        shape = (n, self.spec.dim) if shape is None else shape
        if not isinstance(arr, np.ndarray) or arr.dtype != np.float32 or arr.shape != shape:
            raise TableError(f"{op} on table {self.spec.name!r}: {name} must be float32 of shape "
                             f"{shape}, got {getattr(arr, 'dtype', type(arr).__name__)} "
                             f"{getattr(arr, 'shape', '')}")
        if finite and not np.isfinite(arr).all():
            raise TableError(f"{op} on table {self.spec.name!r}: {name} holds NaN or inf; "
                             f"nothing was applied")

    def _groups(self, keys: np.ndarray):
        """(shard, positions in keys) for every shard that has keys."""
        if len(self.shards) == 1:
            yield self.shards[0], slice(None)
            return
        sid = shard_of(keys, len(self.shards)).astype(np.uint8)  # small ints: a radix sort
        order = np.argsort(sid, kind="stable")
        bounds = np.searchsorted(sid[order], np.arange(len(self.shards) + 1))
        for i, shard in enumerate(self.shards):
            if bounds[i + 1] > bounds[i]:
                yield shard, order[bounds[i]:bounds[i + 1]]

    def pull(self, keys: np.ndarray, training: bool = True, unique: bool = False) -> np.ndarray:
        """Rows [n, dim] for `keys` (any order, duplicates allowed).

        With `training`, absent keys admitted by the entry policy get rows;
        without it the pull is read-only: no row created, no statistic touched.
        Keys without a row read as zeros. `unique` says the caller already
        deduplicated the keys (the client does), which skips a hashing pass;
        duplicates are still answered correctly if it is wrong.
        """
        keys = self._check_keys(keys, "pull_sparse")
        uniq, inverse = (keys, None) if unique else unique_inverse(keys)
        out = np.empty((len(uniq), self.spec.dim), np.float32)
        for shard, pos in self._groups(uniq):
            with shard.lock:
                if isinstance(pos, slice):
                    shard.pull_into(uniq, training, out, None)
                else:
                    shard.pull_into(uniq[pos], training, out, pos)
        return out if inverse is None else out[inverse]

    def push(self, keys: np.ndarray, grads: np.ndarray, shows: np.ndarray | None = None,
             clicks: np.ndarray | None = None) -> None:
        """Apply gradients [n, dim] with shows and clicks [n] (duplicate keys are summed).

        Everything is validated before any row changes.
        """
        keys = self._check_keys(keys, "push_sparse")
        n = len(keys)
        shows = np.ones(n, np.float32) if shows is None else shows
        clicks = np.zeros(n, np.float32) if clicks is None else clicks
        self._check_rows(grads, n, "push_sparse", "grads", finite=False)
        self._check_rows(shows, n, "push_sparse", "shows", (n,), finite=False)
        self._check_rows(clicks, n, "push_sparse", "clicks", (n,), finite=False)
        self.push_packed(keys, np.concatenate([grads, shows[:, None], clicks[:, None]], axis=1))

    def check_packed(self, keys: np.ndarray, packed: np.ndarray, finite: bool = True) -> None:
        """Raise unless (keys, packed [n, dim + 2]) is a valid push for this table."""
        self._check_keys(keys, "push_sparse")
        self._check_rows(packed, len(keys), "push_sparse", "packed [grads | show | click]",
                         (len(keys), self.spec.dim + 2), finite=finite)

    def push_packed(self, keys: np.ndarray, packed: np.ndarray) -> None:
        """`push` with gradients, shows and clicks as one float32 [n, dim + 2] array (the wire form)."""
        self.check_packed(keys, packed, finite=False)
        dim = self.spec.dim
        uniq, merged = merge_rows(keys, packed)
        # a NaN or inf anywhere in the input survives the sums: checking the merged rows suffices
        if not np.isfinite(merged).all():
            raise TableError(f"push_sparse on table {self.spec.name!r}: grads, shows or clicks "
                             f"hold NaN or inf; nothing was applied")
        g = merged[:, :dim]
        s, c = merged[:, dim], merged[:, dim + 1]
        for shard, pos in self._groups(uniq):
            with shard.lock:
                shard.push(uniq[pos], g[pos], s[pos], c[pos])

    def add_delta(self, keys: np.ndarray, deltas: np.ndarray) -> None:
        """GEO: add deltas [n, dim] (or [n, dim + 2]: deltas, shows, clicks) to the rows of `keys`
        that exist (duplicates are summed)."""
        keys = self._check_keys(keys, "push_delta")
        dim = self.spec.dim
        width = deltas.shape[1] if isinstance(deltas, np.ndarray) and deltas.ndim == 2 else dim
        self._check_rows(deltas, len(keys), "push_delta", "deltas [, show, click]",
                         (len(keys), width if width in (dim, dim + 2) else dim))
        uniq, merged = merge_rows(keys, deltas)
        stats = width == dim + 2
        for shard, pos in self._groups(uniq):
            with shard.lock:
                m = merged[pos]
                shard.add_delta(uniq[pos], m[:, :dim], m[:, dim] if stats else None,
                                m[:, dim + 1] if stats else None)

    # -- pass mode (shoal.ps.pass_records has the layouts) --------------------------------
    @property
    def record_width(self) -> int:
        """Columns of a pulled pass record: the row layout plus the embedx flag."""
        return self.shards[0].width + 1

    @property
    def pass_width(self) -> int:
        """Columns of a pass write-back row: the row layout plus the two part weights."""
        return self.shards[0].width + 2

    def pull_records(self, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Pass mode: (found [n], records [n, record_width]) for unique `keys`, pulled for training
        (admitted keys get rows, cold ones are promoted, unseen days reset). Thread-safe."""
        keys = self._check_keys(keys, "pull_records")
        found = np.zeros(len(keys), bool)
        records = np.zeros((len(keys), self.record_width), np.float32)
        for shard, pos in self._groups(keys):
            with shard.lock:
                found[pos], records[pos] = pass_records.pull_records(shard, keys[pos])
        return found, records

    def check_pass(self, keys: np.ndarray, packed: np.ndarray) -> None:
        """Raise unless (keys, packed [n, pass_width]) is a valid pass write-back."""
        self._check_keys(keys, "push_pass")
        self._check_rows(packed, len(keys), "push_pass", "packed pass rows",
                         (len(keys), self.pass_width))
        sh = self.shards[0]
        counts = packed[:, [sh.show, sh.click, sh.width, sh.width + 1]]
        if (counts < 0).any():
            raise TableError(f"push_pass on table {self.spec.name!r}: shows, clicks and part "
                             f"weights must be >= 0 (they are counts); nothing was applied")

    def merge_pass(self, keys: np.ndarray, packed: np.ndarray) -> None:
        """Pass mode: apply every worker's write-back of one pass at once (layout and rule:
        shoal.ps.pass_records). Duplicate keys (several workers) are summed first, then each
        row's learned columns move by the weighted mean of the workers' moves and its counts by
        their sum; with one worker the row becomes that worker's record. Validated before
        anything changes; thread-safe."""
        self.check_pass(keys, packed)
        uniq, merged = merge_rows(keys, packed)
        for shard, pos in self._groups(uniq):
            with shard.lock:
                pass_records.merge(shard, uniq[pos], merged[pos])

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
        return sum(len(s) for s in self.shards)

    def stats(self) -> dict:
        """rows, pending keys and RAM bytes; with a budget also `tiers`: rows and bytes per tier
        ("arena": the arenas, key map excluded; the storage tier by name: its records, and the
        RAM it holds itself as `ram_bytes`: the ssd tier's key index)."""
        ram = int(sum(s.values.nbytes + s.row_keys.nbytes + s.has_embedx.nbytes for s in self.shards))
        out = {"rows": len(self), "pending": sum(len(s.pending) for s in self.shards if s.pending),
               "bytes": ram}
        if self.spec.memory_budget_mb is not None:
            hot = {"rows": sum(len(s.map) for s in self.shards), "bytes": ram}
            cold = [s.cold.stats() for s in self.shards]
            out["tiers"] = {"arena": hot, f"cold.{self.spec.storage}": {
                k: sum(c[k] for c in cold) for k in ("rows", "bytes", "ram_bytes")}}
            out["budget_rows"] = sum(c["budget_rows"] for c in cold)
        return out

    def close(self) -> None:
        """Release the storage tiers (RocksDB files stay, with the cold rows). Idempotent."""
        for shard in self.shards:
            if shard.cold is not None:
                with shard.lock:
                    shard.cold.close()

    def checksum(self) -> float:
        """A number that changes when any row or show count changes (for tests and audits)."""
        total = 0.0
        for shard in self.shards:
            with shard.lock:
                total += shard.checksum()
        return total

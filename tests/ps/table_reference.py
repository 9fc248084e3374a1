"""A slow, obviously-correct dict model of one sparse table (one key at a time).

It mirrors the documented semantics of shoal.ps.sparse_table (Paddle's
CtrCommonAccessor + sparse_sgd_rule), written independently of it.
"""
from __future__ import annotations

import math

import numpy as np

from shoal.ps.partition import uniform_rows


class RefTable:
    def __init__(self, spec):
        self.spec = spec
        self.rows: dict[int, dict] = {}
        self.pending: dict[int, dict] = {}

    def _score(self, show, click):
        return (show - click) * self.spec.nonclk_coeff + click * self.spec.click_coeff

    def _new_state(self, width):
        s = self.spec
        if s.rule == "naive":
            return {}
        if s.rule == "adagrad":
            return {"g2sum": np.zeros(1)}
        if s.rule == "std_adagrad":
            return {"g2sum": np.zeros(width)}
        return {"m": np.zeros(width), "v": np.zeros(width), "p1": s.beta1, "p2": s.beta2}

    def _init(self, key):
        s = self.spec
        split = s.embedx_threshold is not None
        emb = np.zeros(s.dim) if split else \
            uniform_rows(s.seed, np.array([key], np.uint64), s.dim, -s.initial_range, s.initial_range)[0].astype(np.float64)
        parts = {"embed": self._new_state(1 if split else s.dim)}
        return {"emb": emb, "state": parts, "show": 0.0, "click": 0.0, "delta": 0.0, "unseen": 0.0,
                "embedx": False}

    def _admit(self, key):
        s = self.spec
        if s.entry == "none":
            return True
        p = self.pending.setdefault(key, {"count": 0, "show": 0.0, "click": 0.0, "unseen": 0.0})
        p["unseen"] = 0.0
        if s.entry == "count_filter":
            p["count"] += 1
            return p["count"] >= s.entry_count
        if s.entry == "show_click":
            return self._score(p["show"], p["click"]) >= s.entry_threshold
        raise AssertionError(s.entry)

    def pull(self, keys, training):
        out = np.zeros((len(keys), self.spec.dim))
        for i, k in enumerate(int(k) for k in keys):
            if k not in self.rows and training:
                if k in set(int(x) for x in keys[:i]):
                    pass  # a duplicate in this call: decided at its first occurrence
                elif self._admit(k):
                    self.rows[k] = self._init(k)
                    self.pending.pop(k, None)
            if k in self.rows:
                if training:
                    self.rows[k]["unseen"] = 0.0
                out[i] = self.rows[k]["emb"]
        return out

    def _rule(self, w, st, g):
        s = self.spec
        lo, hi = s.weight_bounds
        if s.rule == "naive":
            w = w - s.learning_rate * g
        elif s.rule == "adagrad":
            w = w - s.learning_rate * g * math.sqrt(s.initial_g2sum / (s.initial_g2sum + st["g2sum"][0]))
            st["g2sum"] = st["g2sum"] + np.mean(g * g)
        elif s.rule == "std_adagrad":
            w = w - s.learning_rate * g * np.sqrt(s.initial_g2sum / (s.initial_g2sum + st["g2sum"]))
            st["g2sum"] = st["g2sum"] + g * g
        else:
            st["m"] = s.beta1 * st["m"] + (1 - s.beta1) * g
            st["v"] = s.beta2 * st["v"] + (1 - s.beta2) * g * g
            lr = s.learning_rate * math.sqrt(1 - st["p2"]) / (1 - st["p1"])
            w = w - lr * st["m"] / (np.sqrt(st["v"]) + s.epsilon * math.sqrt(1 - st["p2"]))
            st["p1"] *= s.beta1
            st["p2"] *= s.beta2
        return np.clip(w, lo, hi)

    def push(self, keys, grads, shows, clicks):
        s = self.spec
        merged: dict[int, list] = {}
        for k, g, sh, c in zip((int(k) for k in keys), grads, shows, clicks):
            if k in merged:
                merged[k][0] = merged[k][0] + g
                merged[k][1] += sh
                merged[k][2] += c
            else:
                merged[k] = [g.astype(np.float64), float(sh), float(c)]
        for k, (g, sh, c) in merged.items():
            if k not in self.rows:
                if s.entry in ("count_filter", "show_click"):
                    p = self.pending.setdefault(k, {"count": 0, "show": 0.0, "click": 0.0, "unseen": 0.0})
                    p["show"] += sh
                    p["click"] += c
                continue
            r = self.rows[k]
            r["show"] += sh
            r["click"] += c
            r["delta"] += self._score(sh, c)
            r["unseen"] = 0.0
            if s.scale_by_show:
                g = g / max(sh, 1.0)
            if s.embedx_threshold is None:
                r["emb"] = self._rule(r["emb"], r["state"]["embed"], g)
            else:
                r["emb"][:1] = self._rule(r["emb"][:1], r["state"]["embed"], g[:1])
                if r["embedx"]:
                    r["emb"][1:] = self._rule(r["emb"][1:], r["state"]["embedx"], g[1:])
                elif self._score(r["show"], r["click"]) >= s.embedx_threshold:
                    r["emb"][1:] = uniform_rows(s.seed, np.array([k], np.uint64), s.dim - 1,
                                                -s.initial_range, s.initial_range, offset=1)[0]
                    r["state"]["embedx"] = self._new_state(s.dim - 1)
                    r["embedx"] = True

    def shrink(self):
        s = self.spec
        for k in list(self.rows):
            r = self.rows[k]
            r["show"] *= s.show_click_decay_rate
            r["click"] *= s.show_click_decay_rate
            if self._score(r["show"], r["click"]) < s.delete_threshold or \
                    r["unseen"] > s.delete_after_unseen_days:
                del self.rows[k]
        for k in list(self.pending):
            p = self.pending[k]
            p["show"] *= s.show_click_decay_rate
            p["click"] *= s.show_click_decay_rate
            if p["unseen"] > s.delete_after_unseen_days:
                del self.pending[k]

    def day_tick(self):
        for r in list(self.rows.values()) + list(self.pending.values()):
            r["unseen"] += 1.0

    def saved_keys(self, mode):
        """Keys a save of `mode` writes; mode 1 resets their delta score."""
        s = self.spec
        out = []
        for k, r in self.rows.items():
            ok = True
            if mode in (1, 2):
                ok = self._score(r["show"], r["click"]) >= s.base_threshold and \
                    r["unseen"] <= s.delta_keep_days
                if mode == 1:
                    ok = ok and r["delta"] >= s.delta_threshold
            if ok:
                out.append(k)
        if mode == 1:
            for k in out:
                self.rows[k]["delta"] = 0.0
        return sorted(out)


def random_push(keys: np.ndarray, dim: int, seed: int):
    """(keys, grads, shows, clicks) of a push: normal gradients, 1-3 shows, clicks <= shows."""
    rng = np.random.default_rng(seed)
    grads = rng.normal(0, 1, (len(keys), dim)).astype(np.float32)
    shows = rng.integers(1, 4, len(keys)).astype(np.float32)
    clicks = np.minimum(rng.integers(0, 3, len(keys)), shows).astype(np.float32)
    return keys, grads, shows, clicks

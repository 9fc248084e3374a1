"""Synthetic Criteo-like CTR data with a known hidden model (deterministic by seed).

The recipe, for seed ``seed``:

- 13 dense features, uniform in [0, 1) on a grid of 1e-5 (so the 5-decimal
  text form reads back bit-identical).
- 26 single-id slots C1..C26. Slot s (from 0) has a vocabulary V_s drawn
  log-uniform in [1e5, 1e6]; ids are drawn from a bounded Zipf law with
  exponent 1.1 over ranks 1..V_s (inverse CDF: the normalized cumulative
  weights of each slot, built once, searched with np.searchsorted), mapped
  through a per-slot random permutation to a local id in [0, V_s); the
  global id is s * 10**6 + local id + 1, so slot s owns
  [s * 10**6 + 1, s * 10**6 + V_s].
- The label comes from a hidden logistic model: logit = dense[:, :5] @ w
  (w ~ N(0, 1), fixed by seed) + the sum over slots 0..7 of a per-id weight
  ~ N(0, 0.9**2) + a bias. The weight of local id i of slot s is a pure
  function of (seed, s, i): splitmix64 counters -> two uniforms ->
  Box-Muller (no vocabulary-sized table). The bias is found by bisection so
  that the mean click probability over a fixed calibration sample is 0.29.
  label ~ Bernoulli(sigmoid(logit)).

Samples are generated in internal chunks of 32768 whose RNG is seeded by
(seed, stream, chunk index): sample k is the same whatever chunk size the
caller streams with. Stream 0 is the training data, stream 1 the test data
(same hidden model, other samples).
"""
from __future__ import annotations

import fcntl
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

from shoal._atomic import atomic_write
from shoal.worker.data._hash import counter_uniform, key
from shoal.worker.data.batch import Batch, Ragged
from shoal.worker.data.errors import DataError
from shoal.worker.data.slots import SlotList
from shoal.worker.data.writer import write_multislot

N_DENSE, N_SPARSE = 13, 26
SLOT_STRIDE = 10**6
VOCAB_RANGE = (1e5, 1e6)
ZIPF_EXPONENT = 1.1
LOGIT_DENSE, LOGIT_SLOTS = 5, 8
ID_WEIGHT_STD = 0.9
TARGET_CTR = 0.29
DENSE_GRID = 10**5  # dense values are multiples of 1 / DENSE_GRID
TRAIN_STREAM, TEST_STREAM, _CALIBRATION_STREAM = 0, 1, 0xCA1B
_CHUNK = 1 << 15
_CALIBRATION_SAMPLES = 4 * _CHUNK
_FORMAT_VERSION = 1


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * x))  # no overflow for any x


@dataclass(frozen=True, eq=False)
class HiddenModel:
    """The generator's fixed parts for one seed: vocabularies, Zipf CDFs, id permutations, weights, bias."""

    seed: int
    vocab: np.ndarray          # int64 [26]
    cdf: tuple                 # float64 [V_s] per slot, cdf[-1] == 1
    perm: tuple                # int32 [V_s] per slot: rank - 1 -> local id
    w: np.ndarray              # float64 [5]
    bias: float

    def id_weight(self, slot: int, local_ids: np.ndarray) -> np.ndarray:
        """float64: the hidden weight of each local id of `slot` (a pure function of seed, slot, id)."""
        u1 = counter_uniform(key(self.seed, slot, 1), local_ids)
        u2 = counter_uniform(key(self.seed, slot, 2), local_ids)
        return ID_WEIGHT_STD * np.sqrt(-2.0 * np.log(u1)) * np.cos(2.0 * np.pi * u2)

    def base_logit(self, dense: np.ndarray, local_ids: list[np.ndarray]) -> np.ndarray:
        """The logit without the bias, from dense [B, 13] and the local ids of slots 0..7."""
        z = dense[:, :LOGIT_DENSE].astype(np.float64) @ self.w
        for s in range(LOGIT_SLOTS):
            z += self.id_weight(s, local_ids[s])
        return z


def _draw_features(model: HiddenModel, rng: np.random.Generator, n: int) -> tuple[np.ndarray, list[np.ndarray]]:
    dense = (rng.integers(0, DENSE_GRID, size=(n, N_DENSE)) / DENSE_GRID).astype(np.float32)
    u = rng.random((N_SPARSE, n))
    local = [model.perm[s][np.searchsorted(model.cdf[s], u[s], side="right")].astype(np.int64)
             for s in range(N_SPARSE)]
    return dense, local


@lru_cache(maxsize=1)
def hidden_model(seed: int = 0) -> HiddenModel:
    """The hidden model of `seed` (built once, ~0.3 s and ~120 MB for the CDFs and permutations; cached)."""
    rng = np.random.default_rng([seed, 0x7A1F])
    lo, hi = np.log(VOCAB_RANGE[0]), np.log(VOCAB_RANGE[1])
    vocab = np.rint(np.exp(rng.uniform(lo, hi, size=N_SPARSE))).astype(np.int64)
    cdf, perm = [], []
    for v in vocab:
        c = np.cumsum(np.arange(1, v + 1, dtype=np.float64) ** -ZIPF_EXPONENT)
        c /= c[-1]
        c[-1] = 1.0  # every uniform in [0, 1) finds a rank
        cdf.append(c)
        perm.append(rng.permutation(int(v)).astype(np.int32))
    w = rng.normal(0.0, 1.0, size=LOGIT_DENSE)
    model = HiddenModel(seed, vocab, tuple(cdf), tuple(perm), w, 0.0)
    calib = np.random.default_rng([seed, _CALIBRATION_STREAM])
    base = model.base_logit(*_draw_features(model, calib, _CALIBRATION_SAMPLES))
    lo_b, hi_b = -30.0, 30.0
    for _ in range(60):
        mid = 0.5 * (lo_b + hi_b)
        if _sigmoid(base + mid).mean() < TARGET_CTR:
            lo_b = mid
        else:
            hi_b = mid
    return HiddenModel(seed, vocab, tuple(cdf), tuple(perm), w, 0.5 * (lo_b + hi_b))


def _chunk(model: HiddenModel, stream: int, index: int) -> Batch:
    rng = np.random.default_rng([model.seed, stream, index])
    dense, local = _draw_features(model, rng, _CHUNK)
    logit = model.base_logit(dense, local) + model.bias
    label = (rng.random(_CHUNK) < _sigmoid(logit)).astype(np.float32).reshape(-1, 1)
    offsets = np.arange(_CHUNK + 1, dtype=np.int64)
    sparse = {f"C{s + 1}": Ragged((local[s] + (s * SLOT_STRIDE + 1)).astype(np.uint64), offsets, validate=False)
              for s in range(N_SPARSE)}
    return Batch({"label": label, "dense": dense}, sparse, SlotList.ctr(N_DENSE, N_SPARSE), _CHUNK, validate=False)


def _check_count(name: str, value, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise DataError(f"{name}={value!r}: expected an int >= {minimum}")
    return int(value)


def synthetic_ctr_blocks(n_samples: int, chunk: int = 65536, seed: int = 0, *, start: int = 0,
                         stream: int = TRAIN_STREAM) -> Iterator[Batch]:
    """Samples start .. start + n_samples - 1 of (seed, stream), as Batches of `chunk` samples (the last smaller).

    Memory stays within about one chunk (plus the cached hidden model); the
    samples do not depend on `chunk`. Slots: `SlotList.ctr()` (label 0/1 as
    float32, dense [B, 13], C1..C26 one uint64 id each).
    """
    n_samples = _check_count("n_samples", n_samples, 0)
    chunk = _check_count("chunk", chunk, 1)
    start = _check_count("start", start, 0)
    seed = _check_count("seed", seed, 0)
    stream = _check_count("stream", stream, 0)
    model = hidden_model(seed)

    def gen() -> Iterator[Batch]:
        cached: tuple[int, Batch] | None = None
        pos, end = start, start + n_samples
        while pos < end:
            stop = min(pos + chunk, end)
            pieces = []
            p = pos
            while p < stop:
                c = p // _CHUNK
                if cached is None or cached[0] != c:
                    cached = (c, _chunk(model, stream, c))
                a, b = p - c * _CHUNK, min(stop - c * _CHUNK, _CHUNK)
                pieces.append(cached[1].slice(a, b))
                p = c * _CHUNK + b
            yield Batch.concat(pieces)
            pos = stop

    return gen()


def synthetic_ctr(n_samples: int, seed: int = 0, *, start: int = 0, stream: int = TRAIN_STREAM) -> Batch:
    """`n_samples` synthetic CTR samples as one Batch (see the module docstring for the recipe).

    Example:
        >>> block = synthetic_ctr(10_000, seed=0)
        >>> float(block.dense["label"].mean())     # about 0.29
    """
    blocks = list(synthetic_ctr_blocks(n_samples, 1 << 17, seed, start=start, stream=stream))
    return Batch.concat(blocks) if blocks else Batch.empty(SlotList.ctr(N_DENSE, N_SPARSE))


def hidden_logit(block: Batch, seed: int = 0) -> np.ndarray:
    """float64 [B]: the hidden model's true logit of each sample of a synthetic block of `seed`."""
    model = hidden_model(_check_count("seed", seed, 0))
    local = []
    for s in range(LOGIT_SLOTS):
        r = block.sparse[f"C{s + 1}"]
        if r.nnz != r.size:
            raise DataError(f"hidden_logit: slot C{s + 1} must hold one id per sample (synthetic data)")
        local.append(r.values.astype(np.int64) - (s * SLOT_STRIDE + 1))
    return model.base_logit(block.dense["dense"], local) + model.bias


def _auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """ROC AUC by ranks (Mann-Whitney U), tied scores sharing their average rank."""
    labels = np.asarray(labels).reshape(-1) > 0.5
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    n_pos = int(labels.sum())
    n_neg = len(labels) - n_pos
    if n_pos == 0 or n_neg == 0:
        raise DataError(f"AUC needs both classes, got {n_pos} positive and {n_neg} negative samples")
    order = np.argsort(scores, kind="mergesort")
    s = scores[order]
    first = np.r_[True, s[1:] != s[:-1]]
    starts = np.flatnonzero(first)
    ends = np.r_[starts[1:], len(s)]
    ranks = ((starts + ends + 1) / 2.0)[np.cumsum(first) - 1]  # 1-based average rank of each tie group
    rank_sum = ranks[labels[order]].sum()
    return float((rank_sum - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def best_auc(block: Batch, seed: int = 0) -> float:
    """The AUC of the hidden model's true logit on `block`: the ceiling any model can reach."""
    return _auc(block.dense["label"], hidden_logit(block, seed))


@dataclass(frozen=True)
class SyntheticFiles:
    """What `ensure_synthetic_ctr` made: the root, the train and test part files, and the parameters."""

    root: Path
    train: list[str]
    test: list[str]
    params: dict


def _split_counts(n: int, n_files: int) -> list[int]:
    k = min(n_files, n)
    return [n // k + (1 if i < n % k else 0) for i in range(k)] if k else []


def _manifest_ok(root: Path, params: dict) -> dict | None:
    try:
        manifest = json.loads((root / "MANIFEST.json").read_text())
    except (OSError, ValueError):
        return None
    if manifest.get("params") != params:
        return None
    for rel, size in manifest.get("files", {}).items():
        p = root / rel
        if not p.is_file() or p.stat().st_size != size:
            return None
    return manifest


def ensure_synthetic_ctr(dir: str | os.PathLike, n_train: int = 600_000, n_test: int = 100_000, seed: int = 0,
                         n_files: int = 8) -> SyntheticFiles:
    """Generate ``dir/train/part-*.txt`` and ``dir/test/part-*.txt`` once (MultiSlot text), then reuse them.

    Train files hold samples 0..n_train-1 of stream 0, test files samples
    0..n_test-1 of stream 1, each split in order into min(n_files, n) files.
    ``dir/MANIFEST.json`` (parameters, file sizes) is written last, through a
    temporary file and a rename; a later call with the same parameters and
    intact files returns at once, other parameters regenerate. Concurrent
    callers (several workers of one job) are serialized by a lock file.

    Returns:
        SyntheticFiles(root, train=[paths], test=[paths], params).
    """
    params = {"format": "multislot", "version": _FORMAT_VERSION, "n_train": _check_count("n_train", n_train, 0),
              "n_test": _check_count("n_test", n_test, 0), "seed": _check_count("seed", seed, 0),
              "n_files": _check_count("n_files", n_files, 1)}
    root = Path(dir)
    root.mkdir(parents=True, exist_ok=True)
    with open(root / ".synthetic.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        manifest = _manifest_ok(root, params)
        if manifest is None:
            manifest = _generate(root, params)
    files = sorted(manifest["files"])
    return SyntheticFiles(root, [str(root / f) for f in files if f.startswith("train/")],
                          [str(root / f) for f in files if f.startswith("test/")], params)


def _generate(root: Path, params: dict) -> dict:
    (root / "MANIFEST.json").unlink(missing_ok=True)
    sizes = {}
    for split, n, stream in (("train", params["n_train"], TRAIN_STREAM), ("test", params["n_test"], TEST_STREAM)):
        folder = root / split
        folder.mkdir(exist_ok=True)
        for old in folder.glob("part-*.txt"):
            old.unlink()
        first = 0
        for i, count in enumerate(_split_counts(n, params["n_files"])):
            rel = f"{split}/part-{i:05d}.txt"
            write_multislot(synthetic_ctr_blocks(count, 65536, params["seed"], start=first, stream=stream), root / rel)
            sizes[rel] = (root / rel).stat().st_size
            first += count
    manifest = {"params": params, "files": sizes}
    text = json.dumps(manifest, indent=1, sort_keys=True).encode()
    atomic_write(root / "MANIFEST.json", lambda f: f.write(text))
    return manifest

"""Evaluation metrics with Paddle's fleet semantics, whose state sums across workers.

Every metric keeps a small state, a dict of 1-D numpy arrays (histograms,
sums, counts), and computes its figure from that state alone. Because the
figure over many workers' data is the figure of the *summed* state, global
metrics need one elementwise sum across workers and nothing else:
:func:`all_reduce_metrics` packs the states of all metrics into one float64
array, hands it to a ``reduce(name, array)`` callable once (the fleet layer
passes the parameter server's reduce, which returns the sum over workers),
unpacks the result and computes the figures.

- :class:`Auc` bins probabilities into ``num_thresholds + 1`` buckets exactly
  as Paddle's ``auc`` op does and integrates the ROC curve by the trapezoid
  rule as ``paddle.distributed.fleet.metrics.auc`` does.
- :class:`Accuracy`, :class:`LogLoss` and :class:`Mean` keep sums and counts.

A metric that has seen no examples reports Paddle's value where Paddle
defines one (AUC 0.5, accuracy 0.0) and NaN where there is no meaningful
figure (log loss, mean). Invalid input raises :class:`MetricError` before
anything is counted, so the state is unchanged.

Example::

    auc, loss = Auc(), Mean()
    for batch in loader:
        probs = model(batch)                      # [N, 1] probabilities
        auc.update(probs, batch.labels)
        loss.update(batch_loss, weights=len(batch))
    local = all_reduce_metrics({"auc": auc, "loss": loss})
    glob = all_reduce_metrics({"auc": auc, "loss": loss}, reduce=fleet_reduce)
"""
from __future__ import annotations

import abc
import math
from typing import Callable, Mapping, Optional

import numpy as np

from shoal.kernels import backend_of
from shoal.worker.errors import EngineError

__all__ = ["MetricError", "Metric", "Auc", "Accuracy", "LogLoss", "Mean", "bucket_auc",
           "all_reduce_metrics"]

#: ``reduce(name, packed) -> elementwise sum of packed over all workers``
Reduce = Callable[[str, np.ndarray], np.ndarray]

# float64 holds every integer up to 2**53 exactly, so integer counts survive packing.
_EXACT_INT = 2 ** 53


class MetricError(EngineError, ValueError):
    """Input a metric cannot count (labels, predictions, shapes), or a state that does not fit it."""


def _host(x) -> np.ndarray:
    """`x` (numpy array, shoal Tensor, device array, list, number) as a numpy array."""
    if isinstance(x, np.ndarray):
        return x
    if isinstance(x, (int, float, np.generic, list, tuple)):  # skip backend_of's device probe
        return np.asarray(x)
    to_numpy = getattr(x, "numpy", None)
    if callable(to_numpy):
        return np.asarray(to_numpy())
    return np.asarray(backend_of(x).to_numpy(x))


def _where(metric: "Metric") -> str:
    return f"{type(metric).__name__}.update"


def _real(a: np.ndarray, what: str, metric: "Metric") -> np.ndarray:
    if a.dtype.kind not in "biuf":
        raise MetricError(f"{_where(metric)}: {what} must be real numbers, got dtype {a.dtype}")
    return a


def _probabilities(preds, metric: "Metric") -> np.ndarray:
    """The positive-class probabilities [N] of preds [N], [N, 1] or Paddle's [N, 2] (column 1)."""
    a = _real(_host(preds), "predictions", metric)
    if a.ndim == 2 and a.shape[1] in (1, 2):
        a = a[:, -1]
    elif a.ndim != 1:
        raise MetricError(f"{_where(metric)}: predictions of shape {list(a.shape)} are not "
                          f"probabilities of the positive class; pass [N], [N, 1] or [N, 2] "
                          f"(Paddle's [1 - p, p]; column 1 is used)")
    bad = ~((a >= 0) & (a <= 1))  # NaN fails both comparisons
    if bad.any():
        i = int(np.argmax(bad))
        raise MetricError(f"{_where(metric)}: predictions must be probabilities in [0, 1], but "
                          f"{int(bad.sum())} of {a.size} are not (NaN included), e.g. "
                          f"preds[{i}] = {a[i].item()!r}; apply a sigmoid (or softmax) to the "
                          f"logits first")
    return a


def _labels(labels, n: int, metric: "Metric", classes: int = 2) -> np.ndarray:
    """Labels [N] or [N, 1] with values in range(classes), as int64 [N]."""
    a = _real(_host(labels), "labels", metric)
    if a.ndim == 2 and a.shape[1] == 1:
        a = a[:, 0]
    elif a.ndim != 1:
        raise MetricError(f"{_where(metric)}: labels of shape {list(a.shape)} are not class ids; "
                          f"pass [N] or [N, 1] (not one-hot)")
    if a.shape[0] != n:
        raise MetricError(f"{_where(metric)}: {a.shape[0]} labels for {n} predictions; pass one "
                          f"label per example")
    ok = (a >= 0) & (a < classes)  # NaN fails
    if a.dtype.kind == "f":
        ok &= a == np.floor(a)
    bad = ~ok
    if bad.any():
        i = int(np.argmax(bad))
        want = "0 or 1" if classes == 2 else f"integers in [0, {classes})"
        raise MetricError(f"{_where(metric)}: labels must be {want}, but {int(bad.sum())} of {n} "
                          f"are not, e.g. labels[{i}] = {a[i].item()!r}; pass the class column "
                          f"(click = 1, no click = 0)")
    return a.astype(np.int64)


class Metric(abc.ABC):
    """A metric whose state is a dict of 1-D numpy arrays that sums across workers.

    Subclasses define ``_empty_state()`` (fixing the entries' names, dtypes and
    shapes), ``_value(state) -> float`` and an ``update`` that validates its
    input completely before adding to the state. Not thread-safe: one metric
    belongs to one training loop.
    """

    def __init__(self) -> None:
        self._state = self._empty_state()

    @abc.abstractmethod
    def _empty_state(self) -> dict[str, np.ndarray]:
        """The state before any update."""

    @abc.abstractmethod
    def _value(self, state: Mapping[str, np.ndarray]) -> float:
        """The figure of `state` (this metric's layout)."""

    @abc.abstractmethod
    def update(self, *args, **kwargs) -> None:
        """Count one batch; raises MetricError and changes nothing on invalid input."""

    def accumulate(self) -> float:
        """The figure over everything counted since the last reset (this worker only)."""
        return self._value(self._state)

    def reset(self) -> None:
        """Forget everything counted."""
        self._state = self._empty_state()

    def state(self) -> dict[str, np.ndarray]:
        """A copy of the state: {entry: 1-D array}, to sum across workers or save."""
        return {k: v.copy() for k, v in self._state.items()}

    def load_state(self, state: Mapping[str, np.ndarray]) -> None:
        """Replace the state by `state` (same entries and shapes as :meth:`state`)."""
        self._state = self._checked(state, "load_state")

    def merge(self, other_state: Mapping[str, np.ndarray]) -> None:
        """Add `other_state` (e.g. another worker's :meth:`state`) to this one."""
        other = self._checked(other_state, "merge")
        self._state = {k: self._state[k] + other[k] for k in self._state}

    def global_state(self, reduce: Optional[Reduce], name: str = "metrics") -> dict[str, np.ndarray]:
        """The state summed over all workers through `reduce` (one call); local if None.

        Blocking as `reduce` is; every worker must call it with the same metric.
        """
        if reduce is None:
            return self.state()
        return _reduce_states([self], reduce, name)[0]

    def _checked(self, state: Mapping[str, np.ndarray], op: str) -> dict[str, np.ndarray]:
        where = f"{type(self).__name__}.{op}"
        template = self._empty_state()
        if not isinstance(state, Mapping) or set(state) != set(template):
            got = sorted(state) if isinstance(state, Mapping) else type(state).__name__
            raise MetricError(f"{where}: expected a state with entries {sorted(template)}, got "
                              f"{got}; pass what state() of the same kind of metric returns")
        out = {}
        for k, empty in template.items():
            a = _host(state[k])
            if a.shape != empty.shape or a.dtype.kind not in "biuf":
                raise MetricError(f"{where}: entry {k!r} is {a.dtype}{list(a.shape)}, expected "
                                  f"{empty.dtype}{list(empty.shape)} (same metric settings on "
                                  f"every worker, e.g. num_thresholds)")
            if not np.isfinite(a).all() or (empty.dtype.kind == "i" and (a != np.rint(a)).any()):
                raise MetricError(f"{where}: entry {k!r} holds non-finite or (for counts) "
                                  f"non-integer values; it is not a state of this metric")
            out[k] = a.astype(empty.dtype, copy=True)
        return out

    def __repr__(self) -> str:
        return f"{type(self).__name__}(value={self.accumulate():.6g})"


def bucket_auc(stat_pos, stat_neg) -> float:
    """AUC of positive / negative bucket histograms, as ``paddle.distributed.fleet.metrics.auc``.

    Walks the buckets from the highest prediction down and sums trapezoids of
    the ROC curve (so positives and negatives in the same bucket count half),
    divided by positives * negatives. Returns 0.5 when either class is absent
    (Paddle's convention). The terms are multiples of 0.5, so the sum is exact
    (and equal to Paddle's loop bit for bit) while positives * negatives < 2**52.

    Args:
        stat_pos, stat_neg: counts per bucket, [B] or Paddle's [1, B].
    """
    pos = np.asarray(stat_pos, dtype=np.float64).reshape(-1)[::-1]
    neg = np.asarray(stat_neg, dtype=np.float64).reshape(-1)[::-1]
    if pos.shape != neg.shape:
        raise MetricError(f"bucket_auc: stat_pos has {pos.size} buckets, stat_neg {neg.size}; "
                          f"pass histograms of the same Auc settings")
    tot_pos, tot_neg = float(pos.sum()), float(neg.sum())
    if tot_pos == 0 or tot_neg == 0:
        return 0.5
    above = np.cumsum(pos) - pos  # positives in strictly higher buckets
    area = float(np.dot(neg, above + 0.5 * pos))
    return area / (tot_pos * tot_neg)


class Auc(Metric):
    """Area under the ROC curve from bucketed histograms (Paddle's ``auc`` op, global mode).

    A prediction p falls into bucket ``int(float32(p) * num_thresholds)``; the
    state is ``stat_pos`` and ``stat_neg``, int64 counts of positives and
    negatives per bucket (``num_thresholds + 1`` buckets). The figure is
    :func:`bucket_auc` of them: 0.5 when no positive or no negative has been
    seen. With 4095 thresholds the bucketing error is well under 1e-3.

    Args:
        num_thresholds: bucket count minus one (Paddle's default 2**12 - 1).

    Example::

        auc = Auc()
        auc.update(np.array([0.9, 0.2, 0.6]), np.array([1, 0, 0]))
        auc.accumulate()   # 1.0
    """

    def __init__(self, num_thresholds: int = 4095) -> None:
        if isinstance(num_thresholds, bool) or not isinstance(num_thresholds, (int, np.integer)) \
                or not 1 <= num_thresholds < 2 ** 31:
            raise MetricError(f"Auc: num_thresholds must be an integer in [1, 2**31), got "
                              f"{num_thresholds!r}; Paddle's default is 4095")
        self.num_thresholds = int(num_thresholds)
        super().__init__()

    def _empty_state(self) -> dict[str, np.ndarray]:
        buckets = self.num_thresholds + 1
        return {"stat_pos": np.zeros(buckets, np.int64), "stat_neg": np.zeros(buckets, np.int64)}

    def _value(self, state) -> float:
        return bucket_auc(state["stat_pos"], state["stat_neg"])

    @property
    def stat_pos(self) -> np.ndarray:
        """Positives per bucket (read-only view)."""
        return _readonly(self._state["stat_pos"])

    @property
    def stat_neg(self) -> np.ndarray:
        """Negatives per bucket (read-only view)."""
        return _readonly(self._state["stat_neg"])

    def update(self, preds, labels) -> None:
        """Count a batch: preds [N], [N, 1] or [N, 2] probabilities; labels [N] or [N, 1] of 0/1."""
        p = _probabilities(preds, self)
        y = _labels(labels, p.shape[0], self)
        # float32 product and truncation, as Paddle's kernel (T = float) bins
        bins = (p.astype(np.float32) * np.float32(self.num_thresholds)).astype(np.int64)
        buckets = self.num_thresholds + 1
        counts = np.bincount(bins + buckets * y, minlength=2 * buckets)
        self._state["stat_neg"] += counts[:buckets]
        self._state["stat_pos"] += counts[buckets:]


class Accuracy(Metric):
    """Share of examples whose predicted class is the label: correct / total.

    preds [N, C] (C >= 2: logits or probabilities; the predicted class is the
    argmax, first on ties) with labels in [0, C); or preds [N] / [N, 1] of
    positive-class probabilities, predicted positive when ``p > threshold``
    (so p = 0.5 agrees with the argmax of Paddle's [1 - p, p]) with labels
    0/1. Reports 0.0 before any example (as ``paddle.metric.Accuracy``).
    """

    def __init__(self, threshold: float = 0.5) -> None:
        if not 0.0 <= threshold <= 1.0:
            raise MetricError(f"Accuracy: threshold must lie in [0, 1], got {threshold!r}")
        self.threshold = float(threshold)
        super().__init__()

    def _empty_state(self) -> dict[str, np.ndarray]:
        return {"correct": np.zeros(1, np.int64), "total": np.zeros(1, np.int64)}

    def _value(self, state) -> float:
        total = int(state["total"][0])
        return int(state["correct"][0]) / total if total else 0.0

    def update(self, preds, labels) -> None:
        """Count a batch of predictions against labels (see the class docstring for shapes)."""
        a = _real(_host(preds), "predictions", self)
        if a.ndim == 2 and a.shape[1] >= 2:
            if not np.isfinite(a).all():
                raise MetricError(f"{_where(self)}: predictions contain NaN or inf; check the "
                                  f"model output (a diverged loss?)")
            y = _labels(labels, a.shape[0], self, classes=a.shape[1])
            predicted = np.argmax(a, axis=1)
        else:
            p = _probabilities(a, self)
            y = _labels(labels, p.shape[0], self)
            predicted = p > self.threshold
        self._state["correct"] += int(np.count_nonzero(predicted == y))
        self._state["total"] += y.shape[0]


class LogLoss(Metric):
    """Mean binary cross-entropy of probabilities: -mean(y log p + (1 - y) log(1 - p)).

    p is clipped to [eps, 1 - eps] so a confident mistake costs -log(eps), not
    inf. preds as for :class:`Auc`; labels 0/1. The state is the sum of losses
    (float64) and the example count; NaN before any example.
    """

    def __init__(self, eps: float = 1e-7) -> None:
        if not 0.0 < eps < 0.5:
            raise MetricError(f"LogLoss: eps must lie in (0, 0.5), got {eps!r}")
        self.eps = float(eps)
        super().__init__()

    def _empty_state(self) -> dict[str, np.ndarray]:
        return {"sum": np.zeros(1, np.float64), "count": np.zeros(1, np.int64)}

    def _value(self, state) -> float:
        count = int(state["count"][0])
        return float(state["sum"][0]) / count if count else math.nan

    def update(self, preds, labels) -> None:
        """Count a batch: preds [N], [N, 1] or [N, 2] probabilities; labels [N] or [N, 1] of 0/1."""
        p = np.clip(_probabilities(preds, self).astype(np.float64), self.eps, 1.0 - self.eps)
        y = _labels(labels, p.shape[0], self)
        loss = -np.sum(np.where(y == 1, np.log(p), np.log1p(-p)))
        self._state["sum"] += loss
        self._state["count"] += y.shape[0]


class Mean(Metric):
    """Weighted mean of values (e.g. the training loss): sum(w * v) / sum(w); NaN when empty.

    Example::

        loss_mean = Mean()
        loss_mean.update(loss.item(), weights=batch_size)   # a batch-mean loss
    """

    def _empty_state(self) -> dict[str, np.ndarray]:
        return {"sum": np.zeros(1, np.float64), "weight": np.zeros(1, np.float64)}

    def _value(self, state) -> float:
        weight = float(state["weight"][0])
        return float(state["sum"][0]) / weight if weight else math.nan

    def update(self, values, weights=None) -> None:
        """Add values (a number or an array of any shape), each with weight 1 or `weights`.

        `weights` is a number (the same for every value) or an array of the
        values' shape, finite and >= 0.
        """
        v = _real(_host(values), "values", self).astype(np.float64).reshape(-1)
        if not np.isfinite(v).all():
            raise MetricError(f"{_where(self)}: values contain NaN or inf; check the loss (did "
                              f"training diverge?)")
        if weights is None:
            w = np.ones_like(v)
        else:
            w = _real(_host(weights), "weights", self).astype(np.float64)
            if w.ndim == 0:
                w = np.full_like(v, float(w))
            elif w.size != v.size:
                raise MetricError(f"{_where(self)}: {w.size} weights for {v.size} values; pass "
                                  f"one number or one weight per value")
            w = w.reshape(-1)
            if not (np.isfinite(w) & (w >= 0)).all():
                raise MetricError(f"{_where(self)}: weights must be finite and >= 0, got "
                                  f"{w[~(np.isfinite(w) & (w >= 0))][:3].tolist()}")
        self._state["sum"] += float(np.dot(w, v))
        self._state["weight"] += float(w.sum())


def _readonly(a: np.ndarray) -> np.ndarray:
    view = a.view()
    view.flags.writeable = False
    return view


def _reduce_states(metrics: list[Metric], reduce: Reduce, name: str) -> list[dict[str, np.ndarray]]:
    """Every metric's state summed across workers, through one call of `reduce`."""
    states = [m.state() for m in metrics]
    parts = []
    for m, state in zip(metrics, states):
        for k, a in state.items():
            if a.dtype.kind == "i" and a.size and np.abs(a).max() >= _EXACT_INT:
                raise MetricError(f"all_reduce_metrics: {type(m).__name__} entry {k!r} holds "
                                  f"counts >= 2**53, which float64 cannot carry exactly; reset "
                                  f"the metric more often")
            parts.append(a.astype(np.float64).reshape(-1))
    packed = np.concatenate(parts)
    total = _host(reduce(name, packed))
    if total.shape != packed.shape or total.dtype.kind not in "biuf":
        raise MetricError(f"all_reduce_metrics: reduce({name!r}, float64{list(packed.shape)}) "
                          f"returned {total.dtype}{list(total.shape)}; it must return the "
                          f"elementwise sum over workers (do all workers pass the same metrics "
                          f"with the same settings?)")
    out, offset = [], 0
    for state in states:
        summed = {}
        for k, a in state.items():
            chunk = total[offset:offset + a.size].reshape(a.shape)
            summed[k] = np.rint(chunk).astype(a.dtype) if a.dtype.kind == "i" else chunk.astype(a.dtype)
            offset += a.size
        out.append(summed)
    return out


def all_reduce_metrics(metrics: Mapping[str, Metric], reduce: Optional[Reduce] = None, *,
                       name: str = "metrics") -> dict[str, float]:
    """The figures of `metrics` over all workers, with ONE call of `reduce`.

    Packs every metric's state (in sorted order of the names, so the layout
    does not depend on dict order) into one float64 array (integer counts
    are exact below 2**53), calls ``reduce(name, packed)``, which must return
    the elementwise sum of ``packed`` over all workers, and computes each
    metric's figure from its summed state. The metrics' own states are left
    as they are (local), so training can go on counting.

    Args:
        metrics: {figure name: metric}; every worker passes the same names,
            kinds and settings.
        reduce: the cross-worker sum (blocking), e.g. the fleet layer's
            parameter-server reduce; None computes the local figures and
            calls nothing.
        name: the name passed to `reduce` (the server's rendezvous name).

    Returns:
        {figure name: float}, in the order of `metrics`.

    Raises:
        MetricError: a value that is not a Metric, counts too large for
            float64, or a reduce result of the wrong shape.

    Example::

        figures = all_reduce_metrics({"auc": auc, "loss": loss},
                                     reduce=lambda n, a: client.reduce(n, a, n_workers))
    """
    for key, m in metrics.items():
        if not isinstance(m, Metric):
            raise MetricError(f"all_reduce_metrics: metrics[{key!r}] is a {type(m).__name__}, "
                              f"not a Metric (Auc, Accuracy, LogLoss, Mean)")
    if reduce is None or not metrics:
        return {key: m.accumulate() for key, m in metrics.items()}
    order = sorted(metrics)
    summed = _reduce_states([metrics[k] for k in order], reduce, name)
    by_key = {k: metrics[k]._value(s) for k, s in zip(order, summed)}
    return {key: by_key[key] for key in metrics}

"""Gradient transforms: small functions between backward and the optimizer's update.

A transform is called as `transform(params) -> bool` before each optimizer step, with the
trainable parameters (their `.grad` set by backward, and by DataParallel already averaged over
ranks); it may change the gradients in place and returns False to skip this step's update
(the transforms after it are then not called; a transform that skips for good, as AMP on an
overflow, drops the gradients itself). A transform may also have `check()` (raises before any
transform runs: AMP's "the loss was not scaled"), `wants_sync()` (should the coming backward
all-reduce?) and `after_step(params, optimizer)` (called after an applied update, in the
chain's order: LocalSGD averages the parameters there).
`TransformedOptimizer` chains them in the order given, as the strategy lists them (STYLE.md
§9: plain pieces in a visible order, no meta-optimizer search):

    opt = TransformedOptimizer(Adam(1e-3, parameters=model.parameters()),
                               [gradient_merge(k_steps=4, avg=True)], model=dp_model)
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

from shoal.collective.errors import InvalidArgumentError
from shoal.worker.sparse import SparseGrad

GradTransform = Callable[[list], bool]


class gradient_merge:
    """Apply one update per `k_steps` steps, on the gradients of all k (averaged when `avg`).

    The k backward passes accumulate into `.grad` (TransformedOptimizer keeps clear_grad from
    dropping them in between); the update of the k-th step sees their sum, divided by k with
    `avg`. With DataParallel, only the k-th backward all-reduces (`wants_sync`), so k micro-
    batches cost one reduction: k steps of batch b equal one step of batch k*b."""

    def __init__(self, k_steps: int, avg: bool = True):
        if not isinstance(k_steps, int) or isinstance(k_steps, bool) or k_steps < 1:
            raise InvalidArgumentError(f"gradient_merge(k_steps={k_steps!r}): give an int >= 1")
        self.k_steps, self.avg, self.count = k_steps, bool(avg), 0

    def wants_sync(self) -> bool:
        """Whether the coming backward pass is the last of a merge (the one to all-reduce)."""
        return (self.count + 1) % self.k_steps == 0

    def __call__(self, params) -> bool:
        self.count += 1
        if self.count % self.k_steps:
            return False
        if self.avg and self.k_steps > 1:
            scale = 1.0 / self.k_steps
            for p in params:
                g = p._grad
                if isinstance(g, SparseGrad):
                    p._grad = SparseGrad(g.ids, g.rows * scale, g.shape)
                elif g is not None:
                    p._grad = g * scale
        return True

    def state_dict(self) -> dict:
        return {"count": self.count}

    def set_state_dict(self, state: dict) -> None:
        self.count = int(state["count"])


class TransformedOptimizer:
    """`optimizer` with gradient transforms run, in order, before each update.

    `step()` runs the transforms; if one returns False the update is skipped and the next
    `clear_grad()` keeps the gradients (they are still being merged). `model` (a DataParallel)
    is told before each backward whether to all-reduce: only when every transform that has a
    `wants_sync` wants it. Other attributes are the wrapped optimizer's."""

    def __init__(self, optimizer, transforms: Sequence[GradTransform], *, model=None):
        for t in transforms:
            if not callable(t):
                raise InvalidArgumentError(f"TransformedOptimizer: transform {t!r} is not callable")
        self._inner, self._transforms, self._model = optimizer, list(transforms), model
        self._applied = True
        self._set_sync()

    def __getattr__(self, name):
        return getattr(self._inner, name)

    @property
    def inner(self):
        return self._inner

    def _set_sync(self) -> None:
        if self._model is not None and hasattr(self._model, "_merge_sync"):
            sync = all(t.wants_sync() for t in self._transforms if hasattr(t, "wants_sync"))
            object.__setattr__(self._model, "_merge_sync", sync)

    def step(self) -> None:
        for t in self._transforms:   # refusals come before any transform changed its state
            if hasattr(t, "check"):
                t.check()
        params = [p for p in self._inner._params if getattr(p, "trainable", True)]
        self._applied = all(t(params) for t in self._transforms)
        if self._applied:
            self._inner.step()
            for t in self._transforms:
                if hasattr(t, "after_step"):
                    t.after_step(params, self._inner)
        self._set_sync()

    def clear_grad(self, set_to_zero: bool = False) -> None:
        if self._applied:
            self._inner.clear_grad(set_to_zero)

    def bind(self, model) -> None:
        """The model whose gradient sync the transforms drive (when it was wrapped after the
        optimizer)."""
        self._model = model
        self._set_sync()

    def scale(self, loss):
        """`loss` as backward should see it: multiplied by the loss scale when a transform
        scales losses (AMP), else unchanged."""
        for t in self._transforms:
            if hasattr(t, "scale"):
                loss = t.scale(loss)
        return loss

    @property
    def loss_scaler(self):
        """A GradScaler-shaped view (scale, step, update) for loops that drive the scaler
        themselves, such as PipelineParallel.train_batch; None without a scaling transform."""
        if not any(hasattr(t, "scale") for t in self._transforms):
            return None
        return _ChainScaler(self)

    def minimize(self, loss) -> None:
        """backward() of the (scaled) loss, then step()."""
        self.scale(loss).backward()
        self.step()

    def _names(self) -> list[str]:
        return [type(t).__name__ for t in self._transforms]

    def state_dict(self) -> dict:
        """The wrapped optimizer's state, plus "transforms": {transform name: its state}."""
        out = dict(self._inner.state_dict())
        out["transforms"] = {type(t).__name__: t.state_dict() if hasattr(t, "state_dict") else {}
                             for t in self._transforms}
        return out

    def set_state_dict(self, state: dict) -> None:
        """Load what `state_dict()` returned, for the same chain of transforms; a state of
        another chain raises StateDictError and changes nothing (the wrapped optimizer checks
        its own state before changing it; the transforms load after it)."""
        from shoal.worker.errors import StateDictError
        state = dict(state)
        saved = state.pop("transforms", {})
        if not isinstance(saved, dict) or sorted(saved) != sorted(self._names()):
            got = sorted(saved) if isinstance(saved, dict) else type(saved).__name__
            raise StateDictError(f"TransformedOptimizer.set_state_dict: the state was saved with "
                                 f"the transforms {got}, this optimizer runs "
                                 f"{sorted(self._names())}; load it into an optimizer built "
                                 f"with the same strategy")
        self._inner.set_state_dict(state)
        for t in self._transforms:
            if hasattr(t, "set_state_dict"):
                t.set_state_dict(saved[type(t).__name__])
        self._set_sync()


class _ChainScaler:
    """scale / step / update of a TransformedOptimizer whose transforms scale the loss."""

    def __init__(self, opt: TransformedOptimizer):
        self._opt = opt

    def scale(self, loss):
        return self._opt.scale(loss)

    def step(self, optimizer) -> None:
        # a pipeline's first stages never see the loss: their gradients arrive already scaled
        # by the last stage's, which PipelineParallel vouches for by stepping through here
        for t in self._opt._transforms:
            if hasattr(t, "mark_scaled"):
                t.mark_scaled()
        optimizer.step()

    def update(self) -> None:
        """Nothing: the scaling transform updates the scale inside step()."""

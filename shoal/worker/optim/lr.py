"""Learning-rate schedulers (Paddle's `paddle.optimizer.lr` names and semantics).

A scheduler starts at epoch 0 (`last_epoch=-1` then one implicit `step()`);
call `step()` once per epoch or per iteration, as you choose, and pass the
scheduler as an optimizer's `learning_rate`.
"""
from __future__ import annotations

import math


class LRScheduler:
    """Base class: subclasses define `get_lr()` from `self.last_epoch` and `self.base_lr`."""

    def __init__(self, learning_rate: float = 0.1, last_epoch: int = -1):
        if not isinstance(learning_rate, (int, float)) or learning_rate < 0:
            raise ValueError(f"{type(self).__name__}: learning_rate={learning_rate!r} must be a "
                             f"non-negative number")
        self.base_lr = float(learning_rate)
        self.last_epoch = last_epoch
        self.last_lr = self.base_lr
        self.step()

    def get_lr(self) -> float:
        raise NotImplementedError

    def step(self, epoch: int | None = None) -> None:
        """Advance one epoch (or jump to `epoch`) and recompute `last_lr`."""
        self.last_epoch = self.last_epoch + 1 if epoch is None else int(epoch)
        self.last_lr = float(self.get_lr())

    def __call__(self) -> float:
        return self.last_lr

    def state_dict(self) -> dict:
        return {"last_epoch": self.last_epoch, "last_lr": self.last_lr}

    def set_state_dict(self, state: dict) -> None:
        missing = {"last_epoch", "last_lr"} - set(state)
        if missing:
            from shoal.worker.errors import StateDictError
            raise StateDictError(f"{type(self).__name__}.set_state_dict: missing keys "
                                 f"{sorted(missing)}")
        self.last_epoch, self.last_lr = int(state["last_epoch"]), float(state["last_lr"])

    def __repr__(self) -> str:
        return f"{type(self).__name__}(last_epoch={self.last_epoch}, lr={self.last_lr})"


class StepDecay(LRScheduler):
    """lr = learning_rate * gamma ** (epoch // step_size)."""

    def __init__(self, learning_rate: float, step_size: int, gamma: float = 0.1,
                 last_epoch: int = -1):
        if not isinstance(step_size, int) or step_size <= 0:
            raise ValueError(f"StepDecay: step_size={step_size!r} must be a positive int")
        if gamma >= 1.0:
            raise ValueError(f"StepDecay: gamma={gamma} must be below 1.0")
        self.step_size, self.gamma = step_size, gamma
        super().__init__(learning_rate, last_epoch)

    def get_lr(self) -> float:
        return self.base_lr * self.gamma ** (self.last_epoch // self.step_size)


class CosineAnnealingDecay(LRScheduler):
    """lr = eta_min + (learning_rate - eta_min) * (1 + cos(pi * epoch / T_max)) / 2."""

    def __init__(self, learning_rate: float, T_max: int, eta_min: float = 0.0,
                 last_epoch: int = -1):
        if not isinstance(T_max, int) or T_max <= 0:
            raise ValueError(f"CosineAnnealingDecay: T_max={T_max!r} must be a positive int")
        self.T_max, self.eta_min = T_max, float(eta_min)
        super().__init__(learning_rate, last_epoch)

    def get_lr(self) -> float:
        cos = math.cos(math.pi * self.last_epoch / self.T_max)
        return self.eta_min + (self.base_lr - self.eta_min) * (1 + cos) / 2


class LinearWarmup(LRScheduler):
    """Linear from start_lr to end_lr over warmup_steps, then `learning_rate`
    (a number, or a scheduler that starts counting when the warm-up ends)."""

    def __init__(self, learning_rate, warmup_steps: int, start_lr: float, end_lr: float,
                 last_epoch: int = -1):
        if not isinstance(warmup_steps, int) or warmup_steps <= 0:
            raise ValueError(f"LinearWarmup: warmup_steps={warmup_steps!r} must be a positive int")
        if not isinstance(learning_rate, (int, float, LRScheduler)):
            raise TypeError(f"LinearWarmup: learning_rate must be a number or an LRScheduler, "
                            f"got {type(learning_rate).__name__}")
        self.inner = learning_rate
        self.warmup_steps, self.start_lr, self.end_lr = warmup_steps, start_lr, end_lr
        super().__init__(end_lr, last_epoch)

    def get_lr(self) -> float:
        if self.last_epoch < self.warmup_steps:
            frac = self.last_epoch / self.warmup_steps
            return self.start_lr + (self.end_lr - self.start_lr) * frac
        if isinstance(self.inner, LRScheduler):
            self.inner.step(self.last_epoch - self.warmup_steps)
            return self.inner()
        return float(self.inner)

    def state_dict(self) -> dict:
        out = super().state_dict()
        if isinstance(self.inner, LRScheduler):
            out["inner"] = self.inner.state_dict()
        return out

    def set_state_dict(self, state: dict) -> None:
        super().set_state_dict(state)
        if isinstance(self.inner, LRScheduler) and "inner" in state:
            self.inner.set_state_dict(state["inner"])


__all__ = ["LRScheduler", "StepDecay", "CosineAnnealingDecay", "LinearWarmup"]

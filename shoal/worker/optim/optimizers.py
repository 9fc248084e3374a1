"""SGD, Momentum, Adam, AdamW, Adagrad, Lamb and Lars (Paddle's names and defaults).

Each is a kernel name, its state slots and its hyperparameters; the update
itself is the backend's fused in-place kernel (shoal.kernels).
"""
from __future__ import annotations

from typing import Callable, Iterable

from shoal.worker.optim.optimizer import Optimizer, check_beta, check_positive, exclusion
from shoal.worker.tensor import Tensor


class SGD(Optimizer):
    """p -= lr * g."""

    kernel = "sgd_"

    def _hparams(self, p, lr, step):
        return {"lr": lr}


class Momentum(Optimizer):
    """v = momentum * v + g; p -= lr * v (or lr * (g + momentum * v) with Nesterov)."""

    kernel = "momentum_"
    slots = ("velocity",)

    def __init__(self, learning_rate=0.001, momentum: float = 0.9, parameters=None,
                 use_nesterov: bool = False, weight_decay=None, grad_clip=None):
        super().__init__(learning_rate, parameters, weight_decay, grad_clip)
        self.momentum = check_positive("momentum", momentum, "Momentum", allow_zero=True)
        self.use_nesterov = bool(use_nesterov)

    def _hparams(self, p, lr, step):
        return {"lr": lr, "momentum": self.momentum, "nesterov": self.use_nesterov}


class Adam(Optimizer):
    """Adam with bias correction; `weight_decay` is L2 added to the gradient.

    Row-sparse (embedding) gradients update only the rows they name (lazy mode).
    """

    kernel = "adam_"
    slots = ("moment1", "moment2")

    def __init__(self, learning_rate=0.001, beta1: float = 0.9, beta2: float = 0.999,
                 epsilon: float = 1e-8, parameters=None, weight_decay=None, grad_clip=None,
                 lazy_mode: bool = True):
        super().__init__(learning_rate, parameters, weight_decay, grad_clip)
        where = type(self).__name__
        self.beta1 = check_beta("beta1", beta1, where)
        self.beta2 = check_beta("beta2", beta2, where)
        self.epsilon = check_positive("epsilon", epsilon, where)
        self.lazy_mode = lazy_mode

    def _hparams(self, p, lr, step):
        return {"lr": lr, "beta1": self.beta1, "beta2": self.beta2, "eps": self.epsilon,
                "step": step}


class AdamW(Adam):
    """Adam with decoupled weight decay: p *= 1 - lr * weight_decay before the Adam step.

    `apply_decay_param_fun(name) -> bool` picks the parameters that decay (all by default).
    """

    coupled_decay = False

    def __init__(self, learning_rate=0.001, beta1: float = 0.9, beta2: float = 0.999,
                 epsilon: float = 1e-8, parameters=None, weight_decay: float = 0.01,
                 apply_decay_param_fun: Callable[[str], bool] | None = None, grad_clip=None,
                 lazy_mode: bool = True):
        super().__init__(learning_rate, beta1, beta2, epsilon, parameters, weight_decay,
                         grad_clip, lazy_mode)
        self.apply_decay_param_fun = apply_decay_param_fun

    def _hparams(self, p, lr, step):
        kw = super()._hparams(p, lr, step)
        decays = self.apply_decay_param_fun is None or self.apply_decay_param_fun(p.name)
        kw["weight_decay"] = self.weight_decay if decays else 0.0
        return kw


class Adagrad(Optimizer):
    """acc += g * g; p -= lr * g / (sqrt(acc) + epsilon)."""

    kernel = "adagrad_"
    slots = ("moment",)

    def __init__(self, learning_rate, epsilon: float = 1e-6, parameters=None, weight_decay=None,
                 grad_clip=None, initial_accumulator_value: float = 0.0):
        super().__init__(learning_rate, parameters, weight_decay, grad_clip)
        self.epsilon = check_positive("epsilon", epsilon, "Adagrad")
        self.initial_accumulator_value = check_positive(
            "initial_accumulator_value", initial_accumulator_value, "Adagrad", allow_zero=True)

    def _init_slot(self, name, p):
        return p.backend.xp.full(p.shape, self.initial_accumulator_value, dtype=p.dtype)

    def _hparams(self, p, lr, step):
        return {"lr": lr, "eps": self.epsilon}


class Lamb(Optimizer):
    """LAMB: the Adam direction plus decoupled decay, scaled per parameter by
    ||p|| / ||update|| (You et al. 2019; Paddle's Lamb)."""

    kernel = "lamb_"
    slots = ("moment1", "moment2")
    coupled_decay = False

    def __init__(self, learning_rate=0.001, lamb_weight_decay: float = 0.01, beta1: float = 0.9,
                 beta2: float = 0.999, epsilon: float = 1e-6, parameters=None, grad_clip=None,
                 exclude_from_weight_decay_fn: Callable[[Tensor], bool] | None = None,
                 exclude_from_weight_decay: Iterable[str] | None = None):
        super().__init__(learning_rate, parameters, lamb_weight_decay, grad_clip)
        self.beta1 = check_beta("beta1", beta1, "Lamb")
        self.beta2 = check_beta("beta2", beta2, "Lamb")
        self.epsilon = check_positive("epsilon", epsilon, "Lamb")
        self.excluded = exclusion(exclude_from_weight_decay, exclude_from_weight_decay_fn)

    def _hparams(self, p, lr, step):
        return {"lr": lr, "beta1": self.beta1, "beta2": self.beta2, "eps": self.epsilon,
                "step": step, "weight_decay": 0.0 if self.excluded(p) else self.weight_decay}


class Lars(Optimizer):
    """LARS momentum: a per-parameter lr of lars_coeff * ||p|| / (||g|| + wd ||p|| + eps)
    (Paddle's LarsMomentumOptimizer). `exclude_from_weight_decay` lists name
    substrings (e.g. ["b_0", "layer_norm"]) whose parameters take no decay."""

    kernel = "lars_"
    slots = ("velocity",)
    coupled_decay = False

    def __init__(self, learning_rate=0.001, momentum: float = 0.9, lars_coeff: float = 0.001,
                 lars_weight_decay: float = 0.0005, parameters=None, grad_clip=None,
                 exclude_from_weight_decay: Iterable[str] | None = None, epsilon: float = 0.0):
        super().__init__(learning_rate, parameters, lars_weight_decay, grad_clip)
        self.momentum = check_positive("momentum", momentum, "Lars", allow_zero=True)
        self.lars_coeff = check_positive("lars_coeff", lars_coeff, "Lars")
        self.epsilon = check_positive("epsilon", epsilon, "Lars", allow_zero=True)
        self.excluded = exclusion(exclude_from_weight_decay)

    def _hparams(self, p, lr, step):
        return {"lr": lr, "momentum": self.momentum, "lars_coeff": self.lars_coeff,
                "weight_decay": 0.0 if self.excluded(p) else self.weight_decay,
                "eps": self.epsilon}

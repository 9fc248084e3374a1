"""The cupy backend: fused elementwise kernels where fusion saves memory passes."""
from __future__ import annotations

import math

import numpy as np

from shoal.kernels._backend import Backend

_KERNELS: dict = {}


def _cupy():
    import cupy
    return cupy


def _kernel(name: str):
    """Compile (once) and return one of the fused update kernels."""
    if name not in _KERNELS:
        cp = _cupy()
        src = {
            "sgd": ("T g, T lr", "T p", "p -= lr * g"),
            "momentum": (
                "T g, T lr, T mu, bool nesterov", "T p, T v",
                "v = mu * v + g; p -= nesterov ? lr * (g + mu * v) : lr * v"),
            "adam": (
                "T g, T b1, T b2, T eps, T step_size, T inv_sqrt_bias2, T decay", "T p, T m, T v",
                "m = b1 * m + (1 - b1) * g; v = b2 * v + (1 - b2) * g * g;"
                "p = p * decay - step_size * m / (sqrt(v) * inv_sqrt_bias2 + eps)"),
            "adagrad": (
                "T g, T lr, T eps", "T p, T acc",
                "acc += g * g; p -= lr * g / (sqrt(acc) + eps)"),
        }[name]
        _KERNELS[name] = cp.ElementwiseKernel(src[0], src[1], src[2], f"shoal_{name}")
    return _KERNELS[name]


class CupyBackend(Backend):
    """Arrays on the current CUDA device through cupy (extra `gpu`)."""

    name = "cupy"
    requirement = "It needs a CUDA GPU and the gpu extra: pip install -e '.[gpu]'."

    @classmethod
    def available(cls) -> bool:
        try:
            cp = _cupy()
            return bool(cp.cuda.is_available())
        except Exception:  # ImportError, or a CUDA runtime that cannot start
            return False

    @property
    def xp(self):
        return _cupy()

    def array_types(self) -> tuple[type, ...]:
        return (_cupy().ndarray,)

    def to_numpy(self, a) -> np.ndarray:
        return _cupy().asnumpy(a)

    def _make_rng(self, seed):
        return _cupy().random.default_rng(seed)

    def get_rng_state(self):
        # cupy's bit generators keep per-thread cuRAND states in one device array, no `state`
        return self.rng.bit_generator._state.copy()

    def set_rng_state(self, state) -> None:
        self.rng.bit_generator._state[...] = state

    def uniform(self, shape, low=0.0, high=1.0, dtype="float32"):
        return self.rng.random(size=shape, dtype=dtype) * (high - low) + low

    def normal(self, shape, mean=0.0, std=1.0, dtype="float32"):
        return self.rng.standard_normal(size=shape, dtype=dtype) * std + mean

    def _reduce_sorted(self, sorted_rows, starts):
        # cupy has no ufunc.reduceat: label each row with its segment and scatter-add.
        cp = _cupy()
        import cupyx
        seg = cp.zeros(sorted_rows.shape[0], dtype=cp.int64)
        seg[starts[1:]] = 1
        seg = cp.cumsum(seg)
        out = cp.zeros((starts.shape[0],) + sorted_rows.shape[1:], dtype=sorted_rows.dtype)
        cupyx.scatter_add(out, seg, sorted_rows)
        return out

    def index_add_(self, target, index, values):
        import cupyx
        cupyx.scatter_add(target, index, values)

    def sgd_(self, param, grad, lr):
        _kernel("sgd")(grad, lr, param)

    def momentum_(self, param, grad, velocity, lr, momentum, nesterov=False):
        _kernel("momentum")(grad, lr, momentum, nesterov, param, velocity)

    def adam_(self, param, grad, m, v, lr, beta1, beta2, eps, step, weight_decay=0.0):
        bias1 = 1.0 - beta1 ** step
        bias2 = 1.0 - beta2 ** step
        _kernel("adam")(grad, beta1, beta2, eps, lr / bias1, 1.0 / math.sqrt(bias2),
                        1.0 - lr * weight_decay, param, m, v)

    def adagrad_(self, param, grad, moment, lr, eps):
        _kernel("adagrad")(grad, lr, eps, param, moment)

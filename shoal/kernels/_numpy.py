"""The numpy backend: always there, so everything runs without a GPU."""
from __future__ import annotations

import numpy as np

from shoal.kernels._backend import Backend


class NumpyBackend(Backend):
    name = "numpy"

    @classmethod
    def available(cls) -> bool:
        return True

    @property
    def xp(self):
        return np

    def array_types(self) -> tuple[type, ...]:
        return (np.ndarray,)

    def to_numpy(self, a) -> np.ndarray:
        return np.asarray(a)

    def _make_rng(self, seed):
        return np.random.default_rng(seed)

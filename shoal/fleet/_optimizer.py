"""DistributedOptimizer: the user's optimizer, with its dense step run where the mode says.

In PS mode the model's dense parameters live on the servers as one flat
table ("dense"): the worker's parameters become views of one flat buffer,
so loading fresh values is one copy and the gradient is one concatenation.
The user's optimizer picks the server-side rule (SGD -> sgd, Adam -> adam,
with its hyperparameters); its clipping and L2 decay run on the worker
before the push; its LR scheduler drives the rate sent with every push. In
GEO the user's optimizer itself updates the worker's copy, and the
communicator sends deltas every k steps.
"""
from __future__ import annotations

import numpy as np

from shoal.fleet.errors import FleetError
from shoal.ps.spec import DenseTableSpec
from shoal.worker.optim.optimizer import Optimizer
from shoal.worker.optim.optimizers import SGD, Adam
from shoal.worker.sparse import SparseGrad


def dense_spec(optimizer: Optimizer, size: int, name: str) -> DenseTableSpec:
    """The server-side rule of the dense table, from the user's optimizer."""
    kind = type(optimizer)
    if kind is Adam:
        return DenseTableSpec(name=name, size=size, rule="adam", learning_rate=optimizer.get_lr(),
                              beta1=optimizer.beta1, beta2=optimizer.beta2, epsilon=optimizer.epsilon)
    if kind is SGD:
        return DenseTableSpec(name=name, size=size, rule="sgd", learning_rate=optimizer.get_lr())
    raise FleetError(f"distributed_optimizer: {kind.__name__} has no server-side rule for the dense "
                     f"parameters in parameter-server mode; use shoal.optimizer.SGD or Adam (or GEO "
                     f"mode, where the worker runs any optimizer locally)")


class FlatParams:
    """The trainable parameters of an optimizer as views of one flat float32 buffer."""

    def __init__(self, params: list):
        self.params = [p for p in params if getattr(p, "trainable", True)]
        for p in self.params:
            if p.data.dtype != np.float32 or not isinstance(p.data, np.ndarray):
                raise FleetError(f"parameter {p.name} is {p.data.dtype} on "
                                 f"{type(p.data).__module__}; parameter-server mode keeps dense "
                                 f"parameters as float32 numpy arrays")
        self.sizes = [p.data.size for p in self.params]
        self.size = int(sum(self.sizes))
        self.buffer = np.empty(self.size, np.float32)
        start = 0
        for p, n in zip(self.params, self.sizes):
            view = self.buffer[start:start + n].reshape(p.data.shape)
            view[...] = p.data
            p.data = view
            start += n

    def load(self, values: np.ndarray) -> None:
        np.copyto(self.buffer, values)

    def grads(self, optimizer: Optimizer) -> np.ndarray:
        """The flat gradient after the optimizer's clipping and coupled L2 decay (zeros where a
        parameter has none)."""
        pairs = [(p, p._grad) for p in self.params if p._grad is not None]
        if optimizer.grad_clip is not None and pairs:
            pairs = optimizer.grad_clip(pairs)
        got = {id(p): g for p, g in pairs}
        flat = np.empty(self.size, np.float32)  # every slice is written below
        start = 0
        wd = optimizer.weight_decay if optimizer.coupled_decay else 0.0
        for p, n in zip(self.params, self.sizes):
            g = got.get(id(p))
            if g is None:
                flat[start:start + n] = 0.0
            else:
                if isinstance(g, SparseGrad):
                    g = g.to_dense()
                flat[start:start + n] = np.asarray(g, np.float32).reshape(-1)
            if wd:
                flat[start:start + n] += np.float32(wd) * p.data.reshape(-1)
            start += n
        return flat


class DistributedOptimizer:
    """What `fleet.distributed_optimizer(opt)` returns: `step`, `clear_grad`, `minimize`, and
    the wrapped optimizer's lr and state methods. Stepping before `fleet.init_worker()` raises."""

    def __init__(self, optimizer: Optimizer, runtime):
        if not isinstance(optimizer, Optimizer):
            raise FleetError(f"distributed_optimizer: expected a shoal.optimizer optimizer, got "
                             f"{type(optimizer).__name__}")
        self.inner = optimizer
        self._runtime = runtime
        self.flat: FlatParams | None = None

    def _attach(self, flat: FlatParams) -> None:
        self.flat = flat

    def step(self) -> None:
        comm = self._runtime.communicator
        if comm is None or self.flat is None:
            raise FleetError("optimizer.step(): call fleet.init_worker() first (it connects the "
                             "worker to the servers and loads the dense parameters)")
        lr = self.inner.get_lr()
        if comm.trains_dense_locally:
            self.inner.step()
            fresh = comm.step(self.flat.buffer if self.flat.size else None, lr)
        else:
            fresh = comm.step(self.flat.grads(self.inner) if self.flat.size else None, lr)
        if fresh is not None:
            self.flat.load(fresh)

    def clear_grad(self, set_to_zero: bool = False) -> None:
        self.inner.clear_grad(set_to_zero)

    def minimize(self, loss) -> None:
        loss.backward()
        self.step()

    def get_lr(self) -> float:
        return self.inner.get_lr()

    def set_lr(self, value: float) -> None:
        self.inner.set_lr(value)

    def state_dict(self) -> dict:
        return self.inner.state_dict()

    def set_state_dict(self, state: dict) -> None:
        self.inner.set_state_dict(state)

    @property
    def lr_scheduler(self):
        return self.inner.lr_scheduler

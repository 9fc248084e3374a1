"""PipelineParallel: run a PipelineLayer's stage through a schedule, micro-batch by micro-batch.

    dist.init_parallel_env()
    pipe = PipelineLayer(layers, num_stages=2, loss_fn=F.cross_entropy)
    model = PipelineParallel.from_world(pipe, dp_degree=2, micro_batch_size=4, accumulate_steps=8)
    opt = shoal.optimizer.SGD(0.1, parameters=model.parameters())
    loss = model.train_batch((x, y), opt)        # the same float on every rank

Each stage executes its schedule's instruction stream (schedule.py) through a dispatch table
{instruction type: method}. Activations go forward and gradients back over send/recv of the
pipeline group; an activation travels with a small header (dtype and shape), so any layer
shapes work, and its gradient comes back in the same shape. Every send/recv has the group's
timeout: a dead or stuck stage ends in CollectiveTimeoutError/PeerFailedError, not a hang.

Data parallel together with pipeline (Paddle's topology): world = num_stages * dp_degree,
rank = dp_index * num_stages + stage. Parameters of a stage are broadcast from the first rank
of its dp group at construction; after the schedule the stage's gradients are averaged over
the dp group, one fused all-reduce per dtype, before the optimizer step.
"""
from __future__ import annotations

import time

import numpy as np

from shoal.collective import _api
from shoal.collective.errors import InvalidArgumentError
from shoal.collective.pipeline import _comm
from shoal.collective.pipeline.layer import PipelineLayer
from shoal.collective.pipeline.schedule import (SCHEDULES, Backward, Forward, OptimizerStep,
                                                RecvActivation, RecvGrad, ReduceGrads,
                                                ScheduleMode, SendActivation, SendGrad,
                                                forward_only)
from shoal.kernels import backend_of
from shoal.worker import autograd
from shoal.worker.nn.layer import Layer
from shoal.worker.tensor import Tensor

_COMPUTE = ("Forward", "Backward")


class _Run:
    """One train_batch/eval_batch in progress: the micro-batches and what is in flight."""

    def __init__(self, inputs, labels, *, train: bool, compute_loss: bool, optimizer=None,
                 lr_scheduler=None, scaler=None):
        self.inputs, self.labels = inputs, labels
        self.train, self.compute_loss = train, compute_loss
        self.optimizer, self.lr_scheduler, self.scaler = optimizer, lr_scheduler, scaler
        self.received: dict[int, Tensor] = {}   # mb -> the input activation (a leaf)
        self.outputs: dict[int, Tensor] = {}    # mb -> the output (the loss on the last stage)
        self.grads_in: dict[int, object] = {}   # mb -> the gradient of the output
        self.grads_out: dict[int, object] = {}  # mb -> the gradient of the input, to send back
        self.losses: list[float] = []
        self.results: list = []                 # eval without loss: the last stage's outputs
        self.timeline: list[tuple[str, int | None, float, float]] = []


class PipelineParallel(Layer):
    """Train `pipeline_layer`'s stage in a pipeline of `pipeline_layer.num_stages` ranks.

    Args:
        pipeline_layer: this rank's PipelineLayer (its `stage` is this rank's rank in pp_group).
        micro_batch_size: samples per micro-batch.
        accumulate_steps: micro-batches per train_batch (a batch is their product).
        schedule_mode: "1F1B" (PipeDream-flush: at most num_stages - stage activations alive)
            or "FThenB" (GPipe: all forwards, then all backwards).
        pp_group: the pipeline's group, ranks in stage order (default: the world).
        dp_group: the stage's data-parallel group (default: none).

    `parameters()`/`state_dict()` are this stage's; `forward` runs this stage's layers only
    (use train_batch/eval_batch to run the pipeline). After each train_batch `last_timeline`
    is {"stage", "wall_s", "compute_s", "instructions": [(name, micro_batch, t0, t1), ...]}
    (seconds from the batch's start; compute_s sums Forward and Backward, not the time spent
    waiting in recv), so the stage's bubble is 1 - compute_s / wall_s.

    Raises InvalidArgumentError for a bad argument or a pipeline_layer that does not fit the
    groups. Construction blocks until the dp group's parameters are broadcast. Not
    thread-safe: one thread drives a PipelineParallel."""

    def __init__(self, pipeline_layer: PipelineLayer, *, micro_batch_size: int,
                 accumulate_steps: int, schedule_mode="1F1B", pp_group=None, dp_group=None):
        super().__init__()
        if not isinstance(pipeline_layer, PipelineLayer):
            raise InvalidArgumentError(f"PipelineParallel(pipeline_layer): expected a "
                                       f"PipelineLayer, got {type(pipeline_layer).__name__}")
        for name, value in (("micro_batch_size", micro_batch_size),
                            ("accumulate_steps", accumulate_steps)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise InvalidArgumentError(f"PipelineParallel({name}={value!r}): give an int >= 1")
        mode = ScheduleMode.parse(schedule_mode)
        pp = _api._group(pp_group)
        if pp.size != pipeline_layer.num_stages or pp.rank != pipeline_layer.stage:
            raise InvalidArgumentError(
                f"PipelineParallel: the pipeline group has {pp.size} rank(s) {pp.ranks} and this "
                f"rank is its #{pp.rank}, but the PipelineLayer is stage {pipeline_layer.stage} "
                f"of {pipeline_layer.num_stages}; give pp_group = the ranks of the stages in "
                f"order (or use PipelineParallel.from_world)")
        dp = None if dp_group is None else _api._group(dp_group)
        self._layers = pipeline_layer
        for name, value in (("micro_batch_size", micro_batch_size),
                            ("accumulate_steps", accumulate_steps), ("schedule_mode", mode),
                            ("pp_group", pp), ("dp_group", dp), ("last_timeline", None)):
            object.__setattr__(self, name, value)
        stage = pipeline_layer.stage
        object.__setattr__(self, "_prev", pp.ranks[stage - 1] if stage > 0 else None)
        object.__setattr__(self, "_next", pp.ranks[stage + 1] if stage + 1 < pp.size else None)
        object.__setattr__(self, "_dispatch", {
            RecvActivation: self._recv_activation, Forward: self._forward,
            SendActivation: self._send_activation, RecvGrad: self._recv_grad,
            Backward: self._backward, SendGrad: self._send_grad,
            ReduceGrads: self._reduce_grads, OptimizerStep: self._optimizer_step,
        })
        if dp is not None and dp.size > 1:
            tensors = list(pipeline_layer.parameters()) + [b for _, b in
                                                           pipeline_layer.named_buffers()]
            tasks = [_api.broadcast(t, dp.ranks[0], dp, sync_op=False) for t in tensors]
            for t in tasks:
                t.wait()

    @classmethod
    def from_world(cls, pipeline_layer: PipelineLayer, dp_degree: int = 1, *,
                   micro_batch_size: int, accumulate_steps: int, schedule_mode="1F1B",
                   timeout: float | None = None) -> PipelineParallel:
        """Build the pp and dp groups of the world (rank = dp_index * num_stages + stage) and
        this rank's PipelineParallel. A collective: every rank of the world calls it, in the
        same place (new_group's rule); `timeout` bounds the groups' operations (default: the
        world's). Raises InvalidArgumentError when the world is not num_stages * dp_degree."""
        world = _api._world()
        pp = pipeline_layer.num_stages if isinstance(pipeline_layer, PipelineLayer) else None
        if pp is None:
            raise InvalidArgumentError(f"from_world(pipeline_layer): expected a PipelineLayer, "
                                       f"got {type(pipeline_layer).__name__}")
        if isinstance(dp_degree, bool) or not isinstance(dp_degree, int) or dp_degree < 1 or \
                world.size != pp * dp_degree:
            raise InvalidArgumentError(
                f"from_world: a world of {world.size} rank(s) is not num_stages * dp_degree = "
                f"{pp} * {dp_degree!r}; start num_stages * dp_degree processes or change "
                f"dp_degree")
        stage, dp_index = world.rank % pp, world.rank // pp
        if pipeline_layer.stage != stage:
            raise InvalidArgumentError(f"from_world: rank {world.rank} is stage {stage} "
                                       f"(rank = dp_index * {pp} + stage) but its PipelineLayer "
                                       f"is stage {pipeline_layer.stage}; build it with "
                                       f"stage=None or stage={stage}")
        pp_groups = [_api.new_group([d * pp + s for s in range(pp)], timeout=timeout)
                     for d in range(dp_degree)]
        dp_groups = [_api.new_group([d * pp + s for d in range(dp_degree)], timeout=timeout)
                     for s in range(pp)] if dp_degree > 1 else [None] * pp
        return cls(pipeline_layer, micro_batch_size=micro_batch_size,
                   accumulate_steps=accumulate_steps, schedule_mode=schedule_mode,
                   pp_group=pp_groups[dp_index], dp_group=dp_groups[stage])

    # -- the layer -----------------------------------------------------------------------
    def forward(self, x):
        """This stage's layers only (no communication)."""
        return self._layers(x)

    def state_dict(self):
        """This stage's state dict (the keys of the full model's layers it holds)."""
        return self._layers.state_dict()

    def set_state_dict(self, state_dict, strict: bool = True):
        return self._layers.set_state_dict(state_dict, strict)

    # -- batches ---------------------------------------------------------------------------
    def train_batch(self, data, optimizer, lr_scheduler=None, scaler=None) -> float:
        """One training step on `data` = (inputs, labels) of micro_batch_size *
        accumulate_steps samples (numpy arrays or Tensors; every rank passes its pipeline's
        batch, only the first stage reads inputs and the last labels).

        The loss is the mean over the micro-batches (each scaled by 1/accumulate_steps before
        backward, and by `scaler.scale` when a scaler is given), broadcast from the last stage
        and averaged over the dp group: every rank returns the same float, the loss of the
        global batch. Then the optimizer steps (`scaler.step(optimizer); scaler.update()` with
        a scaler), its gradients are cleared and `lr_scheduler.step()` runs when given.
        Without `scaler`, an optimizer that scales losses itself (fleet's, under strategy.amp)
        lends its `loss_scaler`.
        Gradients already on the parameters when it starts are added to (after a failed
        batch, call optimizer.clear_grad() first).

        Raises InvalidArgumentError for a bad batch or no loss_fn (on every rank, before any
        communication), CollectiveTimeoutError/PeerFailedError when a stage fails. Blocks until
        the whole pipeline has finished the batch."""
        if self._layers.loss_fn is None:
            raise InvalidArgumentError("train_batch: the PipelineLayer has no loss_fn; build it "
                                       "with loss_fn=(output, label) -> Tensor")
        inputs, labels = self._split(data, "train_batch", need_labels=True)
        if scaler is None:
            scaler = getattr(optimizer, "loss_scaler", None)
        run = _Run(inputs, labels, train=True, compute_loss=True, optimizer=optimizer,
                   lr_scheduler=lr_scheduler, scaler=scaler)
        self._layers.train()
        schedule = SCHEDULES[self.schedule_mode]
        start = time.perf_counter()
        self._execute(run, schedule(self._layers.stage, self._layers.num_stages,
                                    self.accumulate_steps), start)
        loss = self._share_loss(run)
        self._timeline(run, start)
        return loss

    def eval_batch(self, data, compute_loss: bool = True):
        """Forward `data` through the pipeline without gradients (layers in eval mode for the
        call). `data` = (inputs, labels), or inputs alone when compute_loss is False.

        Returns the mean loss over the micro-batches (a float, as train_batch's: the same on
        every rank), or with compute_loss=False the last stage's outputs concatenated along
        axis 0 as a numpy array, broadcast to every stage of this pipeline (each dp replica
        returns its own pipeline's). Raises as train_batch does."""
        if compute_loss and self._layers.loss_fn is None:
            raise InvalidArgumentError("eval_batch(compute_loss=True): the PipelineLayer has no "
                                       "loss_fn; build it with one or pass compute_loss=False")
        inputs, labels = self._split(data, "eval_batch", need_labels=compute_loss)
        run = _Run(inputs, labels, train=False, compute_loss=compute_loss)
        was_training = self._layers.training
        self._layers.eval()
        start = time.perf_counter()
        try:
            with autograd.no_grad():
                self._execute(run, forward_only(self._layers.stage, self._layers.num_stages,
                                                self.accumulate_steps), start)
        finally:
            if was_training:
                self._layers.train()
        if compute_loss:
            return self._share_loss(run)
        last = self.pp_group.ranks[-1]
        out = None
        if self._layers.is_last_stage:
            xp = backend_of(run.results[0]).xp
            out = xp.ascontiguousarray(xp.concatenate(run.results, axis=0))
        out = _comm.broadcast_array(out, last, self.pp_group, "eval_batch outputs")
        return backend_of(out).to_numpy(out)

    def _split(self, data, where: str, *, need_labels: bool):
        n = self.micro_batch_size * self.accumulate_steps
        if need_labels or isinstance(data, (tuple, list)):
            if not isinstance(data, (tuple, list)) or len(data) != 2:
                raise InvalidArgumentError(f"{where}(data): give (inputs, labels), got "
                                           f"{type(data).__name__}"
                                           f"{f' of {len(data)}' if hasattr(data, '__len__') else ''}")
            parts = [("inputs", data[0]), ("labels", data[1])]
        else:
            parts = [("inputs", data)]
        arrays = []
        for what, a in parts:
            a = a.data if isinstance(a, Tensor) else a
            if not hasattr(a, "shape") or not hasattr(a, "dtype") or len(a.shape) == 0:
                raise InvalidArgumentError(f"{where}: {what} must be an array or Tensor with a "
                                           f"batch axis, got {type(a).__name__}")
            if a.shape[0] != n:
                raise InvalidArgumentError(
                    f"{where}: {what} hold {a.shape[0]} samples but a batch is micro_batch_size "
                    f"* accumulate_steps = {self.micro_batch_size} * {self.accumulate_steps} = "
                    f"{n}; give exactly {n} samples (or change micro_batch_size/"
                    f"accumulate_steps)")
            m = self.micro_batch_size
            arrays.append([a[i * m:(i + 1) * m] for i in range(self.accumulate_steps)])
        return arrays[0], (arrays[1] if len(arrays) > 1 else None)

    def _execute(self, run: _Run, stream, start: float) -> None:
        clock = time.perf_counter
        for ins in stream:
            t0 = clock()
            self._dispatch[type(ins)](run, ins)
            run.timeline.append((ins.name, getattr(ins, "micro_batch", None), t0 - start,
                                 clock() - start))

    def _share_loss(self, run: _Run) -> float:
        loss = np.array([float(np.mean(run.losses)) if run.losses else 0.0], np.float64)
        _api.broadcast(loss, self.pp_group.ranks[-1], self.pp_group)
        if self.dp_group is not None and self.dp_group.size > 1:
            _api.all_reduce(loss, "avg", self.dp_group)
        return float(loss[0])

    def _timeline(self, run: _Run, start: float) -> None:
        compute = sum(t1 - t0 for name, _, t0, t1 in run.timeline if name in _COMPUTE)
        object.__setattr__(self, "last_timeline", {
            "stage": self._layers.stage, "wall_s": time.perf_counter() - start,
            "compute_s": compute, "instructions": run.timeline})

    # -- the instructions --------------------------------------------------------------------
    def _recv_activation(self, run: _Run, ins: RecvActivation) -> None:
        array = _comm.recv_array(self._prev, self.pp_group)
        run.received[ins.micro_batch] = Tensor._make(array, run.train and array.dtype.kind == "f")

    def _forward(self, run: _Run, ins: Forward) -> None:
        mb, layer = ins.micro_batch, self._layers
        x = Tensor(run.inputs[mb]) if layer.is_first_stage else run.received[mb]
        if not run.train:
            run.received.pop(mb, None)
        out = layer(x)
        if not isinstance(out, Tensor):
            raise InvalidArgumentError(f"stage {layer.stage}: its layers returned "
                                       f"{type(out).__name__}; a pipeline stage must return one "
                                       f"Tensor")
        if not layer.is_last_stage:
            run.outputs[mb] = out
            return
        if not run.compute_loss:
            run.results.append(out.data)
            return
        loss = layer.loss_fn(out, Tensor(run.labels[mb]))
        if not isinstance(loss, Tensor) or loss.size != 1:
            raise InvalidArgumentError(f"loss_fn returned {type(loss).__name__}"
                                       f"{getattr(loss, 'shape', '')}; it must return a "
                                       f"one-element Tensor (reduce it, e.g. reduction='mean')")
        run.losses.append(float(loss.item()))
        if run.train:
            run.outputs[mb] = loss

    def _send_activation(self, run: _Run, ins: SendActivation) -> None:
        out = run.outputs[ins.micro_batch] if run.train else run.outputs.pop(ins.micro_batch)
        _comm.send_array(out.data, self._next, self.pp_group,
                        f"stage {self._layers.stage}'s output")

    def _recv_grad(self, run: _Run, ins: RecvGrad) -> None:
        out = run.outputs[ins.micro_batch]
        grad = backend_of(out.data).xp.empty(out.data.shape, dtype=out.data.dtype)
        _api.recv(grad, self._next, self.pp_group)
        run.grads_in[ins.micro_batch] = grad

    def _backward(self, run: _Run, ins: Backward) -> None:
        mb, layer = ins.micro_batch, self._layers
        out = run.outputs.pop(mb)
        if layer.is_last_stage:
            scaled = out * (1.0 / self.accumulate_steps)
            if run.scaler is not None:
                scaled = run.scaler.scale(scaled)
            scaled.backward()
        elif out.requires_grad:   # an output that depends on no parameter has nothing to do
            out.backward(run.grads_in.pop(mb))
        run.grads_in.pop(mb, None)
        if not layer.is_first_stage:
            x = run.received.pop(mb)
            g = x._grad
            run.grads_out[mb] = g if g is not None else backend_of(x.data).xp.zeros_like(x.data)

    def _send_grad(self, run: _Run, ins: SendGrad) -> None:
        grad = run.grads_out.pop(ins.micro_batch)
        _api.send(backend_of(grad).xp.ascontiguousarray(grad), self._prev, self.pp_group)

    def _reduce_grads(self, run: _Run, ins: ReduceGrads) -> None:
        if self.dp_group is not None and self.dp_group.size > 1:
            _comm.average_grads([p for p in self._layers.parameters() if p.requires_grad],
                               self.dp_group)

    def _optimizer_step(self, run: _Run, ins: OptimizerStep) -> None:
        if run.scaler is not None:
            run.scaler.step(run.optimizer)
            run.scaler.update()
        else:
            run.optimizer.step()
        run.optimizer.clear_grad()
        if run.lr_scheduler is not None:
            run.lr_scheduler.step()

"""PipelineParallel: run a PipelineLayer's stage through a schedule, micro-batch by micro-batch.

    dist.init_parallel_env()
    pipe = PipelineLayer(layers, num_stages=2, loss_fn=F.cross_entropy)
    model = PipelineParallel.from_world(pipe, dp_degree=2, micro_batch_size=4, accumulate_steps=8)
    opt = shoal.optimizer.SGD(0.1, parameters=model.parameters())
    loss = model.train_batch((x, y), opt)        # the same float on every rank

Each stage executes its schedule's instruction stream (schedule.py) through a dispatch table
{instruction type: method}. Activations go forward and gradients back over send/recv, each
direction between two adjacent stages over a group of its own (`_comm.Links`), so a send never
queues behind a receive of the other direction. Sends are asynchronous (at most
`_comm.SENDS_IN_FLIGHT` per link, all waited before the optimizer step and at the end of the
batch); the receives of the next activations and gradients are posted ahead
(`RECVS_AHEAD` per link) and waited when the instruction needing them runs, so data arrives
while the stage computes. The first activation of a batch travels with a small header (dtype
and shape; every micro-batch of the batch must match it), its gradient comes back in the same
shape. Every send/recv has the group's timeout: a dead or stuck stage ends in
CollectiveTimeoutError/PeerFailedError, not a hang.

Data parallel together with pipeline (Paddle's topology): world = num_stages * dp_degree,
rank = dp_index * num_stages + stage. Parameters of a stage are broadcast from the first rank
of its dp group at construction; after the schedule the stage's gradients are averaged over
the dp group, one fused all-reduce per dtype, before the optimizer step.
"""
from __future__ import annotations

import collections
import time

import numpy as np

from shoal.collective import _api
from shoal.collective.errors import GroupBrokenError, InvalidArgumentError
from shoal.collective.pipeline import _comm
from shoal.collective.pipeline._comm import Links
from shoal.collective.pipeline.layer import PipelineLayer
from shoal.collective.pipeline.schedule import (SCHEDULES, Backward, Forward, OptimizerStep,
                                                RecvActivation, RecvGrad, ReduceGrads,
                                                ScheduleMode, SendActivation, SendGrad,
                                                forward_only)
from shoal.kernels import backend_of
from shoal.worker import autograd
from shoal.worker.nn.layer import LayerWrapper
from shoal.worker.tensor import Tensor

_COMPUTE = ("Forward", "Backward")
RECVS_AHEAD = 2   # receives posted ahead per link (each holds a buffer of one activation)


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
        self.acts: collections.deque = collections.deque()   # RecvActivation's mbs to come
        self.grads: collections.deque = collections.deque()  # RecvGrad's mbs to come
        self.acts_posted = self.grads_posted = 0   # of those, how many are posted ahead


class PipelineParallel(LayerWrapper):
    """Train `pipeline_layer`'s stage in a pipeline of `pipeline_layer.num_stages` ranks.

    Args:
        pipeline_layer: this rank's PipelineLayer (its `stage` is this rank's rank in pp_group).
        micro_batch_size: samples per micro-batch.
        accumulate_steps: micro-batches per train_batch (a batch is their product).
        schedule_mode: "1F1B" (PipeDream-flush: at most num_stages - stage activations alive)
            or "FThenB" (GPipe: all forwards, then all backwards).
        pp_group: the pipeline's group, ranks in stage order (default: the world).
        dp_group: the stage's data-parallel group (default: none).
        links: the groups to the neighbouring stages, one per direction (`_comm.Links`; each
            holds exactly this rank and that neighbour). Default: when pp_group spans the
            whole world they are built here, with new_group (a collective over the world, as
            construction then is on every rank anyway); otherwise both directions share
            pp_group, in the schedule's order (sends still asynchronous, nothing received
            ahead: slower). from_world builds them for every pipeline.

    `parameters()`/`state_dict()` are this stage's; `forward` runs this stage's layers only
    (use train_batch/eval_batch to run the pipeline). After each train_batch `last_timeline`
    is {"stage", "wall_s", "compute_s", "instructions": [(name, micro_batch, t0, t1), ...]}
    (seconds from the batch's start; compute_s sums Forward and Backward, not the time spent
    waiting in recv), so the stage's bubble is 1 - compute_s / wall_s.

    Raises InvalidArgumentError for a bad argument or a pipeline_layer that does not fit the
    groups. Construction blocks until the link groups are built and the dp group's parameters
    are broadcast. Not thread-safe: one thread drives a PipelineParallel. After a batch failed
    inside the schedule (a timeout, a dead peer, a layer's error) messages of it may still be
    in flight: later batches raise GroupBrokenError (rebuild the groups and the model)."""

    def __init__(self, pipeline_layer: PipelineLayer, *, micro_batch_size: int,
                 accumulate_steps: int, schedule_mode="1F1B", pp_group=None, dp_group=None,
                 links: Links | None = None):
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
        self._connect(pp, links)
        object.__setattr__(self, "_failed", None)
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
        """Build the pp and dp groups of the world (rank = dp_index * num_stages + stage), the
        link groups of every pipeline (two per pair of adjacent stages: activations, gradients)
        and this rank's PipelineParallel. A collective: every rank of the world calls it, in the
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
        pipelines = [[d * pp + s for s in range(pp)] for d in range(dp_degree)]
        pp_groups = [_api.new_group(ranks, timeout=timeout) for ranks in pipelines]
        dp_groups = [_api.new_group([d * pp + s for d in range(dp_degree)], timeout=timeout)
                     for s in range(pp)] if dp_degree > 1 else [None] * pp
        pairs = _comm.build_links(pipelines, timeout)[dp_index * (pp - 1):(dp_index + 1) * (pp - 1)]
        links = Links(fwd_in=pairs[stage - 1][0] if stage > 0 else None,
                      bwd_out=pairs[stage - 1][1] if stage > 0 else None,
                      fwd_out=pairs[stage][0] if stage < pp - 1 else None,
                      bwd_in=pairs[stage][1] if stage < pp - 1 else None)
        return cls(pipeline_layer, micro_batch_size=micro_batch_size,
                   accumulate_steps=accumulate_steps, schedule_mode=schedule_mode,
                   pp_group=pp_groups[dp_index], dp_group=dp_groups[stage], links=links)

    def _connect(self, pp, links: Links | None) -> None:
        """The inboxes and outboxes to the neighbours, over `links` (checked) or built ones."""
        stage = self._layers.stage
        ahead = True
        if links is None and pp.size > 1:
            if pp.size == _api._world().size:
                pairs = _comm.build_links([pp.ranks])
                links = Links(fwd_in=pairs[stage - 1][0] if stage > 0 else None,
                              bwd_out=pairs[stage - 1][1] if stage > 0 else None,
                              fwd_out=pairs[stage][0] if stage < pp.size - 1 else None,
                              bwd_in=pairs[stage][1] if stage < pp.size - 1 else None)
            else:
                links, ahead = Links(pp, pp, pp, pp), False
        elif links is not None:
            if not isinstance(links, Links):
                raise InvalidArgumentError(f"PipelineParallel(links=...): expected a Links, got "
                                           f"{type(links).__name__}")
            me = pp.ranks[stage]
            for name, peer in (("fwd_in", self._prev), ("bwd_out", self._prev),
                               ("fwd_out", self._next), ("bwd_in", self._next)):
                g = getattr(links, name)
                want = None if peer is None else sorted([me, peer])
                if (g is None) != (want is None) or (g is not None and
                                                     (list(g.ranks) != want or g.rank < 0)):
                    expected = ("None (no neighbour there)" if want is None else
                                f"a group of ranks {want}")
                    raise InvalidArgumentError(
                        f"PipelineParallel(links.{name}): expected {expected} for stage "
                        f"{stage}, got {None if g is None else list(g.ranks)}")
            groups = [g for g in (links.fwd_in, links.bwd_out, links.fwd_out, links.bwd_in)
                      if g is not None]
            ahead = len({id(g) for g in groups}) == len(groups)
        prev, nxt = self._prev, self._next
        what = f"stage {stage}'s output"
        for name, value in (
                ("_ahead", ahead), ("_links", links),
                ("_act_in", None if prev is None else
                 _comm.ActivationReceiver(_comm.Inbox(links.fwd_in, prev))),
                ("_grad_out", None if prev is None else _comm.Outbox(links.bwd_out, prev)),
                ("_act_out", None if nxt is None else
                 _comm.ActivationSender(_comm.Outbox(links.fwd_out, nxt), what)),
                ("_grad_in", None if nxt is None else _comm.Inbox(links.bwd_in, nxt))):
            object.__setattr__(self, name, value)

    # -- the layer -----------------------------------------------------------------------
    def forward(self, x):
        """This stage's layers only (no communication)."""
        return self._layers(x)

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
        if self._failed is not None:
            raise GroupBrokenError(
                f"PipelineParallel (stage {self._layers.stage}): an earlier batch failed inside "
                f"the schedule ({self._failed}); its messages may still be in flight, so this "
                f"pipeline cannot run another batch: destroy_process_group(), init_parallel_env() "
                f"again and rebuild the PipelineParallel (or restart the job)")
        stream = list(stream)
        run.acts.extend(i.micro_batch for i in stream if isinstance(i, RecvActivation))
        run.grads.extend(i.micro_batch for i in stream if isinstance(i, RecvGrad))
        if self._act_out is not None:
            self._act_out.begin_batch()
        if self._act_in is not None:
            self._act_in.begin_batch(ahead=self._ahead and bool(run.acts))
        clock = time.perf_counter
        try:
            self._post_ahead(run)
            for ins in stream:
                t0 = clock()
                self._dispatch[type(ins)](run, ins)
                self._post_ahead(run)   # what this instruction made possible (time of its own)
                run.timeline.append((ins.name, getattr(ins, "micro_batch", None), t0 - start,
                                     clock() - start))
            self._drain()
        except BaseException as e:
            if self._layers.num_stages > 1:
                object.__setattr__(self, "_failed", f"{type(e).__name__}: {e}")
            raise

    def _post_ahead(self, run: _Run) -> None:
        """Post the receives of the next activations and gradients (at most RECVS_AHEAD per
        link, in the stream's order; a gradient once its micro-batch's output exists)."""
        if not self._ahead:
            return
        if self._act_in is not None:
            while run.acts_posted < min(len(run.acts), RECVS_AHEAD) and self._act_in.post():
                run.acts_posted += 1
        if self._grad_in is not None:
            while run.grads_posted < min(len(run.grads), RECVS_AHEAD):
                out = run.outputs.get(run.grads[run.grads_posted])
                if out is None:
                    break
                self._grad_in.post(backend_of(out.data).xp.empty(out.data.shape,
                                                                 dtype=out.data.dtype))
                run.grads_posted += 1

    def _drain(self) -> None:
        for box in (self._act_out and self._act_out.outbox, self._grad_out):
            if box is not None:
                box.drain()

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
        mb = run.acts.popleft()
        assert mb == ins.micro_batch, f"activation {mb} received for {ins}"
        run.acts_posted = max(run.acts_posted - 1, 0)
        array = self._act_in.take()
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
        self._act_out.send(out.data, ins.micro_batch)

    def _recv_grad(self, run: _Run, ins: RecvGrad) -> None:
        mb = run.grads.popleft()
        assert mb == ins.micro_batch, f"gradient {mb} received for {ins}"
        if run.grads_posted:
            run.grads_posted -= 1
        else:
            out = run.outputs[ins.micro_batch].data
            self._grad_in.post(backend_of(out).xp.empty(out.shape, dtype=out.dtype))
        run.grads_in[ins.micro_batch] = self._grad_in.take()

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
        self._grad_out.send(backend_of(grad).xp.ascontiguousarray(grad))

    def _reduce_grads(self, run: _Run, ins: ReduceGrads) -> None:
        if self.dp_group is not None and self.dp_group.size > 1:
            _comm.average_grads([p for p in self._layers.parameters() if p.requires_grad],
                               self.dp_group)

    def _optimizer_step(self, run: _Run, ins: OptimizerStep) -> None:
        self._drain()   # a failed send fails the batch before the update
        if run.scaler is not None:
            run.scaler.step(run.optimizer)
            run.scaler.update()
        else:
            run.optimizer.step()
        run.optimizer.clear_grad()
        if run.lr_scheduler is not None:
            run.lr_scheduler.step()

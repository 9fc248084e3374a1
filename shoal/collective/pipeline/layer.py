"""PipelineLayer: a list of layers cut into consecutive stages, of which a rank keeps one.

    layers = [nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4)]
    pipe = PipelineLayer(layers, num_stages=2, seg_method=[2], loss_fn=F.mse_loss)
    # stage 0 keeps layers[:2], stage 1 keeps layers[2:]

Every rank may build the whole model (the same seed on every rank gives every layer the same
initial weights as the unpipelined model); the PipelineLayer registers only its stage's layers,
so `parameters()`, `state_dict()` and an optimizer built from them see this stage's parameters
alone, named as in the full model (`"2.weight"` is layers[2]'s weight on whichever stage holds
it). The other stages' layers are not referenced, and are freed with the caller's list.
"""
from __future__ import annotations

from typing import Callable, Sequence

from shoal.collective import _api
from shoal.collective.errors import InvalidArgumentError, NotInitializedError
from shoal.worker.nn.layer import Layer
from shoal.worker.nn.layers import Sequential


def uniform_bounds(num_layers: int, num_stages: int) -> list[int]:
    """Stage boundaries [0, ..., num_layers] with sizes as even as possible; the extra layers
    go to the last stages, as in Paddle's SegmentLayers."""
    size, extra = divmod(num_layers, num_stages)
    bounds = [0]
    for s in range(num_stages):
        bounds.append(bounds[-1] + size + (1 if s >= num_stages - extra else 0))
    return bounds


def cut_bounds(cuts: Sequence[int], num_layers: int, num_stages: int) -> list[int]:
    """[0, *cuts, num_layers], after checking the cuts (num_stages - 1 strictly increasing
    indices in 1..num_layers-1); raises InvalidArgumentError naming the bad ones."""
    cuts = list(cuts)
    if len(cuts) != num_stages - 1:
        raise InvalidArgumentError(
            f"seg_method={cuts}: {num_stages} stages need {num_stages - 1} cut indices (where "
            f"stages 1..{num_stages - 1} start), got {len(cuts)}; e.g. [2] cuts two stages into "
            f"layers[:2] and layers[2:]")
    for c in cuts:
        if isinstance(c, bool) or not isinstance(c, int):
            raise InvalidArgumentError(f"seg_method={cuts}: cut {c!r} is not an int layer index")
    outside = [c for c in cuts if not 0 < c < num_layers]
    if outside:
        raise InvalidArgumentError(f"seg_method={cuts}: cut(s) {outside} out of range; a cut is a "
                                   f"layer index in 1..{num_layers - 1} ({num_layers} layers; "
                                   f"no stage may be empty)")
    bad = [(a, b) for a, b in zip(cuts, cuts[1:]) if b <= a]
    if bad:
        raise InvalidArgumentError(f"seg_method={cuts}: cuts must be strictly increasing; "
                                   f"{', '.join(f'{a} then {b}' for a, b in bad)} are not (a "
                                   f"repeated cut leaves a stage empty)")
    return [0, *cuts, num_layers]


class PipelineLayer(Layer):
    """This rank's stage of `layers` cut into `num_stages` consecutive stages.

    Args:
        layers: a list of Layers or a Sequential, applied in order (each to the previous
            one's output: one Tensor in, one Tensor out between stages).
        num_stages: the pipeline degree.
        seg_method: "uniform" (as even as possible by layer count) or the num_stages - 1 cut
            indices, e.g. [2]: layers[:2] | layers[2:].
        loss_fn: `loss_fn(output, label) -> one-element Tensor`, used by the last stage
            (required to train, and to evaluate with compute_loss).
        stage: this rank's stage; by default the world rank modulo num_stages (Paddle's
            topology: rank = dp_index * num_stages + stage), which needs init_parallel_env().

    Attributes: `stage`, `num_stages`, `bounds` (the num_stages + 1 boundaries), `loss_fn`,
    `is_first_stage`, `is_last_stage`.

    Raises InvalidArgumentError for a bad argument (what is wrong and the fix),
    NotInitializedError when `stage` is None before init_parallel_env()."""

    def __init__(self, layers, num_stages: int, seg_method="uniform",
                 loss_fn: Callable | None = None, *, stage: int | None = None):
        super().__init__()
        named = self._named(layers)
        if isinstance(num_stages, bool) or not isinstance(num_stages, int) or num_stages < 1:
            raise InvalidArgumentError(f"PipelineLayer(num_stages={num_stages!r}): give an int >= 1")
        if len(named) < num_stages:
            raise InvalidArgumentError(f"PipelineLayer: {len(named)} layer(s) cannot fill "
                                       f"{num_stages} stages (a stage needs at least one layer); "
                                       f"use fewer stages")
        if isinstance(seg_method, str):
            if seg_method != "uniform":
                raise InvalidArgumentError(f"seg_method={seg_method!r}: use 'uniform' or a list "
                                           f"of {num_stages - 1} cut indices")
            bounds = uniform_bounds(len(named), num_stages)
        elif isinstance(seg_method, (list, tuple)):
            bounds = cut_bounds(seg_method, len(named), num_stages)
        else:
            raise InvalidArgumentError(f"seg_method={seg_method!r}: use 'uniform' or a list of "
                                       f"{num_stages - 1} cut indices")
        if loss_fn is not None and not callable(loss_fn):
            raise InvalidArgumentError(f"loss_fn={loss_fn!r} is not callable; give "
                                       f"loss_fn(output, label) -> Tensor")
        stage = self._stage(stage, num_stages)
        object.__setattr__(self, "num_stages", num_stages)
        object.__setattr__(self, "stage", stage)
        object.__setattr__(self, "bounds", bounds)
        object.__setattr__(self, "loss_fn", loss_fn)
        for name, layer in named[bounds[stage]:bounds[stage + 1]]:
            self.add_sublayer(name, layer)

    @staticmethod
    def _named(layers) -> list[tuple[str, Layer]]:
        if isinstance(layers, Sequential):
            named = list(layers._sub_layers.items())
        elif isinstance(layers, (list, tuple)):
            named = [(str(i), layer) for i, layer in enumerate(layers)]
        else:
            raise InvalidArgumentError(f"PipelineLayer(layers): expected a list of Layers or a "
                                       f"Sequential, got {type(layers).__name__}")
        bad = [i for i, (_, layer) in enumerate(named) if not isinstance(layer, Layer)]
        if bad:
            raise InvalidArgumentError(f"PipelineLayer(layers): item(s) {bad} are not Layers "
                                       f"(wrap functions in a Layer subclass)")
        return named

    @staticmethod
    def _stage(stage, num_stages: int) -> int:
        if stage is None:
            if not _api.is_initialized():
                raise NotInitializedError("PipelineLayer(stage=None) takes the stage from the "
                                          "world rank: call init_parallel_env() first, or pass "
                                          "stage=")
            return _api.get_rank() % num_stages
        if isinstance(stage, bool) or not isinstance(stage, int) or not 0 <= stage < num_stages:
            raise InvalidArgumentError(f"PipelineLayer(stage={stage!r}): give a stage in "
                                       f"0..{num_stages - 1}")
        return stage

    @property
    def is_first_stage(self) -> bool:
        return self.stage == 0

    @property
    def is_last_stage(self) -> bool:
        return self.stage == self.num_stages - 1

    def segment(self, stage: int | None = None) -> tuple[int, int]:
        """(start, end) of `stage`'s layers (this rank's by default) in the full list."""
        s = self.stage if stage is None else stage
        return self.bounds[s], self.bounds[s + 1]

    def forward(self, x):
        """This stage's layers applied in order."""
        for layer in self._sub_layers.values():
            x = layer(x)
        return x

    def extra_repr(self) -> str:
        start, end = self.segment()
        return f"stage={self.stage}/{self.num_stages}, layers[{start}:{end}]"

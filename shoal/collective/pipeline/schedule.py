"""Pipeline schedules: pure generators of instructions, and a checker for a set of streams.

    for ins in one_f_one_b(stage=1, num_stages=2, micro_batches=4):
        table[type(ins)](ins)            # the executor's dispatch table (parallel.py)

A schedule never communicates: it says, per stage, in which order that stage receives, computes
and sends, and is unit-tested without processes (DeepSpeed's `PipeSchedule`). The first stage
has no RecvActivation/SendGrad (it reads the batch), the last no SendActivation/RecvGrad (its
Forward computes the loss, its Backward starts from it). Every training stream ends with
ReduceGrads (the data-parallel all-reduce; the executor skips it without a dp group) and
OptimizerStep.

Communication contract: the streams are deadlock-free even when every send blocks until its
receiver has posted the matching recv (Gloo's point-to-point does). Where two neighbours
exchange in both directions (1F1B's steady state), the lower stage sends first and the higher
stage receives first. `check_streams` verifies this for any set of streams.
"""
from __future__ import annotations

import dataclasses
import enum
from typing import Callable, Iterator, Sequence

from shoal.collective.errors import CollectiveError, InvalidArgumentError


class ScheduleError(CollectiveError):
    """A set of per-stage instruction streams would deadlock, mismatch or break a dependency."""


@dataclasses.dataclass(frozen=True)
class Instruction:
    """Base of the instructions; `micro_batch` is None for the once-per-batch ones."""

    @property
    def name(self) -> str:
        return type(self).__name__


@dataclasses.dataclass(frozen=True)
class _MicroBatchInstruction(Instruction):
    micro_batch: int


class RecvActivation(_MicroBatchInstruction):
    """Receive micro-batch `micro_batch`'s input activation from the previous stage."""


class Forward(_MicroBatchInstruction):
    """Run this stage's layers on the micro-batch (the last stage also computes its loss)."""


class SendActivation(_MicroBatchInstruction):
    """Send the micro-batch's output activation to the next stage."""


class RecvGrad(_MicroBatchInstruction):
    """Receive the gradient of the micro-batch's output from the next stage."""


class Backward(_MicroBatchInstruction):
    """Backpropagate the micro-batch through this stage (from the loss on the last stage)."""


class SendGrad(_MicroBatchInstruction):
    """Send the gradient of the micro-batch's input activation to the previous stage."""


@dataclasses.dataclass(frozen=True)
class ReduceGrads(Instruction):
    """Average the stage's gradients over its data-parallel group (a no-op without one)."""


@dataclasses.dataclass(frozen=True)
class OptimizerStep(Instruction):
    """Step the optimizer (through the scaler when there is one) and clear the gradients."""


# (instruction, the peer's offset, the instruction the peer must be at to match it)
_SENDS = {SendActivation: (+1, RecvActivation), SendGrad: (-1, RecvGrad)}
_RECVS = {RecvActivation: (-1, SendActivation), RecvGrad: (+1, SendGrad)}
COMMUNICATION = frozenset(_SENDS) | frozenset(_RECVS)


def _check_args(stage, num_stages, micro_batches, where: str) -> None:
    for name, value in (("stage", stage), ("num_stages", num_stages),
                        ("micro_batches", micro_batches)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise InvalidArgumentError(f"{where}({name}={value!r}): give an int")
    if num_stages < 1:
        raise InvalidArgumentError(f"{where}(num_stages={num_stages}): give at least 1 stage")
    if not 0 <= stage < num_stages:
        raise InvalidArgumentError(f"{where}(stage={stage}, num_stages={num_stages}): stage must "
                                   f"be in 0..{num_stages - 1}")
    if micro_batches < 1:
        raise InvalidArgumentError(f"{where}(micro_batches={micro_batches}): give at least 1 "
                                   f"micro-batch (accumulate_steps >= 1)")


def _forward(mb: int, first: bool, last: bool) -> Iterator[Instruction]:
    if not first:
        yield RecvActivation(mb)
    yield Forward(mb)
    if not last:
        yield SendActivation(mb)


def _backward(mb: int, first: bool, last: bool) -> Iterator[Instruction]:
    if not last:
        yield RecvGrad(mb)
    yield Backward(mb)
    if not first:
        yield SendGrad(mb)


def forward_only(stage: int, num_stages: int, micro_batches: int) -> Iterator[Instruction]:
    """Evaluation: every micro-batch forward through the pipeline, nothing else."""
    _check_args(stage, num_stages, micro_batches, "forward_only")
    first, last = stage == 0, stage == num_stages - 1
    for mb in range(micro_batches):
        yield from _forward(mb, first, last)


def fthenb(stage: int, num_stages: int, micro_batches: int) -> Iterator[Instruction]:
    """GPipe's order: every micro-batch forward, then every one backward (0 first).

    Keeps all `micro_batches` activations of the stage alive at once. Raises
    InvalidArgumentError for a stage outside 0..num_stages-1 or counts below 1."""
    _check_args(stage, num_stages, micro_batches, "fthenb")
    first, last = stage == 0, stage == num_stages - 1
    for mb in range(micro_batches):
        yield from _forward(mb, first, last)
    for mb in range(micro_batches):
        yield from _backward(mb, first, last)
    yield ReduceGrads()
    yield OptimizerStep()


def one_f_one_b(stage: int, num_stages: int, micro_batches: int) -> Iterator[Instruction]:
    """PipeDream-flush (Megatron's non-interleaved 1F1B): warm-up of
    min(num_stages - stage - 1, micro_batches) forwards, then one forward and one backward in
    turn, then the remaining backwards. At most num_stages - stage micro-batches are in flight.

    In the steady state the stage sends its activation before it receives the next stage's
    gradient, and receives the previous stage's next activation before it sends its gradient
    back, so blocking sends pair up (lower stage sends first). Raises InvalidArgumentError as
    `fthenb` does.

    Example (2 stages, 2 micro-batches, stage 0): F0 SendA0 F1 SendA1 RecvG0 B0 RecvG1 B1 ..."""
    _check_args(stage, num_stages, micro_batches, "one_f_one_b")
    first, last = stage == 0, stage == num_stages - 1
    warmup = min(num_stages - stage - 1, micro_batches)
    steady = micro_batches - warmup
    for mb in range(warmup):
        yield from _forward(mb, first, last)
    if steady and not first:
        yield RecvActivation(warmup)
    for i in range(steady):
        fwd, bwd = warmup + i, i
        yield Forward(fwd)
        if not last:
            yield SendActivation(fwd)
            yield RecvGrad(bwd)
        yield Backward(bwd)
        if not first:
            if i < steady - 1:
                yield RecvActivation(fwd + 1)
            yield SendGrad(bwd)
    for mb in range(steady, micro_batches):
        yield from _backward(mb, first, last)
    yield ReduceGrads()
    yield OptimizerStep()


class ScheduleMode(enum.Enum):
    """Paddle's `schedule_mode` names."""
    ONE_F_ONE_B = "1F1B"
    F_THEN_B = "FThenB"

    @classmethod
    def parse(cls, value) -> ScheduleMode:
        if isinstance(value, cls):
            return value
        for mode in cls:
            if isinstance(value, str) and value.lower() == mode.value.lower():
                return mode
        raise InvalidArgumentError(f"schedule_mode={value!r}: use one of "
                                   f"{[m.value for m in cls]}")


SCHEDULES: dict[ScheduleMode, Callable[[int, int, int], Iterator[Instruction]]] = {
    ScheduleMode.ONE_F_ONE_B: one_f_one_b,
    ScheduleMode.F_THEN_B: fthenb,
}


def streams(schedule: Callable[[int, int, int], Iterator[Instruction]], num_stages: int,
            micro_batches: int) -> list[list[Instruction]]:
    """Every stage's stream of `schedule`, as lists."""
    return [list(schedule(s, num_stages, micro_batches)) for s in range(num_stages)]


def in_flight(stream: Sequence[Instruction]) -> int:
    """The most micro-batches a stream holds activations for at once (Forward minus Backward)."""
    live = peak = 0
    for ins in stream:
        live += isinstance(ins, Forward) - isinstance(ins, Backward)
        peak = max(peak, live)
    return peak


def _check_dependencies(stage: int, num_stages: int, stream: Sequence[Instruction]) -> None:
    """Per stage: each step of a micro-batch once, and after the step it needs."""
    needs = {SendActivation: (Forward,), Backward: (Forward,), SendGrad: (Backward,),
             Forward: () if stage == 0 else (RecvActivation,)}
    if stage < num_stages - 1:
        needs[Backward] = (Forward, RecvGrad)
    seen: set = set()
    for pos, ins in enumerate(stream):
        if not isinstance(ins, _MicroBatchInstruction):
            continue
        key = (type(ins), ins.micro_batch)
        if key in seen:
            raise ScheduleError(f"stage {stage}, position {pos}: {ins} appears twice")
        seen.add(key)
        for need in needs.get(type(ins), ()):
            if (need, ins.micro_batch) not in seen:
                raise ScheduleError(f"stage {stage}, position {pos}: {ins} comes before "
                                    f"{need.__name__}({ins.micro_batch}), which it needs")


def check_streams(stage_streams: Sequence[Sequence[Instruction]]) -> None:
    """Raise ScheduleError unless the streams (stage 0 first) run to the end together.

    Simulates the strictest semantics: a send and its recv both block until the peer reaches
    the other (a rendezvous), channels are FIFO per (sender, receiver, kind). Checks that every
    send meets the recv of the same micro-batch (the same order on both sides), that no stage
    talks to a stage that does not exist, that nothing is left waiting (a deadlock: the message
    names every stage's blocked instruction), and each stage's own dependencies (Forward after
    its RecvActivation, SendActivation after its Forward, Backward after its Forward and
    RecvGrad, SendGrad after its Backward; each instruction once)."""
    p = len(stage_streams)
    lists = [list(s) for s in stage_streams]
    for s, stream in enumerate(lists):
        _check_dependencies(s, p, stream)
    pos = [0] * p

    def current(s):
        return lists[s][pos[s]] if pos[s] < len(lists[s]) else None

    moved = True
    while moved:
        moved = False
        for s in range(p):
            while (ins := current(s)) is not None and type(ins) not in COMMUNICATION:
                pos[s] += 1
                moved = True
            if ins is None:
                continue
            offset, partner = (_SENDS.get(type(ins)) or _RECVS[type(ins)])
            peer = s + offset
            if not 0 <= peer < p:
                raise ScheduleError(f"stage {s}, position {pos[s]}: {ins} needs stage {peer}, "
                                    f"which does not exist ({p} stages)")
            other = current(peer)
            if type(other) is partner:
                if other.micro_batch != ins.micro_batch:
                    raise ScheduleError(
                        f"stage {s} is at {ins} while stage {peer} is at {other}: the channel "
                        f"would deliver one micro-batch as another; both sides must send and "
                        f"receive in the same order")
                pos[s] += 1
                pos[peer] += 1
                moved = True
    stuck = [(s, current(s)) for s in range(p) if current(s) is not None]
    if stuck:
        raise ScheduleError("the streams deadlock: " + "; ".join(
            f"stage {s} waits at position {pos[s]} in {ins}" for s, ins in stuck))

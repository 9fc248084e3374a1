"""auto_cast: the per-op choice of float16 or float32 (Paddle's `paddle.amp.auto_cast`).

An op that takes part calls `amp_inputs(op_name, *inputs)` at its entry and runs on what it
gets back. Outside `auto_cast` that returns the inputs untouched (one thread-local read), so
the engine's dtype rules (two tensors of different dtypes raise DTypeError) hold as before.
Inside, by the op's list:

- white (matmul, linear): float32 inputs are cast to float16, the op computes in float16;
- black (softmax, log_softmax, the losses, sum, mean, layer_norm): float16 inputs are cast to
  float32, the op computes in float32;
- promote (the elementwise binary ops, comparisons): inputs that mix float16 and float32 are
  cast to float32 under O1 and to float16 under O2; inputs of one dtype are left alone.

Casts go through the differentiable `Cast` (`Tensor.astype`), so the gradient of a float32
parameter used by a float16 op comes back float32. float64 and integer inputs are never cast.
"""
from __future__ import annotations

import enum
import functools
import threading
from collections.abc import Iterable

import numpy as np

from shoal.worker.errors import AmpError

# matmul-like ops: float16 is fast there and their sums of products tolerate it
WHITE_LIST = frozenset({"matmul", "linear"})
# ops whose exp/log/long sums lose too much in float16, or overflow it
BLACK_LIST = frozenset({"softmax", "log_softmax", "cross_entropy",
                        "binary_cross_entropy_with_logits", "mse_loss", "sum", "mean",
                        "layer_norm"})
# hooked ops that just need their operands in one dtype
PROMOTE_LIST = frozenset({"add", "sub", "mul", "div", "pow", "maximum", "minimum"})
KNOWN_OPS = WHITE_LIST | BLACK_LIST | PROMOTE_LIST

_F16, _F32 = np.dtype("float16"), np.dtype("float32")
_AMP_FLOATS = (_F16, _F32)


class AmpLevel(enum.Enum):
    """O0: off. O1: white ops in float16, the rest as given. O2: everything in the parameters'
    dtype (float16 after `decorate`) except the black list."""
    O0 = "O0"
    O1 = "O1"
    O2 = "O2"


def parse_level(level, where: str) -> AmpLevel:
    """`level` ("O0", "O1", "O2" or an AmpLevel) as an AmpLevel; anything else raises AmpError."""
    try:
        return level if isinstance(level, AmpLevel) else AmpLevel(str(level).upper())
    except ValueError:
        raise AmpError(f"{where}: level={level!r} is not one of "
                       f"{[lv.value for lv in AmpLevel]}; use 'O1' or 'O2'") from None


def parse_dtype(dtype, where: str) -> np.dtype:
    """The low-precision dtype: float16 only (numpy and cupy have no bfloat16)."""
    name = str(getattr(dtype, "name", dtype)).lower()
    if name in ("bfloat16", "bf16"):
        raise AmpError(f"{where}: dtype='bfloat16' is not available: the numpy and cupy backends "
                       f"have no bfloat16 dtype, only float16; pass dtype='float16'")
    if name not in ("float16", "fp16", "half"):
        raise AmpError(f"{where}: dtype={dtype!r} is not a low-precision float dtype; pass "
                       f"dtype='float16'")
    return _F16


def white_list() -> frozenset:
    """The ops auto_cast runs in float16 by default."""
    return WHITE_LIST


def black_list() -> frozenset:
    """The ops auto_cast runs in float32 by default."""
    return BLACK_LIST


def _names(names, what: str) -> frozenset:
    if names is None:
        return frozenset()
    if isinstance(names, str):
        names = [names]
    if not isinstance(names, Iterable):
        raise AmpError(f"auto_cast: {what}={names!r} is not a list of op names")
    out = frozenset(names)
    unknown = sorted(str(n) for n in out if n not in KNOWN_OPS)
    if unknown:
        raise AmpError(f"auto_cast: {what} names {unknown}, which auto_cast does not know; the "
                       f"ops it casts are {sorted(KNOWN_OPS)}")
    return out


class _Policy:
    """The lists and level of one auto_cast block (immutable once built)."""

    __slots__ = ("level", "white", "black")

    def __init__(self, level: AmpLevel, white: frozenset, black: frozenset):
        self.level, self.white, self.black = level, white, black

    def cast(self, op: str, inputs: tuple) -> tuple:
        if op in self.black:
            target = _F32
        elif op in self.white:
            target = _F16
        else:
            kinds = {t.dtype for t in inputs if hasattr(t, "_ctx") and t.dtype in _AMP_FLOATS}
            if len(kinds) < 2:
                return inputs
            target = _F16 if self.level is AmpLevel.O2 else _F32
        # only Tensors (not raw arrays or numbers) have `_ctx`; their astype is the graph's Cast
        return tuple(t.astype(target) if hasattr(t, "_ctx") and t.dtype in _AMP_FLOATS
                     and t.dtype != target else t for t in inputs)


_local = threading.local()


def amp_inputs(op: str, *inputs) -> tuple:
    """`inputs` as op `op` should compute on them under the current auto_cast (unchanged
    outside one). Items that are not float16/float32 Tensors (None, numbers, arrays, int
    tensors) pass through as they are. Thread-local: other threads are not affected."""
    policy = getattr(_local, "policy", None)
    if policy is None:
        return inputs
    return policy.cast(op, inputs)


def amp_level() -> AmpLevel:
    """The level in force on this thread (O0 outside auto_cast)."""
    policy = getattr(_local, "policy", None)
    return AmpLevel.O0 if policy is None else policy.level


class auto_cast:
    """Run the ops inside in mixed precision (a context manager, or a decorator).

    Args:
        enable: False runs the block as if auto_cast were not there.
        custom_white_list: op names to run in float16 (moved off the black list).
        custom_black_list: op names to run in float32 (moved off the white list).
        level: "O1" (white ops in float16) or "O2" (everything but the black list in the
            parameters' dtype; use with `decorate`); "O0" is off.
        dtype: "float16"; "bfloat16" raises (the numpy and cupy backends have none).

    Raises AmpError for an op name auto_cast does not know (the message lists the known
    ones), a name in both custom lists, a bad level or dtype. The setting is per thread and
    blocks nest (the inner one wins until it exits).

        with shoal.amp.auto_cast():
            loss = F.cross_entropy(model(x), y)   # linear in float16, the loss in float32
    """

    def __init__(self, enable: bool = True, custom_white_list=None, custom_black_list=None,
                 level: str = "O1", dtype: str = "float16"):
        lv = parse_level(level, "auto_cast")
        parse_dtype(dtype, "auto_cast")
        white = _names(custom_white_list, "custom_white_list")
        black = _names(custom_black_list, "custom_black_list")
        both = sorted(white & black)
        if both:
            raise AmpError(f"auto_cast: {both} are in both custom_white_list and "
                           f"custom_black_list; put each op in one of them")
        if not enable or lv is AmpLevel.O0:
            self._policy = None
        else:
            self._policy = _Policy(lv, (WHITE_LIST - black) | white, (BLACK_LIST - white) | black)
        self._saved = threading.local()   # per thread: one object may be entered by several

    def __enter__(self) -> auto_cast:
        self._saved.__dict__.setdefault("stack", []).append(getattr(_local, "policy", None))
        _local.policy = self._policy
        return self

    def __exit__(self, *exc) -> None:
        _local.policy = self._saved.stack.pop()

    def __call__(self, fn):
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            with self:
                return fn(*args, **kwargs)
        return wrapper


class _PolicyScope:
    """Reinstates one auto_cast policy (None: off) for a block; reusable and nestable."""

    def __init__(self, policy):
        self._policy, self._saved = policy, threading.local()

    def __enter__(self):
        self._saved.__dict__.setdefault("stack", []).append(getattr(_local, "policy", None))
        _local.policy = self._policy
        return self

    def __exit__(self, *exc) -> None:
        _local.policy = self._saved.stack.pop()


def capture_policy() -> _PolicyScope:
    """The auto_cast policy in force on this thread, as a scope that reinstates it (recompute
    runs a segment's second forward under it: usually outside the auto_cast block the first
    one ran in, and it must cast exactly as that one did or its gradients change dtype)."""
    return _PolicyScope(getattr(_local, "policy", None))


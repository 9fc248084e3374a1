"""decorate: models in float16 and optimizers with float32 master weights (Paddle's
`paddle.amp.decorate`)."""
from __future__ import annotations

import collections

import numpy as np

from shoal.worker.amp._autocast import AmpLevel, parse_dtype, parse_level
from shoal.worker.amp._scaler import base_optimizer
from shoal.worker.errors import AmpError

_F32 = np.dtype("float32")
_SAVE_DTYPES = frozenset(np.dtype(d) for d in ("float16", "float32", "float64"))


def _as_list(obj, what: str, kind) -> tuple[list, bool]:
    if isinstance(obj, (list, tuple)):
        items, single = list(obj), False
    else:
        items, single = [obj], True
    for i, o in enumerate(items):
        if not kind(o):
            raise AmpError(f"decorate: {what}[{i}] is a {type(o).__name__}; expected "
                           f"{'a Layer' if what == 'models' else 'an Optimizer'} or a list of them")
    return items, single


def _keeps_float32(layer) -> bool:
    # the engine's norm layers: their statistics and affine terms stay float32, as in Paddle
    from shoal.worker.nn.layers import LayerNorm
    return isinstance(layer, LayerNorm)


def _cast_model(model, dtype: np.dtype, masters: dict) -> None:
    for layer in model.sublayers(include_self=True):
        if _keeps_float32(layer):
            continue
        for p in layer._parameters.values():
            if p is None or p.dtype.kind != "f" or p.dtype == dtype:
                continue
            for st in masters.get(id(p), ()):
                st.setdefault("master", p.data.astype(_F32))  # state made before decorate
            p.data = p.data.astype(dtype)
            p._grad = None


def _with_save_dtype(model, save_dtype: np.dtype) -> None:
    own = type(model).state_dict

    def state_dict():
        out = collections.OrderedDict()
        for k, t in own(model).items():
            out[k] = t.astype(save_dtype).detach() if t.dtype.kind == "f" else t
        return out
    state_dict.__doc__ = own.__doc__
    object.__setattr__(model, "state_dict", state_dict)


def decorate(models, optimizers=None, level: str = "O2", dtype: str = "float16",
             master_weight: bool | None = None, save_dtype=None):
    """Prepare models and optimizers for `auto_cast(level=...)`.

    O1 changes nothing. O2 casts the float parameters of every layer to `dtype` in place (the
    Parameter objects stay the same, so optimizers built over them keep working), except
    those of LayerNorm layers, which stay float32; and turns on `multi_precision` in the
    optimizers (unless `master_weight=False`): each float16 parameter gets a float32 master
    copy that the update runs on. Call it before DataParallel (which buckets by dtype).

    Args:
        models: a Layer or a list of Layers.
        optimizers: an Optimizer (or a wrapper of one, e.g. TransformedOptimizer), a list of
            them, or None.
        level: "O1" or "O2".
        dtype: "float16" (numpy and cupy have no bfloat16).
        master_weight: keep float32 master weights (None: yes under O2).
        save_dtype: float16/float32/float64: `model.state_dict()` returns its floats in it.

    Returns:
        `models` when `optimizers` is None, else `(models, optimizers)`, each a single object
        or a list as given.

    Raises AmpError for a bad level, dtype, save_dtype or argument type.

        model, opt = shoal.amp.decorate(model, opt, level="O2")
    """
    from shoal.worker.nn.layer import Layer
    from shoal.worker.optim.optimizer import Optimizer
    lv = parse_level(level, "decorate")
    low = parse_dtype(dtype, "decorate")
    if save_dtype is not None:
        try:
            save = np.dtype(save_dtype)
        except TypeError as e:
            raise AmpError(f"decorate: save_dtype={save_dtype!r} is not a dtype; give one of "
                           f"{sorted(str(d) for d in _SAVE_DTYPES)}") from e
        if save not in _SAVE_DTYPES:
            raise AmpError(f"decorate: save_dtype={save_dtype!r} is not one of "
                           f"{sorted(str(d) for d in _SAVE_DTYPES)}")
    model_list, single_model = _as_list(models, "models", lambda m: isinstance(m, Layer))
    opt_list, single_opt = ([], True) if optimizers is None else _as_list(
        optimizers, "optimizers", lambda o: isinstance(base_optimizer(o, "decorate"), Optimizer))
    if lv is AmpLevel.O2:
        bases = [base_optimizer(o, "decorate") for o in opt_list]
        keep_master = master_weight is None or bool(master_weight)
        masters: dict[int, list] = {}
        for opt in bases:
            opt.multi_precision = keep_master
            if keep_master:
                for p in opt._params:
                    if id(p) in opt._state:
                        masters.setdefault(id(p), []).append(opt._state[id(p)])
        for m in model_list:
            _cast_model(m, low, masters)
    if save_dtype is not None:
        for m in model_list:
            _with_save_dtype(m, save)
    out_models = model_list[0] if single_model else model_list
    if optimizers is None:
        return out_models
    return out_models, (opt_list[0] if single_opt else opt_list)

"""The base of every strategy model: strict, closed, validated on assignment, with errors that are
StrategyErrors (never a bare pydantic traceback)."""
from __future__ import annotations

from collections.abc import Mapping

import pydantic
from pydantic import ConfigDict

from shoal.configs._report import strategy_error, unknown_key
from shoal.configs.errors import StrategyError


class ConfigModel(pydantic.BaseModel):
    """A node of the strategy tree.

    Unknown keys are rejected (extra="forbid"); values are checked strictly (YAML `"100"` is not
    an integer, `yes` is not a number) and on every assignment. Assigning a mapping to a
    sub-config field updates the keys it names and keeps the others, as Paddle's
    `strategy.a_sync_configs = {"k_steps": 100}` does. A failed assignment leaves the model
    unchanged and raises StrategyError, as does a constructor call with bad fields.
    """

    model_config = ConfigDict(extra="forbid", validate_assignment=True, strict=True,
                              allow_inf_nan=False)

    def __init__(self, **data):
        try:
            super().__init__(**data)
        except pydantic.ValidationError as e:
            raise strategy_error(e, type(self)) from e

    # Only the user's own call goes through the wrapper above: without this mark pydantic would
    # also call it to build every nested model (pydantic's RootModel marks its __init__ alike).
    __init__.__pydantic_base_init__ = True

    def __setattr__(self, name: str, value) -> None:
        if name not in type(self).model_fields and not name.startswith("_"):
            raise StrategyError(f"{type(self).__name__}: {unknown_key(type(self), name)}")
        current = self.__dict__.get(name)
        if isinstance(value, Mapping) and isinstance(current, ConfigModel):
            value = {**explicit_dict(current), **value}
        saved_fields_set = set(self.__pydantic_fields_set__)
        try:
            super().__setattr__(name, value)
        except pydantic.ValidationError as e:
            # an after-validator runs once the value is stored: put the old one back
            self.__dict__[name] = current
            object.__setattr__(self, "__pydantic_fields_set__", saved_fields_set)
            raise strategy_error(e, type(self), prefix=()) from e


def explicit_dict(model: pydantic.BaseModel) -> dict:
    """The fields that were set or differ from their defaults, recursively (what a YAML file needs
    to rebuild `model`, and which per-table override fields win over the default block)."""
    out = {}
    for name, field in type(model).model_fields.items():
        value = getattr(model, name)
        chosen = name in model.model_fields_set
        if isinstance(value, pydantic.BaseModel):
            sub = explicit_dict(value)
            if sub or chosen:
                out[name] = sub
        elif isinstance(value, dict) and any(isinstance(v, pydantic.BaseModel) for v in value.values()):
            out[name] = {k: explicit_dict(v) for k, v in value.items()}
        elif chosen or value != field.get_default(call_default_factory=True):
            out[name] = list(value) if isinstance(value, tuple) else value
    return out

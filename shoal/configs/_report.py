"""Turn a pydantic ValidationError into one StrategyError: every problem with its dotted path,
its file and line when it came from YAML, the valid choices, a suggestion, and what was wrong."""
from __future__ import annotations

import difflib
import types
import typing
from collections.abc import Mapping

import pydantic

from shoal.configs.errors import StrategyError

_YAML_TYPE = {str: "string", int: "integer", float: "number", bool: "boolean", dict: "mapping",
              list: "list", tuple: "list", type(None): "null"}


def dotted(loc) -> str:
    """('amp_configs', 'custom_white_list', 0) -> 'amp_configs.custom_white_list[0]'."""
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _unwrap(tp):
    while True:
        origin = typing.get_origin(tp)
        if origin is typing.Annotated:
            tp = typing.get_args(tp)[0]
        elif origin in (typing.Union, types.UnionType):
            args = [a for a in typing.get_args(tp) if a is not type(None)]
            if len(args) != 1:
                return tp
            tp = args[0]
        else:
            return tp


def _is_model(tp) -> bool:
    return isinstance(tp, type) and issubclass(tp, pydantic.BaseModel)


def resolve(root: type, loc) -> tuple[type | None, object]:
    """Walk `loc` through the schema: (model class holding the last key, that key's annotation).

    The annotation is None when the last key is not a field (an unknown key)."""
    owner, tp = None, root
    for part in loc:
        tp = _unwrap(tp)
        if _is_model(tp):
            if part not in tp.model_fields:
                return tp, None
            owner, tp = tp, tp.model_fields[part].annotation
        elif typing.get_origin(tp) is dict:
            owner, tp = None, typing.get_args(tp)[1]
        elif typing.get_origin(tp) in (list, tuple):
            owner, tp = None, typing.get_args(tp)[0]
        else:
            return None, None
    return owner, _unwrap(tp)


def type_name(tp) -> str:
    """A schema annotation in YAML words: 'integer', 'list of string', 'number or null'."""
    if tp is None:
        return "value"
    origin = typing.get_origin(tp)
    if origin is typing.Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(type_name(a) for a in typing.get_args(tp))
    if origin is typing.Annotated:
        return type_name(typing.get_args(tp)[0])
    if origin is list:
        return f"list of {type_name(typing.get_args(tp)[0])}"
    if origin is tuple:
        args = typing.get_args(tp)
        return f"list of {len(args)} {type_name(args[0])}s" if args else "list"
    if origin is dict:
        return f"mapping of name to {type_name(typing.get_args(tp)[1])}"
    if _is_model(tp):
        return f"mapping ({tp.__name__})"
    return _YAML_TYPE.get(tp, getattr(tp, "__name__", str(tp)))


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _suggest(word, choices) -> str:
    close = difflib.get_close_matches(str(word), [str(c) for c in choices], n=1, cutoff=0.6)
    return f"; did you mean {close[0]!r}?" if close else ""


def unknown_key(owner: type | None, key) -> str:
    """'unknown key ...; valid keys of Owner are: ...; did you mean ...?'"""
    names = list(owner.model_fields) if owner is not None else []
    valid = f"; valid keys of {owner.__name__} are: {', '.join(names)}" if names else ""
    return f"unknown key {key!r}{valid}{_suggest(key, names)}"


def _problem(err: Mapping, root: type, prefix: tuple) -> tuple[tuple, str]:
    """(loc relative to the YAML root, text) of one pydantic error."""
    kind, loc, value = err["type"], tuple(err["loc"]), err.get("input")
    ctx = err.get("ctx") or {}
    if kind == "extra_forbidden":
        return prefix + loc, unknown_key(resolve(root, loc)[0], loc[-1])
    if "at" in ctx:       # a model validator pointing at the field it is about
        return prefix + tuple(ctx["at"].split(".")), err["msg"]
    _, tp = resolve(root, loc)
    if kind == "literal_error":
        choices = typing.get_args(tp) if typing.get_origin(tp) is typing.Literal else ()
        listed = ", ".join(repr(c) for c in choices) if choices else ctx.get("expected", "")
        return prefix + loc, f"{_short(value)} is not a valid choice; choose one of {listed}" + (
            _suggest(value, choices) if isinstance(value, str) else "")
    if kind == "value_error":
        return prefix + loc, err["msg"].removeprefix("Value error, ")
    if kind.endswith("_type") or kind.endswith("_parsing") or kind in ("model_attributes_type",):
        got = _YAML_TYPE.get(type(value), type(value).__name__)
        return prefix + loc, (f"expected {type_name(tp)}, got {got} {_short(value)}"
                              if not _is_model(type(value)) else f"expected {type_name(tp)}")
    if kind == "missing":
        return prefix + loc, f"required key is missing (a {type_name(tp)})"
    return prefix + loc, f"{_short(value)} is not allowed: {err['msg']}"


def strategy_error(e: pydantic.ValidationError, root: type, *, source: str | None = None,
                   marks: Mapping | None = None, prefix: tuple = (),
                   error: type[StrategyError] = StrategyError) -> StrategyError:
    """One StrategyError listing every error of `e` (raise it `from e`).

    `root` is the model class that was validated, `prefix` the path of that model inside the
    YAML document (empty for a whole strategy), `marks` the {key path: line} of the document.
    """
    marks = marks or {}
    found = []
    for err in e.errors(include_url=False):
        loc, text = _problem(err, root, prefix)
        line = next((marks[loc[:n]] for n in range(len(loc), 0, -1) if loc[:n] in marks), None)
        where = ", ".join(x for x in (source, f"line {line}" if line else None) if x)
        path = dotted(loc) or "(top level)"
        found.append((line or 0, f"{path} ({where}): {text}" if where else f"{path}: {text}"))
    problems = [text for _, text in sorted(found, key=lambda x: x[0])]   # in file order
    n = len(problems)
    head = f"{source}: " if source else ""
    message = (f"{head}invalid {root.__name__} ({n} problem{'s' if n > 1 else ''}):\n  - "
               + "\n  - ".join(problems))
    return error(message, problems)

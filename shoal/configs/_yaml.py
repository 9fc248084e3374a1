"""YAML in and out for strategies: safe loading with the line of every key, duplicate-key and
syntax errors with their line, and YAML 1.2 floats (`1e-4`) read as numbers."""
from __future__ import annotations

import re

import yaml

from shoal.configs.errors import StrategyError

KeyPath = tuple  # a key path: ('a_sync_configs', 'k_steps') or ('amp_configs', 'custom_white_list', 0)


class _Loader(yaml.SafeLoader):
    """SafeLoader that also reads `1e-4` / `3E5` as floats: PyYAML follows YAML 1.1, which needs
    a dot in the mantissa, and would hand a string to a float field."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"))


def _where(source: str, mark) -> str:
    return f"{source}, line {mark.line + 1}" if mark is not None else source


def load(text: str, source: str) -> tuple[object, dict[KeyPath, int]]:
    """Parse one YAML document: (data, {key path: 1-based line of the key}).

    An empty document is None. Raises StrategyError for a syntax error, several documents,
    or a key repeated in one mapping (each with its line).
    """
    loader = _Loader(text)
    try:
        try:
            node = loader.get_single_node()
        except yaml.MarkedYAMLError as e:
            what = " ".join(x for x in (e.context, e.problem) if x)
            raise StrategyError(f"{_where(source, e.problem_mark)}: YAML syntax error: {what}; "
                                f"fix the YAML there") from e
        except yaml.YAMLError as e:
            raise StrategyError(f"{source}: YAML error: {e}") from e
        if node is None:
            return None, {}
        marks: dict[KeyPath, int] = {}
        _walk(loader, node, (), marks, source, set())
        try:
            data = loader.construct_document(node)
        except yaml.MarkedYAMLError as e:
            raise StrategyError(f"{_where(source, e.problem_mark)}: cannot read this YAML value: "
                                f"{e.problem}") from e
        return data, marks
    finally:
        loader.dispose()


def _walk(loader, node, path: KeyPath, marks: dict, source: str, seen: set) -> None:
    if id(node) in seen:   # an alias of a node already walked (anchors may repeat, not recurse)
        return
    seen.add(id(node))
    if isinstance(node, yaml.MappingNode):
        first: dict = {}
        for key_node, value_node in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            try:
                key = loader.construct_object(key_node, deep=True)
            except yaml.YAMLError:
                continue   # construct_document reports it with its mark
            try:
                hash(key)
            except TypeError:
                raise StrategyError(f"{_where(source, key_node.start_mark)}: a mapping key must be a "
                                    f"plain value, got a {type(key).__name__}") from None
            line = key_node.start_mark.line + 1
            if key in first:
                dotted = ".".join(str(p) for p in path + (key,))
                raise StrategyError(f"{source}, line {line}: duplicate key {dotted!r} (first given at "
                                    f"line {first[key]}); keep one of them")
            first[key] = line
            marks[path + (key,)] = line
            _walk(loader, value_node, path + (key,), marks, source, seen)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            marks[path + (i,)] = item.start_mark.line + 1
            _walk(loader, item, path + (i,), marks, source, seen)


def dump(data: dict) -> str:
    """Block-style YAML in the schema's field order (tuples written as lists)."""
    return yaml.safe_dump(_plain(data), sort_keys=False, default_flow_style=False, allow_unicode=True)


def _plain(x):
    if isinstance(x, dict):
        return {k: _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    return x

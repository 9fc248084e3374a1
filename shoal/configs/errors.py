"""Errors of the configuration layer: the strategy schema, its YAML, presets, the environment contract."""
from __future__ import annotations

from shoal.errors import ShoalError


class ConfigError(ShoalError, ValueError):
    """Base class of configuration errors.

    `problems` holds one line per thing that was wrong (the message lists them
    all), so a caller can show them one by one.
    """

    def __init__(self, message: str, problems: tuple[str, ...] | list[str] = ()):
        super().__init__(message)
        self.problems = tuple(problems) or (message,)


class StrategyError(ConfigError):
    """A DistributedStrategy that does not validate: unknown keys, wrong types, bad values,
    contradicting fields, or YAML that does not parse (each problem names its dotted path and,
    when it came from YAML, the file and line)."""


class PresetError(StrategyError):
    """`DistributedStrategy.load(name)` got neither a known preset name nor a YAML file."""


class ContractError(ConfigError):
    """The process environment names some contract variables (TRAINING_ROLE, PADDLE_*, SHOAL_*)
    but not all that its role needs, or some are malformed; every bad variable is named."""

    def __init__(self, message: str, problems: tuple[str, ...] | list[str] = (),
                 variables: tuple[str, ...] | list[str] = ()):
        super().__init__(message, problems)
        self.variables = tuple(variables)

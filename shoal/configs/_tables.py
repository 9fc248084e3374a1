"""Sparse table settings: a default block plus per-table overrides, merged field by field.

The fields mirror shoal.ps.spec.SparseTableSpec (Paddle's CtrCommonAccessor and sparse_sgd_rule
defaults); `TableConfig.spec_fields()` gives that spec's keyword arguments. The valid rule and
entry names are Literal types here and registries in ps/; a test checks that the two agree.
"""
from __future__ import annotations

from typing import Annotated, Literal

import pydantic
from pydantic import BeforeValidator, Field, field_validator, model_validator

from shoal.configs._base import ConfigModel, explicit_dict
from shoal.configs.errors import StrategyError

SparseRuleName = Literal["naive", "adagrad", "std_adagrad", "adam"]
EntryName = Literal["none", "count_filter", "probability", "show_click"]
StorageName = Literal["memory", "ssd"]
EvictionName = Literal["unseen_days", "lfu"]

# YAML has no tuples: accept [min, max] as a list and keep it as a tuple
_Bounds = Annotated[tuple[float, float],
                    BeforeValidator(lambda v: tuple(v) if isinstance(v, list) else v)]


class AccessorConfig(ConfigModel):
    """Show/click statistics and the scores that drive admission of embedx, saving and shrinking
    (Paddle's CtrCommonAccessor)."""

    nonclk_coeff: float = Field(0.1, ge=0, description="weight of a show without a click in the score")
    click_coeff: float = Field(1.0, ge=0, description="weight of a click in the score")
    base_threshold: float = Field(1.5, ge=0, description="score a row needs to be saved (save modes 1, 2)")
    delta_threshold: float = Field(0.25, ge=0, description="delta score a row needs to be in a delta save")
    delta_keep_days: float = Field(16.0, ge=0, description="a delta save skips rows unseen for longer")
    show_click_decay_rate: float = Field(0.98, gt=0, le=1, description="show/click multiplier per day tick")
    delete_threshold: float = Field(0.8, ge=0, description="shrink deletes rows whose score is below this")
    delete_after_unseen_days: float = Field(30.0, ge=0, description="shrink deletes rows unseen for longer")
    embedx_threshold: float | None = Field(
        None, ge=0, description="with a value: a row is 1-wide embed_w until its score reaches this, "
                                "then grows its embedx (Paddle's split layout; needs dim >= 2)")
    scale_by_show: bool = Field(True, description="divide a pushed gradient by its show count")


class RuleConfig(ConfigModel):
    """The server-side optimizer rule applied to pushed sparse gradients (Paddle's sparse_sgd_rule)."""

    name: SparseRuleName = Field("adagrad", description="the rule")
    learning_rate: float = Field(0.05, ge=0, description="step size")
    initial_g2sum: float = Field(3.0, ge=0, description="adagrad, std_adagrad: initial g2sum")
    initial_range: float = Field(1e-4, ge=0, description="new rows start uniform in "
                                                         "[-initial_range, initial_range]")
    weight_bounds: _Bounds = Field((-10.0, 10.0), description="[min, max] every weight is clipped to")
    beta1: float = Field(0.9, ge=0, lt=1, description="adam: first-moment decay")
    beta2: float = Field(0.999, ge=0, lt=1, description="adam: second-moment decay")
    epsilon: float = Field(1e-8, ge=0, description="added to the denominator")

    @field_validator("weight_bounds")
    @classmethod
    def _ordered(cls, v):
        if not v[0] < v[1]:
            raise ValueError(f"weight_bounds={list(v)}: min must be below max; write [min, max], "
                             f"e.g. [-10.0, 10.0]")
        return v


class EntryConfig(ConfigModel):
    """Admission: when a key seen in training becomes a stored row."""

    name: EntryName = Field("none", description="none: every key; count_filter: after `count` sightings; "
                                                "probability: with `probability` per sighting; "
                                                "show_click: once its score reaches `threshold`")
    count: int = Field(1, ge=1, description="count_filter: sightings before admission")
    probability: float = Field(1.0, gt=0, le=1, description="probability: chance of admission per sighting")
    threshold: float = Field(0.0, ge=0, description="show_click: score a pending key must reach")


class TierConfig(ConfigModel):
    """Where rows live: all in RAM (no budget), or hot rows in RAM under `memory_budget_mb` and the
    rest in `storage` (Paddle's SSDSparseTable)."""

    storage: StorageName = Field("memory", description="the tier for rows past the budget: memory "
                                                       "(a compact RAM store) or ssd (RocksDB)")
    memory_budget_mb: float | None = Field(None, gt=0, description="RAM for hot rows per server, "
                                           "key index included; None keeps every row in RAM")
    ssd_path: str | None = Field(None, min_length=1, description="storage ssd: RocksDB directory; "
                                 "server i uses <ssd_path>/server-<i> (required: there is no default)")
    eviction: EvictionName = Field("unseen_days", description="coldest first: unseen_days (then "
                                   "lowest score), or lfu (fewest shows)")

    def problem(self) -> str | None:
        """What makes these settings unusable, or None. Checked on a table's merged settings (an
        override may name storage: ssd and take the budget and path from the default block)."""
        if self.storage == "ssd" and self.ssd_path is None:
            return ("tier.storage='ssd' needs tier.ssd_path, a directory for RocksDB (each server "
                    "uses <ssd_path>/server-<index>)")
        if self.storage == "ssd" and self.memory_budget_mb is None:
            return ("tier.storage='ssd' spills rows past a RAM budget: set tier.memory_budget_mb "
                    "(MiB per server)")
        return None


class TableConfig(ConfigModel):
    """Settings of one sparse table (or of the default block every unnamed table gets)."""

    dim: int | None = Field(None, ge=1, description="row width; optional, and when set it must match "
                                                    "the layer's embedding dim")
    accessor: AccessorConfig = Field(default_factory=AccessorConfig, description="show/click statistics")
    rule: RuleConfig = Field(default_factory=RuleConfig, description="server-side optimizer rule")
    entry: EntryConfig = Field(default_factory=EntryConfig, description="admission policy")
    shards: int = Field(4, ge=1, le=256, description="lock-separated shards inside one server")
    seed: int = Field(0, ge=0, lt=2 ** 63, description="seed of the rows' deterministic initial values")
    tier: TierConfig = Field(default_factory=TierConfig, description="RAM budget and SSD spill")

    @model_validator(mode="after")
    def _split_needs_two_columns(self):
        if self.accessor.embedx_threshold is not None and self.dim is not None and self.dim < 2:
            raise ValueError(f"dim={self.dim} with accessor.embedx_threshold="
                             f"{self.accessor.embedx_threshold}: the split embed_w/embedx layout "
                             f"needs dim >= 2; raise dim or drop embedx_threshold")
        return self

    def spec_fields(self) -> dict:
        """The keyword arguments of shoal.ps.spec.SparseTableSpec but name and dim, flattened.

        Example: `SparseTableSpec(name="user", dim=8, **strategy.table_config("user").spec_fields())`.
        """
        a, r, e, t = self.accessor, self.rule, self.entry, self.tier
        return dict(
            rule=r.name, learning_rate=r.learning_rate, initial_g2sum=r.initial_g2sum,
            initial_range=r.initial_range, weight_bounds=tuple(r.weight_bounds), beta1=r.beta1,
            beta2=r.beta2, epsilon=r.epsilon,
            scale_by_show=a.scale_by_show, embedx_threshold=a.embedx_threshold,
            nonclk_coeff=a.nonclk_coeff, click_coeff=a.click_coeff, base_threshold=a.base_threshold,
            delta_threshold=a.delta_threshold, delta_keep_days=a.delta_keep_days,
            show_click_decay_rate=a.show_click_decay_rate, delete_threshold=a.delete_threshold,
            delete_after_unseen_days=a.delete_after_unseen_days,
            entry=e.name, entry_count=e.count, entry_probability=e.probability,
            entry_threshold=e.threshold,
            seed=self.seed, shards=self.shards,
            storage=t.storage, memory_budget_mb=t.memory_budget_mb, ssd_path=t.ssd_path,
            eviction=t.eviction)


class SparseTableSettings(ConfigModel):
    """`default` applies to every sparse table; `tables` overrides it per table name, field by
    field: only the keys an override names win, so overriding `rule.learning_rate` keeps the
    default block's rule name, bounds and everything else."""

    default: TableConfig = Field(default_factory=TableConfig, description="settings of every table")
    tables: dict[str, TableConfig] = Field(default_factory=dict,
                                           description="per-table overrides, by table name")

    @field_validator("tables")
    @classmethod
    def _names(cls, tables):
        for name in tables:
            if name == "" or "/" in name:
                raise ValueError(f"table name {name!r} is invalid: give a non-empty name without '/' "
                                 f"(checkpoints use it as a separator)")
        return tables

    @model_validator(mode="after")
    def _overrides_merge(self):
        problem = self.default.tier.problem()
        if problem:
            raise ValueError(f"default: {problem}")
        for name in self.tables:
            problem = self.merged(name).tier.problem()  # a merge can make an invalid table: say so now
            if problem:
                raise ValueError(f"table {name!r}: {problem}")
        return self

    def merged(self, name: str) -> TableConfig:
        """The settings of table `name`: its override (if any) merged onto `default`.

        Raises StrategyError when the merged fields make an invalid table."""
        override = self.tables.get(name)
        if override is None:
            return self.default.model_copy(deep=True)
        try:
            return TableConfig.model_validate(_merge(self.default, explicit_dict(override)))
        except pydantic.ValidationError as e:
            raise StrategyError(f"table {name!r}: its override merged onto the default block is invalid: "
                             + "; ".join(f"{'.'.join(map(str, x['loc']))}: {x['msg']}"
                                         for x in e.errors(include_url=False))) from None


def _merge(base: pydantic.BaseModel, explicit: dict) -> dict:
    """`base` as a dict with the fields in `explicit` (an override's explicit_dict) replacing its
    own, recursively."""
    out = {}
    for name in type(base).model_fields:
        b = getattr(base, name)
        if name not in explicit:
            out[name] = b.model_dump() if isinstance(b, pydantic.BaseModel) else b
        elif isinstance(b, pydantic.BaseModel):
            out[name] = _merge(b, explicit[name])
        else:
            out[name] = explicit[name]
    return out

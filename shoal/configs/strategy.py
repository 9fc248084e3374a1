"""DistributedStrategy: every strategy of a job as one tree of typed models, read from YAML.

Field names and defaults are Paddle 2.0's (`paddle.distributed.fleet.DistributedStrategy`), so
`strategy.a_sync = False` or `strategy.a_sync_configs = {"k_steps": 100}` read as they do there.
Every problem in a YAML file is reported at once with its dotted path, file and line:

    >>> DistributedStrategy.from_yaml("a_sync_configs:\\n  k_stepz: 100\\n")
    StrategyError: YAML text: invalid DistributedStrategy (1 problem):
      - a_sync_configs.k_stepz (YAML text, line 2): unknown key 'k_stepz'; valid keys of
        AsyncConfig are: k_steps, ...; did you mean 'k_steps'?
"""
from __future__ import annotations

import difflib
import enum
import os
from importlib import resources
from pathlib import Path

import pydantic
from pydantic import Field, model_validator
from pydantic_core import PydanticCustomError

from shoal.configs import _composition, _yaml
from shoal.configs._base import ConfigModel, explicit_dict
from shoal.configs._collective import (AmpConfig, GradientMergeConfig, LambConfig, LarsConfig,
                                       LocalSGDConfig, PipelineConfig, RecomputeConfig,
                                       ShardingConfig)
from shoal.configs._report import dotted, strategy_error
from shoal.configs._tables import SparseTableSettings, TableConfig
from shoal.configs.errors import PresetError, StrategyError


class CommMode(enum.Enum):
    """How workers exchange sparse and dense gradients with the servers."""

    SYNC = "sync"              # push, then wait on a barrier every step
    ASYNC = "async"            # a background thread merges and sends; no barrier
    HALF_ASYNC = "half_async"  # async sends, with a barrier per step
    GEO = "geo"                # train a local copy k steps, then push deltas and pull
    PASS = "pass"              # train a whole pass against a worker-side copy, then write it back


class AsyncConfig(ConfigModel):
    """The communicator of parameter-server training (Paddle's a_sync_configs)."""

    k_steps: int = Field(-1, description="> 0: GEO mode, pushing deltas every k_steps; <= 0: async")
    max_merge_var_num: int = Field(1, ge=1, description="gradients merged into one send")
    send_queue_size: int = Field(16, ge=1, description="gradients queued per variable before a send blocks")
    independent_recv_thread: bool = Field(False, description="pull parameters on a thread of their own")
    min_send_grad_num_before_recv: int = Field(1, description="sends between two receives")
    thread_pool_size: int = Field(1, ge=1, description="threads that send")
    send_wait_times: int = Field(1, description="waits for more gradients before sending a partial merge")
    runtime_split_send_recv: bool = Field(False, description="split variables over servers at run time")
    launch_barrier: bool = Field(True, description="workers wait until every server is up")
    lr_decay_steps: int = Field(10, description="GEO/async: steps between learning-rate syncs")
    use_ps_gpu: bool = Field(False, description="pass mode: train a whole pass (fleet.train_pass) "
                                                "against a worker-side copy of its rows, in GPU "
                                                "memory (cupy) when there is one")
    pass_timeout: float = Field(3600.0, gt=0, le=86400,
                                description="Shoal's own: pass mode: seconds a worker waits at the "
                                            "end of a pass for the other workers' write-backs "
                                            "(a pass can be an epoch; servers are checked for "
                                            "liveness every RPC timeout meanwhile)")
    half_async: bool = Field(False, description="Shoal's own: async sends with a barrier per step "
                                                "(needs a_sync: true and k_steps <= 0)")


def _mode_conflicts(a_sync: bool, cfg: AsyncConfig) -> list[tuple[str, str]]:
    """(message, dotted path it is about) for each contradiction among the mode fields."""
    out = []
    if cfg.half_async and not a_sync:
        out.append(("a_sync_configs.half_async=true contradicts a_sync=false (sync mode): half-async "
                    "is an asynchronous mode; set a_sync: true, or drop half_async for sync training",
                    "a_sync_configs.half_async"))
    if cfg.half_async and cfg.k_steps > 0:
        out.append((f"a_sync_configs.half_async=true contradicts a_sync_configs.k_steps={cfg.k_steps} "
                    f"(GEO mode): set k_steps <= 0 for half-async, or half_async: false for GEO",
                    "a_sync_configs.half_async"))
    if cfg.use_ps_gpu and cfg.half_async:
        out.append(("a_sync_configs.use_ps_gpu=true (pass mode) contradicts "
                    "a_sync_configs.half_async=true: choose one of the two modes",
                    "a_sync_configs.use_ps_gpu"))
    if cfg.use_ps_gpu and cfg.k_steps > 0:
        out.append((f"a_sync_configs.use_ps_gpu=true (pass mode) contradicts "
                    f"a_sync_configs.k_steps={cfg.k_steps} (GEO mode): set k_steps <= 0 for pass "
                    f"mode, or use_ps_gpu: false for GEO", "a_sync_configs.use_ps_gpu"))
    return out


class DistributedStrategy(ConfigModel):
    """Every strategy of a job. Parameter-server training reads a_sync, a_sync_configs and
    sparse_table; collective training the switches below, each with its `*_configs` group.

    Build one in code (`DistributedStrategy(a_sync=False)`), from YAML (`from_yaml`), from a
    mapping (`from_dict`) or from a preset or file (`load("ps_geo")`). Invalid input raises
    StrategyError listing every problem; assignments are validated too.
    """

    a_sync: bool = Field(True, description="false: sync; true: async, half-async or GEO "
                                           "(see communicator_mode)")
    a_sync_configs: AsyncConfig = Field(default_factory=AsyncConfig, description="the PS communicator")
    sparse_table: SparseTableSettings = Field(default_factory=SparseTableSettings,
                                              description="sparse table settings: default and per table")

    amp: bool = Field(False, description="automatic mixed precision")
    amp_configs: AmpConfig = Field(default_factory=AmpConfig)
    recompute: bool = Field(False, description="recompute activations in backward")
    recompute_configs: RecomputeConfig = Field(default_factory=RecomputeConfig)
    gradient_merge: bool = Field(False, description="merge gradients over k steps")
    gradient_merge_configs: GradientMergeConfig = Field(default_factory=GradientMergeConfig)
    sharding: bool = Field(False, description="ZeRO sharding of optimizer state / gradients")
    sharding_configs: ShardingConfig = Field(default_factory=ShardingConfig)
    pipeline: bool = Field(False, description="pipeline parallelism")
    pipeline_configs: PipelineConfig = Field(default_factory=PipelineConfig)
    lars: bool = Field(False, description="LARS (wraps Momentum)")
    lars_configs: LarsConfig = Field(default_factory=LarsConfig)
    lamb: bool = Field(False, description="LAMB (wraps Adam)")
    lamb_configs: LambConfig = Field(default_factory=LambConfig)
    localsgd: bool = Field(False, description="local SGD")
    localsgd_configs: LocalSGDConfig = Field(default_factory=LocalSGDConfig)
    fuse_all_reduce_ops: bool = Field(True, description="all-reduce gradients in fused buckets")
    fuse_grad_size_in_MB: int = Field(32, gt=0, description="size of one fused all-reduce bucket")

    @model_validator(mode="after")
    def _consistent(self):
        conflicts = _mode_conflicts(self.a_sync, self.a_sync_configs)
        if conflicts:
            message, at = conflicts[0]
            raise PydanticCustomError("contradiction", message, {"at": at})
        enabled = {name for name in _composition.OPTIMIZER_ORDER + _composition.MODEL_ORDER
                   if getattr(self, name)}
        clashes = _composition.conflicts(enabled)
        if clashes:
            message, at = clashes[0]
            if len(clashes) > 1:
                message += "; and " + "; and ".join(m for m, _ in clashes[1:])
            raise PydanticCustomError("contradiction", message, {"at": at})
        return self

    @property
    def communicator_mode(self) -> CommMode:
        """PASS with a_sync_configs.use_ps_gpu (either a_sync); else SYNC when a_sync is false;
        else HALF_ASYNC with a_sync_configs.half_async, GEO with a_sync_configs.k_steps > 0,
        ASYNC otherwise. Raises StrategyError on a contradiction (possible after an in-place
        edit of a_sync_configs)."""
        conflicts = _mode_conflicts(self.a_sync, self.a_sync_configs)
        if conflicts:
            raise StrategyError(conflicts[0][0], [m for m, _ in conflicts])
        if self.a_sync_configs.use_ps_gpu:
            return CommMode.PASS
        if not self.a_sync:
            return CommMode.SYNC
        if self.a_sync_configs.half_async:
            return CommMode.HALF_ASYNC
        return CommMode.GEO if self.a_sync_configs.k_steps > 0 else CommMode.ASYNC

    def table_config(self, name: str) -> TableConfig:
        """The settings of sparse table `name`: `sparse_table.tables[name]` merged onto
        `sparse_table.default` (only the fields the override sets win, group by group); the
        default block alone for a table without an override. Returns a new TableConfig."""
        return self.sparse_table.merged(name)

    # --- input and output -------------------------------------------------------------------

    @classmethod
    def from_dict(cls, data, *, source: str | None = None) -> DistributedStrategy:
        """Validate a mapping of fields (nested mappings for the groups).

        Raises StrategyError listing every problem by dotted path."""
        return cls._validate(data, source=source, marks={})

    def to_dict(self, *, full: bool = False) -> dict:
        """The fields that were set or differ from their defaults (`full=True`: every field,
        with each table override written as its complete merged settings).
        `from_dict(s.to_dict(...))` rebuilds an equivalent strategy."""
        if not full:
            return explicit_dict(self)
        out = self.model_dump(mode="json")
        out["sparse_table"]["tables"] = {n: self.table_config(n).model_dump(mode="json")
                                         for n in self.sparse_table.tables}
        return out

    @classmethod
    def from_yaml(cls, path_or_text: str | os.PathLike) -> DistributedStrategy:
        """Read a strategy from a YAML file or YAML text.

        A Path, or a one-line str that ends in .yaml/.yml or names an existing file, is a file;
        any other str is YAML text. An empty document is the default strategy. Raises
        StrategyError for an unreadable file, bad YAML, a top level that is not a mapping, a
        duplicate key, or invalid fields (each with its file and line)."""
        if _is_path(path_or_text):
            path = Path(path_or_text)
            try:
                text = path.read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as e:
                raise StrategyError(f"cannot read strategy file {str(path)!r}: {e}") from e
            return cls._from_text(text, str(path))
        return cls._from_text(str(path_or_text), "YAML text")

    def to_yaml(self, *, full: bool = False) -> str:
        """YAML of `to_dict(full=full)`; `from_yaml(s.to_yaml()) == s`."""
        return _yaml.dump(self.to_dict(full=full))

    @classmethod
    def load(cls, name_or_path: str | os.PathLike) -> DistributedStrategy:
        """A preset by name (see `presets()`), or a YAML file by path.

        Raises PresetError when `name_or_path` is neither, listing the presets."""
        if isinstance(name_or_path, str) and name_or_path in presets():
            text = (resources.files(__package__) / "presets" / f"{name_or_path}.yaml").read_text("utf-8")
            return cls._from_text(text, f"preset {name_or_path!r}")
        if Path(name_or_path).is_file():
            return cls.from_yaml(Path(name_or_path))
        names = presets()
        close = difflib.get_close_matches(str(name_or_path), names, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise PresetError(f"{str(name_or_path)!r} is neither a strategy preset nor a YAML file: give "
                          f"one of the presets {', '.join(names)} or the path of a YAML file{hint}")

    def diff(self, other: DistributedStrategy) -> list[str]:
        """Dotted paths of the fields whose values differ between the two strategies (tables
        compared by their merged settings), e.g. ['a_sync', 'a_sync_configs.k_steps']."""
        return _diff(self.to_dict(full=True), other.to_dict(full=True), ())

    @classmethod
    def _from_text(cls, text: str, source: str) -> DistributedStrategy:
        data, marks = _yaml.load(text, source)
        if data is None:
            data = {}
        if not isinstance(data, dict):
            kind = {list: "a list", str: "a string"}.get(type(data), f"a {type(data).__name__}")
            raise StrategyError(f"{source}: the top level must be a mapping of DistributedStrategy "
                                f"fields (a_sync: true, a_sync_configs: ...), got {kind}")
        return cls._validate(data, source=source, marks=marks)

    @classmethod
    def _validate(cls, data, *, source, marks) -> DistributedStrategy:
        try:
            return cls.model_validate(data)
        except pydantic.ValidationError as e:
            raise strategy_error(e, cls, source=source, marks=marks) from e


def presets() -> list[str]:
    """Names of the strategy presets shipped with Shoal (shoal/configs/presets/*.yaml)."""
    folder = resources.files(__package__) / "presets"
    return sorted(p.name[:-5] for p in folder.iterdir() if p.name.endswith(".yaml"))


def _is_path(x) -> bool:
    if isinstance(x, os.PathLike):
        return True
    return (isinstance(x, str) and "\n" not in x
            and (x.endswith((".yaml", ".yml")) or os.path.isfile(x)))


def _diff(a, b, path: tuple) -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for key in list(a) + [k for k in b if k not in a]:
            if key not in a or key not in b:
                out.append(dotted(path + (key,)))
            else:
                out.extend(_diff(a[key], b[key], path + (key,)))
        return out
    return [] if a == b else [dotted(path)]

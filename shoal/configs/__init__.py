"""Configuration, the bottom layer every part of Shoal may import (it imports only shoal.errors).

- `DistributedStrategy`: every strategy of a job as a tree of typed models, read from YAML
  (`from_yaml`, `load("ps_geo")`) with errors that name the dotted path, file and line.
- The environment contract (`ClusterEnv.detect()`, `WorkerEnv`, `ServerEnv`): what `fleetrun`
  puts in each process's environment, written and read in one place.
"""
from shoal.configs._collective import (AmpConfig, GradientMergeConfig, LambConfig, LarsConfig,
                                       LocalSGDConfig, PipelineConfig, RecomputeConfig,
                                       ShardingConfig)
from shoal.configs._tables import (AccessorConfig, EntryConfig, EntryName, RuleConfig,
                                   SparseRuleName, SparseTableSettings, TableConfig)
from shoal.configs.cluster import (CONTRACT_VARIABLES, Auth, ClusterEnv, Role, ServerEnv, WorkerEnv,
                                   parse_endpoint)
from shoal.configs.errors import ConfigError, ContractError, PresetError, StrategyError
from shoal.configs.strategy import AsyncConfig, CommMode, DistributedStrategy, presets

__all__ = [
    "DistributedStrategy", "CommMode", "AsyncConfig", "presets",
    "SparseTableSettings", "TableConfig", "AccessorConfig", "RuleConfig", "EntryConfig",
    "SparseRuleName", "EntryName",
    "AmpConfig", "RecomputeConfig", "GradientMergeConfig", "ShardingConfig", "PipelineConfig",
    "LarsConfig", "LambConfig", "LocalSGDConfig",
    "ClusterEnv", "WorkerEnv", "ServerEnv", "Role", "Auth", "CONTRACT_VARIABLES", "parse_endpoint",
    "ConfigError", "StrategyError", "PresetError", "ContractError",
]

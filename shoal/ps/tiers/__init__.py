"""Storage tiers of the sparse table: where a shard's cold rows go once its RAM budget is spent.

`memory` keeps them in a compact RAM arena, `ssd` in RocksDB. A shard with
`memory_budget_mb` keeps its hot rows in its arena and the rest in the tier
its spec's `storage` names (see shoal.ps.tiers.tiered).
"""
from shoal.ps.tiers._base import StorageTier, make_tier, register_tier, tier_names
from shoal.ps.tiers.memory import MemoryTier
from shoal.ps.tiers.ssd import SsdTier

__all__ = ["StorageTier", "make_tier", "register_tier", "tier_names", "MemoryTier", "SsdTier"]

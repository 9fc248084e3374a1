"""ZeRO sharding over Shoal's collectives (Paddle's DygraphShardingOptimizer / GroupShardedStage2).

    import shoal.collective as dist
    dist.init_parallel_env()
    sg, dg = dist.sharding_groups(2)           # 2 ranks a shard; data parallel across groups
    model = dist.ShardedDataParallel(net, stage=2, group=sg, dp_group=dg)
    opt = dist.ShardingOptimizer(shoal.optimizer.Adam(1e-3, parameters=model.parameters()), model)
    loss_fn(model(x), y).backward(); opt.step(); opt.clear_grad()

Stage 1 shards the optimizer state (each rank updates the parameters it owns, then they are
broadcast by their owners); stage 2 also shards the gradients (reduced to their owners during
backward, a rank keeping only its own).
`ShardedDataParallel.from_config(net, strategy.sharding_configs)` builds the groups from a
strategy. `held_bytes(model, optimizer)` reports what a rank holds, for
DataParallel too.
"""
from shoal.collective.sharding._memory import held_bytes
from shoal.collective.sharding._model import ShardedDataParallel, sharding_groups
from shoal.collective.sharding._optimizer import ShardingOptimizer

__all__ = ["ShardedDataParallel", "ShardingOptimizer", "sharding_groups", "held_bytes"]

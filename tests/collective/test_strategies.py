"""fleet's collective strategies against their baselines: LARS/LAMB swaps against hand-written
numpy, LocalSGD's averaging schedule, and the composition rules of shoal.configs._composition."""
import numpy as np
import pytest

from shoal.configs import DistributedStrategy, StrategyError, presets
from shoal.configs._composition import INCOMPATIBLE, MODEL_ORDER, OPTIMIZER_ORDER
from shoal.launcher._spawn import spawn
from tests.collective import strategy_ranks

pytest.importorskip("shoal.collective._gloo", reason="the Gloo binding is not built (libgloo-dev)")


def _params(out: dict) -> dict:
    return {k: v for k, v in out.items() if "." in k}


@pytest.mark.parametrize("kind,inner", [("lars", "Lars"), ("lamb", "Lamb")])
def test_lars_and_lamb_replace_the_optimizer_and_match_numpy(kind, inner):
    ref = strategy_ranks.swapped_reference(kind, steps=3)
    results = spawn(strategy_ranks.swapped, (kind, 3), nprocs=2, timeout=120)
    for out in results:
        assert out["inner"] == inner
        for k, v in ref.items():
            np.testing.assert_allclose(out[k], v, rtol=2e-5, atol=2e-6, err_msg=k)


@pytest.mark.parametrize("kind,want", [("lars", "Momentum"), ("lamb", "Adam")])
def test_lars_and_lamb_refuse_another_optimizer(kind, want):
    message, = spawn(strategy_ranks.wrong_optimizer, (kind,), nprocs=1, timeout=60)
    assert f"strategy.{kind}" in message and want in message and "got SGD" in message


def test_localsgd_averages_every_k_steps_after_begin_step():
    k, begin, steps = 3, 2, 7
    ref = strategy_ranks.local_sgd_reference(k, begin, steps)
    r0, r1 = spawn(strategy_ranks.local_sgd, (k, begin, steps), nprocs=2, timeout=120)
    for s in range(1, steps + 1):
        a, b = r0[s - 1], r1[s - 1]
        synced = s < begin or (s - begin + 1) % k == 0
        # step 1 all-reduces gradients; the local steps after it do not
        assert (a["grad_reductions"] > 0) == (s < begin), s
        same = all(np.array_equal(a[n], b[n]) for n in _params(a))
        assert same == synced, f"step {s}: replicas {'differ' if synced else 'agree'}"
        for rank, out in enumerate((a, b)):
            for n, v in ref[s - 1][rank].items():
                np.testing.assert_allclose(out[n], v, rtol=2e-5, atol=2e-6,
                                           err_msg=f"step {s} rank {rank} {n}")


def test_localsgd_every_step_with_sgd_equals_data_parallel():
    ref = strategy_ranks.local_sgd_reference(1, 1, 3)
    dp = strategy_ranks.local_sgd_reference(1, 10, 3)   # begin after the end: plain DP
    for s in range(3):
        for n in ref[s][0]:
            np.testing.assert_allclose(ref[s][0][n], dp[s][0][n], rtol=1e-5, atol=1e-6)
    r0, _ = spawn(strategy_ranks.local_sgd, (1, 1, 3), nprocs=2, timeout=120)
    for n in ref[2][0]:
        np.testing.assert_allclose(r0[2][n], dp[2][0][n], rtol=2e-5, atol=2e-6, err_msg=n)


@pytest.mark.parametrize("pair", sorted(INCOMPATIBLE))
def test_each_incompatible_pair_is_refused_naming_both_fields(pair):
    a, b = pair
    fields = {a: True, b: True}
    if "recompute" in fields:
        fields["recompute_configs"] = {"checkpoints": ["x"]}
    with pytest.raises(StrategyError) as e:
        DistributedStrategy(**fields)
    assert f"{a}=true" in str(e.value) and f"{b}=true" in str(e.value)


def test_the_order_lists_every_collective_strategy_once():
    strategies = {"recompute", "amp", "pipeline", "sharding", "lars", "lamb", "gradient_merge",
                  "localsgd"}
    assert set(MODEL_ORDER) | set(OPTIMIZER_ORDER) == strategies
    assert len(set(OPTIMIZER_ORDER)) == len(OPTIMIZER_ORDER)
    # amp unscales a merged gradient once; sharding updates after amp decided to step
    assert OPTIMIZER_ORDER.index("gradient_merge") < OPTIMIZER_ORDER.index("amp") \
        < OPTIMIZER_ORDER.index("sharding") < OPTIMIZER_ORDER.index("localsgd")


def test_recompute_without_checkpoints_is_refused():
    with pytest.raises(StrategyError, match="recompute_configs.checkpoints"):
        DistributedStrategy(recompute=True)


def test_collective_presets_load_and_switch_on_their_strategy():
    wanted = {"sharding_stage1": "sharding", "sharding_stage2": "sharding",
              "pipeline_1f1b": "pipeline", "pipeline_fthenb": "pipeline", "amp_o1": "amp",
              "amp_o2": "amp", "recompute": "recompute", "lars": "lars", "lamb": "lamb",
              "localsgd": "localsgd", "gradient_merge": "gradient_merge"}
    assert set(wanted) <= set(presets())
    for name, field in wanted.items():
        s = DistributedStrategy.load(name)
        assert getattr(s, field), name
    assert DistributedStrategy.load("sharding_stage2").sharding_configs.stage == 2
    assert DistributedStrategy.load("pipeline_fthenb").pipeline_configs.schedule_mode == "FThenB"
    assert DistributedStrategy.load("amp_o2").amp_configs.use_pure_fp16

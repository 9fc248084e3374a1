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


def test_recompute_without_checkpoints_is_refused_when_applied():
    import shoal.nn as nn
    from shoal.fleet._strategies import Wiring, wrap_model
    from shoal.fleet.errors import FleetError
    s = DistributedStrategy()
    s.recompute = True                       # Paddle's order: the switch, then the configs
    s.recompute_configs = {"checkpoints": ["0"]}
    with pytest.raises(FleetError, match="recompute_configs.checkpoints is empty"):
        wrap_model(Wiring(DistributedStrategy(recompute=True), 1), nn.Sequential(nn.Linear(2, 2)))


def test_every_clash_is_reported_at_once():
    with pytest.raises(StrategyError) as e:
        DistributedStrategy(pipeline=True, sharding=True, gradient_merge=True)
    text = str(e.value)
    assert "pipeline=true contradicts sharding=true" in text
    assert "pipeline=true contradicts gradient_merge=true" in text


def test_amp_with_pipeline_needs_a_pipeline_layer():
    import shoal.nn as nn
    from shoal.fleet._strategies import Wiring, wrap_model
    from shoal.fleet.errors import FleetError
    with pytest.raises(FleetError, match="needs a PipelineLayer"):
        wrap_model(Wiring(DistributedStrategy(amp=True, pipeline=True), 2), nn.Linear(2, 2))


def test_an_overflow_is_skipped_and_training_goes_on():
    r0, r1 = spawn(strategy_ranks.amp_overflow, nprocs=2, timeout=120)
    for out in (r0, r1):
        assert out["skipped"] == 1                       # only the step with the inf
        assert out["applied"] == [True, False, True, True, True]
        assert out["scale"] < out["scale0"]
    for k in _params(r0):
        np.testing.assert_array_equal(r0[k], r1[k], err_msg=k)
        assert np.isfinite(r0[k]).all()


def test_localsgd_under_amp_o2_averages_the_master_weights():
    r0, r1 = spawn(strategy_ranks.localsgd_o2, nprocs=2, timeout=120)
    assert r0["masters"] and r0["masters"].keys() == r1["masters"].keys()
    for k in r0["masters"]:   # averaged every step: the masters the next update uses agree
        np.testing.assert_array_equal(r0["masters"][k], r1["masters"][k], err_msg=k)
    for k in _params(r0):
        np.testing.assert_array_equal(r0[k], r1[k], err_msg=k)


def test_swaps_refuse_settings_they_cannot_honour():
    for kind, kw, needle in [("lars", {"use_nesterov": True}, "use_nesterov"),
                             ("lars", {"weight_decay": 0.01}, "lars_configs.lars_weight_decay"),
                             ("lamb", {"weight_decay": 0.01}, "lamb_configs.lamb_weight_decay")]:
        message, = spawn(strategy_ranks.swap_refused, (kind, kw), nprocs=1, timeout=60)
        assert needle in message, message


def test_an_equal_strategy_given_again_to_distributed_optimizer_is_accepted():
    out, = spawn(strategy_ranks.same_strategy_twice, nprocs=1, timeout=60)
    assert out == "ok", out


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


def test_a_transformed_optimizers_state_loads_only_into_the_same_chain():
    import shoal
    import shoal.nn as nn
    from shoal.collective import TransformedOptimizer, gradient_merge
    from shoal.collective.localsgd import localsgd
    from shoal.worker.errors import StateDictError

    def chain(*transforms):
        layer = nn.Linear(3, 2)
        return TransformedOptimizer(shoal.optimizer.Adam(0.1, parameters=layer.parameters()),
                                    list(transforms))
    a = chain(gradient_merge(2))
    a._transforms[0].count = 5
    state = a.state_dict()
    b = chain(gradient_merge(2))
    b.set_state_dict(state)
    assert b._transforms[0].count == 5
    c = chain(gradient_merge(2), localsgd(2))
    with pytest.raises(StateDictError, match="gradient_merge"):
        c.set_state_dict(state)
    assert c._transforms[0].count == 0                 # nothing changed
    d = chain(gradient_merge(2))
    bad = dict(state, num_params=7)                    # the inner optimizer refuses it
    with pytest.raises(StateDictError):
        d.set_state_dict(bad)
    assert d._transforms[0].count == 0

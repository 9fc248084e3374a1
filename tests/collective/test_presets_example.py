"""Every collective preset runs examples/mlp_dp.py on 2 ranks (as `fleetrun --nproc_per_node 2
--strategy <preset>` starts it), learns the task, and ends with the wrappers it asks for."""
from __future__ import annotations

import pytest

from shoal.configs import DistributedStrategy, presets
from shoal.launcher._spawn import spawn
from tests.collective.test_mlp_dp_example import run_example

pytest.importorskip("shoal.collective._gloo", reason="the Gloo binding is not built (libgloo-dev)")

ARGS = ["--steps", "30", "--log-every", "30", "--samples", "4000", "--test-samples", "1024"]
# preset -> (the model wrapper, the optimizer fleet's chain ends in)
WANTED = {
    "collective_dp": ("DataParallel", "Adam"),
    "sharding_stage1": ("ShardedDataParallel", "ShardingOptimizer"),
    "sharding_stage2": ("ShardedDataParallel", "ShardingOptimizer"),
    "amp_o1": ("DataParallel", "Adam"),
    "amp_o2": ("DataParallel", "Adam"),
    "recompute": ("DataParallel", "Adam"),
    "gradient_merge": ("DataParallel", "Adam"),
    "localsgd": ("DataParallel", "Adam"),
    "lars": ("DataParallel", "Lars"),
    "lamb": ("DataParallel", "Lamb"),
    "pipeline_1f1b": ("PipelineParallel", "Adam"),
    "pipeline_fthenb": ("PipelineParallel", "Adam"),
}


def test_every_collective_preset_is_covered():
    collective = [p for p in presets() if not p.startswith("ps_")]
    assert sorted(collective) == sorted(WANTED)
    for name in collective:
        assert not DistributedStrategy.load(name).a_sync, name


@pytest.mark.parametrize("preset", sorted(WANTED))
def test_preset_trains_the_example_on_two_ranks(preset):
    steps = ["--steps", "60"] if preset == "gradient_merge" else []
    r0, r1 = spawn(run_example, (ARGS + steps + ["--strategy", preset],), nprocs=2, timeout=120)
    assert (r0["model"], r0["optimizer"]) == WANTED[preset]
    assert r0["accuracy"] == r1["accuracy"] and r0["loss"] == r1["loss"]
    assert r0["accuracy"] > 0.5, (preset, r0["accuracy"])   # 8 classes: chance is 0.125


COMBOS = {   # several strategies at once, in _composition's order
    "amp_sharding2_merge": ("amp: true\nsharding: true\nsharding_configs: {sharding_degree: 2, "
                            "stage: 2}\ngradient_merge: true\ngradient_merge_configs: "
                            "{k_steps: 2}\n", ("ShardedDataParallel", "ShardingOptimizer")),
    "pipeline_amp_recompute": ("amp: true\npipeline: true\npipeline_configs: {micro_batch_size: "
                               "32, accumulate_steps: 8}\nrecompute: true\nrecompute_configs: "
                               "{checkpoints: ['0', '1']}\n", ("PipelineParallel", "Adam")),
    "o2_localsgd_lamb": ("amp: true\namp_configs: {use_pure_fp16: true}\nlocalsgd: true\n"
                         "localsgd_configs: {k_steps: 2, begin_step: 5}\nlamb: true\n",
                         ("DataParallel", "Lamb")),
}


@pytest.mark.parametrize("combo", sorted(COMBOS))
def test_strategies_compose_on_two_ranks(combo, tmp_path):
    text, wanted = COMBOS[combo]
    path = tmp_path / f"{combo}.yaml"
    path.write_text("a_sync: false\n" + text)
    r0, r1 = spawn(run_example, (ARGS + ["--steps", "40", "--strategy", str(path)],), nprocs=2,
                   timeout=180)
    assert (r0["model"], r0["optimizer"]) == wanted
    assert r0["accuracy"] == r1["accuracy"] and r0["loss"] == r1["loss"]
    assert r0["accuracy"] > 0.5, (combo, r0["accuracy"])

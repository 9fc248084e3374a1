"""PipelineParallel on real processes against the unpipelined model; bad input; a dead stage."""
import numpy as np
import pytest

from shoal.launcher._spawn import spawn
from tests.collective import pipeline_ranks

pytest.importorskip("shoal.collective._gloo", reason="the Gloo binding is not built (libgloo-dev)")

STEPS = 3


@pytest.fixture(scope="module")
def reference():
    return pipeline_ranks.train_reference(STEPS)


def _matches(results, ref, per):
    """Every rank: its stage's parameters, the losses and the evaluation equal the reference."""
    keys = set()
    for out in results:
        assert out["state"]
        for k, v in out["state"].items():
            np.testing.assert_allclose(v, ref["state"][k], rtol=1e-5, atol=1e-6, err_msg=k)
            keys.add(k)
        np.testing.assert_allclose(out["losses"], ref["losses"], rtol=1e-5)
        np.testing.assert_allclose(out["eval_loss"], ref["eval_loss"], rtol=1e-5)
        d = out["dp_index"]
        np.testing.assert_allclose(out["eval_out"], ref["eval_out"][d * per:(d + 1) * per],
                                   rtol=1e-5, atol=1e-6)
        assert out["ran"] == out["expected"]        # the executor ran exactly the schedule
        assert out["ahead"]                         # receives posted ahead over own links
        assert 0 < out["compute_s"] < out["wall_s"]
    assert keys == set(ref["state"])                # the stages together hold the whole model
    stages = len(results) // len({out["dp_index"] for out in results})
    for out in results:   # a group per direction and neighbour: [fwd_in, fwd_out, bwd_in, bwd_out]
        rank, s = out["dp_index"] * stages + out["stage"], out["stage"]
        prev = [sorted([rank - 1, rank])] * 2 if s > 0 else [None, None]
        nxt = [sorted([rank, rank + 1])] * 2 if s < stages - 1 else [None, None]
        assert [l and l[1] for l in out["links"]] == [prev[0], nxt[0], nxt[1], prev[1]]
        ids = [l[0] for l in out["links"] if l is not None] + [out["pp_id"]]
        assert len(set(ids)) == len(ids)            # none shared, none the pipeline group


@pytest.mark.parametrize("mode", ["1F1B", "FThenB"])
def test_two_stages_four_micro_batches_equal_the_unpipelined_model(reference, mode):
    results = spawn(pipeline_ranks.train_pipeline, (STEPS, mode, 1, [2]), nprocs=2, timeout=120)
    assert [out["stage"] for out in results] == [0, 1]
    assert sorted(results[0]["state"]) == ["0.bias", "0.weight"]   # a stage keeps its own
    _matches(results, reference, per=pipeline_ranks.BATCH)


def test_three_stages_one_f_one_b_equal_the_unpipelined_model(reference):
    results = spawn(pipeline_ranks.train_pipeline, (STEPS, "1F1B", 1, "uniform"), nprocs=3,
                    timeout=180)
    assert sorted(results[1]["state"]) == ["2.bias", "2.weight"]   # uniform: [0, 1, 3, 5]
    _matches(results, reference, per=pipeline_ranks.BATCH)


def test_two_stages_times_two_replicas_equal_the_unpipelined_model_on_the_global_batch(reference):
    # replica 1 is built from another seed: the dp broadcast must replace its weights
    results = spawn(pipeline_ranks.train_pipeline, (STEPS, "1F1B", 2, [2]), nprocs=4,
                    timeout=240)
    assert [(o["dp_index"], o["stage"]) for o in results] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    _matches(results, reference, per=pipeline_ranks.BATCH // 2)
    for a, b in ((0, 2), (1, 3)):   # the replicas of a stage are identical, bit for bit
        for k, v in results[a]["state"].items():
            np.testing.assert_array_equal(v, results[b]["state"][k], err_msg=k)


def test_a_dead_stage_raises_instead_of_hanging():
    r0, _ = spawn(pipeline_ranks.dead_stage, (3.0,), nprocs=2, timeout=120)
    assert r0["error"] == "CollectiveTimeoutError", r0
    assert r0["waited"] < 30
    assert r0["again"] == "GroupBrokenError", r0   # no batch after one that failed midway


@pytest.mark.parametrize("ahead", [True, False])
def test_activations_cross_with_one_header_per_batch_whatever_the_shapes(ahead):
    sent, received = spawn(pipeline_ranks.channel, (ahead,), nprocs=2, timeout=120)
    batches = pipeline_ranks.CHANNEL_BATCHES + [("int64", (4, 3), 1)]
    assert len(received["received"]) == len(batches)
    for b, got in enumerate(received["received"]):
        dtype, shape, n = batches[b]
        assert len(got) == n
        for mb, a in enumerate(got):
            last = b == len(batches) - 1          # the batch whose second send was refused
            want = np.zeros(shape, dtype) if last else pipeline_ranks.channel_array(b, mb)
            assert a.dtype == np.dtype(dtype) and a.shape == shape, (b, mb)
            np.testing.assert_array_equal(a, want, err_msg=f"batch {b}, micro-batch {mb}")
    assert "micro-batch 1 is int64[5, 3] but this batch's first was int64[4, 3]" in \
        sent["error"]


def test_a_pipeline_group_short_of_the_world_shares_it_for_both_directions(reference):
    results = spawn(pipeline_ranks.subgroup_pipeline, (STEPS,), nprocs=3, timeout=180)
    for out in results[:2]:
        assert out["ahead"] is False
        for k, v in out["state"].items():
            np.testing.assert_allclose(v, reference["state"][k], rtol=1e-5, atol=1e-6, err_msg=k)
        np.testing.assert_allclose(out["losses"], reference["losses"], rtol=1e-5)
        np.testing.assert_allclose(out["eval_loss"], reference["eval_loss"], rtol=1e-5)
        np.testing.assert_allclose(out["eval_out"], reference["eval_out"], rtol=1e-5, atol=1e-6)
    assert sorted(results[0]["state"]) + sorted(results[1]["state"]) == sorted(
        reference["state"])


def test_bad_batch_sizes_and_a_missing_loss_raise_before_anything_is_sent():
    import shoal
    import shoal.collective as dist
    import shoal.nn.functional as F
    dist.init_parallel_env(timeout=30)    # a world of one: one stage, nothing to send
    try:
        layers = pipeline_ranks.build_layers(0)
        model = dist.PipelineParallel(dist.PipelineLayer(layers, 1, loss_fn=F.mse_loss),
                                      micro_batch_size=4, accumulate_steps=4)
        opt = shoal.optimizer.SGD(0.1, parameters=model.parameters())
        x, y = pipeline_ranks.data(0)
        with pytest.raises(dist.InvalidArgumentError,
                           match=r"inputs hold 15 samples but a batch is micro_batch_size \* "
                                 r"accumulate_steps = 4 \* 4 = 16; give exactly 16"):
            model.train_batch((x[:15], y[:15]), opt)
        with pytest.raises(dist.InvalidArgumentError, match="labels hold 8 samples"):
            model.train_batch((x, y[:8]), opt)
        with pytest.raises(dist.InvalidArgumentError, match=r"give \(inputs, labels\)"):
            model.train_batch(x, opt)
        no_loss = dist.PipelineParallel(dist.PipelineLayer(layers, 1), micro_batch_size=4,
                                        accumulate_steps=4)
        with pytest.raises(dist.InvalidArgumentError, match="has no loss_fn"):
            no_loss.train_batch((x, y), opt)
        with pytest.raises(dist.InvalidArgumentError, match="accumulate_steps=0"):
            dist.PipelineParallel(dist.PipelineLayer(layers, 1), micro_batch_size=4,
                                  accumulate_steps=0)
        from shoal.collective.pipeline._comm import Links
        with pytest.raises(dist.InvalidArgumentError,
                           match=r"links.fwd_in\): expected None \(no neighbour there\) for "
                                 r"stage 0, got \[0\]"):
            dist.PipelineParallel(dist.PipelineLayer(layers, 1), micro_batch_size=4,
                                  accumulate_steps=4, links=Links(fwd_in=dist.new_group([0])))
        with pytest.raises(dist.InvalidArgumentError, match=r"2 \* 1"):
            dist.PipelineParallel.from_world(dist.PipelineLayer(layers, 2, stage=0),
                                             micro_batch_size=4, accumulate_steps=4)
    finally:
        dist.destroy_process_group()


def test_one_stage_with_a_scaler_and_an_lr_scheduler_equals_the_reference():
    import shoal
    import shoal.collective as dist
    import shoal.nn.functional as F
    ref = pipeline_ranks.train_reference(2)
    dist.init_parallel_env(timeout=30)
    try:
        model = dist.PipelineParallel(
            dist.PipelineLayer(pipeline_ranks.build_layers(0), 1, loss_fn=F.mse_loss),
            micro_batch_size=4, accumulate_steps=4, schedule_mode="FThenB")
        sched = shoal.optimizer.lr.StepDecay(0.1, step_size=100)
        opt = shoal.optimizer.Momentum(sched, parameters=model.parameters())
        scaler = pipeline_ranks.HalvingScaler()
        losses = [model.train_batch(pipeline_ranks.data(s), opt, sched, scaler) for s in range(2)]
        np.testing.assert_allclose(losses, ref["losses"], rtol=1e-5)
        for k, v in model.state_dict().items():
            np.testing.assert_allclose(v.numpy(), ref["state"][k], rtol=1e-5, atol=1e-6)
        assert (scaler.scaled, scaler.updates, sched.last_epoch) == (8, 2, 2)
        assert all(p.grad is None for p in model.parameters())   # cleared inside train_batch
    finally:
        dist.destroy_process_group()

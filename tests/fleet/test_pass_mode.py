"""Pass mode end to end: real server processes and workers on 127.0.0.1 (tests/fleet/job.py)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tests.fleet.test_ps_training import ps_run


def _dir(tmp_path, name):
    (tmp_path / name).mkdir()
    return tmp_path / name


@pytest.mark.parametrize("rule", ["adagrad", "adam"])
def test_one_worker_in_pass_mode_equals_per_step_sync_training(tmp_path, rule):
    args = ["--steps", "12", "--batch", "16", "--rule", rule]
    (sync,) = ps_run(_dir(tmp_path, "sync"), 2, 1, "--mode", "sync", *args)
    (pas,) = ps_run(_dir(tmp_path, "pass"), 2, 1, "--mode", "pass", "--pass-steps", "5", *args)
    assert np.abs(sync["rows"] - sync["rows0"]).max() > 1e-3  # training moved the rows
    np.testing.assert_allclose(pas["rows"], sync["rows"], atol=1e-5)
    np.testing.assert_allclose(pas["dense"], sync["dense"], atol=1e-5)
    np.testing.assert_allclose(pas["losses"], sync["losses"], rtol=1e-5)


def test_two_workers_merge_a_pass_by_the_shows_weighted_mean_of_their_changes(tmp_path):
    """Naive SGD at lr 1 (no show scaling): a worker's copy of a row moves by minus the sum of
    the gradients it computed, so after one pass the servers' row must have moved by the
    shows-weighted mean of the two workers' moves, and the dense values by their mean."""
    workers = ps_run(tmp_path, 2, 2, "--mode", "pass", "--steps", "6", "--pass-steps", "6",
                     "--batch", "8", "--sgd1")
    keys = workers[0]["keys"]
    moved = np.zeros(workers[0]["rows"].shape)
    weight = np.zeros(len(keys))
    for w in workers:
        at = np.searchsorted(keys, w["pushed_keys"])
        moved[at] -= w["pushed"] * w["pushed_shows"][:, None]
        weight[at] += w["pushed_shows"]
    seen = weight > 0
    assert seen.sum() > 20 and np.abs(moved).max() > 0.05
    expected = moved[seen] / weight[seen, None]
    for w in workers:
        np.testing.assert_allclose(w["rows"][seen] - w["rows0"][seen], expected, atol=1e-5)
        np.testing.assert_allclose(w["rows"][~seen], w["rows0"][~seen], atol=0)
        np.testing.assert_allclose(w["dense"] - w["dense0"],
                                   -sum(x["dense_pushed"] for x in workers) / 2, atol=1e-5)


def test_two_by_two_in_pass_mode_reaches_the_auc_of_one_process(tmp_path):
    from tests.fleet.test_ps_training import local_run
    args = ["--steps", "800", "--eval", "1000"]
    local = local_run(tmp_path, "--mode", "sync", "--batch", "32", *args)
    workers = ps_run(tmp_path, 2, 2, "--mode", "pass", "--pass-steps", "50", "--batch", "16", *args)
    assert local["auc"] > 0.75
    assert workers[0]["auc"] == workers[1]["auc"]
    assert abs(float(workers[0]["auc"]) - float(local["auc"])) < 0.03


def _runtime(model):
    from shoal.fleet._runtime import PSRuntime
    rt = PSRuntime(quiet=True)
    rt.model = model
    return rt


def _two_tables():
    import shoal.nn as nn
    from shoal.worker.nn.sparse import EmbeddingBag

    class TwoTables(nn.Layer):
        def __init__(self):
            super().__init__()
            self.user = EmbeddingBag("user", 4)
            self.item = EmbeddingBag("item", 4)
    return TwoTables()


def test_a_pass_scans_the_slots_of_each_table_from_the_shared_data_sample():
    from shoal.worker.data import InMemoryDataset, SlotList
    sample = Path(__file__).resolve().parents[3] / "shared" / "data" / "ctr_multislot_sample.txt"
    ds = InMemoryDataset(batch_size=4, use_var=SlotList.ctr())
    ds.set_filelist([str(sample)])
    ds.load_into_memory()
    slots = sorted(ds.block.sparse)
    rt = _runtime(_two_tables())
    keys = rt._pass_keys(ds, {"user": slots[:2], "item": slots[2:]})
    want = np.concatenate([ds.block.sparse[s].values for s in slots[:2]])
    np.testing.assert_array_equal(keys["user"], want)
    assert keys["user"].dtype == np.uint64 and len(keys["item"]) > len(keys["user"])


@pytest.mark.parametrize("slots,match", [
    (None, r"2 sparse tables \['item', 'user'\]; say which dataset slots feed which"),
    ({"nope": ["C1"]}, r"names table\(s\) \['nope'\] the model does not use"),
    ({"user": ["C1", "Z9"]}, r"slot\(s\) \['Z9'\] for table 'user' are not sparse slots"),
])
def test_a_pass_over_slots_that_do_not_fit_the_model_is_refused(slots, match):
    from shoal.fleet import FleetError
    from shoal.worker.data import Batch, Ragged
    batch = Batch({}, {"C1": Ragged(np.array([1, 2], np.uint64), np.array([0, 1, 2]))})
    with pytest.raises(FleetError, match=match):
        _runtime(_two_tables())._pass_keys(batch, slots)


def test_a_pass_over_a_streaming_dataset_is_refused_with_the_reason():
    from shoal.fleet import FleetError
    from shoal.worker.data import QueueDataset
    with pytest.raises(FleetError, match="streaming QueueDataset cannot be a pass"):
        _runtime(_two_tables())._pass_keys(QueueDataset(batch_size=4), None)

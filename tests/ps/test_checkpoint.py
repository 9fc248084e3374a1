"""Checkpoint files in-process: resharding, save modes, crash safety, bad directories."""
import json
import os

import numpy as np
import pytest

from shoal.ps import checkpoint as ckpt
from shoal.ps.dense_table import DenseTable
from shoal.ps.errors import CheckpointError
from shoal.ps.partition import partition
from shoal.ps.sparse_table import SparseTable
from shoal.ps.spec import DenseTableSpec, SparseTableSpec

SPARSE = SparseTableSpec(name="emb", dim=4, rule="adam", nonclk_coeff=1.0, base_threshold=1.0,
                         delta_threshold=1.0)
DENSE = DenseTableSpec(name="w", size=103, rule="adam")


def _servers(n):
    return [{"emb": SparseTable(SPARSE), "w": DenseTable(DENSE, i, n)} for i in range(n)]


def _fill(servers, keys, rng):
    n = len(servers)
    owner = partition(keys, n)
    for i, tables in enumerate(servers):
        k = keys[owner == i]
        tables["emb"].pull(k)
        tables["emb"].push(k, rng.normal(size=(len(k), 4)).astype(np.float32),
                           rng.integers(1, 5, len(k)).astype(np.float32),
                           np.zeros(len(k), np.float32))
        w = tables["w"]
        w.init(np.arange(w.start, w.end, dtype=np.float32))
        w.push(np.ones(w.end - w.start, np.float32))


def _save(directory, servers, mode, save_id):
    files = [ckpt.save_shard(directory, i, save_id, t, mode)["file"] for i, t in enumerate(servers)]
    ckpt.write_manifest(directory, save_id, mode, [SPARSE, DENSE], files)


def _rows(servers, keys):
    owner = partition(keys, len(servers))
    out = np.zeros((len(keys), 4), np.float32)
    for i, tables in enumerate(servers):
        out[owner == i] = tables["emb"].pull(keys[owner == i], training=False)
    return out


def _dense(servers):
    return np.concatenate([t["w"].pull() for t in servers])


@pytest.mark.parametrize("n_from,n_to", [(2, 3), (3, 1), (2, 2), (1, 4)])
def test_a_checkpoint_loads_onto_any_number_of_servers(tmp_path, n_from, n_to):
    rng = np.random.default_rng(0)
    keys = np.unique(rng.integers(0, 2 ** 63, 600, dtype=np.uint64))[:500]
    src = _servers(n_from)
    _fill(src, keys, rng)
    _save(str(tmp_path), src, 0, "s1")
    dst = _servers(n_to)
    for i, tables in enumerate(dst):
        ckpt.load_into(str(tmp_path), i, n_to, tables)
    np.testing.assert_array_equal(_rows(dst, keys), _rows(src, keys))
    np.testing.assert_array_equal(_dense(dst), _dense(src))
    assert sum(len(t["emb"]) for t in dst) == 500
    # optimizer state came along: one more identical push gives identical rows
    for group in (src, dst):
        owner = partition(keys, len(group))
        for i, t in enumerate(group):
            k = keys[owner == i]
            t["emb"].push(k, np.ones((len(k), 4), np.float32))
    np.testing.assert_array_equal(_rows(dst, keys), _rows(src, keys))


def test_delta_holds_changed_rows_and_loads_on_top_of_its_base(tmp_path):
    rng = np.random.default_rng(1)
    keys = np.arange(1, 201, dtype=np.uint64)
    servers = _servers(2)
    _fill(servers, keys, rng)
    base, delta = str(tmp_path / "base"), str(tmp_path / "delta")
    _save(base, servers, 2, "b")
    _save(delta, servers, 1, "d0")  # resets delta scores of what it wrote
    changed = keys[:20]
    owner = partition(changed, 2)
    for i, t in enumerate(servers):
        k = changed[owner == i]
        t["emb"].push(k, np.ones((len(k), 4), np.float32), np.full(len(k), 20.0, np.float32),
                      np.zeros(len(k), np.float32))
    _save(delta, servers, 1, "d1")
    manifest = ckpt.read_manifest(delta)
    assert manifest["mode"] == 1 and manifest["save_id"] == "d1"
    with np.load(os.path.join(delta, manifest["files"][0])) as z:
        n0 = len(z["sparse/emb/keys"])
    with np.load(os.path.join(delta, manifest["files"][1])) as z:
        n1 = len(z["sparse/emb/keys"])
    assert n0 + n1 == 20
    restored = _servers(3)
    for i, t in enumerate(restored):
        ckpt.load_into(base, i, 3, t)
        ckpt.load_into(delta, i, 3, t)
    np.testing.assert_array_equal(_rows(restored, keys), _rows(servers, keys))
    assert len(os.listdir(delta)) == 3  # the d0 shard files were removed after d1 committed


def test_a_save_that_dies_before_its_manifest_leaves_the_previous_one(tmp_path):
    rng = np.random.default_rng(2)
    keys = np.arange(1, 50, dtype=np.uint64)
    servers = _servers(2)
    _fill(servers, keys, rng)
    _save(str(tmp_path), servers, 0, "old")
    before = _rows(servers, keys)
    for i, t in enumerate(servers):
        t["emb"].push(keys[partition(keys, 2) == i], np.ones(((partition(keys, 2) == i).sum(), 4),
                                                               np.float32))
    ckpt.save_shard(str(tmp_path), 0, "new", servers[0], 0)  # server 1 "crashed": no manifest
    fresh = _servers(2)
    for i, t in enumerate(fresh):
        ckpt.load_into(str(tmp_path), i, 2, t)
    np.testing.assert_array_equal(_rows(fresh, keys), before)
    with pytest.raises(CheckpointError, match="shard file .* is missing"):
        ckpt.write_manifest(str(tmp_path), "new", 0, [SPARSE], ["shard-00000-new.npz",
                                                              "shard-00001-new.npz"])


def test_bad_directories_raise_checkpoint_errors(tmp_path):
    with pytest.raises(CheckpointError, match="MANIFEST.json is missing"):
        ckpt.read_manifest(str(tmp_path))
    (tmp_path / "MANIFEST.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="unreadable manifest"):
        ckpt.read_manifest(str(tmp_path))
    (tmp_path / "MANIFEST.json").write_text(json.dumps({"format": ckpt.FORMAT,
                                                        "partition_hash": "mod", "partition_version": 0}))
    with pytest.raises(CheckpointError, match="partitioned with mod"):
        ckpt.read_manifest(str(tmp_path))
    with pytest.raises(CheckpointError, match="save mode 5"):
        ckpt.save_shard(str(tmp_path), 0, "x", {}, 5)

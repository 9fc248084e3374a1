"""kill -9 of servers whose sparse table keeps most rows in RocksDB, then new servers with the same
ssd_path and indexes: the new table starts empty in both tiers, and after loading the last
checkpoint it equals the checkpoint's state exactly (rows, embeddings, optimizer state, statistics),
not what RocksDB held when the servers died."""
import dataclasses
import os
import signal

import numpy as np
import pytest

from shoal.ps import checkpoint as ckpt
from shoal.ps.client import PSClient
from shoal.ps.sparse_table import SparseTable
from shoal.ps.spec import SparseTableSpec
from tests.ps.servers import TOKEN, running_servers

DIM = 8
ROW_COST = 4 * (DIM + 1 + 4) + 8 + 1 + 24  # adagrad: dim + g2sum + 4 statistics, key, flag, index
BEFORE = np.arange(3000, dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15)  # trained, then saved
AFTER = BEFORE + np.uint64(1)  # keys first seen after the save


def _spec(ssd_path: str) -> SparseTableSpec:
    # ~150 hot rows per server (2 shards): nine rows in ten are cold
    return SparseTableSpec(name="emb", dim=DIM, rule="adagrad", shards=2, storage="ssd",
                           ssd_path=ssd_path, memory_budget_mb=150 * ROW_COST / 2 ** 20,
                           nonclk_coeff=1.0, base_threshold=0.0, delta_threshold=0.0)


def _train(client, keys: np.ndarray, seed: int, steps: int = 3) -> None:
    rng = np.random.default_rng(seed)
    for _ in range(steps):
        # every key, some twice (the client and the servers merge duplicates), in a new order
        batch = rng.permutation(np.concatenate([keys, rng.choice(keys, len(keys) // 4)]))
        client.pull_sparse("emb", batch, training=True)
        client.push_sparse("emb", batch, rng.normal(0, 1, (len(batch), DIM)).astype(np.float32),
                           np.ones(len(batch), np.float32),
                           (rng.random(len(batch)) < 0.3).astype(np.float32))


def _tiers(client) -> tuple[int, int, int]:
    """(rows, hot rows, cold rows) over every server."""
    stats = [s["tables"]["emb"] for s in client.stats()]
    return (sum(s["rows"] for s in stats), sum(s["tiers"]["arena"]["rows"] for s in stats),
            sum(s["tiers"]["cold.ssd"]["rows"] for s in stats))


def _kill(procs) -> None:
    for p in procs:
        os.kill(p.pid, signal.SIGKILL)
    for p in procs:
        assert p.wait(timeout=10) == -signal.SIGKILL


@pytest.mark.parametrize("n_servers", [1, 2])
def test_kill_9_then_restart_from_the_last_checkpoint(tmp_path, n_servers):
    spec = _spec(str(tmp_path / "ssd"))
    save_dir = str(tmp_path / "ckpt")
    every_key = np.concatenate([BEFORE, AFTER])
    for run in ("first", "second"):
        (tmp_path / run).mkdir()
    with running_servers(n_servers, tmp_path / "first") as (endpoints, procs):
        with PSClient(endpoints, TOKEN, timeout=30) as client:
            client.create_table(spec)
            _train(client, BEFORE, seed=0)
            rows, hot, cold = _tiers(client)
            assert rows == len(BEFORE) and cold > 0.8 * rows  # most rows live in RocksDB
            saved = client.pull_sparse("emb", every_key, training=False)
            client.save(save_dir)

            # more training after the save: RocksDB now holds rows newer than the checkpoint,
            # and rows of keys the checkpoint never saw
            _train(client, BEFORE, seed=1)
            _train(client, AFTER, seed=2)
            rows, hot, cold = _tiers(client)
            assert rows == len(every_key) and cold > 0.8 * rows
            newer = client.pull_sparse("emb", every_key, training=False)
            assert not np.array_equal(newer[:len(BEFORE)], saved[:len(BEFORE)])
            assert np.all(newer[len(BEFORE):] != 0)
        _kill(procs)

    # what the checkpoint holds, loaded into an all-RAM table in this process
    reference = SparseTable(dataclasses.replace(spec, storage="memory", memory_budget_mb=None,
                                                ssd_path=None))
    assert ckpt.load_into(save_dir, 0, 1, {"emb": reference}) == {"emb": len(BEFORE)}
    np.testing.assert_array_equal(reference.pull(every_key, training=False), saved)

    with running_servers(n_servers, tmp_path / "second") as (endpoints, procs):
        with PSClient(endpoints, TOKEN, timeout=30) as client:
            client.create_table(spec)  # same ssd_path and indexes as the killed servers
            assert _tiers(client) == (0, 0, 0)  # the dead servers' cold rows are dropped
            assert np.all(client.pull_sparse("emb", every_key, training=False) == 0)

            loaded = client.load(save_dir)
            assert sum(r["emb"] for r in loaded) == len(BEFORE)
            rows, hot, cold = _tiers(client)
            assert rows == len(BEFORE) and cold > 0.8 * rows
            np.testing.assert_array_equal(client.pull_sparse("emb", every_key, training=False),
                                          saved)
            # optimizer state and statistics came back too: the same training from here gives
            # the same rows as the checkpoint's table trained in this process
            rng = np.random.default_rng(3)
            for _ in range(3):
                keys = rng.choice(every_key, 800, replace=False)
                grads = rng.normal(0, 1, (len(keys), DIM)).astype(np.float32)
                shows = np.ones(len(keys), np.float32)
                clicks = (rng.random(len(keys)) < 0.3).astype(np.float32)
                np.testing.assert_array_equal(client.pull_sparse("emb", keys, training=True),
                                              reference.pull(keys, training=True))
                client.push_sparse("emb", keys, grads, shows, clicks)
                reference.push(keys, grads, shows, clicks)
            np.testing.assert_array_equal(client.pull_sparse("emb", every_key, training=False),
                                          reference.pull(every_key, training=False))
            assert _tiers(client)[0] == len(reference)

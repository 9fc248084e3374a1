"""InMemoryDataset and QueueDataset: file sharding, batching, shuffles, streaming threads."""
from __future__ import annotations

import gc
import queue
import threading
import time

import numpy as np
import pytest

from shoal.worker.data import (Batch, BadLineError, DataError, InMemoryDataset, PipeCommandError, QueueDataset,
                               SlotList, shard_files, synthetic_ctr, write_multislot)
from tests.worker.data.helpers import signatures

CTR = SlotList.ctr()


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("ctr")
    block = synthetic_ctr(3000, seed=0, start=10_000)
    paths = []
    for i, (a, b) in enumerate([(0, 1000), (1000, 1700), (1700, 2500), (2500, 3000)]):
        paths.append(str(root / f"part-{i:05d}.txt"))
        write_multislot(block.slice(a, b), paths[-1])
    return paths, block


def loaded(paths, **kw) -> InMemoryDataset:
    ds = InMemoryDataset()
    ds.init(batch_size=kw.pop("batch_size", 256), thread_num=2, use_var=CTR, **kw)
    ds.set_filelist(paths)
    ds.load_into_memory()
    return ds


def queue_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "shoal-queue-dataset"]


def test_shard_files_round_robin():
    files = [f"f{i}" for i in range(5)]
    assert shard_files(files, 0, 2) == ["f0", "f2", "f4"] and shard_files(files, 1, 2) == ["f1", "f3"]
    with pytest.raises(DataError, match="worker 2 would get no file"):
        shard_files(files[:2], 2, 3)
    ds = InMemoryDataset(use_var=CTR)
    ds.set_filelist(files, worker_index=1, worker_num=3)
    assert ds.get_filelist() == ["f1", "f4"] and (ds.worker_index, ds.worker_num) == (1, 3)
    with pytest.raises(DataError, match="expected a list of file names"):
        ds.set_filelist("f0")


def test_load_and_batches(files):
    paths, block = files
    ds = loaded(paths, batch_size=256)
    assert len(ds) == ds.get_memory_data_size() == 3000 and ds.block.equals(block)
    sizes = [b.size for b in ds]
    assert sizes == [256] * 11 + [3000 - 11 * 256] and ds.num_batches() == 12
    assert [b.size for b in ds.batches(drop_last=True)] == [256] * 11
    assert ds.num_batches(drop_last=True) == 11
    batches = list(ds.batches(batch_size=1000))
    assert [b.size for b in batches] == [1000] * 3
    skipped = list(ds.batches(skip=10))
    assert [b.size for b in skipped] == [256, 184]
    assert skipped[0].equals(block.slice(2560, 2816))
    assert list(ds.batches(skip=50)) == []
    b = next(iter(ds))
    assert isinstance(b, Batch) and b.dense["label"].shape == (256, 1) and b.sparse["C26"].size == 256
    with pytest.raises(DataError, match="skip=-1"):
        ds.batches(skip=-1)


def test_settings_validation():
    with pytest.raises(DataError, match=r"unknown setting\(s\) \['batchsize'\]"):
        InMemoryDataset(batchsize=3)
    with pytest.raises(DataError, match="batch_size=0"):
        InMemoryDataset().init(batch_size=0)
    ds = InMemoryDataset(batch_size=4)
    with pytest.raises(DataError, match="no slots"):
        ds.load_into_memory()
    ds.init(use_var=list(CTR))
    with pytest.raises(DataError, match="no files"):
        ds.load_into_memory()
    with pytest.raises(DataError, match="call load_into_memory"):
        list(ds)


def test_local_shuffle_is_a_seeded_permutation(files):
    paths, block = files
    ds = loaded(paths)
    ds.local_shuffle(seed=7)
    first = ds.block
    assert not first.equals(block) and np.array_equal(signatures(first), signatures(block))
    assert ds.get_shuffle_data_size() == 3000
    ds.load_into_memory()
    assert ds.get_shuffle_data_size() == 0
    ds.local_shuffle(seed=7)
    assert ds.block.equals(first)
    ds.local_shuffle(seed=8)
    assert not ds.block.equals(first)


def test_batches_after_a_shuffle_are_the_shuffled_samples_in_order(files):
    """local_shuffle only records the permutation; batches gather through it, and the block
    applied later is the same order (twice shuffled: the permutations compose)."""
    paths, _ = files
    lazy, eager = loaded(paths), loaded(paths)
    for ds in (lazy, eager):
        ds.local_shuffle(seed=3)
        ds.local_shuffle(seed=4)
    eager.block  # noqa: B018 - applies the pending permutation to the columns
    got = Batch.concat(list(lazy.batches(batch_size=256, skip=2)))
    want = Batch.concat(list(eager.batches(batch_size=256, skip=2)))
    assert got.equals(want) and got.size == 3000 - 512
    assert lazy.block.equals(eager.block)


def test_release_memory(files):
    ds = loaded(files[0])
    ds.release_memory()
    assert len(ds) == 0 and ds.get_memory_data_size() == 0
    with pytest.raises(DataError, match="load_into_memory"):
        ds.batches()
    ds.preload_into_memory()
    ds.wait_preload_done()
    assert len(ds) == 3000


def fake_all_to_all(n: int):
    """An in-process all_to_all over n "workers" (threads): one inbox queue per worker."""
    inbox = [queue.Queue() for _ in range(n)]

    def make(rank):
        def exchange(parts):
            assert len(parts) == n
            for j, part in enumerate(parts):
                inbox[j].put((rank, part))
            got = sorted((inbox[rank].get(timeout=10) for _ in range(n)), key=lambda x: x[0])
            return [p for _, p in got]
        return exchange

    return [make(r) for r in range(n)]


@pytest.mark.parametrize("n", [2, 3])
def test_global_shuffle_moves_every_sample_exactly_once(files, n):
    paths, block = files
    exchanges = fake_all_to_all(n)
    datasets = [None] * n
    before = [None] * n
    errors = []

    def worker(rank):
        try:
            ds = InMemoryDataset(batch_size=100, thread_num=1, use_var=CTR)
            ds.set_filelist(paths, worker_index=rank, worker_num=n)
            ds.load_into_memory()
            before[rank] = ds.block
            ds.global_shuffle(exchanges[rank], seed=11)
            datasets[rank] = ds
        except BaseException as e:  # surfaced below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(r,)) for r in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not errors, errors
    sizes = [len(ds) for ds in datasets]
    assert sum(sizes) == 3000 and all(s > 0 for s in sizes)
    assert [ds.get_shuffle_data_size() for ds in datasets] == sizes
    after = Batch.concat([ds.block for ds in datasets])
    assert np.array_equal(signatures(after), signatures(block))
    # samples really moved between workers
    assert any(not np.array_equal(signatures(before[r]), signatures(datasets[r].block)) for r in range(n))


def test_global_shuffle_without_exchange_is_local_and_checks_exchange(files):
    paths, block = files
    ds = loaded(paths)
    ds.global_shuffle(seed=1)
    assert np.array_equal(signatures(ds.block), signatures(block)) and not ds.block.equals(block)
    with pytest.raises(DataError, match="expected 2 Batch blocks"):
        ds.global_shuffle(lambda parts: parts[:1], seed=1, worker_index=0, worker_num=2)


def test_queue_dataset_matches_in_memory_order(files):
    paths, block = files
    ds = QueueDataset(batch_size=37, thread_num=2, use_var=CTR, chunk_bytes=20_000, queue_blocks=2)
    ds.set_filelist(paths)
    batches = list(ds)
    assert [b.size for b in batches[:-1]] == [37] * (len(batches) - 1) and batches[-1].size == 3000 % 37
    assert Batch.concat(batches).equals(block)
    dropped = list(ds.batches(drop_last=True))
    assert len(dropped) == 3000 // 37 and dropped[-1].size == 37
    resumed = list(ds.batches(skip=80))
    assert Batch.concat(resumed).equals(block.slice(80 * 37, 3000))
    assert not queue_threads()


def test_queue_dataset_early_stop_joins_thread(files):
    paths, _ = files
    ds = QueueDataset(batch_size=10, use_var=CTR, chunk_bytes=4096, queue_blocks=1)
    ds.set_filelist(paths)
    stream = ds.batches()
    next(stream)
    assert stream.thread.is_alive()
    stream.close()
    assert not stream.thread.is_alive() and not queue_threads()
    for b in ds:
        break
    del b
    gc.collect()
    assert not queue_threads()
    with ds.batches() as s:
        next(s)
    assert not queue_threads()


def test_queue_dataset_errors_surface_in_consumer(files, tmp_path):
    paths, _ = files
    bad = tmp_path / "bad.txt"
    bad.write_text("1 0 13 1 2 3\n")
    ds = QueueDataset(batch_size=500, use_var=CTR)
    ds.set_filelist(paths[:1] + [str(bad)])
    got = 0
    with pytest.raises(BadLineError, match=rf"{bad}:1: slot 'dense'"):
        for b in ds:
            got += b.size
    assert got == 1000 and not queue_threads()
    ds.init(on_bad_line="skip")
    assert sum(b.size for b in ds) == 1000 and ds.bad_lines == 1


def test_queue_dataset_stops_a_silent_pipe_command(files):
    paths, _ = files
    ds = QueueDataset(batch_size=10, use_var=CTR, pipe_command="sleep 30")
    ds.set_filelist(paths[:1])
    stream = ds.batches()
    time.sleep(0.2)
    t0 = time.monotonic()
    stream.close()
    assert time.monotonic() - t0 < 5 and not queue_threads()
    ds.init(pipe_command="exit 4")
    with pytest.raises(PipeCommandError, match="exited with status 4"):
        list(ds)
    assert not queue_threads()


def test_reading_block_or_shuffling_again_mid_iteration_changes_nothing_already_iterating(files):
    paths, _ = files
    ds, ref = loaded(paths), loaded(paths)
    ds.local_shuffle(seed=5)
    ref.local_shuffle(seed=5)
    want = list(ref.batches(batch_size=500))
    it = ds.batches(batch_size=500)
    got = [next(it)]
    ds.block  # noqa: B018 - applies the pending shuffle to the dataset's columns
    ds.local_shuffle(seed=6)
    got += list(it)
    assert len(got) == len(want) and all(g.equals(w) for g, w in zip(got, want))


@pytest.mark.parametrize("shuffled", [False, True])
def test_slot_values_are_the_ids_the_batches_of_a_range_hold(files, shuffled):
    ds = loaded(files[0])
    if shuffled:
        ds.local_shuffle(seed=3)
    names = ds.sparse_slots[:3]
    bs = 16
    batches = list(ds.batches(bs))
    for start, stop in ((0, None), (2, 5), (4, len(batches))):
        want = np.concatenate([np.concatenate([b.sparse[n].values for b in batches[start:stop]])
                               for n in names])
        got = ds.slot_values(names, start * bs, None if stop is None else stop * bs)
        np.testing.assert_array_equal(np.sort(got), np.sort(want))  # their order is unspecified
        assert got.dtype == np.uint64
    assert ds._order is not None or not shuffled  # the pending shuffle was not applied
    with pytest.raises(DataError, match=r"\['nope'\] are not sparse slots"):
        ds.slot_values(["nope"])

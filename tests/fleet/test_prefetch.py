"""Async mode's prefetch: while one batch trains, the next batch's rows are already on their way."""
from shoal.fleet import prefetched
from shoal.ps.client import PSClient
from shoal.ps.communicator import AsyncCommunicator, SyncCommunicator
from shoal.ps.spec import SparseTableSpec
from shoal.worker.data import synthetic_ctr
from shoal.worker.nn.sparse import EmbeddingBag, bind_sparse_backend

SLOTS = [f"C{i + 1}" for i in range(26)]


def _train(comm, n_batches=8, stop_after=None):
    comm.client.create_table(SparseTableSpec(name="emb", dim=4))
    layer = EmbeddingBag("emb", 4)
    bind_sparse_backend(layer, comm)
    block = synthetic_ctr(64 * n_batches, seed=3)
    batches = [block.slice(i * 64, (i + 1) * 64) for i in range(n_batches)]
    seen = 0
    for batch in prefetched(batches, layer, comm):
        out = layer([batch.sparse[s] for s in SLOTS], labels=batch.dense["label"][:, 0])
        out.sum().backward()
        comm.step(None, 0.1)
        seen += 1
        if seen == stop_after:
            break
    return seen


def test_async_pulls_after_the_first_two_batches_are_prefetched():
    comm = AsyncCommunicator(PSClient.local())
    try:
        assert _train(comm) == 8
        # batch 0 teaches the loader which slots feed the table; batch 1 was read before that
        assert comm.prefetch_hits == 6
    finally:
        comm.stop()


def test_a_loader_that_stops_early_leaves_nothing_in_flight():
    comm = AsyncCommunicator(PSClient.local())
    try:
        assert _train(comm, stop_after=4) == 4
        assert comm._prefetched == {}
    finally:
        comm.stop()


def test_sync_mode_does_not_prefetch():
    comm = SyncCommunicator(PSClient.local())
    try:
        _train(comm)
        assert comm.prefetch_hits == 0
    finally:
        comm.stop()

"""Batches with the next batch's sparse rows already on their way (async mode's prefetch)."""
from __future__ import annotations

from collections.abc import Iterable, Iterator

from shoal.worker.nn.sparse import EmbeddingBag, sparse_layers


def _slot_names(layer: EmbeddingBag, batch) -> list[str] | None:
    """The names of `batch.sparse` slots the layer read in its last forward (by identity)."""
    inputs = getattr(layer, "last_inputs", None)
    sparse = getattr(batch, "sparse", None)
    if not inputs or not isinstance(sparse, dict):
        return None
    by_id = {id(r): name for name, r in sparse.items()}
    names = [by_id.get(id(x)) for x in inputs]
    return None if None in names else names


def prefetched(batches: Iterable, model=None, communicator=None) -> Iterator:
    """Yield `batches` unchanged; in async mode, while one batch trains, pull the next one's rows.

    After the first batch it learns which slots of a batch (`batch.sparse[name]`)
    each EmbeddingBag of `model` reads, then, before yielding batch k, starts
    the pull of batch k+1's unique keys; the layer's forward on batch k+1
    finds the rows waiting. Other modes (and batches without `.sparse`) pass
    through. `model` and `communicator` default to those of init_worker.
    """
    comm = communicator
    if comm is None or model is None:
        from shoal import fleet
        rt = fleet._rt("prefetched")
        comm = comm if comm is not None else rt.communicator
        model = model if model is not None else rt.model
    if comm is None or not getattr(comm, "prefetches", False) or model is None:
        yield from batches
        return
    layers = [m for m in sparse_layers(model) if isinstance(m, EmbeddingBag)]
    plan: dict[EmbeddingBag, list[str]] = {}
    it = iter(batches)
    current = next(it, None)
    try:
        while current is not None:
            upcoming = next(it, None)
            if upcoming is not None:
                for layer, names in plan.items():
                    comm.prefetch(layer.table, layer.unique_keys([upcoming.sparse[n] for n in names]))
            yield current
            if not plan:
                for layer in layers:
                    names = _slot_names(layer, current)
                    if names is not None:
                        plan[layer] = names
            current = upcoming
    finally:  # the consumer stopped early (break, --steps): nothing stays in flight
        if not comm._stopped:
            comm._drop_prefetches()

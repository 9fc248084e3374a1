"""`shoal.datasets`: the data layer's public names (an alias of `shoal.worker.data`).

Example:
    >>> from shoal.datasets import InMemoryDataset, SlotList, ensure_synthetic_ctr
    >>> files = ensure_synthetic_ctr("/tmp/ctr", n_train=600_000, n_test=100_000)
"""
from shoal.worker.data import (Batch, DataError, InMemoryDataset, QueueDataset, Ragged, SampleBlock, Slot,
                               SlotList, best_auc, ensure_synthetic_ctr, synthetic_ctr, synthetic_ctr_blocks,
                               write_multislot)

__all__ = ["synthetic_ctr", "synthetic_ctr_blocks", "ensure_synthetic_ctr", "write_multislot", "best_auc",
           "InMemoryDataset", "QueueDataset", "SlotList", "Slot", "Batch", "SampleBlock", "Ragged", "DataError"]

"""The data layer of a worker: MultiSlot slot files, batches, Paddle's datasets, synthetic CTR data.

- `Slot` / `SlotList`: the columns of a MultiSlot line (Paddle's ``use_var``).
- `MultiSlotReader`: native, multi-threaded parsing of files or a
  ``pipe_command``'s output into `Batch` blocks; bad lines fail or are skipped.
- `Batch` (alias `SampleBlock`) and `Ragged`: column-wise samples.
- `InMemoryDataset` (load, local/global shuffle, batches) and `QueueDataset`
  (streamed by a background thread), with Paddle's method names.
- `synthetic_ctr`, `ensure_synthetic_ctr`, `write_multislot`, `best_auc`:
  Criteo-like data from a known hidden model.

Nothing here imports the parameter server, collectives, launcher or fleet;
`global_shuffle` takes the all-to-all exchange as a callable.
"""
from shoal.worker.data.batch import Batch, Ragged, SampleBlock
from shoal.worker.data.dataset import DatasetBase, shard_files
from shoal.worker.data.errors import BadLineError, DataError, PipeCommandError
from shoal.worker.data.in_memory import InMemoryDataset, shuffle_destinations
from shoal.worker.data.reader import MultiSlotReader, OnBadLine, parse_multislot
from shoal.worker.data.slots import Slot, SlotList
from shoal.worker.data.streaming import BatchStream, QueueDataset
from shoal.worker.data.synthetic import (SyntheticFiles, best_auc, ensure_synthetic_ctr, hidden_logit,
                                         synthetic_ctr, synthetic_ctr_blocks)
from shoal.worker.data.writer import format_multislot, write_multislot

__all__ = ["Slot", "SlotList", "Batch", "SampleBlock", "Ragged", "MultiSlotReader", "OnBadLine", "parse_multislot",
           "DatasetBase", "InMemoryDataset", "QueueDataset", "BatchStream", "shard_files", "shuffle_destinations",
           "synthetic_ctr", "synthetic_ctr_blocks", "ensure_synthetic_ctr", "SyntheticFiles", "best_auc",
           "hidden_logit", "write_multislot", "format_multislot", "DataError", "BadLineError", "PipeCommandError"]

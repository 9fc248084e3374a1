"""The worker's communicator: how sparse and dense gradients reach the servers, by mode.

One object per worker implements the worker/ sparse seam (`pull`, `push`)
and the dense step (`step`), in one of Paddle's modes (DESIGN.md
"Communicator modes"):

- sync: every push is tagged (step, n_workers); each server holds a step's
  pushes until all workers' arrived and applies their sum once; the step ends
  with a barrier, then the fresh dense values are pulled. With one worker
  this is local training exactly; with n it is local training on the n×
  batch (gradients are pre-scaled by 1/n, as the mean over the larger batch).
- async: pushes go into a bounded send queue; a sender thread merges up to
  `max_merge_var_num` queued gradients per table (sparse by key, dense summed)
  and sends them; a receiver thread pulls the dense values after each dense
  send; the next batch's rows can be prefetched while this one computes.
- half_async: async's queue and sender, but each step waits for its sends
  and a barrier, so workers stay in step (Paddle's HalfAsyncCommunicator).
- geo: the worker trains a local copy for `k_steps` (sparse rows with plain
  SGD at the table's rate, dense parameters with the user's optimizer), then
  pushes (local - base) / n_workers as deltas and pulls fresh values.
- pass (a_sync_configs.use_ps_gpu): the worker pulls the whole records of a
  pass's keys once, trains the pass against its own copy with the table's
  rule (on the GPU when there is one), and writes the changes back at
  the end of the pass; the servers merge every worker's (pass_mode.py).

`flush()` (called by stop_worker) sends and applies everything queued, so no
gradient is lost. Errors of background threads are re-raised on the
training thread at the next call. Not thread-safe: one training thread
drives a communicator (its own threads are internal).
"""
from __future__ import annotations

import enum

from shoal.ps.client import PSClient
from shoal.ps.communicator.asynchronous import AsyncCommunicator, HalfAsyncCommunicator
from shoal.ps.communicator.base import DENSE_TABLE, Communicator, CommunicatorError, Mode
from shoal.ps.communicator.geo import GeoCommunicator
from shoal.ps.communicator.pass_mode import PassCommunicator, PassTable
from shoal.ps.communicator.sync import SyncCommunicator

_MODES: dict[Mode, type[Communicator]] = {
    Mode.SYNC: SyncCommunicator, Mode.ASYNC: AsyncCommunicator,
    Mode.HALF_ASYNC: HalfAsyncCommunicator, Mode.GEO: GeoCommunicator, Mode.PASS: PassCommunicator,
}


def make_communicator(mode: Mode | str, client: PSClient, **kwargs) -> Communicator:
    """The communicator of `mode` ('sync', 'async', 'half_async', 'geo', 'pass') over `client`."""
    try:
        mode = Mode(mode.value if isinstance(mode, enum.Enum) else mode)
    except ValueError:
        raise CommunicatorError(f"unknown communicator mode {mode!r}; choose one of "
                                f"{[m.value for m in Mode]}") from None
    return _MODES[mode](client, **kwargs)


__all__ = ["Mode", "Communicator", "SyncCommunicator", "AsyncCommunicator",
           "HalfAsyncCommunicator", "GeoCommunicator", "PassCommunicator", "PassTable", "CommunicatorError", "make_communicator",
           "DENSE_TABLE"]

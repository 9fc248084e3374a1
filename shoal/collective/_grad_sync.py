"""What DataParallel and ShardedDataParallel share: `no_sync()`, gradient merge's `_merge_sync`,
and starting a backward pass's reduction from the first gradient hook of the pass."""
from __future__ import annotations

import contextlib

from shoal.worker import autograd


class GradSync:
    """A mixin for Layer wrappers that reduce gradients from post-accumulate hooks. The class
    sets `_no_sync_depth = 0`, `_merge_sync = True`, `_pass_id = None` at construction and
    defines `_finish_pass()` (queued to run when a reducing pass ends) and `_reset(wait=)`."""

    @contextlib.contextmanager
    def no_sync(self):
        """Backward passes inside only accumulate locally (in full); the next one outside
        reduces what accumulated."""
        object.__setattr__(self, "_no_sync_depth", self._no_sync_depth + 1)
        try:
            yield
        finally:
            object.__setattr__(self, "_no_sync_depth", self._no_sync_depth - 1)

    def _reducing_pass(self) -> bool:
        """From a gradient hook: whether the running backward pass reduces. The first hook of a
        reducing pass drops what a previous pass that raised left behind and queues
        `_finish_pass` for the pass's end."""
        if self._no_sync_depth or not self._merge_sync:
            return False
        pass_id = autograd.backward_pass()
        if pass_id != self._pass_id:
            if self._pass_id is not None:  # the last pass raised before it ended: drop it
                self._reset(wait=True)
            object.__setattr__(self, "_pass_id", pass_id)
            autograd.queue_callback(self._finish_pass)
        return True

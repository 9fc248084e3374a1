"""What DataParallel and ShardedDataParallel share: `no_sync()`, gradient merge's `_merge_sync`,
and starting a backward pass's reduction from the first gradient hook of the pass."""
from __future__ import annotations

import contextlib
import weakref

from shoal.worker import autograd


class GradSync:
    """A mixin for Layer wrappers that reduce gradients from post-accumulate hooks. The class
    sets `_no_sync_depth = 0`, `_merge_sync = True`, `_pass_id = None` at construction and
    defines `_on_grad(param)`, `_finish_pass()` (queued to run when a reducing pass ends) and
    `_reset(wait=)`."""

    def _take_over(self, layers) -> None:
        """Become the one wrapper reducing `layers`' gradients: a wrapper made before (a
        DataParallel or sharded one, over another group say) loses its hooks."""
        previous = getattr(layers, "_shoal_data_parallel", lambda: None)()
        if previous is not None:
            previous._detach()
        object.__setattr__(layers, "_shoal_data_parallel", weakref.ref(self))

    def _hook(self, params) -> None:
        """Call `_on_grad(p)` after each backward pass accumulated p's gradient (held weakly:
        a dropped wrapper's hooks do nothing)."""
        me = weakref.ref(self)

        def hook(param):
            wrapper = me()
            if wrapper is not None:
                wrapper._on_grad(param)
        object.__setattr__(self, "_hooks", [p.register_post_accumulate_grad_hook(hook)
                                            for p in params])

    def _detach(self) -> None:
        for h in self._hooks:
            h.remove()
        object.__setattr__(self, "_hooks", [])

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

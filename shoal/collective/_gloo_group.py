"""The gloo process group: CPU collectives through the binding to the system's Gloo (csrc/gloo.cpp).

Arrays are numpy; a cupy array or a non-contiguous one is copied to a contiguous host array
and the result copied back. Gloo writes straight into the array's memory with the GIL released,
so the caller must not touch it until the operation is done (a Task's `wait()`).

When every rank of the group runs on this host, all_reduce, broadcast and all_gather go through
one shared-memory segment instead (`_shm_group`, csrc/shm.cpp: no sockets, no Python in the
loop); every other operation stays on Gloo. `SHOAL_SHM=0` in the environment keeps everything on Gloo.
"""
from __future__ import annotations

import numpy as np

from shoal.collective import _shm_group
from shoal.collective._group import ProcessGroup, register_backend
from shoal.collective.errors import BackendUnavailableError, RendezvousError

_SHM_SCALED = (np.dtype(np.float32), np.dtype(np.float64))  # dtypes the shm path scales

_HOW_TO = ("the Gloo binding (shoal.collective._gloo) was not built: install the system's Gloo "
           "(`apt-get install libgloo-dev` on Debian/Ubuntu, as root) and reinstall Shoal "
           "(`pip install -e .`, or run ./scripts/test, which does both); or use the nccl backend "
           "on GPUs")


def _binding():
    try:
        from shoal.collective import _gloo
    except ImportError as e:
        raise BackendUnavailableError(f"{_HOW_TO} ({e})") from None
    return _gloo


class GlooGroup(ProcessGroup):
    """Gloo over TCP; every socket binds `host`. Collectives of 256 KiB and more use the ring
    all-reduce, smaller ones bcube (the binding picks). A group whose ranks share this host
    all-reduces, broadcasts and all-gathers through shared memory (`uses_shm`; `shm_ops` counts
    those operations)."""

    name = "gloo"

    def __init__(self, store, *, rank: int, ranks: list[int], host: str, timeout: float):
        super().__init__(store, rank=rank, ranks=ranks, host=host, timeout=timeout)
        g = self._gloo = _binding()
        try:
            self._ctx = g.Context(store, rank, self.size, host, int(timeout * 1000))
        except g.GlooError as e:
            raise RendezvousError(
                f"gloo rendezvous of ranks {self.ranks} failed on rank {ranks[rank]} after up to "
                f"{timeout:g}s: {e}; are all ranks started, with the same store and generation?"
            ) from e
        self._shm = None
        if self.size > 1:
            try:
                self._shm = _shm_group.open_segment(store, rank, self.size, timeout)
            except BaseException:
                self._ctx.close()
                raise

    @property
    def uses_shm(self) -> bool:
        """Whether all_reduce goes through the group's shared-memory segment."""
        return self._shm is not None and not self._shm.closed

    @property
    def shm_ops(self) -> int:
        """How many operations (all_reduce, broadcast, all_gather) went through shared memory."""
        return 0 if self._shm is None else self._shm.ops

    def _to_native(self, array):
        if isinstance(array, np.ndarray):
            if array.flags.c_contiguous and array.flags.writeable:
                return array, None
            native = np.ascontiguousarray(array)

            def back():
                np.copyto(array, native.reshape(array.shape))
            return native, back
        import cupy  # a cupy array: through host memory
        native = np.ascontiguousarray(cupy.asnumpy(array))

        def back():
            array[...] = cupy.asarray(native.reshape(array.shape))
        return native, back

    def _through_shm(self, *arrays) -> bool:
        return self._shm is not None and all(isinstance(a, np.ndarray) and a.flags.c_contiguous
                                             for a in arrays)

    def _all_reduce(self, arr, op):
        if self._through_shm(arr):
            self._shm.all_reduce(arr, op, int(self.timeout * 1000))
        else:
            self._ctx.allreduce(arr, op)

    def _all_reduce_into(self, inputs, out, op, scale):
        if self._through_shm(out, *inputs) and (scale == 1.0 or out.dtype in _SHM_SCALED):
            self._shm.all_reduce_gather(list(inputs), out, op, scale, int(self.timeout * 1000))
        else:
            super()._all_reduce_into(inputs, out, op, scale)

    def _broadcast(self, arr, root):
        if self._through_shm(arr):
            self._shm.broadcast(arr, root, int(self.timeout * 1000))
        else:
            self._ctx.broadcast(arr, root)

    def _reduce(self, arr, root, op):
        self._ctx.reduce(arr, root, op)

    def _all_gather(self, inp, out):
        if self._through_shm(inp, out):
            self._shm.all_gather(inp, out, int(self.timeout * 1000))
        else:
            self._ctx.allgather(inp, out)

    def _scatter(self, inputs, out, root):
        self._ctx.scatter(inputs, out, root)

    def _reduce_scatter(self, inp, out, op):
        self._ctx.reduce_scatter(inp, out, op)

    def _alltoall(self, inp, out):
        self._ctx.alltoall(inp, out)

    def _barrier(self):
        self._ctx.barrier()

    def _send(self, arr, dst, tag):
        self._ctx.send(arr, dst, tag)

    def _recv(self, arr, src, tag):
        self._ctx.recv(arr, src, tag)

    def _close(self):
        if self._shm is not None:
            self._shm.close()
        self._ctx.close()

    def _failure_kind(self, error):
        shm = _shm_group.binding() if self._shm is not None else None
        if shm is not None and isinstance(error, shm.ShmError):
            if isinstance(error, shm.ShmTimeoutError):
                return "timeout"
            return "peer" if isinstance(error, shm.ShmPeerError) else "other"
        g = self._gloo
        if isinstance(error, g.GlooTimeoutError):
            return "timeout"
        if isinstance(error, g.GlooIoError):
            return "peer"
        if isinstance(error, g.GlooError):
            return "other"
        return None


register_backend("gloo", GlooGroup)

"""The nccl process group: GPU collectives through cupy.cuda.nccl (the `gpu` extra).

Arrays are cupy; a numpy array is copied to the device and the result copied back. NCCL's
unique id travels through the rendezvous store. NCCL calls are asynchronous: each operation
runs on the group's own stream (after the caller's stream has finished producing the input)
and is waited for by polling an event, so a peer that never arrives raises a timeout (and the
communicator is aborted) instead of hanging the process.
"""
from __future__ import annotations

import time

import numpy as np

from shoal.collective._group import ProcessGroup, register_backend
from shoal.collective.errors import BackendUnavailableError, RendezvousError, StoreTimeoutError

_POLL_S = 0.0002


class _NcclTimeout(Exception):
    pass


def _cupy():
    try:
        import cupy
        from cupy.cuda import nccl
        if cupy.cuda.runtime.getDeviceCount() < 1:
            raise RuntimeError("no CUDA device")
    except Exception as e:  # noqa: BLE001 - ImportError, CUDA errors: the backend cannot run here
        raise BackendUnavailableError(f"the nccl backend needs a CUDA GPU with cupy and NCCL "
                                      f"(`pip install 'shoal[gpu]'`); here: {e}. Use the gloo "
                                      f"backend on CPUs") from None
    return cupy, nccl


class NcclGroup(ProcessGroup):
    """NCCL over the GPUs of the ranks; one communicator per group."""

    name = "nccl"

    def __init__(self, store, *, rank: int, ranks: list[int], host: str, timeout: float):
        super().__init__(store, rank=rank, ranks=ranks, host=host, timeout=timeout)
        cupy, nccl = self._cupy, self._nccl = _cupy()
        self._types = {np.dtype(k): v for k, v in (
            ("float16", nccl.NCCL_FLOAT16), ("float32", nccl.NCCL_FLOAT32),
            ("float64", nccl.NCCL_FLOAT64), ("int8", nccl.NCCL_INT8), ("uint8", nccl.NCCL_UINT8),
            ("int32", nccl.NCCL_INT32), ("int64", nccl.NCCL_INT64))}
        self._ops = {"sum": nccl.NCCL_SUM, "prod": nccl.NCCL_PROD, "max": nccl.NCCL_MAX,
                     "min": nccl.NCCL_MIN}
        try:
            if rank == 0:
                store.set("nccl_id", np.asarray(nccl.get_unique_id(), dtype=np.int64).tobytes())
            uid = tuple(int(x) for x in np.frombuffer(store.get("nccl_id", timeout), np.int64))
            # every rank announces itself first: NCCL's own init would block without a deadline
            store.set(f"nccl_joined/{rank}", b"1")
            store.wait([f"nccl_joined/{i}" for i in range(self.size)], int(timeout * 1000))
        except StoreTimeoutError as e:
            raise RendezvousError(f"nccl rendezvous of ranks {self.ranks} timed out after "
                                  f"{timeout:g}s: {e}") from e
        self._comm = nccl.NcclCommunicator(self.size, uid, rank)
        self._aborted = False
        self._stream = cupy.cuda.Stream(non_blocking=True)

    def _to_native(self, array):
        cupy = self._cupy
        if isinstance(array, np.ndarray):
            native = cupy.asarray(array)

            def back():
                np.copyto(array, cupy.asnumpy(native).reshape(array.shape))
            return native, back
        if array.flags.c_contiguous:
            return array, None
        native = cupy.ascontiguousarray(array)

        def back():
            array[...] = native
        return native, back

    def _inputs_ready(self):
        # the caller's stream wrote the inputs (and any copies made for this call); the group's
        # own stream does not wait for it by itself
        self._cupy.cuda.get_current_stream().synchronize()

    def _kind(self, arr):
        try:
            return self._types[arr.dtype]
        except KeyError:
            raise TypeError(f"nccl: dtype {arr.dtype} is not supported; use one of "
                            f"{sorted(str(d) for d in self._types)}") from None

    def _op(self, op):
        return self._ops[op]

    def _complete(self):
        """Wait for the group's stream with the group's timeout; abort the communicator after."""
        event = self._stream.record()
        deadline = time.monotonic() + self.timeout
        while not event.done:
            self._comm.check_async_error()  # a failed peer surfaces here, not as a timeout
            if time.monotonic() > deadline:
                self._comm.abort()
                self._aborted = True
                raise _NcclTimeout(f"NCCL operation not complete after {self.timeout:g}s "
                                   f"(communicator aborted)")
            time.sleep(_POLL_S)

    def _all_reduce(self, arr, op):
        s = self._stream.ptr
        self._comm.allReduce(arr.data.ptr, arr.data.ptr, arr.size, self._kind(arr), self._op(op), s)
        self._complete()

    def _broadcast(self, arr, root):
        self._comm.broadcast(arr.data.ptr, arr.data.ptr, arr.size, self._kind(arr), root,
                             self._stream.ptr)
        self._complete()

    def _reduce(self, arr, root, op):
        self._comm.reduce(arr.data.ptr, arr.data.ptr, arr.size, self._kind(arr), self._op(op), root,
                          self._stream.ptr)
        self._complete()

    def _all_gather(self, inp, out):
        self._comm.allGather(inp.data.ptr, out.data.ptr, inp.size, self._kind(inp), self._stream.ptr)
        self._complete()

    def _reduce_scatter(self, inp, out, op):
        self._comm.reduceScatter(inp.data.ptr, out.data.ptr, out.size, self._kind(out),
                                 self._op(op), self._stream.ptr)
        self._complete()

    def _grouped(self, sends, recvs):
        """Point-to-point transfers as one NCCL group: [(array, peer)] each."""
        nccl, s = self._nccl, self._stream.ptr
        nccl.groupStart()
        try:
            for arr, peer in sends:
                self._comm.send(arr.data.ptr, arr.size, self._kind(arr), peer, s)
            for arr, peer in recvs:
                self._comm.recv(arr.data.ptr, arr.size, self._kind(arr), peer, s)
        finally:
            nccl.groupEnd()
        self._complete()

    def _scatter(self, inputs, out, root):
        sends = [(a, i) for i, a in enumerate(inputs) if i != self.rank] if self.rank == root else []
        if self.rank == root:
            out[...] = inputs[root]
        self._grouped(sends, [] if self.rank == root else [(out, root)])

    def _alltoall(self, inp, out):
        n = self.size
        a, b = inp.reshape(n, -1), out.reshape(n, -1)
        b[self.rank] = a[self.rank]
        peers = [i for i in range(n) if i != self.rank]
        self._grouped([(a[i], i) for i in peers], [(b[i], i) for i in peers])

    def _barrier(self):
        one = self._cupy.zeros(1, dtype=np.float32)
        self._all_reduce(one, "sum")

    def _send(self, arr, dst, tag):
        self._grouped([(arr, dst)], [])

    def _recv(self, arr, src, tag):
        self._grouped([], [(arr, src)])

    def _close(self):
        if not self._aborted:
            self._comm.destroy()

    def _failure_kind(self, error):
        if isinstance(error, _NcclTimeout):
            return "timeout"
        if isinstance(error, self._nccl.NcclError):
            if not self._aborted:  # a communicator that failed may still run: never destroy it
                self._comm.abort()
                self._aborted = True
            return "peer"
        return None


register_backend("nccl", NcclGroup)

"""Process groups: one small ABC, a registry of backends, and the machinery they all share.

A backend (gloo, nccl) implements a handful of primitives on its own arrays, in place, and
says which of its exceptions are timeouts. `ProcessGroup` wraps every call: it serializes the
group's operations on one issuing thread at a time (two threads on one Gloo context silently
corrupt results), runs `sync_op=False` calls on a per-group worker thread in the order they
were issued, and turns a backend failure into a typed error. After a timeout it asks the
rendezvous store which ranks reached the same operation, so `CollectiveTimeoutError` names the
ranks that never arrived; the fast path never touches the store.

    register_backend("gloo", GlooGroup)
    group = get_backend("gloo")(store, rank=0, ranks=[0, 1], host="127.0.0.1", timeout=30)
    group.all_reduce(array, "sum")
"""
from __future__ import annotations

import abc
import collections
import threading
import time
from typing import Callable, ClassVar

from shoal.collective.errors import (BackendUnavailableError, CollectiveError,
                                     CollectiveTimeoutError, GroupBrokenError, PeerFailedError,
                                     RendezvousError)

REDUCE_OPS = ("sum", "max", "min", "prod")
_DIAG_GRACE_S = 2.0   # how long a timed-out rank waits for the others' diagnosis marks
_DIAG_POLL_S = 0.05


class Task:
    """An operation started with `sync_op=False`; `wait()` blocks until it is done.

    `wait(timeout=None)` returns True once the operation completed and raises its error if it
    failed (CollectiveTimeoutError, PeerFailedError, ...). With a timeout (seconds) it returns
    False if the operation is still running then. Thread-safe."""

    def __init__(self, op: str):
        self.op = op
        self._done = threading.Event()
        self._error: BaseException | None = None
        self._then: Callable[[], None] | None = None
        self._then_lock = threading.Lock()

    def is_completed(self) -> bool:
        return self._done.is_set()

    def wait(self, timeout: float | None = None) -> bool:
        if not self._done.wait(timeout):
            return False
        if self._error is not None:
            raise self._error
        with self._then_lock:  # copies back into the caller's arrays once, on a waiter's thread
            then, self._then = self._then, None
            if then is not None:
                then()
        return True

    def _finish(self, error: BaseException | None) -> None:
        self._error = error
        self._done.set()


class _Issuer:
    """Runs a group's operations one at a time, in issue order, inline or on a worker thread."""

    def __init__(self, name: str):
        self._name = name
        self._lock = threading.Lock()        # held while an operation runs
        self._queue: collections.deque = collections.deque()
        self._pending = 0                    # queued or running asynchronous operations
        self._cv = threading.Condition(threading.Lock())
        self._thread: threading.Thread | None = None
        self._closed = False

    def run(self, fn: Callable[[], None]) -> None:
        with self._lock:
            if self._pending == 0:  # nothing issued before is still outstanding: run it here
                fn()
                return
        task = self.submit(fn, Task("sync"))
        task.wait()

    def submit(self, fn: Callable[[], None], task: Task) -> Task:
        with self._cv:
            if self._closed:
                raise GroupBrokenError(f"{self._name} is closed")
            self._pending += 1
            self._queue.append((fn, task))
            if self._thread is None:
                self._thread = threading.Thread(target=self._work, name=f"shoal-{self._name}",
                                                daemon=True)
                self._thread.start()
            self._cv.notify()
        return task

    def _work(self) -> None:
        while True:
            with self._cv:
                while not self._queue and not self._closed:
                    self._cv.wait()
                if not self._queue:
                    return
                fn, task = self._queue.popleft()
            error = None
            with self._lock:
                try:
                    fn()
                except BaseException as e:  # noqa: BLE001 - handed to the waiter
                    error = e
                finally:
                    with self._cv:
                        self._pending -= 1
            task._finish(error)
            # drop them before waiting for the next: an operation's closure holds its arrays,
            # which a caller may want to find unreferenced (DataParallel reuses its buffers)
            del fn, task

    def close(self, why: str) -> bool:
        """Fail what is still queued, let the running operation end; True once the worker is idle."""
        with self._cv:
            self._closed = True
            dropped, self._queue = list(self._queue), collections.deque()
            self._pending -= len(dropped)
            self._cv.notify()
        for _, task in dropped:
            task._finish(GroupBrokenError(f"{task.op} was never run: {why}"))
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=5)
            return not self._thread.is_alive()
        return True


class ProcessGroup(abc.ABC):
    """The ranks `ranks` (global, ascending) talking through one backend.

    Subclasses implement the primitives below on contiguous arrays of their own kind, in place
    (`_to_native` converts what the caller gave); the public methods of the API in
    `shoal.collective` handle groups, tensors and `sync_op`. A group is not usable from two
    processes and must not be forked after it is built.

    Raises (from construction): RendezvousError when the ranks do not all join in time."""

    name: ClassVar[str]

    def __init__(self, store, *, rank: int, ranks: list[int], host: str, timeout: float):
        self.store, self.rank, self.ranks = store, rank, list(ranks)
        self.size, self.host, self.timeout = len(self.ranks), host, float(timeout)
        self._seq = 0            # operations issued so far; every rank issues the same sequence
        self._broken: str | None = None
        self._issuer = _Issuer(f"{self.name}-group{self.ranks}")

    # -- what a backend implements ---------------------------------------------------
    @abc.abstractmethod
    def _to_native(self, array):
        """(a contiguous array this backend works on, a function copying a result back or None)."""

    @abc.abstractmethod
    def _all_reduce(self, arr, op: str) -> None: ...

    def _all_reduce_into(self, inputs: list, out, op: str, scale: float) -> None:
        """`out` (native, flat) = the reduction over ranks of the concatenation of `inputs` (flat
        native arrays of out's dtype), times `scale`: here, a copy into `out` then `_all_reduce`;
        a backend may read the inputs where they are instead."""
        off = 0
        for a in inputs:
            part = out[off:off + a.size]
            if scale == 1.0:
                part[...] = a.reshape(-1)
            else:  # scaled on the way in (the copy's one pass)
                part[...] = a.reshape(-1) * out.dtype.type(scale)
            off += a.size
        self._all_reduce(out, op)

    @abc.abstractmethod
    def _broadcast(self, arr, root: int) -> None: ...

    @abc.abstractmethod
    def _reduce(self, arr, root: int, op: str) -> None: ...

    @abc.abstractmethod
    def _all_gather(self, inp, out) -> None: ...

    @abc.abstractmethod
    def _scatter(self, inputs, out, root: int) -> None: ...

    @abc.abstractmethod
    def _reduce_scatter(self, inp, out, op: str) -> None: ...

    @abc.abstractmethod
    def _alltoall(self, inp, out) -> None: ...

    @abc.abstractmethod
    def _barrier(self) -> None: ...

    @abc.abstractmethod
    def _send(self, arr, dst: int, tag: int) -> None: ...

    @abc.abstractmethod
    def _recv(self, arr, src: int, tag: int) -> None: ...

    @abc.abstractmethod
    def _close(self) -> None: ...

    @abc.abstractmethod
    def _failure_kind(self, error: BaseException) -> str | None:
        """'timeout', 'peer' or 'other' for an error of the backend; None if it is not one."""

    # -- the shared machinery --------------------------------------------------------
    @property
    def broken(self) -> str | None:
        """Why this group is unusable, or None."""
        return self._broken

    def execute(self, op: str, fn: Callable[[], None], *, sync_op: bool = True,
                then: Callable[[], None] | None = None) -> Task | None:
        """Run `fn` (backend primitives) as operation `op` of this group.

        Synchronous: returns None once done (and `then` ran). Asynchronous: returns a Task;
        `then` runs in its `wait()`. Errors: GroupBrokenError, CollectiveTimeoutError,
        PeerFailedError, CollectiveError."""
        if self._broken is not None:
            raise GroupBrokenError(f"{op}: the group of ranks {self.ranks} is unusable after an "
                                   f"earlier failure ({self._broken}); a failed Gloo/NCCL group "
                                   f"cannot be reused: rendezvous again (destroy_process_group() "
                                   f"and init_parallel_env() with a new generation, or restart "
                                   f"the job)")

        point_to_point = op in ("send", "recv")

        def guarded():
            if self._broken is not None:  # an operation queued behind one that failed
                raise GroupBrokenError(f"{op} was not run: the group of ranks {self.ranks} failed "
                                       f"before it ({self._broken})")
            if not point_to_point:  # only collectives: every rank counts the same sequence
                self._seq += 1
            seq = self._seq
            try:
                fn()
            except BaseException as e:  # noqa: BLE001 - re-raised as a typed error
                kind = self._failure_kind(e)
                if kind is None:
                    raise
                raise self._fail(op, seq, kind, e, diagnose=not point_to_point) from e
        self._inputs_ready()
        if sync_op:
            self._issuer.run(guarded)
            if then is not None:
                then()
            return None
        task = Task(op)
        task._then = then
        return self._issuer.submit(guarded, task)

    def _inputs_ready(self) -> None:
        """On the caller's thread, before an operation is issued: make its inputs readable by
        the issuing thread (a device backend waits for the caller's stream)."""

    def _fail(self, op: str, seq: int, kind: str, error: BaseException, *,
              diagnose: bool = True) -> CollectiveError:
        if self._broken is None:
            self._broken = f"{op} #{seq}: {error}"
        arrived = self._arrivals(op, seq) if diagnose else None
        missing = [r for r in self.ranks if r not in arrived] if arrived is not None else []
        elsewhere = {r: o for r, o in (arrived or {}).items() if o != op}
        if elsewhere:
            who = (f"rank(s) {sorted(elsewhere)} of the group {self.ranks} are in a different "
                   f"collective at this point ({', '.join(f'rank {r}: {o}' for r, o in sorted(elsewhere.items()))}): "
                   f"the ranks issue different sequences of collectives")
        elif missing:
            who = f"rank(s) {missing} of the group {self.ranks} did not arrive"
        elif arrived is not None:
            who = (f"every rank of the group {self.ranks} arrived (a slow link or a peer that "
                   f"failed mid-operation)")
        else:
            who = ("point-to-point: the peer did not match it in time" if not diagnose else
                   "the store could not be asked which ranks arrived")
        if kind == "timeout":
            return CollectiveTimeoutError(
                f"{op} timed out after {self.timeout:g}s on rank {self.ranks[self.rank]}: {who}; "
                f"check those ranks' logs (a crash, a hang, or a different sequence of "
                f"collectives), or raise the timeout", op=op, missing=missing, timeout=self.timeout)
        if kind == "peer":
            return PeerFailedError(f"{op} failed on rank {self.ranks[self.rank]}: a peer closed its "
                                   f"connection ({error}); {who}; see the failed rank's log")
        return CollectiveError(f"{op} failed on rank {self.ranks[self.rank]}: {error}")

    def _arrivals(self, op: str, seq: int) -> dict[int, str] | None:
        """Global rank -> the operation it is in at position `seq`, for the ranks that reached
        that position too, asked through the store (each call bounded by the grace period)."""
        key = f"diag/{seq}/"
        grace = min(_DIAG_GRACE_S, self.timeout)
        try:
            self.store.set(f"{key}{self.rank}", op.encode(), timeout=grace)
            keys = {r: f"{key}{i}" for i, r in enumerate(self.ranks)}
            deadline = time.monotonic() + grace
            while True:
                arrived = [r for r, k in keys.items() if self.store.check([k], timeout=grace)]
                if len(arrived) == self.size or time.monotonic() > deadline:
                    return {r: self.store.get(keys[r], grace).decode(errors="replace")
                            for r in arrived}
                time.sleep(_DIAG_POLL_S)
        except RendezvousError:
            return None

    def close(self) -> None:
        """Release the group's connections (idempotent); later operations raise GroupBrokenError
        and queued ones fail with it. An operation still running keeps its resources until it
        ends (its own timeout)."""
        if self._broken is None:
            self._broken = "the group was closed"
        if self._issuer.close(self._broken):
            self._close()


_BACKENDS: dict[str, type[ProcessGroup]] = {}


def register_backend(name: str, cls: type[ProcessGroup]) -> None:
    """Make `cls` the process group of backend `name` (a name may be registered once)."""
    if name in _BACKENDS and _BACKENDS[name] is not cls:
        raise CollectiveError(f"collective backend {name!r} is already registered "
                              f"({_BACKENDS[name].__name__})")
    _BACKENDS[name] = cls


def get_backend(name: str) -> type[ProcessGroup]:
    """The process-group class of `name`; an unknown name lists the registered ones."""
    _load_builtin()
    if name not in _BACKENDS:
        raise BackendUnavailableError(f"collective backend {name!r} is not registered; known: "
                                      f"{sorted(_BACKENDS)}. Did you forget to call "
                                      f"register_backend?")
    return _BACKENDS[name]


def backends() -> list[str]:
    _load_builtin()
    return sorted(_BACKENDS)


def _load_builtin() -> None:
    # the built-in backends register themselves on import; their heavy imports stay lazy
    from shoal.collective import _gloo_group, _nccl_group  # noqa: F401

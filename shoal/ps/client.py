"""The worker's client of the parameter servers (ps-lite style pull / push).

Keys are partitioned over the servers by a mixing hash (ps/partition.py);
a pull deduplicates its keys, asks every server for its share at once and
scatters the rows back to the caller's order; a push merges the gradients of
duplicate keys first (one hashing pass of the native map's merge_rows). Every call has a timeout; pushes
carry (client id, sequence number) and are retried on a timeout or a dropped
connection with the same number, so a server applies each push once.

Thread-safety: every method may be called from several threads at once.
`*_async` methods return without waiting: call `wait()` on the handle, and do
not modify the arrays you passed until it returns.
"""
from __future__ import annotations

import os
import time
import uuid

import numpy as np

from shoal.ps.errors import ConnectionLostError, PSError, TableError
from shoal.ps._keymap import merge_rows, unique_inverse
from shoal.ps.partition import partition
from shoal.ps.rpc import RpcClient
from shoal.ps.spec import spec_to_dict


class PSHandle:
    """The pending result of an async call: `wait(timeout=None)` returns it or raises."""

    def __init__(self, finish):
        self._finish, self._done, self._value = finish, False, None

    def wait(self, timeout: float | None = None):
        if not self._done:
            self._value = self._finish(timeout)
            self._done = True
        return self._value


def _groups(owner: np.ndarray, n: int):
    """(server, positions) for each server that owns some of the keys."""
    # owners are small ints: a stable sort of uint16 is numpy's O(n) radix sort
    order = np.argsort(owner.astype(np.uint16) if n <= 65535 else owner, kind="stable")
    bounds = np.searchsorted(owner[order], np.arange(n + 1))
    for s in range(n):
        if bounds[s + 1] > bounds[s]:
            yield s, order[bounds[s]:bounds[s + 1]]


class PSClient:
    """Pull and push against all parameter servers of a job.

    Args:
        endpoints: server endpoints in server-index order (a list or the
            comma-separated PADDLE_PSERVERS_IP_PORT_LIST).
        token: the job token (SHOAL_JOB_TOKEN).
        auth: 'plain' or 'curve', as the servers.
        timeout: seconds any one call may take before PSTimeoutError.
        retries: how many times a timed-out push is resent (same sequence number).
        transport: instead of endpoints and token, an object with RpcClient's
            call interface (local mode passes a LocalTransport).
    """

    @classmethod
    def local(cls) -> "PSClient":
        """A client of one in-process server (local mode: no sockets, same handlers)."""
        from shoal.ps.local import LocalTransport
        return cls(None, transport=LocalTransport())

    def __init__(self, endpoints, token: str | None = None, auth: str = "plain", timeout: float = 30.0,
                 retries: int = 2, client_id: str | None = None, *, transport=None):
        self.rpc = transport if transport is not None else \
            RpcClient(endpoints, token, auth=auth, timeout=timeout, client_id=client_id)
        self.n = len(self.rpc.endpoints)
        self.timeout, self.retries = timeout, retries
        self.specs: dict = {}

    # -- plumbing --------------------------------------------------------------------
    def _wait_all(self, handles: list, timeout: float | None = None) -> list:
        out, first_error = [], None
        for h in handles:
            try:
                out.append(h.wait(timeout))
            except PSError as e:  # wait for the rest too, so nothing is left in flight
                first_error = first_error or e
                out.append(None)
        if first_error is not None:
            raise first_error
        return out

    def _broadcast(self, op: str, header: dict, timeout: float | None = None) -> list:
        handles = [self.rpc.call_async(s, op, header, timeout=timeout) for s in range(self.n)]
        return [h for h, _ in self._wait_all(handles)]

    def _push(self, server: int, op: str, header: dict, arrays: list,
              timeout: float | None = None) -> PSHandle:
        """A call that must apply once: numbered, and resent with the same number when the
        connection dropped. Every attempt shares the call's one deadline (`timeout`, default the
        client's), so a hung server fails the push within it, not a multiple of it."""
        header = dict(header, seq=self.rpc.next_seq())
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        current = [self.rpc.call_async(server, op, header, arrays, timeout=timeout)]

        def finish(timeout=None):
            for attempt in range(self.retries + 1):
                try:
                    return current[0].wait(timeout)
                except ConnectionLostError:
                    # applied or not, the same seq makes the resend safe
                    left = deadline - time.monotonic() - 0.1 * (attempt + 1)
                    if attempt == self.retries or left <= 0:
                        raise
                    time.sleep(0.1 * (attempt + 1))
                    current[0] = self.rpc.call_async(server, op, header, arrays, timeout=left)
        return PSHandle(finish)

    def _spec(self, table: str, kind: str):
        spec = self.specs.get(table)
        if spec is None:
            raise TableError(f"table {table!r} is unknown to this client; call create_table(spec) "
                             f"(or register_table) first")
        if spec.kind != kind:
            raise TableError(f"table {table!r} is {spec.kind}, not {kind}")
        return spec

    @staticmethod
    def _keys(keys) -> np.ndarray:
        if not isinstance(keys, np.ndarray) or keys.dtype != np.uint64 or keys.ndim != 1:
            raise TableError(f"keys must be a 1-D uint64 array, got "
                             f"{getattr(keys, 'dtype', type(keys).__name__)} "
                             f"{getattr(keys, 'shape', '')}")
        return keys

    # -- tables ------------------------------------------------------------------------
    def create_table(self, spec) -> bool:
        """Create `spec` on every server (an identical spec again is fine; a different one raises).

        Returns True when the table is new on every server, False when it was
        there already (created by another worker, or loaded from a checkpoint).
        """
        replies = self._broadcast("create_table", {"spec": spec_to_dict(spec)})
        self.specs[spec.name] = spec
        return all(r.get("created", False) for r in replies)

    def register_table(self, spec) -> None:
        """Know a table some other worker created (no server call)."""
        self.specs[spec.name] = spec

    # -- sparse ------------------------------------------------------------------------
    def pull_sparse_async(self, table: str, keys: np.ndarray, training: bool = True,
                          unique: bool = False) -> PSHandle:
        """Start a pull; `unique` says the keys hold no duplicates (the sparse layers dedup
        already), which skips the client's dedup and reorder. Correct either way."""
        spec = self._spec(table, "sparse")
        if unique:
            uniq, inverse = self._keys(keys), None
        else:
            uniq, inverse = unique_inverse(self._keys(keys))
        owner = partition(uniq, self.n)
        header = {"table": table, "training": training, "unique": True}
        parts = [(pos, self.rpc.call_async(s, "pull_sparse", header, [uniq[pos]]))
                 for s, pos in _groups(owner, self.n)]

        def finish(timeout=None):
            out = np.empty((len(uniq), spec.dim), np.float32)
            replies = self._wait_all([h for _, h in parts], timeout)
            for (pos, _), (_, arrays) in zip(parts, replies):
                out[pos] = arrays[0]
            return out if inverse is None else out[inverse]
        return PSHandle(finish)

    def pull_sparse(self, table: str, keys: np.ndarray, training: bool = True,
                    unique: bool = False) -> np.ndarray:
        """Rows [len(keys), dim] in the order of `keys`. Read-only when not `training`."""
        return self.pull_sparse_async(table, keys, training, unique).wait()

    def push_sparse_async(self, table: str, keys: np.ndarray, grads: np.ndarray,
                          shows: np.ndarray | None = None, clicks: np.ndarray | None = None,
                          sync: tuple[int, int] | None = None) -> PSHandle:
        """Start a push; `sync=(step, n_workers)` makes each server hold it until all n workers'
        pushes of that step arrived and apply their sum once (sync mode)."""
        spec = self._spec(table, "sparse")
        keys = self._keys(keys)
        n = len(keys)
        shows = np.ones(n, np.float32) if shows is None else np.asarray(shows, np.float32)
        clicks = np.zeros(n, np.float32) if clicks is None else np.asarray(clicks, np.float32)
        if grads.shape != (n, spec.dim) or shows.shape != (n,) or clicks.shape != (n,):
            raise TableError(f"push_sparse {table!r}: grads {grads.shape}, shows {shows.shape}, "
                             f"clicks {clicks.shape} do not fit {n} keys of dim {spec.dim}")
        packed = np.concatenate([np.asarray(grads, np.float32), shows[:, None], clicks[:, None]], axis=1)
        uniq, merged = merge_rows(keys, packed)
        owner = partition(uniq, self.n)
        # on the wire a push is (keys, [grads | show | click]): merged rows go as they are
        header = {"table": table} if sync is None else {"table": table, "sync": list(sync)}
        if sync is None:
            groups = _groups(owner, self.n)
        else:  # every server must hear from every worker, with no keys if need be
            groups = list(_groups(owner, self.n))
            have = {s for s, _ in groups}
            groups += [(s, np.zeros(0, np.int64)) for s in range(self.n) if s not in have]
        handles = [self._push(s, "push_sparse", header, [uniq[pos], merged[pos]])
                   for s, pos in groups]
        return PSHandle(lambda timeout=None: self._wait_all(handles, timeout) and None)

    def push_sparse(self, table, keys, grads, shows=None, clicks=None) -> None:
        """Apply gradients with their shows and clicks (duplicate keys merged first)."""
        self.push_sparse_async(table, keys, grads, shows, clicks).wait()

    def push_sparse_delta(self, table: str, keys: np.ndarray, deltas: np.ndarray,
                          shows: np.ndarray | None = None, clicks: np.ndarray | None = None) -> None:
        """GEO: add deltas to existing rows (duplicate keys merged first), with the shows and
        clicks seen since the last sync when given (admission, shrink and saves use them)."""
        spec = self._spec(table, "sparse")
        deltas = np.ascontiguousarray(deltas, np.float32).reshape(len(keys), spec.dim)
        if shows is not None:
            deltas = np.concatenate([deltas, np.asarray(shows, np.float32).reshape(-1, 1),
                                     np.asarray(clicks, np.float32).reshape(-1, 1)], axis=1)
        uniq, merged = merge_rows(self._keys(keys), deltas)
        owner = partition(uniq, self.n)
        self._wait_all([self._push(s, "push_delta", {"table": table}, [uniq[pos], merged[pos]])
                        for s, pos in _groups(owner, self.n)])

    # -- pass mode ---------------------------------------------------------------------
    #: keys per pass message: far below the wire's frame limit for any row width
    PASS_CHUNK_KEYS = 1 << 20

    def pull_records(self, table: str, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Pass mode: (found [n], records [n, width]) of unique `keys`, pulled for training: each
        row's whole record (embedding, rule state, statistics, embedx flag); see
        SparseTable.pull_records. In messages of at most PASS_CHUNK_KEYS keys, all servers at
        once. Blocks (each message bounded by the client's timeout)."""
        self._spec(table, "sparse")
        keys = self._keys(keys)
        step = self.PASS_CHUNK_KEYS
        parts = [(pos[i:i + step], self.rpc.call_async(s, "pull_records", {"table": table},
                                                       [keys[pos[i:i + step]]]))
                 for s, pos in _groups(partition(keys, self.n), self.n)
                 for i in range(0, len(pos), step)]
        replies = self._wait_all([h for _, h in parts])
        widths = {h.get("width") for h, _ in replies}
        if len(widths) > 1:
            raise TableError(f"pull_records {table!r}: servers hold records of different widths "
                             f"{sorted(widths)}; every server must run the same Shoal and spec")
        width = widths.pop() if widths else 0
        found = np.zeros(len(keys), bool)
        records = np.zeros((len(keys), width), np.float32)
        for (pos, _), (_, (f, rec)) in zip(parts, replies):
            found[pos] = f.view(bool)
            records[pos] = rec
        return found, records

    def push_pass_async(self, table: str, keys: np.ndarray, packed: np.ndarray,
                        sync: tuple[int, int, int], timeout: float | None = None) -> PSHandle:
        """Start a pass write-back (shoal.ps.pass_records' layout), `sync=(pass, n_workers,
        worker)`: every server hears from every worker (with no keys if need be), in chunks of
        at most PASS_CHUNK_KEYS keys (header 'chunk': [i, total]), and applies the pass once all
        n workers' chunks arrived; the call that completes it is answered after the merge, so
        `timeout` (default the client's) bounds that too."""
        self._spec(table, "sparse")
        # no merge here: the servers merge every worker's rows of a key anyway
        keys, packed = self._keys(keys), np.ascontiguousarray(packed, np.float32)
        groups = dict(_groups(partition(keys, self.n), self.n))
        step = self.PASS_CHUNK_KEYS
        handles = []
        for s in range(self.n):
            pos = groups.get(s, np.zeros(0, np.int64))
            total = max(1, -(-len(pos) // step))
            for i in range(total):
                at = pos[i * step:(i + 1) * step]
                header = {"table": table, "sync": list(sync), "chunk": [i, total]}
                handles.append(self._push(s, "push_pass", header, [keys[at], packed[at]], timeout))
        return PSHandle(lambda t=None: self._wait_all(handles, t) and None)

    # -- dense -------------------------------------------------------------------------
    def _split(self, spec, vector: np.ndarray, what: str) -> list:
        vector = np.asarray(vector, np.float32).reshape(-1)
        if vector.shape != (spec.size,):
            raise TableError(f"{what} {spec.name!r}: expected {spec.size} values, got {vector.shape[0]}")
        return [vector[slice(*spec.bounds(s, self.n))] for s in range(self.n)]

    def init_dense(self, table: str, values: np.ndarray) -> None:
        parts = self._split(self._spec(table, "dense"), values, "init_dense")
        self._wait_all([self.rpc.call_async(s, "init_dense", {"table": table}, [p])
                        for s, p in enumerate(parts)])

    def pull_dense(self, table: str) -> np.ndarray:
        self._spec(table, "dense")
        replies = self._wait_all([self.rpc.call_async(s, "pull_dense", {"table": table})
                                  for s in range(self.n)])
        return np.concatenate([arrays[0] for _, arrays in replies])

    def push_dense_async(self, table: str, grad: np.ndarray, lr: float | None = None,
                         sync: tuple[int, int] | None = None) -> PSHandle:
        """Start a push of the whole gradient; `lr` overrides the rule's learning rate for this
        step; `sync=(step, n_workers)` as for push_sparse_async."""
        parts = self._split(self._spec(table, "dense"), grad, "push_dense")
        header = {"table": table}
        if lr is not None:
            header["lr"] = float(lr)
        if sync is not None:
            header["sync"] = list(sync)
        handles = [self._push(s, "push_dense", header, [p]) for s, p in enumerate(parts)]
        return PSHandle(lambda timeout=None: self._wait_all(handles, timeout) and None)

    def push_dense(self, table: str, grad: np.ndarray, lr: float | None = None,
                   sync: tuple[int, int] | None = None) -> None:
        self.push_dense_async(table, grad, lr, sync).wait()

    def push_dense_delta(self, table: str, delta: np.ndarray) -> None:
        parts = self._split(self._spec(table, "dense"), delta, "push_delta")
        self._wait_all([self._push(s, "push_delta", {"table": table}, [p]) for s, p in enumerate(parts)])

    # -- coordination ------------------------------------------------------------------
    def barrier(self, name: str, count: int, timeout: float = 60.0, *,
                member: int | None = None) -> None:
        """Return once `count` callers reached barrier `name` (on server 0). A caller that gives
        its rank as `member` counts once however often it arrives (a restarted worker meeting
        the others where its predecessor already had)."""
        header = {"name": name, "count": count, "timeout": timeout}
        if member is not None:
            header["member"] = member
        self.rpc.call(0, "barrier", header, timeout=timeout + 5.0)

    def gatherings(self, prefix: str = "", timeout: float = 10.0) -> dict:
        """The barriers and reduces open on server 0 whose names start with `prefix`:
        name -> {"count", "arrived", "members"}."""
        header, _ = self.rpc.call(0, "gatherings", {"prefix": prefix}, timeout=timeout)
        return header["open"]

    def reduce(self, name: str, array: np.ndarray, count: int, timeout: float = 60.0) -> np.ndarray:
        """The sum of `array` over `count` callers of reduce `name` (through server 0)."""
        _, arrays = self.rpc.call(0, "reduce", {"name": name, "count": count, "timeout": timeout},
                                  [np.ascontiguousarray(array)], timeout=timeout + 5.0)
        return np.array(arrays[0])

    # -- checkpoints and maintenance -------------------------------------------------------
    def save(self, directory: str, mode: int = 0, timeout: float = 600.0, *,
             save_id: str | None = None, worker_files: list[str] | None = None) -> dict:
        """Save every table (mode 0 all, 1 delta, 2 base; 3 the day tick) into `directory`.

        Each server writes its shard; then server 0 writes the manifest, so
        the save becomes the directory's checkpoint all at once. `worker_files`
        (already written into `directory`) are recorded in the manifest and
        kept with this save, so the workers' state belongs to the same save.
        """
        directory = os.path.abspath(directory)
        save_id = save_id or f"{int(time.time())}-{uuid.uuid4().hex[:8]}"
        header = {"dir": directory, "mode": mode, "save_id": save_id}
        replies = self._broadcast("save", header, timeout=timeout)
        if mode == 3:
            return {"day_tick": True}
        files = [r["file"] for r in replies]
        self.rpc.call(0, "commit_save", dict(header, files=files, worker_files=list(worker_files or [])),
                      timeout=timeout)
        return {"dir": directory, "save_id": save_id, "files": files,
                "rows": [r["rows"] for r in replies]}

    def load(self, directory: str, timeout: float = 600.0) -> list:
        """Load the checkpoint in `directory` onto these servers (any number of them)."""
        replies = self._broadcast("load", {"dir": os.path.abspath(directory)}, timeout=timeout)
        return [r["rows"] for r in replies]

    def shrink(self, table: str | None = None, day_tick: bool = False) -> int:
        header = {"day_tick": day_tick} if table is None else {"table": table, "day_tick": day_tick}
        return sum(sum(r["deleted"].values()) for r in self._broadcast("shrink", header))

    def unresponsive(self, timeout: float = 2.0) -> list[str]:
        """The endpoints of servers that do not answer a `stats` call within `timeout` seconds
        (a diagnosis after a timeout: which server is down or hung). Blocks up to `timeout`."""
        handles = [self.rpc.call_async(s, "stats", {}, timeout=timeout) for s in range(self.n)]
        down = []
        for s, h in enumerate(handles):
            try:
                h.wait()
            except PSError:
                down.append(self.rpc.endpoints[s])
        return down

    def stats(self) -> list[dict]:
        return self._broadcast("stats", {})

    def stop_servers(self) -> None:
        """Ask every server to drain and exit.

        A server that answers and closes at once may drop the connection before
        its reply is read; a lost connection on `stop` counts as stopped.
        """
        handles = [self.rpc.call_async(s, "stop", {}) for s in range(self.n)]
        for h in handles:
            try:
                h.wait()
            except ConnectionLostError:
                pass

    def close(self) -> None:
        self.rpc.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

"""The `ssd` tier: cold records in RocksDB (rocksdict), one column family per table shard.

Layout: one RocksDB database per server at `<ssd_path>/server-<index>`,
shared by every table and shard of that server; a shard's rows live in the
column family `<table>.<shard>` (a shard iterates only its own rows for
shrink, day_tick and export). Keys are 8-byte big-endian strings, values the
raw float32 record. Writes go in one WriteBatch per call, reads in one
multi-get; the per-key byte strings are built by numpy (`view` + `tolist`)
and fed to RocksDB through `map`, so no Python loop of ours runs per key.
The WAL is on (RocksDB's default): a write batch that returned survives a
kill of the server.
"""
from __future__ import annotations

import collections
import itertools
import os
import threading
from collections.abc import Iterator

import numpy as np
import rocksdict

from shoal.ps.errors import TableError
from shoal.ps.tiers._base import StorageTier, register_tier

_BE = np.dtype(">u8")


def _options() -> rocksdict.Options:
    opt = rocksdict.Options(raw_mode=True)
    opt.create_if_missing(True)
    opt.create_missing_column_families(True)
    return opt


class _Db:
    """A RocksDB database shared by the shards of one server, closed when its last user leaves."""

    _open: dict[str, _Db] = {}
    _lock = threading.Lock()

    def __init__(self, path: str):
        self.path, self.users, self.opt = path, 0, _options()
        try:
            os.makedirs(path, exist_ok=True)
            try:
                names = rocksdict.Rdict.list_cf(path, self.opt)
            except Exception:  # a new database: only 'default' will exist
                names = []
            self.db = rocksdict.Rdict(path, options=self.opt, column_families={
                n: _options() for n in names if n != "default"})
            self.names = set(names)
        except Exception as e:
            raise TableError(f"cannot open the RocksDB cold tier at {path!r}: {e}; check that the "
                             f"directory is writable and that no other process (another server "
                             f"with the same ssd_path and index) holds it") from e

    @classmethod
    def acquire(cls, path: str) -> _Db:
        path = os.path.abspath(path)
        with cls._lock:
            db = cls._open.get(path)
            if db is None:
                db = cls._open[path] = _Db(path)
            db.users += 1
            return db

    def family(self, name: str):
        with self._lock:
            if name in self.names:
                return self.db.get_column_family(name)
            self.names.add(name)
            return self.db.create_column_family(name, _options())

    def release(self) -> None:
        with self._lock:
            self.users -= 1
            if self.users == 0:
                del self._open[self.path]
                self.db.close()
                self.db = None


def _key_bytes(keys: np.ndarray) -> list:
    return keys.astype(_BE).view("V8").tolist()


class SsdTier(StorageTier):
    """Records of one shard in a RocksDB column family. Durable: reopening finds them again."""

    def __init__(self, width: int, path: str, family: str):
        super().__init__(width)
        self.family = family
        self._db = _Db.acquire(path)
        try:
            self._cf = self._db.family(family)
            self._handle = self._db.db.get_column_family_handle(family)
        except Exception as e:
            self._db.release()
            raise TableError(f"cannot open column family {family!r} of the RocksDB at {path!r}: "
                             f"{e}") from e
        self._void = np.dtype((np.void, 4 * width))
        self._n = sum(len(k) for k, _ in self.batches(65536))

    @classmethod
    def open(cls, *, width, table, shard, server, path) -> SsdTier:
        if not path:
            raise TableError(f"table {table!r}: storage 'ssd' needs ssd_path (a directory for "
                             f"RocksDB)")
        return cls(width, os.path.join(path, f"server-{server:05d}"), f"{table}.{shard}")

    def _records(self, values: list, n: int) -> np.ndarray:
        raw = b"".join(values)
        if len(raw) != n * 4 * self.width:
            raise TableError(f"RocksDB column family {self.family!r} at {self._db.path!r} holds "
                             f"records of another width than {self.width} float32 (written with "
                             f"another rule, dim or layout?); use another ssd_path or delete it")
        return np.frombuffer(raw, np.float32).reshape(n, self.width).copy()

    def get(self, keys):
        values = self._cf.get(_key_bytes(keys))
        found = np.array(values, dtype=object) != None  # noqa: E711 (elementwise on an object array)
        out = np.zeros((len(keys), self.width), np.float32)
        n = int(found.sum())
        if n:
            out[found] = self._records(list(itertools.compress(values, found)), n)
        return found, out

    def _write(self, fn, *columns) -> None:
        batch = rocksdict.WriteBatch(raw_mode=True)
        batch.set_default_column_family(self._handle)
        collections.deque(map(getattr(batch, fn), *columns), maxlen=0)
        self._db.db.write(batch)

    def put(self, keys, records, *, fresh):
        if len(keys) == 0:
            return
        block = np.ascontiguousarray(records, np.float32)
        self._write("put", _key_bytes(keys), block.view(self._void).ravel().tolist())
        if fresh:
            self._n += len(keys)

    def delete(self, keys):
        if len(keys) == 0:
            return
        self._write("delete", _key_bytes(keys))
        self._n -= len(keys)

    def batches(self, size: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        items = self._cf.items()  # a RocksDB iterator reads from an implicit snapshot
        try:
            while chunk := list(itertools.islice(items, size)):
                keys, values = zip(*chunk)
                yield (np.frombuffer(b"".join(keys), _BE).astype(np.uint64),
                       self._records(values, len(keys)))
        finally:
            del items

    def __len__(self) -> int:
        return self._n

    def close(self) -> None:
        if self._db is not None:
            self._cf.close()
            self._cf = self._handle = None
            self._db.release()
            self._db = None


register_tier("ssd", SsdTier)

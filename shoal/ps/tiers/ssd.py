"""The `ssd` tier: cold records in RocksDB (rocksdict), one column family per table shard.

Layout: one RocksDB database per server at `<ssd_path>/server-<index>`,
shared by every table and shard of that server; a shard's rows live in the
column family `<table>.<shard>` (a shard iterates only its own rows for
shrink, day_tick and export). Keys are 8-byte big-endian strings, values the
raw float32 record. Writes go in one WriteBatch per call (per 65536 keys),
reads in one pass over the keys (per 65536 keys); the per-key byte strings are built by numpy (`view` + `tolist`)
and fed to RocksDB through `map`, so no Python loop of ours runs per key.

Durability: the WAL is on (RocksDB's default), so a write batch that
returned survives a kill of the server and the database opens cleanly
again. `open(empty=False)` finds a family's records again (the tier's own
durability); `open(empty=True)`, what a tiered table does, drops the family
and starts it empty (see shoal.ps.tiers.tiered for why).

Options, chosen by measurement (bench/tiered.py, a 10M-key Zipf stream,
and single-operation timings with 800k records of 88 bytes):
- no compression: the records are float32 that barely compress;
- a 10-bit Bloom filter per table file: a lookup of an absent key skips
  most files;
- a hash-linked memtable keyed by the whole 8-byte key: a write of one
  record went from ~1.8 us (the default skiplist) to ~0.6 us, which took
  the Zipf case from 0.15x to 0.29x the all-RAM speed (with the known-cold
  filter on in both). Whole-family iteration (shrink, day_tick, export)
  then needs total-order reads, which it asks for, and flushes sort the
  memtable in RocksDB's background threads;
- RAM outside the table's budget, per server: a 64 MiB block cache and at
  most 256 MiB of write buffers (all column families together).
Reads are one `get` per key through `map` rather than rocksdict's list
multi-get, which cost 1.1 us per present key against 0.85 us for single
gets on memtable-resident records (and 0.5 us against 0.2 on a tiny one).
The WAL costs ~0.15 us of a record's write and stays on.
"""
from __future__ import annotations

import collections
import itertools
import operator
import os
import threading
from collections.abc import Iterator

import numpy as np
import rocksdict

from shoal.ps.errors import TableError
from shoal.ps.tiers._base import StorageTier, register_tier

_BE = np.dtype(">u8")
_CACHE_BYTES = 64 << 20         # block cache per database (per server)
_MEMTABLES_BYTES = 256 << 20    # all write buffers of a database together (per server)
_MEMTABLE_BUCKETS = 1 << 18     # ~2 records per bucket in a full 64 MiB write buffer
_CHUNK = 65536                  # keys per multi-get or write batch


def _options(cache: rocksdict.Cache | None = None) -> rocksdict.Options:
    opt = rocksdict.Options(raw_mode=True)
    opt.create_if_missing(True)
    opt.create_missing_column_families(True)
    opt.set_compression_type(rocksdict.DBCompressionType.none())
    table = rocksdict.BlockBasedOptions()
    table.set_bloom_filter(10, False)
    if cache is not None:
        table.set_block_cache(cache)
    opt.set_block_based_table_factory(table)
    # the hash memtable needs every key's prefix: the whole key (all keys are 8 bytes)
    opt.set_prefix_extractor(rocksdict.SliceTransform.create_fixed_prefix(8))
    opt.set_memtable_factory(rocksdict.MemtableFactory.hash_link_list(_MEMTABLE_BUCKETS))
    opt.set_allow_concurrent_memtable_write(False)  # the hash memtable cannot take parallel inserts
    return opt


def _total_order() -> rocksdict.ReadOptions:
    ro = rocksdict.ReadOptions()
    ro.set_total_order_seek(True)  # iterate every key, not one prefix (see _options)
    return ro


class _Db:
    """A RocksDB database shared by the shards of one server, closed when its last user leaves."""

    _open: dict[str, _Db] = {}
    _lock = threading.Lock()

    def __init__(self, path: str):
        self.path, self.users, self.in_use = path, 0, set()
        self.cache = rocksdict.Cache(_CACHE_BYTES)
        self.opt = _options(self.cache)
        self.opt.set_db_write_buffer_size(_MEMTABLES_BYTES)
        try:
            os.makedirs(path, exist_ok=True)
            try:
                names = rocksdict.Rdict.list_cf(path, self.opt)
            except Exception:  # a new database: only 'default' will exist
                names = []
            self.db = rocksdict.Rdict(path, options=self.opt, column_families={
                n: _options(self.cache) for n in names if n != "default"})
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

    def family(self, name: str, empty: bool):
        """The column family `name`, for one user at a time; with `empty`, dropped and made anew
        (RocksDB deletes the old files in the background: no per-key work)."""
        with self._lock:
            if name in self.in_use:
                raise TableError(f"column family {name!r} of the RocksDB at {self.path!r} is "
                                 f"already open in this process (two tables with one name on "
                                 f"one server index?); close the first one, or use another "
                                 f"table name or ssd_path")
            if name in self.names and empty:
                self.db.drop_column_family(name)
                self.names.discard(name)
            cf = self.db.get_column_family(name) if name in self.names else \
                self.db.create_column_family(name, _options(self.cache))
            self.names.add(name)
            self.in_use.add(name)
            return cf

    def release(self, name: str | None) -> None:
        with self._lock:
            self.in_use.discard(name)
            self.users -= 1
            if self.users == 0:
                del self._open[self.path]
                self.db.close()
                self.db = None


def _key_bytes(keys: np.ndarray) -> list:
    return keys.astype(_BE).view("V8").tolist()


def _chunks(n: int) -> Iterator[slice]:
    """Slices of at most _CHUNK: a spill of a million rows must not hold a million byte strings
    (~0.2 KB each with the WriteBatch's copy) at once."""
    return (slice(start, min(n, start + _CHUNK)) for start in range(0, n, _CHUNK))


class SsdTier(StorageTier):
    """Records of one shard in a RocksDB column family (see the module docstring)."""

    def __init__(self, width: int, path: str, family: str, empty: bool = False):
        super().__init__(width)
        self.family = family
        self._db = _Db.acquire(path)
        try:
            self._cf = self._db.family(family, empty)
        except TableError:
            self._db.release(None)
            raise
        except Exception as e:
            self._db.release(None)
            raise TableError(f"cannot open column family {family!r} of the RocksDB at {path!r}: "
                             f"{e}") from e
        self._handle = self._db.db.get_column_family_handle(family)
        self._void = np.dtype((np.void, 4 * width))
        try:
            self._n = 0 if empty else sum(len(k) for k, _ in self.batches(65536))
        except TableError:
            self.close()
            raise

    @classmethod
    def open(cls, *, width, table, shard, server, path, empty=False) -> SsdTier:
        if not path:
            raise TableError(f"table {table!r}: storage 'ssd' needs ssd_path (a directory for "
                             f"RocksDB)")
        return cls(width, os.path.join(path, f"server-{server:05d}"), f"{table}.{shard}", empty)

    def _records(self, values, n: int) -> np.ndarray:
        raw = b"".join(values)
        if len(raw) != n * 4 * self.width:
            raise TableError(f"RocksDB column family {self.family!r} at {self._db.path!r} holds "
                             f"records of another width than {self.width} float32 (written with "
                             f"another rule, dim or layout?); use another ssd_path or delete it")
        return np.frombuffer(raw, np.float32).reshape(n, self.width).copy()

    def get(self, keys):
        found = np.zeros(len(keys), bool)
        out = np.zeros((len(keys), self.width), np.float32)
        for at in _chunks(len(keys)):
            values = list(map(self._cf.get, _key_bytes(keys[at])))
            hit = np.fromiter(map(operator.is_not, values, itertools.repeat(None)), bool,
                              len(values))
            n = int(hit.sum())
            if n:
                found[at] = hit
                out[at][hit] = self._records(itertools.compress(values, hit), n)
        return found, out

    def _write(self, fn, *columns) -> None:
        batch = rocksdict.WriteBatch(raw_mode=True)
        batch.set_default_column_family(self._handle)
        collections.deque(map(getattr(batch, fn), *columns), maxlen=0)
        try:
            self._db.db.write(batch)
        except Exception as e:  # disk full, I/O error: RocksDB refuses further writes
            raise TableError(f"writing to the RocksDB cold tier (column family {self.family!r} "
                             f"at {self._db.path!r}) failed: {e}; the table's cold rows may be "
                             f"incomplete: free the disk or fix the error, then restart the "
                             f"server from the last checkpoint") from e

    def put(self, keys, records, *, fresh):
        block = np.ascontiguousarray(records, np.float32).view(self._void).ravel()
        for at in _chunks(len(keys)):
            self._write("put", _key_bytes(keys[at]), block[at].tolist())
        if fresh:
            self._n += len(keys)

    def delete(self, keys):
        for at in _chunks(len(keys)):
            self._write("delete", _key_bytes(keys[at]))
        self._n -= len(keys)

    def batches(self, size: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        items = self._cf.items(read_opt=_total_order())  # reads from an implicit snapshot
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
            self._db.release(self.family)
            self._db = None


register_tier("ssd", SsdTier)

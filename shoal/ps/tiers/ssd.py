"""The `ssd` tier: cold records in RocksDB (rocksdict) as segments of a few rows, one column
family per table shard, with the key index in RAM.

Layout: one RocksDB database per server at `<ssd_path>/server-<index>`,
shared by every table and shard of that server; a shard's records live in
the column family `<table>.<shard>`. A RocksDB value is a SEGMENT of
SEGMENT_ROWS records (the float32 records, then their uint64 keys, padded to
full size), under its 8-byte big-endian segment id. The index, a KeyMap in
RAM, gives every cold key its position (segment id * SEGMENT_ROWS + slot).

Why segments and an index (bench/tiered.py, the 10M-key Zipf stream): a
RocksDB operation costs about the same for one 100-byte record as for a
segment of eight (0.6-1.5 us through rocksdict, most of it per operation),
and a spill writes thousands of records at once. One record per RocksDB key
took ~9.3k writes and deletes per batch, 0.32x the all-RAM speed; eight per
value take ~0.9k writes, and a promotion writes nothing: it updates the
index, leaving a dead slot, and copies the records straight out of the
segments' bytes (0.53-0.54x with eviction 'lfu'). What it costs: RAM per cold key,
the map's 16-byte slots at 35-70% load plus a 4-byte position, ~33 bytes per
cold key measured (reported by `ram_bytes`, outside the table's
memory_budget_mb like RocksDB's own memory); a read fetches a whole segment
(eight records) for one. Also measured: a skip-list memtable, 4 or 16 rows
per segment, 2**15 or 2**20 memtable buckets, list multi-gets, and the writes
in a background thread (RocksDB releases the GIL, but on two cores the
stream got no faster) gained nothing or lost. Without the WAL the stream
would be ~6% faster; it stays on (see Durability).

Dead slots: a slot dies when its key is promoted, deleted or written again
(a rewrite goes to a new segment). A segment left with no live slot by a
put is overwritten or deleted in that put's own write batch; one left so by
a delete is deleted in the delete's; one left so by a promotion is stale
until a later put or delete that writes overwrites or deletes it the same
way (a promotion writes nothing; so are the ids a failed put of several
batches wrote under). When the dead slots
of the partly live segments outnumber the live rows (or _GC_FLOOR, whichever
is more), the sparsest segments are rewritten: their live rows go into new
segments, so after a put or a delete the disk holds at most about twice the
live records.

Whole-tier passes (shrink, day_tick, export) iterate the family from an
implicit snapshot and keep a slot only if the index still places its key
there, so the caller may put or delete the keys already yielded while it
iterates, and nothing else (a key rewritten before it was yielded would be
missed: it moved out of the snapshot). The snapshot's stale segments are
skipped: a put reusing one's id could put a yielded key back in its old
slot, and its old copy there would pass for live. A batch holds up to
max(size, SEGMENT_ROWS) rows.

Durability: the WAL is on, so a write batch that returned survives a kill
of the server and the database opens cleanly again; one call's writes are
one WriteBatch (atomic) up to _CHUNK segments. The index is not
persisted: a tier always starts EMPTY (its column family is dropped and
made anew, no per-key pass), which is what a restarted server needs anyway:
its hot rows died with it, so its cold rows alone are a state the table
never was in, and the last checkpoint brings every row back (see
shoal.ps.tiers.tiered). The WAL stays on although a successor drops the
family: what a dead server wrote stays consistent on disk, as the design
asks, for ~6% of the Zipf stream's speed.

Options, chosen by measurement: no compression (float32 records barely
compress); a 10-bit Bloom filter per table file; a hash-linked memtable
keyed by the whole 8-byte id (a write of a small value: ~0.6 us against
~1.8 with the default skip list; whole-family iteration then asks for
total-order reads, and flushes sort the memtable in RocksDB's background
threads); per server, a 64 MiB block cache and at most 256 MiB of write
buffers (all column families together). Reads are one `get` per segment
through `map`: rocksdict's list multi-get cost 1.9 us per key against 0.7
for single gets on memtable-resident values.
"""
from __future__ import annotations

import collections
import itertools
import os
import threading
from collections.abc import Iterator

import numpy as np
import rocksdict

from shoal.ps._keymap import KeyMap, segment_slots, unique_inverse
from shoal.ps.errors import TableError
from shoal.ps.tiers._base import StorageTier, register_tier

SEGMENT_ROWS = 8                # records per RocksDB value (measured: see the module docstring)
_BE = np.dtype(">u8")
_CACHE_BYTES = 64 << 20         # block cache per database (per server)
_MEMTABLES_BYTES = 256 << 20    # all write buffers of a database together (per server)
_MEMTABLE_BUCKETS = 1 << 18     # hash buckets of one memtable
_CHUNK = 8192                   # segments per write batch or read pass
_GC_FLOOR = 4096                # dead slots tolerated whatever the live rows
_MAX_SEGMENTS = 2 ** 32 // SEGMENT_ROWS  # positions are uint32


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

    def family(self, name: str):
        """The column family `name`, empty (dropped and made anew: RocksDB deletes the old files
        in the background), for one user at a time."""
        with self._lock:
            if name in self.in_use:
                raise TableError(f"column family {name!r} of the RocksDB at {self.path!r} is "
                                 f"already open in this process (two tables with one name on "
                                 f"one server index?); close the first one, or use another "
                                 f"table name or ssd_path")
            if name in self.names:
                self.db.drop_column_family(name)
            cf = self.db.create_column_family(name, _options(self.cache))
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


def _ids(segments: np.ndarray) -> list:
    return segments.astype(_BE).view("V8").tolist()


def _segments_of(positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(distinct segment ids int64, inverse) of slot `positions`: one hashing pass (np.unique's
    sort cost ~7% of a promotion)."""
    segs, inv = unique_inverse((positions // SEGMENT_ROWS).astype(np.uint64))
    return segs.astype(np.int64), inv


def _chunks(n: int) -> Iterator[slice]:
    return (slice(start, min(n, start + _CHUNK)) for start in range(0, n, _CHUNK))


class SsdTier(StorageTier):
    """Records of one shard in segments of a RocksDB column family (see the module docstring)."""

    def __init__(self, width: int, path: str, family: str):
        super().__init__(width)
        self.family = family
        self._db = _Db.acquire(path)
        try:
            self._cf = self._db.family(family)
        except TableError:
            self._db.release(None)
            raise
        except Exception as e:
            self._db.release(None)
            raise TableError(f"cannot open column family {family!r} of the RocksDB at {path!r}: "
                             f"{e}") from e
        self._handle = self._db.db.get_column_family_handle(family)
        self._words = SEGMENT_ROWS * (width + 2)   # float32 words of a segment: records, then keys
        self._value = np.dtype((np.void, 4 * self._words))
        self._index = KeyMap()                     # key -> index row
        self._where = np.zeros(0, np.uint32)       # index row -> segment * SEGMENT_ROWS + slot
        self._live = np.zeros(0, np.uint8)         # segment id -> live slots (0: free or unused)
        self._free = np.zeros(0, np.int64)         # ids below len(_live) with no value in RocksDB
        self._stale: list[np.ndarray] = []         # ids with no live slot whose value may be there
        self._dead = 0                             # dead slots of the segments with a live one
        self._iterating = 0                        # open batches(): no compaction meanwhile
        self._compacting = False

    @classmethod
    def open(cls, *, width, table, shard, server, path) -> SsdTier:
        if not path:
            raise TableError(f"table {table!r}: storage 'ssd' needs ssd_path (a directory for "
                             f"RocksDB)")
        return cls(width, os.path.join(path, f"server-{server:05d}"), f"{table}.{shard}")

    # -- segments ----------------------------------------------------------------------
    def _split(self, words: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(records [m, SEGMENT_ROWS, width], keys [m, SEGMENT_ROWS]) of segment words [m, _words]."""
        cut = SEGMENT_ROWS * self.width
        return (words[:, :cut].reshape(-1, SEGMENT_ROWS, self.width),
                words[:, cut:].view(np.uint64))

    def _damaged(self, what: str) -> TableError:
        return TableError(f"RocksDB column family {self.family!r} at {self._db.path!r} {what}: "
                          f"the cold tier is damaged; restart the server from the last checkpoint")

    def _words_of(self, values: list, what: str) -> np.ndarray:
        raw = b"" if None in values else b"".join(values)
        if len(raw) != len(values) * 4 * self._words:
            raise self._damaged(what)
        return np.frombuffer(raw, np.float32).reshape(len(values), self._words)

    def _read(self, segments: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        parts = [self._words_of(list(map(self._cf.get, _ids(segments[at]))),
                                "lacks segments its index places rows in")
                 for at in _chunks(len(segments))]
        return self._split(parts[0] if len(parts) == 1 else np.concatenate(parts))

    def _write(self, ids: np.ndarray, words: np.ndarray | None, deletes: np.ndarray) -> None:
        """Put segment `words` [len(ids), _words] under `ids` and delete the `deletes` ids.

        Up to _CHUNK segments this is ONE WriteBatch, which RocksDB applies atomically (a failure
        writes nothing); a larger put goes in batches of _CHUNK, the deletes in the last one, so
        such a put must not overwrite a segment the index still needs (see put)."""
        try:
            batch = self._new_batch()
            if words is not None:
                values = words.view(self._value).ravel()
                for at in _chunks(len(ids)):
                    if at.start:
                        self._db.db.write(batch)
                        batch = self._new_batch()
                    collections.deque(map(batch.put, _ids(ids[at]), values[at].tolist()), maxlen=0)
            collections.deque(map(batch.delete, _ids(deletes)), maxlen=0)
            self._db.db.write(batch)
        except Exception as e:  # disk full, I/O error: RocksDB refuses further writes
            raise TableError(f"writing to the RocksDB cold tier (column family {self.family!r} "
                             f"at {self._db.path!r}) failed: {e}; the table's cold rows may be "
                             f"incomplete: free the disk or fix the error, then restart the "
                             f"server from the last checkpoint") from e

    def _new_batch(self) -> rocksdict.WriteBatch:
        batch = rocksdict.WriteBatch(raw_mode=True)
        batch.set_default_column_family(self._handle)
        return batch

    def _kill(self, positions: np.ndarray, grouped=None) -> tuple[np.ndarray, np.ndarray]:
        """(segments, live slots each keeps) once the slots at `positions` die; nothing applied.
        `grouped`: (segments, slots dying in each) when the caller has them already."""
        if grouped is None:
            segs, inv = _segments_of(positions)
            grouped = segs, np.bincount(inv, minlength=len(segs))
        segs, n = grouped
        return segs, self._live[segs].astype(np.int64) - n

    def _apply_kill(self, segs: np.ndarray, left: np.ndarray) -> None:
        before = self._live[segs].astype(np.int64)
        keep = left > 0
        self._dead += int((before[keep] - left[keep]).sum()) - \
            int((SEGMENT_ROWS - before[~keep]).sum())
        self._live[segs] = left

    def _allocate(self, n: int, emptied: np.ndarray) -> tuple[np.ndarray, int]:
        """(`n` segment ids: `emptied` ones first, then free ones, then new ones; free ids taken)."""
        if n <= len(emptied):
            return emptied[:n], 0
        taken = min(n - len(emptied), len(self._free))
        start = len(self._live)
        fresh = n - len(emptied) - taken
        if start + fresh > _MAX_SEGMENTS:
            raise TableError(f"the cold tier of {self.family!r} would pass {_MAX_SEGMENTS:,} "
                             f"segments of {SEGMENT_ROWS} rows; give the table more shards")
        return np.concatenate([emptied, self._free[len(self._free) - taken:],
                               np.arange(start, start + fresh, dtype=np.int64)]), taken

    # -- the tier ----------------------------------------------------------------------
    def contains(self, keys):
        return self._index.lookup(keys) >= 0

    def get(self, keys):
        rows = self._index.lookup(keys)
        found = rows >= 0
        return found, self._records_at(keys, found, rows)[0]

    def _records_at(self, keys: np.ndarray, found: np.ndarray,
                    rows: np.ndarray) -> tuple[np.ndarray, tuple | None]:
        """(records [n, width] of `keys`, zeros where not `found`, read from their segments;
        (segments read, found keys in each), for _kill)."""
        out = np.zeros((len(keys), self.width), np.float32)
        at = np.flatnonzero(found)
        grouped = None
        if len(at):
            pos = self._where[rows[at]]
            segs, inv = _segments_of(pos)
            values = list(map(self._cf.get, _ids(segs)))
            # the records straight from the segments' bytes into out (no joined copy, no gathers)
            status = segment_slots(values, inv, (pos % SEGMENT_ROWS).astype(np.int64), keys[at],
                                   at, out, SEGMENT_ROWS)
            if status == 1:
                raise self._damaged("lacks segments its index places rows in (or holds segments "
                                    "of another size)")
            if status != 0:
                raise self._damaged("holds other keys where its index places rows")
            grouped = segs, np.bincount(inv, minlength=len(segs))
        return out, grouped

    def take(self, keys):
        self._compact()
        rows = self._index.lookup(keys)
        found = rows >= 0
        out, grouped = self._records_at(keys, found, rows)  # a failed read has changed nothing
        self._index.erase(keys[found])
        self._forget(self._where[rows[found]], grouped, defer=True)
        return found, out

    def delete(self, keys):
        self._compact()
        rows = self._index.erase(keys)
        found = rows >= 0
        try:
            self._forget(self._where[rows[found]])
        except BaseException:
            self._index.insert_with_rows(keys[found], rows[found])
            raise

    def _forget(self, positions: np.ndarray, grouped=None, defer: bool = False) -> None:
        """The slots at `positions` die (their keys already left the index). Segments left with
        no live slot are deleted with the stale ones and their ids freed; with `defer` (a
        promotion) they become stale instead, for the next put to overwrite or delete in its own
        batch: a RocksDB write per promotion cost ~4% of the Zipf stream."""
        if len(positions) == 0:
            return
        segs, left = self._kill(positions, grouped)
        if defer:
            self._apply_kill(segs, left)
            self._stale.append(segs[left == 0])
            return
        emptied = np.concatenate([self._stale_ids(), segs[left == 0]])
        self._write(emptied, None, emptied)
        self._apply_kill(segs, left)
        self._free = np.concatenate([self._free, emptied])
        self._stale = []

    def _stale_ids(self) -> np.ndarray:
        if len(self._stale) != 1:  # appended to per promotion, joined when used
            self._stale = [np.concatenate(self._stale)] if self._stale else [np.zeros(0, np.int64)]
        return self._stale[0]

    def _cover(self, top: int) -> None:
        """Let the segment table reach id `top` - 1, with room to grow into on the free list (ids
        from `top` on; never past the cap)."""
        if top > len(self._live):
            size = min(max(top, 2 * len(self._live)), _MAX_SEGMENTS)
            self._live = np.concatenate([self._live, np.zeros(size - len(self._live), np.uint8)])
            self._free = np.concatenate([self._free, np.arange(top, size)])

    def put(self, keys, records):
        self._compact()
        n = len(keys)
        if n == 0:
            return
        rows, is_new = self._index.get_or_insert(keys)  # undone below if the write fails
        ids = None
        try:
            if self._index.row_bound > len(self._where):
                self._where = np.concatenate([self._where, np.zeros(
                    max(self._index.row_bound, 2 * len(self._where)) - len(self._where), np.uint32)])
            segs, left = self._kill(self._where[rows[~is_new]])
            emptied = np.concatenate([segs[left == 0], self._stale_ids()])
            m = -(-n // SEGMENT_ROWS)
            # emptied ids are overwritten only by a put of one (atomic) batch: a put in several
            # could fail after overwriting segments the restored index still points into
            reuse = emptied if m <= _CHUNK else emptied[:0]
            ids, taken = self._allocate(m, reuse)
            deletes = emptied[min(m, len(reuse)):]
            self._write(ids, self._segment_words(keys, records, m), deletes)
        except BaseException:
            self._index.erase(keys[is_new])
            if ids is not None and m > _CHUNK:
                # its first batches may have landed: their ids hold values no key is in, stale
                # (never free) until a later put or delete overwrites or deletes them
                if taken:
                    self._free = self._free[:len(self._free) - taken]
                self._cover(int(ids.max()) + 1)
                self._stale.append(ids)
            raise
        # written: the segment table and the positions
        self._apply_kill(segs, left)
        self._stale = []
        if taken:
            self._free = self._free[:len(self._free) - taken]
        self._free = np.concatenate([self._free, deletes])
        self._cover(int(ids.max()) + 1)
        counts = np.full(m, SEGMENT_ROWS, np.uint8)
        counts[-1] = n - (m - 1) * SEGMENT_ROWS
        self._live[ids] = counts
        self._dead += SEGMENT_ROWS - int(counts[-1])
        self._where[rows] = (ids[:, None] * SEGMENT_ROWS + np.arange(SEGMENT_ROWS)).ravel()[:n]

    def _segment_words(self, keys: np.ndarray, records: np.ndarray, m: int) -> np.ndarray:
        """[m, _words] segments of `keys` and their `records` in order; the slots past the last
        key are padding (zero records under key 0, never live)."""
        n, full = len(keys), len(keys) // SEGMENT_ROWS
        words = np.empty((m, self._words), np.float32)
        recs, stored = self._split(words)
        recs[:full] = np.asarray(records, np.float32)[:full * SEGMENT_ROWS].reshape(
            full, SEGMENT_ROWS, self.width)
        stored[:full] = np.asarray(keys, np.uint64)[:full * SEGMENT_ROWS].reshape(full, SEGMENT_ROWS)
        if full < m:
            tail = n - full * SEGMENT_ROWS
            words[full] = 0.0
            recs[full, :tail] = records[full * SEGMENT_ROWS:]
            stored[full, :tail] = keys[full * SEGMENT_ROWS:]
        return words

    def _placed(self, segs: np.ndarray, keys: np.ndarray) -> np.ndarray:
        """bool per slot of the whole segments `segs` (their stored `keys`, slot order): the
        index still places that key in that slot."""
        pos = (segs[:, None] * SEGMENT_ROWS + np.arange(SEGMENT_ROWS)).ravel()
        rows = self._index.lookup(keys)
        live = rows >= 0
        live[live] = self._where[rows[live]] == pos[live]
        return live

    def _compact(self) -> None:
        """Rewrite the sparsest segments when dead slots outnumber the live rows (and the floor),
        down to half as many dead slots as live rows. Runs at the START of a put, take or delete,
        so a failure here (a failed write, rolled back by the rewrite's own put) leaves that
        operation undone rather than half done; never during an iteration."""
        if self._iterating or self._compacting or self._dead <= max(len(self), _GC_FLOOR):
            return
        partly = np.flatnonzero((self._live > 0) & (self._live < SEGMENT_ROWS))
        partly = partly[np.argsort(self._live[partly], kind="stable")]
        gain = np.cumsum(SEGMENT_ROWS - self._live[partly].astype(np.int64))
        picked = partly[:int(np.searchsorted(gain, self._dead - len(self) // 2)) + 1]
        records, stored = self._read(picked)
        keys = stored.ravel()
        live = self._placed(picked, keys)
        self._compacting = True
        try:
            self.put(keys[live], records.reshape(-1, self.width)[live])
        finally:
            self._compacting = False

    def batches(self, size: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        per = max(1, size // SEGMENT_ROWS)
        # a stale segment is in the snapshot with old copies of keys in its dead slots; a put
        # reusing its id may place a yielded key in its old slot again, and the old copy would
        # then pass for live: the snapshot's stale segments are skipped (and any id past the
        # table: no key is placed there)
        skip = np.zeros(len(self._live), bool)
        skip[self._stale_ids()] = True
        self._iterating += 1
        items = self._cf.items(read_opt=_total_order())  # reads from an implicit snapshot
        try:
            while chunk := list(itertools.islice(items, per)):
                ids, values = zip(*chunk)
                records, stored = self._split(self._words_of(list(values), "holds segments of "
                                                             "another size than its table's rows"))
                segs = np.frombuffer(b"".join(ids), _BE).astype(np.int64)
                keys = stored.ravel()
                keep = segs < len(skip)
                keep[keep] = ~skip[segs[keep]]
                live = self._placed(segs, keys) & np.repeat(keep, SEGMENT_ROWS)
                if live.any():
                    yield keys[live], records.reshape(-1, self.width)[live]
        finally:
            del items
            self._iterating -= 1

    def __len__(self) -> int:
        return len(self._index)

    def ram_bytes(self) -> int:
        return (16 * self._index.capacity + self._where.nbytes + self._live.nbytes +
                self._free.nbytes + sum(a.nbytes for a in self._stale))

    def close(self) -> None:
        if self._db is not None:
            self._cf.close()
            self._cf = self._handle = None
            self._db.release(self.family)
            self._db = None
            self._index.clear()


register_tier("ssd", SsdTier)

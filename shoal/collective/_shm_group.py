"""Shared memory for the ranks of a gloo group that all run on one host (csrc/shm.cpp).

`open_segment(store, rank, size, timeout)` runs at group creation, on every rank of the group
(after Gloo's own rendezvous, so every rank is there):

1. each rank publishes its host identity (/proc/sys/kernel/random/boot_id, the hostname, and
   its pid and mount namespaces: ranks in different containers of one machine share no
   /dev/shm) under `shm/host/<rank>` of the group's store, or "off" when `SHOAL_SHM=0` in its
   environment; any difference, or any "off", means no shared memory for the whole group;
2. rank 0 creates a segment named after its pid, the store prefix and a random token and
   publishes the name (`shm/name`; empty when creating failed), the others attach;
3. every rank publishes whether it attached (`shm/ok/<rank>`); once rank 0 has read all of
   them it unlinks the name, so /dev/shm holds nothing of the job after that point, even if a
   rank crashes later. Only a crash of rank 0 in the few milliseconds between creating and
   unlinking leaves a name behind; the next creation on the host removes names whose creator
   pid is gone.

The group then all-reduces contiguous numpy arrays through the segment (`Segment.all_reduce`:
copy in, reduce-scatter, all-gather, in C++ with the GIL released), broadcasts and all-gathers
through it too, and keeps Gloo for every other operation. Memory: 2 x size x CHUNK_BYTES per group (1 MiB for two ranks).

Environment: `SHOAL_SHM=0` turns it off (every collective over Gloo's TCP); `1` or unset: on.
"""
from __future__ import annotations

import os
import re
import secrets
import socket

from shoal.collective.errors import CollectiveError, RendezvousError

# One slot per rank and set; bigger messages go through in chunks. 256 KiB measured best for
# 4-7 MiB messages on 2 ranks (the slots stay in L2; 128 KiB pays too many barriers, 1-4 MiB
# stream through memory): 1.8 ms vs 2.2 ms at 4 MiB chunks for 7.5 MB.
CHUNK_BYTES = 256 << 10
_ENV = "SHOAL_SHM"
_DEV_SHM = "/dev/shm"
_NAME_RE = re.compile(r"shoal-(\d+)-")


def enabled() -> bool:
    """Whether this process may use shared memory (`SHOAL_SHM`: "0" off, "1" or unset on)."""
    value = os.environ.get(_ENV, "1")
    if value not in ("0", "1"):
        raise CollectiveError(f"{_ENV}={value!r}: expected 0 (every collective over Gloo's TCP) "
                              f"or 1 (the default: shared memory between the ranks of a group "
                              f"on one host)")
    return value == "1"


def binding():
    """shoal.collective._shm, or None when it was not built (then Gloo does everything)."""
    try:
        from shoal.collective import _shm
    except ImportError:
        return None
    return _shm


def host_identity() -> bytes:
    """What two processes share exactly when they can map the same /dev/shm segment."""
    parts = [socket.gethostname()]
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            parts.append(f.read().strip())
    except OSError:
        parts.append(f"no-boot-id-{os.getpid()}")   # unknown: never equal to another process's
    for ns in ("pid", "mnt"):
        try:
            parts.append(os.readlink(f"/proc/self/ns/{ns}"))
        except OSError:
            pass
    return "|".join(parts).encode()


def _remove_stale() -> None:
    """Unlink segments this module left behind when their creator died before unlinking."""
    try:
        names = os.listdir(_DEV_SHM)
    except OSError:
        return
    for name in names:
        m = _NAME_RE.match(name)
        if m is None:
            continue
        pid = int(m.group(1))
        try:
            os.kill(pid, 0)
            continue   # alive (or not ours to signal): leave it
        except ProcessLookupError:
            pass
        except PermissionError:
            continue
        try:
            os.unlink(os.path.join(_DEV_SHM, name))
        except OSError:
            pass


def _segment_name(store) -> str:
    prefix = re.sub(r"[^A-Za-z0-9]+", "-", getattr(store, "prefix", "")).strip("-") or "group"
    return f"/shoal-{os.getpid()}-{prefix[-80:]}-{secrets.token_hex(8)}"


def open_segment(store, rank: int, size: int, timeout: float, *, chunk_bytes: int | None = None):
    """The group's shared-memory segment (a `_shm.Segment`), or None where the group cannot or
    must not use one (ranks on different hosts, SHOAL_SHM=0 on any rank, no binding, a rank
    that could not attach). Every rank of the group calls it, in the same order relative to
    the group's other store traffic; it blocks until all did.

    Raises RendezvousError when a rank does not take part within `timeout` seconds."""
    shm = binding()
    mine = host_identity() if (shm is not None and enabled()) else b"off"
    chunk = int(chunk_bytes or CHUNK_BYTES)
    try:
        store.set(f"shm/host/{rank}", mine, timeout=timeout)
        hosts = [store.get(f"shm/host/{r}", timeout) for r in range(size)]
        if b"off" in hosts or any(h != hosts[0] for h in hosts):
            return None
        segment, name = None, ""
        if rank == 0:
            _remove_stale()
            name = _segment_name(store)
            try:
                segment = shm.Segment(name, 0, size, chunk, True)
            except (OSError, ValueError):
                name = ""   # e.g. /dev/shm full or missing: the group stays on Gloo
            store.set("shm/name", name.encode(), timeout=timeout)
        else:
            name = store.get("shm/name", timeout).decode()
            if name:
                try:
                    segment = shm.Segment(name, rank, size, chunk, False)
                except (OSError, ValueError):
                    segment = None
        if not name:
            return None
        try:
            store.set(f"shm/ok/{rank}", b"1" if segment is not None else b"0", timeout=timeout)
            oks = [store.get(f"shm/ok/{r}", timeout) for r in range(size)]
        finally:
            if rank == 0:
                shm.unlink_segment(name)
    except RendezvousError as e:
        raise RendezvousError(f"shared-memory setup of a gloo group of {size} ranks failed on "
                              f"group rank {rank}: {e}; are all ranks alive? (SHOAL_SHM=0 "
                              f"skips this step)") from e
    if any(ok != b"1" for ok in oks):
        if segment is not None:
            segment.close()
        return None
    return segment

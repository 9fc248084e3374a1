"""Checkpoints of the parameter servers: one file per server shard, a manifest last.

A save writes `shard-<server>-<save id>.npz` from every server (temp name,
fsync, rename) and then server 0 writes `MANIFEST.json` the same way, naming
those files. Until the manifest's rename the previous checkpoint in the
directory stays whole and loadable; files of older saves are removed only
after. Loading reads the manifest, checks the partition hash, and lets every
server take from every shard file the rows that hash to it now, so a
checkpoint loads onto any number of servers. Files are .npz of plain arrays
(read with allow_pickle=False) and JSON: nothing is unpickled.
"""
from __future__ import annotations

import glob
import json
import os
import time
import zipfile

import numpy as np

from shoal._atomic import atomic_write
from shoal.ps.errors import CheckpointError
from shoal.ps.partition import PARTITION_HASH, PARTITION_VERSION, partition
from shoal.ps.spec import spec_to_dict

MANIFEST = "MANIFEST.json"
FORMAT = "shoal-ps-checkpoint-v1"
MODES = {0: "all", 1: "delta", 2: "base"}


def shard_file(server: int, save_id: str) -> str:
    return f"shard-{server:05d}-{save_id}.npz"


def save_shard(directory: str, server: int, save_id: str, tables: dict, mode: int) -> dict:
    """Write this server's rows of every table; returns {"file", "rows": {table: n}}."""
    if mode not in MODES:
        raise CheckpointError(f"save mode {mode!r} is not one of {sorted(MODES)} "
                              f"(0 all, 1 delta, 2 base; 3 is the day tick)")
    if not save_id.replace("-", "").isalnum():
        raise CheckpointError(f"save id {save_id!r} must be letters, digits and '-'")
    os.makedirs(directory, exist_ok=True)
    arrays, rows = {}, {}
    for name, table in tables.items():
        if table.spec.kind == "sparse":
            data = table.export(mode)
            rows[name] = int(len(data["keys"]))
        else:
            data = table.export()
            rows[name] = int(len(data["values"]))
        for field, arr in data.items():
            arrays[f"{table.spec.kind}/{name}/{field}"] = arr
    name = shard_file(server, save_id)
    atomic_write(os.path.join(directory, name), lambda f: np.savez(f, **arrays))
    return {"file": name, "rows": rows}


def write_manifest(directory: str, save_id: str, mode: int, specs: list, files: list[str],
                   worker_files: list[str] = ()) -> None:
    """Make the save of `save_id` the directory's checkpoint (atomically), then drop the files of
    older saves. `worker_files` are the workers' own state files of this save (kept, listed)."""
    for kind, names in (("shard", files), ("worker", worker_files)):
        for f in names:
            if not isinstance(f, str) or os.path.basename(f) != f or not f.endswith(".npz"):
                raise CheckpointError(f"cannot commit save {save_id}: {f!r} is not a file name in "
                                      f"the checkpoint directory")
            if not os.path.exists(os.path.join(directory, f)):
                raise CheckpointError(f"cannot commit save {save_id}: {kind} file {f} is missing "
                                      f"in {directory}")
    manifest = {"format": FORMAT, "save_id": save_id, "mode": mode, "mode_name": MODES[mode],
                "n_servers": len(files), "files": files, "worker_files": list(worker_files),
                "tables": [spec_to_dict(s) for s in specs],
                "partition_hash": PARTITION_HASH, "partition_version": PARTITION_VERSION,
                "created": time.time()}
    data = json.dumps(manifest, indent=1).encode()
    atomic_write(os.path.join(directory, MANIFEST), lambda f: f.write(data))
    keep = set(files) | set(worker_files)
    for pattern in ("shard-*.npz", "worker-*.npz"):
        for old in glob.glob(os.path.join(directory, pattern)):
            if os.path.basename(old) not in keep:
                os.unlink(old)


def read_manifest(directory: str) -> dict:
    path = os.path.join(directory, MANIFEST)
    if not os.path.exists(path):
        raise CheckpointError(f"no checkpoint in {directory!r}: {MANIFEST} is missing (the "
                              f"directory is empty or a save did not complete)")
    try:
        with open(path, "rb") as f:
            manifest = json.loads(f.read())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path}: unreadable manifest ({e})") from e
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a Shoal PS checkpoint (format "
                              f"{manifest.get('format') if isinstance(manifest, dict) else None!r})")
    if (manifest.get("partition_hash"), manifest.get("partition_version")) != \
            (PARTITION_HASH, PARTITION_VERSION):
        raise CheckpointError(
            f"{path}: rows were partitioned with {manifest.get('partition_hash')} "
            f"v{manifest.get('partition_version')}, this Shoal uses {PARTITION_HASH} "
            f"v{PARTITION_VERSION}; load it with the Shoal version that wrote it")
    return manifest


def _open(directory: str, name: str):
    path = os.path.join(directory, name)
    try:
        return np.load(path, allow_pickle=False)
    except (OSError, ValueError, zipfile.BadZipFile) as e:
        raise CheckpointError(f"shard file {path} is missing or unreadable ({e})") from e


def load_into(directory: str, server: int, n_servers: int, tables: dict) -> dict:
    """Load the rows of every table in the checkpoint that belong to `server` of `n_servers`.

    `tables` maps names to this server's tables (created from the manifest's
    specs by the caller). Sparse rows are re-partitioned by key; dense
    vectors are reassembled and re-split. Returns {table: rows loaded}.
    """
    manifest = read_manifest(directory)
    loaded = {name: 0 for name in tables}
    dense_parts: dict[str, list] = {}
    for fname in manifest["files"]:
        with _open(directory, fname) as z:
            for name, table in tables.items():
                prefix = f"{table.spec.kind}/{name}/"
                fields = [k[len(prefix):] for k in z.files if k.startswith(prefix)]
                if not fields:
                    continue
                if table.spec.kind == "dense":
                    dense_parts.setdefault(name, []).append({f: z[prefix + f] for f in fields})
                    continue
                keys = z[prefix + "keys"]
                mine = partition(keys, n_servers) == server
                if not mine.any():
                    continue
                table.load_rows({f: z[prefix + f][mine] for f in fields})
                loaded[name] += int(mine.sum())
    for name, parts in dense_parts.items():
        table = tables[name]
        parts.sort(key=lambda p: int(p["start"][0]))
        full = {k: np.concatenate([p[k] for p in parts]) if k in parts[0] else None
                for k in ("values", "m", "v")}
        table.load_full(full["values"], full["m"], full["v"], int(parts[0]["step"][0]))
        loaded[name] = table.end - table.start
    return loaded

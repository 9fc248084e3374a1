"""`save` / `load`: nested state (dicts, lists, tensors, arrays, numbers) in a safe file.

The file is a numpy .npz archive: the arrays as .npy members plus one member,
``__shoal_tree__``, holding a JSON description of the nesting. Loading never
unpickles anything (`allow_pickle=False`), so a checkpoint from an untrusted
source cannot run code.
"""
from __future__ import annotations

import io
import json
import os
import zipfile

import numpy as np

from shoal._atomic import atomic_write
from shoal.kernels import backend_of
from shoal.worker.errors import SerializationError
from shoal.worker.sparse import SparseGrad
from shoal.worker.tensor import Tensor

_TREE = "__shoal_tree__"
_FORMAT = "shoal-state-v1"


def _encode(obj, arrays: list, where: str):
    if isinstance(obj, Tensor):
        arrays.append(obj.numpy())
        return {"t": "tensor", "k": len(arrays) - 1, "grad": obj.requires_grad}
    if isinstance(obj, np.ndarray) or hasattr(obj, "__cuda_array_interface__"):
        arr = backend_of(obj).to_numpy(obj)
        if arr.dtype.kind not in "biuf":
            raise SerializationError(f"save: {where} is an array of dtype {arr.dtype}; only "
                                     f"bool, integer and float arrays can be saved")
        arrays.append(arr)
        return {"t": "array", "k": len(arrays) - 1}
    if isinstance(obj, np.generic):
        return _encode(obj.item(), arrays, where)
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return {"t": "value", "v": obj}
    if isinstance(obj, dict):
        items = []
        for k, v in obj.items():
            if not isinstance(k, (str, int)) or isinstance(k, bool):
                raise SerializationError(f"save: {where} has a key {k!r} of type "
                                         f"{type(k).__name__}; keys must be str or int")
            items.append([k, _encode(v, arrays, f"{where}[{k!r}]")])
        return {"t": "dict", "items": items}
    if isinstance(obj, (list, tuple)):
        return {"t": type(obj).__name__,
                "items": [_encode(v, arrays, f"{where}[{i}]") for i, v in enumerate(obj)]}
    if isinstance(obj, SparseGrad):
        return _encode(obj.to_dense(), arrays, where)
    raise SerializationError(f"save: {where} is a {type(obj).__name__}, which cannot be saved "
                             f"safely; save its state_dict() (tensors, arrays, numbers, str, "
                             f"lists and dicts)")


def save(obj, path: str | os.PathLike) -> None:
    """Write `obj` (e.g. ``{"model": model.state_dict(), "opt": opt.state_dict()}``) to `path`.

    The write is atomic: a temporary file in the same directory is renamed
    over `path` once complete, so a crash never leaves a half-written file.
    """
    arrays: list = []
    tree = _encode(obj, arrays, "obj")
    meta = json.dumps({"format": _FORMAT, "tree": tree}).encode()
    members = {f"a{i}": a for i, a in enumerate(arrays)}
    members[_TREE] = np.frombuffer(meta, dtype=np.uint8)
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        raise SerializationError(f"save: directory {directory!r} does not exist; create it first")
    atomic_write(path, lambda f: np.savez(f, **members))


def _decode(node, arrays, return_numpy: bool):
    kind = node.get("t")
    if kind == "value":
        return node["v"]
    if kind == "tensor":
        arr = arrays[f"a{node['k']}"]
        if return_numpy:
            return arr
        return Tensor(arr, dtype=arr.dtype, requires_grad=bool(node.get("grad")) and arr.dtype.kind == "f")
    if kind == "array":
        return arrays[f"a{node['k']}"]
    if kind == "dict":
        return {k: _decode(v, arrays, return_numpy) for k, v in node["items"]}
    if kind in ("list", "tuple"):
        items = [_decode(v, arrays, return_numpy) for v in node["items"]]
        return items if kind == "list" else tuple(items)
    raise SerializationError(f"unknown node type {kind!r} in the file's tree")


def load(path: str | os.PathLike, return_numpy: bool = False):
    """Read what `save` wrote. Tensors come back as Tensors (numpy arrays with `return_numpy`).

    Raises FileNotFoundError for a missing file and SerializationError for a
    file that is not a Shoal save (naming the path).
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"load: no such file {path!r}")
    try:
        with open(path, "rb") as f:
            data = f.read()
        with np.load(io.BytesIO(data), allow_pickle=False) as z:
            if _TREE not in z.files:
                raise SerializationError(f"an npz file but not a Shoal save (no {_TREE} member)")
            meta = json.loads(z[_TREE].tobytes().decode())
            if meta.get("format") != _FORMAT:
                raise SerializationError(f"format {meta.get('format')!r}; this Shoal reads "
                                         f"{_FORMAT!r}")
            arrays = {k: z[k] for k in z.files if k != _TREE}
        return _decode(meta["tree"], arrays, return_numpy)
    except SerializationError as e:
        raise SerializationError(f"load: {path!r}: {e}") from e
    except (zipfile.BadZipFile, ValueError, KeyError, OSError, EOFError, TypeError,
            AttributeError) as e:
        raise SerializationError(f"load: {path!r} is not a readable Shoal save ({e}); it may be "
                                 f"truncated or of another format") from e

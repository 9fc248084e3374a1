"""The message format between parameter-server clients and servers.

A message is a list of frames. Frame 0 is a msgpack map, the header; the
frames after it are raw array buffers, one per array, in C order and
little-endian. The header always carries ``"op"`` (str) and ``"rid"`` (int,
the request id a reply echoes back); requests may add ``"table"`` (int or
str), ``"client"`` (str), ``"seq"`` (int) and any other msgpack-able
fields; replies echo "op" and "rid" and add ``"ok"`` (bool) and, when ``ok`` is false, ``"error"``
and ``"kind"``. The reserved field ``"arrays"`` lists ``[dtype, shape]``
for each array frame::

    {"op": "pull", "rid": 7, "table": 0, "arrays": [["uint64", [3]]]}
    <24 bytes: three uint64 keys>

Only the dtypes in :data:`DTYPES` travel; nothing is ever pickled, so a
message can carry numbers and strings but no code. :func:`decode` checks
every field it relies on and raises :class:`~shoal.ps.errors.WireError`
naming what was wrong.

Example::

    frames = encode({"op": "echo", "rid": 1}, [np.arange(3, dtype=np.float32)])
    header, arrays = decode(frames, max_bytes=1 << 20)
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import msgpack
import numpy as np
import zmq

from shoal.ps.errors import WireError

#: dtype names allowed on the wire (numpy names; little-endian for multi-byte types).
DTYPES: frozenset[str] = frozenset({
    "bool", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64",
    "float16", "float32", "float64",
})
#: The largest header frame accepted: headers carry names and small fields, never bulk data.
MAX_HEADER_BYTES = 1 << 20
#: The most dimensions an array may have.
MAX_NDIM = 32
#: The most arrays one message may carry (a sanity bound: a frame costs memory even when empty).
MAX_ARRAYS = 4096
#: Default limit on a whole message (header plus array frames).
DEFAULT_MAX_BYTES = 1 << 30
#: The header field that lists the arrays; set by :func:`encode`, removed by :func:`decode`.
ARRAYS_KEY = "arrays"

_DTYPE_LIST = ", ".join(sorted(DTYPES))
_WIRE_DTYPES = {name: np.dtype(name).newbyteorder("<") for name in DTYPES}
_WIRE_NAMES = {dt: name for name, dt in _WIRE_DTYPES.items()}  # exact (little-endian) wire dtypes only


def _pack_default(obj: Any) -> Any:
    # numpy scalars (np.int64(3), np.float32(0.5)) are common in handler headers; send them as numbers.
    if isinstance(obj, np.generic) and obj.dtype.kind in "biuf":
        return obj.item()
    raise TypeError(f"header value {obj!r} of type {type(obj).__name__} is not msgpack-able; "
                    "send numbers, strings, bools, None, bytes, lists and str-keyed dicts, "
                    "and arrays as array frames")


def encode(header: Mapping[str, Any], arrays: Sequence[Any] = ()) -> list:
    """Build the frames of one message: a msgpack header, then one frame per array.

    Args:
        header: the header fields: "op" (str) and "rid" (int) always, "ok"
            (bool) in a reply, anything msgpack-able besides (numpy scalars
            are sent as numbers). The key "arrays" is reserved and filled in
            here.
        arrays: numpy arrays (or objects ``np.asarray`` turns into one) of a
            dtype in :data:`DTYPES`.

    Returns:
        ``[header_bytes, array, array, ...]``. The arrays are the callers'
        own buffers, not copies (a non-contiguous or big-endian array is made
        contiguous and little-endian first, which copies it): send them with
        ``copy=False`` and do not modify them until the message is sent.

    Raises:
        WireError: a dtype outside :data:`DTYPES`, the reserved key in
            ``header``, a header :func:`decode` would refuse (no string
            "op" or integer "rid"; "table", "client", "seq" or "ok" of the
            wrong type), or a header value msgpack cannot carry.

    Pure function; thread-safe.
    """
    if ARRAYS_KEY in header:
        raise WireError(f"header key {ARRAYS_KEY!r} is reserved for the array list; rename the field")
    if len(arrays) > MAX_ARRAYS:
        raise WireError(f"{len(arrays)} arrays in one message; at most {MAX_ARRAYS} are sent "
                        "(concatenate small arrays or split the request)")
    descs, bufs = [], []
    for i, a in enumerate(arrays):
        if type(a) is not np.ndarray:
            a = np.asarray(a)
        name = _WIRE_NAMES.get(a.dtype)
        if name is None:  # not a wire dtype, or a big-endian one
            name = a.dtype.name
            if name not in DTYPES or a.dtype.hasobject:
                raise WireError(f"array {i} has dtype {a.dtype}, which is not sent on the wire; "
                                f"allowed dtypes: {_DTYPE_LIST}")
            a = a.astype(_WIRE_DTYPES[name])  # the wire is little-endian
        if a.ndim > MAX_NDIM:
            raise WireError(f"array {i} has {a.ndim} dimensions; at most {MAX_NDIM} are sent")
        if not a.flags.c_contiguous:
            a = np.ascontiguousarray(a)
        descs.append([name, a.shape])
        bufs.append(a if a.base is None else _whole_frame(a))
    full = dict(header)
    full[ARRAYS_KEY] = descs
    _check_header(full)  # refuse here what decode() would refuse at the other end
    try:
        packed = msgpack.packb(full, use_bin_type=True, default=_pack_default)
    except (TypeError, ValueError, OverflowError) as e:
        raise WireError(f"cannot encode header for op {header.get('op')!r}: {e}") from e
    return [packed, *bufs]


def _whole_frame(a: np.ndarray) -> Any:
    """The received zmq.Frame ``a`` views in full, if it does, else ``a``.

    Sending a Frame shares libzmq's message (a reference count) where an
    ndarray becomes a new zero-copy message whose release goes through
    pyzmq's garbage-collector thread: a thread wake-up per large frame,
    measurable when a handler returns (part of) what it received.
    """
    base = a.base
    while isinstance(base, np.ndarray):
        base = base.base
    # ``a`` is C-contiguous and lies inside the frame's buffer: with as many bytes as the
    # frame it can only be all of it, from its start.
    if isinstance(base, memoryview) and base.nbytes == a.nbytes and isinstance(base.obj, zmq.Frame):
        return base.obj
    return a


def _buffer(frame: Any) -> memoryview:
    """A flat byte view of a received frame (zmq.Frame, bytes, bytearray or memoryview)."""
    buf = getattr(frame, "buffer", None)  # zmq.Frame exposes its message memory here
    mv = memoryview(buf if buf is not None else frame)
    if mv.ndim != 1 or mv.format not in ("B", "b", "c"):
        mv = mv.cast("B")
    return mv


def _is_int(x: Any) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, bool)


def _unpack_header(buf: memoryview) -> Any:
    if buf.nbytes > MAX_HEADER_BYTES:
        raise WireError(f"header frame is {buf.nbytes} bytes; the limit is {MAX_HEADER_BYTES}")
    if buf.nbytes == 0:
        raise WireError("header frame (frame 0) is empty; expected a msgpack map")
    try:
        return msgpack.unpackb(buf, raw=False, use_list=True, strict_map_key=True)
    except msgpack.ExtraData as e:
        raise WireError("header frame (frame 0) holds bytes after its msgpack value "
                        f"({len(e.extra)} extra bytes); expected exactly one msgpack map") from e
    except (ValueError, TypeError, msgpack.UnpackException) as e:
        raise WireError(f"header frame (frame 0) is not valid msgpack ({type(e).__name__}: {e}); "
                        "the message is truncated or not from a Shoal client") from e


def peek_ids(frame: Any) -> tuple[int, str]:
    """``(rid, op)`` of a message's header frame, or -1 / ``"unknown"`` for what cannot be read.

    Used to address an error reply for a message that failed to decode.
    Never raises; thread-safe.
    """
    try:
        header = _unpack_header(_buffer(frame))
    except (WireError, TypeError, ValueError):
        return -1, "unknown"
    if not isinstance(header, dict):
        return -1, "unknown"
    rid, op = header.get("rid"), header.get("op")
    return (rid if _is_int(rid) else -1), (op if isinstance(op, str) and op else "unknown")


def _check_header(header: Any) -> None:
    if type(header) is not dict:
        raise WireError(f"header frame (frame 0) must be a msgpack map, got a {type(header).__name__}")
    op = header.get("op")
    if not isinstance(op, str) or not op:
        raise WireError(f"header field 'op' must be a non-empty string, got {op!r}")
    if not _is_int(header.get("rid")):
        raise WireError(f"header field 'rid' must be an integer, got {header.get('rid')!r}")
    if len(header) > 3:  # beyond op, rid and arrays: check the optional fields' types
        if "table" in header and not (_is_int(header["table"]) or isinstance(header["table"], str)):
            raise WireError(f"header field 'table' must be an integer or a string, got {header['table']!r}")
        if "client" in header and not isinstance(header["client"], str):
            raise WireError(f"header field 'client' must be a string, got {header['client']!r}")
        if "seq" in header and not _is_int(header["seq"]):
            raise WireError(f"header field 'seq' must be an integer, got {header['seq']!r}")
        if "ok" in header and not isinstance(header["ok"], bool):
            raise WireError(f"header field 'ok' must be a bool, got {header['ok']!r}")


def _array_spec(i: int, desc: Any) -> tuple[np.dtype, tuple[int, ...]]:
    if type(desc) is not list or len(desc) != 2:
        raise WireError(f"header 'arrays'[{i}] must be [dtype, shape], got {desc!r}")
    name, shape = desc
    dtype = _WIRE_DTYPES.get(name) if type(name) is str else None
    if dtype is None:
        raise WireError(f"array {i} has dtype {name!r}, which is not accepted on the wire; "
                        f"allowed dtypes: {_DTYPE_LIST}")
    if type(shape) is not list or len(shape) > MAX_NDIM:
        raise WireError(f"array {i} has shape {shape!r}; expected a list of at most {MAX_NDIM} "
                        "non-negative integers")
    for d in shape:
        if type(d) is not int or d < 0:
            raise WireError(f"array {i} has shape {shape!r}; expected a list of at most {MAX_NDIM} "
                            "non-negative integers")
    return dtype, tuple(shape)


def decode(frames: Sequence[Any], max_bytes: int = DEFAULT_MAX_BYTES) -> tuple[dict, list[np.ndarray]]:
    """Check and unpack one message into ``(header, arrays)``.

    Args:
        frames: the frames as received (``zmq.Frame`` from
            ``recv_multipart(copy=False)``, or bytes-like objects).
        max_bytes: the most bytes the whole message may hold.

    Returns:
        The header (a dict, without the "arrays" key) and the arrays. Each
        array is a zero-copy, **read-only** view of its frame (it keeps the
        frame alive); copy it to modify it. An array whose frame memory is
        not aligned for its dtype (libzmq packs small messages into shared
        receive buffers) is copied, so every array returned is aligned.

    Raises:
        WireError: frame 0 is not a msgpack map with a string "op" and an
            integer "rid" (or "table", "client", "seq", "ok" have the wrong
            type); the number of array frames differs from the arrays the
            header lists; a dtype is not in :data:`DTYPES`; a frame's size is
            not ``prod(shape) * itemsize``; the message exceeds ``max_bytes``
            or has more than :data:`MAX_ARRAYS` arrays. The message says
            which.

    Pure function; thread-safe. Never unpickles anything.
    """
    if len(frames) == 0:
        raise WireError("empty message: expected a msgpack header frame and array frames")
    if len(frames) > MAX_ARRAYS + 1:
        raise WireError(f"message of {len(frames)} frames; at most {MAX_ARRAYS} arrays (plus the header) "
                        "are accepted")
    bufs = [f.buffer if type(f) is zmq.Frame else _buffer(f) for f in frames]
    header = _unpack_header(bufs[0])
    _check_header(header)
    total = 0
    for b in bufs:
        total += b.nbytes
    if total > max_bytes:
        raise WireError(f"message of {total} bytes exceeds the limit of {max_bytes} bytes "
                        f"(op {header['op']!r}); split it into smaller requests")
    descs = header.pop(ARRAYS_KEY, [])
    if type(descs) is not list:
        raise WireError(f"header field 'arrays' must be a list of [dtype, shape], got {descs!r}")
    if len(descs) != len(bufs) - 1:
        raise WireError(f"header lists {len(descs)} arrays but the message has {len(bufs) - 1} "
                        "array frames after the header")
    arrays = []
    for i, desc in enumerate(descs):
        dtype, shape = _array_spec(i, desc)
        buf = bufs[i + 1]
        need = dtype.itemsize
        for d in shape:
            need *= d
        if buf.nbytes != need:
            raise WireError(f"array {i} ({dtype.name}, shape {list(shape)}) needs {need} bytes "
                            f"but its frame holds {buf.nbytes}")
        if need == 0:
            arr = np.empty(shape, dtype)
            arr.flags.writeable = False
        else:
            # A read-only view makes a read-only array without touching its flags afterwards.
            arr = np.frombuffer(buf.toreadonly(), dtype=dtype)
            if len(shape) != 1:
                arr = arr.reshape(shape)
            if not arr.flags.aligned:
                arr = arr.copy()
                arr.flags.writeable = False
        arrays.append(arr)
    return header, arrays


__all__ = ["ARRAYS_KEY", "DEFAULT_MAX_BYTES", "DTYPES", "MAX_ARRAYS", "MAX_HEADER_BYTES", "MAX_NDIM",
           "decode", "encode", "peek_ids"]

"""Client pickles read as data, and replies pickled as plain data only.

``restricted_loads`` reads a request (or, in ``studio_plugins.client``, a reply): the common
layout, a dict of plain arrays as ``pickle.dumps`` writes it, by the fast path
(core/wire/fast_pickle.py); anything else by the data-only decoder (core/wire/pickle_decoder.py), which
walks the opcodes itself within limits and never runs CPython's unpickler or numpy's
reconstructors. ``dumps`` writes replies that only hold data, so a client can read them the same way.
"""

from __future__ import annotations

import pickle
from typing import Any

import numpy as np

from core.errors import BadRequest, PayloadTooLarge
from core.wire.fast_pickle import read_arrays, write_arrays
from core.wire.pickle_decoder import Limits, PickleRefused, PickleTooLarge, decode

MAX_DEPTH = 64
DEFAULT_LIMIT = 64 * 1024 * 1024
"""What a decoded body may hold when the caller names no limit (the server passes --max-body)."""


def restricted_loads(data: bytes, limit: int = DEFAULT_LIMIT) -> Any:
    """The numpy arrays, scalars, dtypes and plain containers ``data`` pickles, read as data.

    Raises ``BadRequest`` for anything else, for truncated or garbage data and for data nested
    too deeply, and ``PayloadTooLarge`` when the values would hold more than ``limit`` bytes
    (shared references counted each time); the message says what was refused. A canonical pickle
    of a dict of plain arrays (nearly every request) is read by the fast path, to the same result.
    """
    arrays = read_arrays(data) if type(data) is bytes else None
    if arrays is not None:
        return arrays  # its arrays are copies of literal bytes in ``data``: never more than it
    return decode_general(data, limit)


_limits: dict[int, Limits] = {}


def decode_general(data: bytes, limit: int = DEFAULT_LIMIT) -> Any:
    """``restricted_loads`` by the data-only decoder alone, whatever the body."""
    limits = _limits.get(limit)
    if limits is None:
        if len(_limits) > 16:  # a server has one limit; callers of this function a few
            _limits.clear()
        limits = _limits[limit] = Limits(max_bytes=limit, max_depth=MAX_DEPTH)
    try:
        return decode(bytes(data), limits)
    except PickleTooLarge as exc:
        raise PayloadTooLarge(f"refused pickle: {exc}") from None
    except PickleRefused as exc:
        raise BadRequest(f"refused pickle: {exc}") from None


_SCALARS = (str, bytes, bytearray, int, float, complex, bool, type(None))


def plain_data(value: Any) -> Any:
    """``value`` as only what ``restricted_loads`` admits: array-likes (torch tensors, ...) become
    numpy arrays; anything else is a ``TypeError``, so every reply we send can be decoded.

    A container reached twice is converted once and stays shared, so pickle writes it once: a
    reply echoing shared references does not grow (the decoder counts them, bounded)."""
    return _plain(value, 0, {})


def _plain(value: Any, depth: int, seen: dict[int, Any]) -> Any:
    if isinstance(value, _SCALARS):
        return value
    if depth > MAX_DEPTH:
        raise TypeError(f"output nested deeper than {MAX_DEPTH} levels")
    if isinstance(value, np.ndarray | np.generic | np.dtype):
        dtype = value if isinstance(value, np.dtype) else value.dtype
        if dtype.hasobject:
            raise TypeError("object-dtype arrays cannot be sent")
        if dtype.kind == "T":  # numpy's variable-width strings hold pointers: sent as fixed-width
            return value.astype("U") if not isinstance(value, np.dtype) else np.dtype("U")
        return value
    done = seen.get(id(value))
    if done is not None:
        return done[1]
    if isinstance(value, dict):
        result: Any = {_plain(k, depth + 1, seen): _plain(v, depth + 1, seen) for k, v in value.items()}
    elif isinstance(value, list | tuple):
        items = [_plain(item, depth + 1, seen) for item in value]
        result = items if isinstance(value, list) else tuple(items)
    elif isinstance(value, set | frozenset):
        result = type(value)(_plain(item, depth + 1, seen) for item in value)
    elif hasattr(value, "__array__"):
        return _plain(np.asarray(value), depth, seen)
    else:
        raise TypeError(f"{type(value).__module__}.{type(value).__qualname__} is not data")
    seen[id(value)] = (value, result)  # the original kept alive: its id stays its own
    return result


def dumps(value: Any) -> bytes:
    """Pickle a reply (protocol 5: arrays without an extra copy; numpy >= 1.26 reads it).

    Only plain data is pickled (see ``plain_data``): a reply never references code. A dict of
    plain arrays (most replies) is written without the pickler, in the same layout."""
    fast = write_arrays(value)
    if fast is not None:
        return fast
    return pickle.dumps(plain_data(value), protocol=5)

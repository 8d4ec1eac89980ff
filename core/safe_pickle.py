"""Client pickles read as data, and replies pickled as plain data only.

``restricted_loads`` reads a request (or, in ``studio_plugins.client``, a reply): the common
layout, a dict of plain arrays as ``pickle.dumps`` writes it, by the fast path
(core/fast_pickle.py); anything else by the data-only decoder (core/pickle_decoder.py), which
walks the opcodes itself within limits and never runs CPython's unpickler or numpy's
reconstructors. ``dumps`` writes replies that only hold data, so a client can read them the same way.
"""

from __future__ import annotations

import pickle
from typing import Any

import numpy as np

from core.errors import BadRequest, PayloadTooLarge
from core.fast_pickle import read_arrays, write_arrays
from core.pickle_decoder import Limits, PickleRefused, PickleTooLarge, decode

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


def plain_data(value: Any, depth: int = 0) -> Any:
    """``value`` as only what ``restricted_loads`` admits: array-likes (torch tensors, ...) become
    numpy arrays; anything else is a ``TypeError``, so every reply we send can be decoded."""
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
    if isinstance(value, dict):
        return {plain_data(k, depth + 1): plain_data(v, depth + 1) for k, v in value.items()}
    if isinstance(value, list | tuple):
        items = [plain_data(item, depth + 1) for item in value]
        return items if isinstance(value, list) else tuple(items)
    if isinstance(value, set | frozenset):
        return type(value)(plain_data(item, depth + 1) for item in value)
    if hasattr(value, "__array__"):
        return plain_data(np.asarray(value), depth)
    raise TypeError(f"{type(value).__module__}.{type(value).__qualname__} is not data")


def dumps(value: Any) -> bytes:
    """Pickle a reply (protocol 5: arrays without an extra copy; numpy >= 1.26 reads it).

    Only plain data is pickled (see ``plain_data``): a reply never references code. A dict of
    plain arrays (most replies) is written without the pickler, in the same layout."""
    fast = write_arrays(value)
    if fast is not None:
        return fast
    return pickle.dumps(plain_data(value), protocol=5)

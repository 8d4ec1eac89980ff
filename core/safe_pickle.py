"""A restricted unpickler for dicts of numpy arrays: the server never runs client-chosen code.

Pickle's ``find_class`` is the only way a pickle reaches code. We answer it from a fixed table of
the names numpy's own pickles use (numpy 2 ``numpy._core`` and numpy 1.x ``numpy.core``, pickle
protocols 2 to 5), each mapped directly to an object, never imported by name. Object-dtype arrays
and persistent ids are refused, so the result holds nothing but data.
"""

from __future__ import annotations

import io
import pickle
from collections.abc import Callable
from typing import Any

import numpy as np
from numpy._core import multiarray as _multiarray
from numpy._core import numeric as _numeric

from core.errors import BadRequest

MAX_DEPTH = 64


class UnsafePickleError(pickle.UnpicklingError):
    """The pickle references something outside the allow-list."""


def _checked_dtype(*args: Any) -> np.dtype[Any]:
    """``numpy.dtype`` as pickles call it, refusing object dtypes (they carry arbitrary objects)."""
    dtype = np.dtype(*args)
    if dtype.hasobject:
        raise UnsafePickleError("object-dtype arrays are not accepted")
    return dtype


def _checked_scalar(dtype: np.dtype[Any], *args: Any) -> Any:
    if not isinstance(dtype, np.dtype) or dtype.hasobject:
        raise UnsafePickleError("object-dtype scalars are not accepted")
    return _multiarray.scalar(dtype, *args)


def _latin1_encode(text: str, encoding: str = "utf-8") -> bytes:
    """``_codecs.encode`` as protocol 2 uses it for bytes: only text codecs, nothing else."""
    if not isinstance(text, str) or encoding.lower().replace("_", "-") not in {"latin1", "latin-1"}:
        raise UnsafePickleError("_codecs.encode is only accepted for latin-1 text")
    return text.encode("latin-1")


def _empty_bytes(*args: Any) -> bytes:
    """``bytes()`` as protocol 2 uses it (zero-size arrays); never ``bytes(huge_int)``."""
    if args:
        raise UnsafePickleError("bytes() with arguments is not accepted")
    return b""


def _frombuffer(*args: Any) -> np.ndarray[Any, Any]:
    array = _numeric._frombuffer(*args)  # type: ignore[attr-defined]
    if array.dtype.hasobject:
        raise UnsafePickleError("object-dtype arrays are not accepted")
    return array


_NUMPY_NAMES: dict[str, Callable[..., Any] | type] = {
    "multiarray._reconstruct": _multiarray._reconstruct,
    "multiarray.scalar": _checked_scalar,
    "numeric._frombuffer": _frombuffer,
}

ALLOWED: dict[tuple[str, str], Any] = {
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): _checked_dtype,
    ("_codecs", "encode"): _latin1_encode,
    ("builtins", "bytes"): _empty_bytes,
    ("__builtin__", "bytes"): _empty_bytes,
    ("builtins", "complex"): complex,
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
    ("builtins", "bytearray"): bytearray,
}
for _prefix in ("numpy._core", "numpy.core"):
    for _name, _obj in _NUMPY_NAMES.items():
        _module, _, _attr = f"{_prefix}.{_name}".rpartition(".")
        ALLOWED[(_module, _attr)] = _obj
# numpy dtype classes (numpy >= 1.25 pickles ``numpy.dtypes.Float64DType`` for some dtypes)
for _dtype_class_name in dir(np.dtypes):
    if _dtype_class_name.endswith("DType") and _dtype_class_name != "ObjectDType":
        ALLOWED[("numpy.dtypes", _dtype_class_name)] = getattr(np.dtypes, _dtype_class_name)


class RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        try:
            return ALLOWED[(module, name)]
        except KeyError:
            raise UnsafePickleError(f"{module}.{name} is not allowed in a request") from None

    def persistent_load(self, pid: Any) -> Any:
        raise UnsafePickleError("persistent ids are not accepted")


def _check_data(value: Any, depth: int = 0) -> None:
    """Refuse object arrays however they were built (``__setstate__`` can add object fields)."""
    if depth > MAX_DEPTH:
        raise UnsafePickleError(f"nested deeper than {MAX_DEPTH} levels")
    if isinstance(value, np.ndarray | np.generic):
        if value.dtype.hasobject:
            raise UnsafePickleError("object-dtype arrays are not accepted")
    elif isinstance(value, dict):
        for key, item in value.items():
            _check_data(key, depth + 1)
            _check_data(item, depth + 1)
    elif isinstance(value, list | tuple | set | frozenset):
        for item in value:
            _check_data(item, depth + 1)


def restricted_loads(data: bytes) -> Any:
    """Unpickle ``data`` admitting only numpy arrays, scalars, dtypes and plain containers.

    Raises ``BadRequest`` for anything else, for truncated or garbage data, and for data nested
    too deeply; the message says what was refused.
    """
    try:
        value = RestrictedUnpickler(io.BytesIO(data)).load()
        _check_data(value)
    except UnsafePickleError as exc:
        raise BadRequest(f"refused pickle: {exc}") from None
    except RecursionError:
        raise BadRequest("refused pickle: nested too deeply") from None
    except MemoryError:
        raise BadRequest("refused pickle: too large to decode") from None
    except Exception as exc:  # truncated, garbage, numpy rejecting a malformed state ...
        raise BadRequest(f"invalid pickle: {type(exc).__name__}: {exc}") from None
    return value


_SCALARS = (str, bytes, bytearray, int, float, complex, bool, type(None))


def plain_data(value: Any, depth: int = 0) -> Any:
    """``value`` as only what ``restricted_loads`` admits: array-likes (torch tensors, ...) become
    numpy arrays; anything else is a ``TypeError``, so every reply we send can be decoded."""
    if isinstance(value, _SCALARS):
        return value
    if depth > MAX_DEPTH:
        raise TypeError(f"output nested deeper than {MAX_DEPTH} levels")
    if isinstance(value, np.ndarray | np.generic):
        if value.dtype.hasobject:
            raise TypeError("object-dtype arrays cannot be sent")
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

    Only plain data is pickled (see ``plain_data``): a reply never references code."""
    return pickle.dumps(plain_data(value), protocol=5)

"""The restricted unpickler studio-plug used before the data-only decoder (issue 13), kept here only
as the baseline bench_codec measures the decoder against. Never serve with it: CPython's
unpickler and numpy's reconstructors still run on client-chosen state here, and small hostile
bodies crash, hang or corrupt it (see core/wire/pickle_decoder.py for what it cost).
"""

from __future__ import annotations

import copy
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


# Bits a dtype only has when its items hold pointers (object, StringDType) or need Python to be
# read: NPY_ITEM_REFCOUNT, NPY_LIST_PICKLE, NPY_ITEM_IS_POINTER, NPY_USE_GETITEM, NPY_USE_SETITEM.
# ``dtype.__setstate__`` (a pickle's BUILD) sets flags, field offsets and sizes as it is told, so a
# hostile pickle can forge them; every dtype is checked after it is built and before data uses it.
_POINTER_FLAGS = 0x01 | 0x02 | 0x04 | 0x20 | 0x40
_DATA_DTYPES = frozenset(
    getattr(np.dtypes, name)
    for name in dir(np.dtypes)
    if name.endswith("DType") and name not in {"ObjectDType", "StringDType"}
)


def _check_dtype(dtype: Any, depth: int = 0) -> np.dtype[Any]:
    """Refuse a dtype whose items are not plain bytes in the array's own buffer.

    Object and StringDType items are pointers; forged flags, out-of-range field offsets or a
    subarray bigger than its item would make numpy read or free memory outside the array.
    """
    if type(dtype) is _DatetimeDtype:
        dtype = dtype.dtype
    if not isinstance(dtype, np.dtype):
        raise UnsafePickleError(f"expected a numpy dtype, got {type(dtype).__name__}")
    if type(dtype) not in _DATA_DTYPES or dtype.hasobject or dtype.flags & _POINTER_FLAGS:
        raise UnsafePickleError("object-dtype arrays are not accepted")
    if depth > MAX_DEPTH:
        raise UnsafePickleError(f"dtype nested deeper than {MAX_DEPTH} levels")
    if dtype.kind == "U" and dtype.itemsize % 4:
        raise UnsafePickleError(f"a unicode dtype of {dtype.itemsize} bytes is malformed")
    if dtype.subdtype is not None:
        base, shape = dtype.subdtype
        _check_dtype(base, depth + 1)
        if base.itemsize * int(np.prod(shape, dtype=np.int64)) != dtype.itemsize:
            raise UnsafePickleError("a subarray dtype does not fit its item size")
    if dtype.fields is not None:
        for field in dtype.fields.values():
            field_dtype, offset = field[0], field[1]
            _check_dtype(field_dtype, depth + 1)
            if not 0 <= offset <= dtype.itemsize - field_dtype.itemsize:
                raise UnsafePickleError("a structured dtype has a field outside its item")
    return dtype


def _private_dtype(dtype: Any) -> np.dtype[Any]:
    """A checked copy of ``dtype`` for an array or scalar to keep. The pickle cannot reach the
    copy, so a later BUILD on the original (a memo reference) cannot change what data uses."""
    checked = _check_dtype(dtype)
    if checked.fields is None and checked.subdtype is None:
        # a plain dtype is fully described by its string; numpy hands back its own (shared,
        # unreachable from the pickle) descriptor for it, which is much cheaper than a copy
        return _check_dtype(np.dtype(checked.str))
    return _check_dtype(copy.copy(checked))


class _DatetimeDtype:
    """What ``numpy.dtype(...)`` gives for datetime64/timedelta64: numpy's own ``__setstate__``
    for them dereferences a missing unit and crashes the process on a malformed state (a numpy
    bug), so the pickle's BUILD lands here and only numpy's own state shape is passed on."""

    __slots__ = ("built", "dtype")

    def __init__(self, dtype: np.dtype[Any]) -> None:
        self.dtype = dtype
        self.built = False

    def __setstate__(self, state: Any) -> None:
        metadata = state[8] if isinstance(state, tuple) and len(state) == 9 else None
        unit = metadata[1] if isinstance(metadata, tuple) and len(metadata) == 2 else None
        if (self.built or state[0] != 4 or not isinstance(unit, tuple) or len(unit) != 4
                or not isinstance(unit[0], bytes) or not all(type(n) is int for n in unit[1:])):
            raise UnsafePickleError("a datetime dtype's state is not numpy's")
        self.dtype.__setstate__(state)  # type: ignore[attr-defined]
        self.built = True


def _checked_dtype(*args: Any) -> np.dtype[Any] | _DatetimeDtype:
    """``numpy.dtype`` as pickles call it, refusing object dtypes (they carry arbitrary objects)."""
    dtype = _check_dtype(np.dtype(*args))
    return _DatetimeDtype(dtype) if dtype.kind in "mM" else dtype


def _checked_scalar(dtype: np.dtype[Any], *args: Any) -> Any:
    return _multiarray.scalar(_private_dtype(dtype), *args)


class _NdarrayName:
    """What ``numpy.ndarray`` resolves to: only a token for ``_reconstruct``, never callable
    (``ndarray(shape, dtype)`` would hand back uninitialised server memory)."""

    def __repr__(self) -> str:
        return "numpy.ndarray"

    def __call__(self, *args: Any) -> None:
        raise UnsafePickleError("numpy.ndarray cannot be called in a request")


_NDARRAY = _NdarrayName()


class _ArrayBuilder:
    """What ``_reconstruct`` returns in place of the empty array numpy's own would.

    The pickle's BUILD that follows calls ``__setstate__`` here, where the dtype in the state is
    checked (and copied) before a real array is made from it; ``_finish`` swaps the array in.
    """

    __slots__ = ("array",)

    def __init__(self) -> None:
        self.array: np.ndarray[Any, Any] | None = None

    def __setstate__(self, state: Any) -> None:
        if self.array is not None:
            raise UnsafePickleError("an array's state is set twice")
        # (version, shape, dtype, is_fortran, data); numpy also reads it without the version
        if not isinstance(state, tuple) or len(state) not in (4, 5):
            raise UnsafePickleError("malformed array state")
        state = (*state[:-3], _private_dtype(state[-3]), *state[-2:])
        array: Any = _multiarray._reconstruct(np.ndarray, (0,), b"b")
        array.__setstate__(state)
        self.array = array


def _reconstruct(cls: Any, shape: Any, typecode: Any) -> _ArrayBuilder:
    """``_reconstruct(ndarray, (0,), b'b')`` exactly as numpy writes it; its BUILD sets the data."""
    if cls is not _NDARRAY or shape != (0,) or typecode not in (b"b", "b"):
        raise UnsafePickleError("_reconstruct is only accepted as numpy's pickles call it")
    return _ArrayBuilder()


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


def _bytearray(*args: Any) -> bytearray:
    """``bytearray(data)`` or ``bytearray(text, 'latin-1')`` as pickles write it; never
    ``bytearray(huge_int)``."""
    if not args:
        return bytearray()
    if len(args) == 1 and isinstance(args[0], bytes | bytearray):
        return bytearray(args[0])
    if len(args) == 2 and isinstance(args[0], str):
        return bytearray(_latin1_encode(*args))
    raise UnsafePickleError("bytearray() is only accepted from bytes or latin-1 text")


def _frombuffer(buffer: Any, dtype: Any, shape: Any, order: Any) -> np.ndarray[Any, Any]:
    return _numeric._frombuffer(buffer, _private_dtype(dtype), shape, order)  # type: ignore[attr-defined]


_NUMPY_NAMES: dict[str, Callable[..., Any] | type] = {
    "multiarray._reconstruct": _reconstruct,
    "multiarray.scalar": _checked_scalar,
    "numeric._frombuffer": _frombuffer,
}

ALLOWED: dict[tuple[str, str], Any] = {
    ("numpy", "ndarray"): _NDARRAY,
    ("numpy", "dtype"): _checked_dtype,
    ("_codecs", "encode"): _latin1_encode,
    ("builtins", "bytes"): _empty_bytes,
    ("builtins", "complex"): complex,
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
    ("builtins", "bytearray"): _bytearray,
}
# protocol 2 writes Python 2's module name for builtins (pickle's fix_imports)
ALLOWED.update({("__builtin__", name): obj for (module, name), obj in list(ALLOWED.items())
                if module == "builtins"})
for _prefix in ("numpy._core", "numpy.core"):
    for _name, _obj in _NUMPY_NAMES.items():
        _module, _, _attr = f"{_prefix}.{_name}".rpartition(".")
        ALLOWED[(_module, _attr)] = _obj


class RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        try:
            return ALLOWED[(module, name)]
        except KeyError:
            raise UnsafePickleError(f"{module}.{name} is not allowed in a request") from None

    def persistent_load(self, pid: Any) -> Any:
        raise UnsafePickleError("persistent ids are not accepted")


def _finish(value: Any, depth: int = 0) -> Any:
    """Swap built arrays in for their builders and refuse anything that is not plain data.

    Dicts and lists are fixed in place (so shared references stay shared), tuples rebuilt."""
    if depth > MAX_DEPTH:
        raise UnsafePickleError(f"nested deeper than {MAX_DEPTH} levels")
    if type(value) is _DatetimeDtype:
        return _check_dtype(value)
    if type(value) is _ArrayBuilder:
        if value.array is None:
            raise UnsafePickleError("an array without its state")
        return value.array
    if isinstance(value, np.ndarray | np.generic):
        _check_dtype(value.dtype)
    elif isinstance(value, np.dtype):
        _check_dtype(value)
    elif isinstance(value, dict):
        for key, item in value.items():
            _finish_hashable(key, depth + 1)
            done = _finish(item, depth + 1)
            if done is not item:
                value[key] = done
    elif isinstance(value, list):
        for index, item in enumerate(value):
            done = _finish(item, depth + 1)
            if done is not item:
                value[index] = done
    elif isinstance(value, tuple):
        items = [_finish(item, depth + 1) for item in value]
        if any(done is not item for done, item in zip(items, value, strict=True)):
            return tuple(items)
    elif isinstance(value, set | frozenset):
        for item in value:
            _finish_hashable(item, depth + 1)
    return value


def _finish_hashable(value: Any, depth: int) -> None:
    """Dict keys and set members: arrays are not hashable, so a builder here is refused."""
    if _finish(value, depth) is not value:
        raise UnsafePickleError("an array cannot be a dict key or set member")


def unpickle_restricted(data: bytes) -> Any:
    """``restricted_loads`` by the restricted unpickler alone, whatever the body."""
    try:
        value = _finish(RestrictedUnpickler(io.BytesIO(data)).load())
    except UnsafePickleError as exc:
        raise BadRequest(f"refused pickle: {exc}") from None
    except RecursionError:
        raise BadRequest("refused pickle: nested too deeply") from None
    except MemoryError:
        raise BadRequest("refused pickle: too large to decode") from None
    except Exception as exc:  # truncated, garbage, numpy rejecting a malformed state ...
        raise BadRequest(f"invalid pickle: {type(exc).__name__}: {exc}") from None
    return value

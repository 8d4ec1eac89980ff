"""Open Inference Protocol (V2) tensors <-> the values a model sees, in JSON and in binary.

A numeric tensor becomes a numpy array of its datatype, shaped as declared (binary data with
``np.frombuffer``: no copy, read-only). A ``BYTES`` tensor becomes nested Python lists of
``bytes`` shaped like the tensor (a bare ``bytes`` for shape ``[]``), as ``ndarray.tolist()``
nests: object arrays are refused elsewhere in studio-plug, while lists pass the data plane
(batching leaves them alone) and the identity model unchanged. Going out, a model may answer a
BYTES output with such lists, ``str`` or ``bytes`` values, or ``S``/``U``/object arrays of them.

Every check a client can fail raises ``BadRequest`` naming the tensor (``PayloadTooLarge`` past
the request's decoded-size budget); nothing is read past the bytes a tensor was given, and
nothing is built before its shape passed ``v2_limits``.
"""

from __future__ import annotations

import array
import struct
from dataclasses import dataclass
from typing import Any

import numpy as np

from studio_plugins import BadRequest, ModelError

from .v2_limits import (
    Budget,
    check_empty_lists,
    check_shape,
    element_count,
    empty_lists,
    leaves,
    rows,
    short,
)

BYTES = "BYTES"

# Binary tensor data is little-endian (the extension says so); JSON data is native.
DTYPES: dict[str, np.dtype] = {
    "BOOL": np.dtype("?"),
    "UINT8": np.dtype("<u1"), "UINT16": np.dtype("<u2"), "UINT32": np.dtype("<u4"), "UINT64": np.dtype("<u8"),
    "INT8": np.dtype("<i1"), "INT16": np.dtype("<i2"), "INT32": np.dtype("<i4"), "INT64": np.dtype("<i8"),
    "FP16": np.dtype("<f2"), "FP32": np.dtype("<f4"), "FP64": np.dtype("<f8"),
}
DATATYPES = (*DTYPES, BYTES)
_BY_KIND_SIZE = {(dtype.kind, dtype.itemsize): name for name, dtype in DTYPES.items()}
_NATIVE = {name: dtype.newbyteorder("=") for name, dtype in DTYPES.items()}
"""JSON data's dtypes (made once: ``newbyteorder`` builds a new dtype each call)."""
_LENGTH = struct.Struct("<I")


def _datatype(name: str, datatype: Any) -> str:
    if isinstance(datatype, str) and (datatype in DTYPES or datatype == BYTES):
        return datatype
    raise BadRequest(
        f"input {name!r}: unknown datatype {short(datatype)}; one of {', '.join(DATATYPES)}"
    )


def nest(flat: list[Any], shape: tuple[int, ...]) -> Any:
    """A flat row-major list as nested lists of ``shape`` (the element itself for ``()``)."""
    if not shape:
        return flat[0]
    if not flat:
        return empty_lists(shape)
    if len(shape) == 1:
        return flat
    step = len(flat) // shape[0]
    return [nest(flat[i * step:(i + 1) * step], shape[1:]) for i in range(shape[0])]


def _checked_shape(
    name: str, datatype: str, shape: Any, budget: Budget | None
) -> tuple[tuple[int, ...], int]:
    """The dims and element count, refused (400, or 413 past the budget) before anything is built."""
    dims = check_shape(name, shape)
    count = element_count(name, dims)
    if datatype == BYTES:
        if count == 0:
            check_empty_lists(name, dims)
    elif budget is not None:
        budget.spend(name, count * DTYPES[datatype].itemsize)
    return dims, count


# --- decoding: JSON ---------------------------------------------------------------------------

_NUMBERS = (int, float)
_FAST = {"f": "d", "i": "q", "u": "q"}
_FEW = 64


def decode_json(name: str, datatype: Any, shape: Any, data: Any, budget: Budget | None = None) -> Any:
    """The value of a tensor sent as JSON ``data`` (nested or flat, row-major).

    ``budget``: what the request's decoded values may still hold (None: no bound, for tests)."""
    datatype = _datatype(name, datatype)
    dims, count = _checked_shape(name, datatype, shape, budget)
    if datatype == BYTES:
        strings = leaves(name, data, (str,), "a string (BYTES data must be strings)")
        _check_count(name, dims, count, len(strings))
        items = [text.encode("utf-8") for text in strings]
        if budget is not None:
            budget.spend(name, sum(map(len, items)))
        return nest(items, dims)
    dtype = _NATIVE[datatype]
    flat = rows(name, data)
    _check_count(name, dims, count, len(flat))
    if count == 0:
        return np.empty(dims, dtype)
    source = _numbers(flat, dtype)
    if source is None:  # not plain numbers: the exact path says which value is wrong
        if datatype == "BOOL":
            flat = leaves(name, flat, (bool,), "true or false (BOOL data must be true or false)")
        else:
            flat = leaves(name, flat, _NUMBERS, f"a {datatype} value")
        return _cast(name, datatype, dtype, flat).reshape(dims)
    return _cast_numbers(name, datatype, dtype, source, flat).reshape(dims)


def _numbers(flat: list[Any], dtype: np.dtype) -> np.ndarray | None:
    """The common case at C speed: every leaf a number, read by ``array.array`` (which takes
    no strings, None, lists or objects) as float64 for float datatypes or int64 for integer
    ones; None when that fails (a float for an integer datatype, a uint64 past 2**63, a string,
    true or false, BOOL) and each leaf must be looked at."""
    code = _FAST.get(dtype.kind)
    if code is None:
        return None
    try:
        packed = array.array(code, flat)
    except (TypeError, OverflowError, ValueError):
        return None
    source = np.frombuffer(packed, np.float64 if code == "d" else np.int64)
    # array.array reads true and false as 1 and 0: where a 1 or a 0 is, look for them (a few
    # values are looked at directly: three numpy calls cost more than that)
    if len(flat) <= _FEW:
        if bool in set(map(type, flat)):
            return None
    elif ((source == 0) | (source == 1)).any() and bool in set(map(type, flat)):
        return None
    return source


def _check_count(name: str, dims: tuple[int, ...], count: int, got: int) -> None:
    if got != count:
        raise BadRequest(
            f"input {name!r}: shape {short(list(dims))} holds {count} elements but data has {got}"
        )


def _example(source: np.ndarray, bad: np.ndarray) -> Any:
    return source[bad].flat[0].item() if bad.any() else None


def _integer(name: str, datatype: str, info: np.iinfo, value: Any) -> int:
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if not isinstance(value, int) or isinstance(value, bool):
        raise BadRequest(f"input {name!r}: {value!r} is not a {datatype} value")
    if not info.min <= value <= info.max:
        raise BadRequest(f"input {name!r}: {value!r} is out of range for {datatype} [{info.min}, {info.max}]")
    return value


def _cast_numbers(
    name: str, datatype: str, dtype: np.dtype, source: np.ndarray, flat: list[Any]
) -> np.ndarray:
    """``source`` (numpy's reading of the JSON values ``flat``) as ``dtype``, refusing what does
    not fit."""
    if dtype.kind == "f":
        if dtype.itemsize == 8:  # float64 as float64: nothing can overflow (and errstate costs)
            return source.astype(dtype)
        with np.errstate(over="ignore"):
            result = source.astype(dtype)
        if dtype.itemsize < 8:
            infinite = np.isinf(result)
            if infinite.any():  # orjson reads no infinities: an overflow
                raise BadRequest(
                    f"input {name!r}: {flat[int(infinite.argmax())]!r} is out of range for {datatype}"
                )
        return result
    info = np.iinfo(dtype)
    out_of_range = (source < info.min) | (source > info.max)
    if out_of_range.any():
        _integer(name, datatype, info, _example(source, out_of_range))
    return source.astype(dtype)


def _cast(name: str, datatype: str, dtype: np.dtype, flat: list[Any]) -> np.ndarray:
    """The JSON values ``flat`` (bools for BOOL, ints and floats otherwise: ``leaves`` checked)
    as ``dtype``, refusing values that do not fit: 300 for UINT8, 1.5 for INT32, an overflow."""
    if dtype.kind == "b":
        return np.array(flat, dtype)
    source = np.asarray(flat)
    if dtype.kind == "f" or source.dtype.kind != "f":
        return _cast_numbers(name, datatype, dtype, source, flat)
    # numpy made floats for an integer datatype: the client sent some, or 64-bit ints numpy
    # would not mix (2**64-1 beside 0): check the exact Python values instead
    info = np.iinfo(dtype)
    return np.array([_integer(name, datatype, info, value) for value in flat], dtype)


# --- decoding: binary -------------------------------------------------------------------------


def decode_binary(
    name: str, datatype: Any, shape: Any, buffer: memoryview, budget: Budget | None = None
) -> Any:
    """The value of a tensor whose data is exactly ``buffer`` (its ``binary_data_size`` bytes)."""
    datatype = _datatype(name, datatype)
    dims, count = _checked_shape(name, datatype, shape, budget)
    size = len(buffer)
    if datatype == BYTES:
        items = _bytes_elements(name, buffer, count)
        if budget is not None:
            budget.spend(name, sum(map(len, items)))
        return nest(items, dims)
    dtype = DTYPES[datatype]
    if size != count * dtype.itemsize:
        raise BadRequest(
            f"input {name!r}: binary_data_size is {size} bytes but shape {short(list(dims))} of "
            f"{datatype} takes {count * dtype.itemsize}"
        )
    array = np.frombuffer(buffer, dtype, count)
    if dtype.kind == "b" and count and array.view(np.uint8).max() > 1:
        raise BadRequest(f"input {name!r}: BOOL bytes must be 0 or 1")
    try:
        return array.reshape(dims)
    except ValueError as exc:  # an empty tensor whose other dims multiply past what numpy holds
        raise BadRequest(f"input {name!r}: shape {short(list(dims))} is too big for numpy") from exc


def _bytes_elements(name: str, buffer: memoryview, count: int) -> list[bytes]:
    """BYTES in binary: each element a 4-byte little-endian length, then that many bytes (each
    length checked against what is left before anything is sliced)."""
    end = len(buffer)
    if count * 4 > end:
        raise BadRequest(f"input {name!r}: {end} bytes cannot hold {count} BYTES elements")
    items: list[bytes] = []
    position = 0
    for _ in range(count):
        if position + 4 > end:
            raise BadRequest(f"input {name!r}: BYTES data ends inside an element's length")
        (length,) = _LENGTH.unpack_from(buffer, position)
        position += 4
        if position + length > end:
            raise BadRequest(f"input {name!r}: a BYTES element of {length} bytes runs past its data")
        items.append(bytes(buffer[position:position + length]))
        position += length
    if position != end:
        raise BadRequest(
            f"input {name!r}: binary_data_size is {end} bytes but its {count} BYTES elements "
            f"take {position}"
        )
    return items


# --- encoding ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Tensor:
    """A model's output as the protocol carries it: numeric (``array``) or BYTES (``items``)."""

    name: str
    datatype: str
    shape: list[int]
    array: np.ndarray | None = None
    """Numeric data, C-contiguous and flat."""
    items: list[bytes] | None = None
    """BYTES elements, row-major."""

    def json_data(self) -> Any:
        """``data`` for JSON: the flat array (orjson serialises numpy) or a list of strings."""
        if self.array is not None:
            return self.array
        assert self.items is not None
        try:
            return [item.decode("utf-8") for item in self.items]
        except UnicodeDecodeError:
            raise BadRequest(
                f"output {self.name!r} holds bytes that are not UTF-8, which JSON cannot carry: "
                "ask for it in binary (outputs: [{\"name\": ..., \"parameters\": {\"binary_data\": true}}])"
            ) from None

    def binary_data(self) -> bytes | memoryview:
        """The binary extension's bytes: little-endian elements (the array's own memory when it
        is already laid out so), or length-prefixed BYTES."""
        if self.array is not None:
            little = np.ascontiguousarray(self.array, self.array.dtype.newbyteorder("<"))
            return little.data.cast("B")
        assert self.items is not None
        return b"".join(_LENGTH.pack(len(item)) + item for item in self.items)


def encode(name: str, value: Any, hint: str | None = None) -> Tensor:
    """A model's output value as a ``Tensor`` (a ``ModelError`` when it is not one).

    ``hint``: the datatype of the request's input of the same name, for a value whose own type
    says nothing (an empty list: an empty BYTES tensor through the identity model)."""
    if type(value) is np.ndarray:  # the common output: what the checks below would make of it
        datatype = _BY_KIND_SIZE.get((value.dtype.kind, value.dtype.itemsize))
        if datatype is not None and value.dtype.isnative:
            return Tensor(name, datatype, list(value.shape), array=np.ascontiguousarray(value.reshape(-1)))
    if isinstance(value, list) and not _has_leaf(value) and hint is not None:
        if hint == BYTES:
            return Tensor(name, BYTES, _flatten(name, value)[0], items=[])
        if hint in DTYPES:
            value = np.asarray(value, DTYPES[hint].newbyteorder("="))
    if isinstance(value, bytes | str) or (isinstance(value, list) and _first_leaf_is_text(value)):
        shape, leaves = _flatten(name, value)
        return Tensor(name, BYTES, shape, items=[_as_bytes(name, leaf) for leaf in leaves])
    if isinstance(value, dict):
        raise ModelError(f"output {name!r} is a dict ({', '.join(map(str, value))}); a V2 output "
                         "is one tensor: give each tensor its own key")
    try:
        array = value if isinstance(value, np.ndarray) else np.asarray(value)
    except (ValueError, TypeError) as exc:
        raise ModelError(f"output {name!r} is not an array: {exc}") from None
    shape = [int(size) for size in array.shape]
    if array.dtype.kind in "SUO":
        return Tensor(name, BYTES, shape, items=[_as_bytes(name, leaf) for leaf in array.ravel().tolist()])
    datatype = _BY_KIND_SIZE.get((array.dtype.kind, array.dtype.itemsize))
    if datatype is None:
        raise ModelError(f"output {name!r} has dtype {array.dtype}, which the V2 protocol cannot carry")
    if not array.dtype.isnative:
        array = array.astype(array.dtype.newbyteorder("="))
    return Tensor(name, datatype, shape, array=np.ascontiguousarray(array.reshape(-1)))


def _has_leaf(value: list[Any]) -> bool:
    return any(_has_leaf(item) if isinstance(item, list) else True for item in value)


def _first_leaf_is_text(value: list[Any]) -> bool:
    while isinstance(value, list) and value:
        value = value[0]
    return isinstance(value, bytes | str)


def _flatten(name: str, value: Any) -> tuple[list[int], list[Any]]:
    if not isinstance(value, list | tuple):
        return [], [value]
    if not value:
        return [0], []
    parts = [_flatten(name, item) for item in value]
    shape = parts[0][0]
    if any(part[0] != shape for part in parts):
        raise ModelError(f"output {name!r} is a ragged list; a tensor must be rectangular")
    return [len(value), *shape], [leaf for part in parts for leaf in part[1]]


def _as_bytes(name: str, leaf: Any) -> bytes:
    if isinstance(leaf, bytes):
        return leaf
    if isinstance(leaf, str):
        return leaf.encode("utf-8")
    raise ModelError(f"output {name!r} mixes {type(leaf).__name__} values with strings")

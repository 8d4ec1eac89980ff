"""A ``.npy`` header read as data: magic, version, a short literal dict, checked fields.

numpy's own reader reads the header's declared length (up to 4 GiB in version 2) before it
checks it, and builds structured and subarray dtypes from client-chosen descriptions; this one
reads at most ``MAX_HEADER`` bytes and accepts plain dtypes only.
"""

from __future__ import annotations

import ast
import re
import struct
from dataclasses import dataclass
from typing import Any

import numpy as np

from studio_plugins import BadRequest

MAGIC = b"\x93NUMPY"
MAX_HEADER = 4096
"""numpy writes 118 bytes for a plain dtype; a 32-dim shape of 19-digit dims takes ~700."""
MAX_NDIM = 32
"""numpy 1.x's NPY_MAXDIMS: the most dims an array has on every numpy we support."""
MAX_ELEMENTS_BYTES = 2**62
"""numpy needs the nonzero dims times the itemsize to fit its index type, even for a zero-size
array; staying below 2**62 keeps that true with room."""
_LENGTH = {1: struct.Struct("<H"), 2: struct.Struct("<I"), 3: struct.Struct("<I")}
_KEYS = {"descr", "fortran_order", "shape"}
_KINDS = "biufcmMSU"
# what numpy writes for a plain dtype: '<f8', '|b1', '<U3', '|S1', '<M8[D]', '<m8[25us]' ...
_DESCR = re.compile(r"[<>|=]?(?:[biufcSUV]\d{1,10}|[mM]8(?:\[\d{0,10}[A-Za-z]{1,2}\])?|[?O])")


@dataclass(frozen=True)
class ArrayHeader:
    dtype: np.dtype
    shape: tuple[int, ...]
    fortran_order: bool
    count: int
    """Elements (0 when a dim is)."""
    length: int
    """Bytes from the member's start to its data."""

    @property
    def nbytes(self) -> int:
        return self.count * self.dtype.itemsize


def _exactly(member: Any, size: int, name: str, what: str) -> bytes:
    data = b""
    while len(data) < size:
        chunk = member.read(size - len(data))
        if not chunk:
            raise BadRequest(f"npz member {name!r} ends inside its {what}")
        data += chunk
    return data


def read_header(member: Any, name: str) -> ArrayHeader:
    """The header at the start of ``member`` (a readable zip member), read no further than it."""
    preamble = _exactly(member, len(MAGIC) + 2, name, "npy magic")
    if not preamble.startswith(MAGIC):
        raise BadRequest(f"npz member {name!r} is not a .npy array")
    major, minor = preamble[len(MAGIC)], preamble[len(MAGIC) + 1]
    unpack = _LENGTH.get(major)
    if unpack is None or minor != 0:
        raise BadRequest(f"npz member {name!r}: unknown .npy format version {major}.{minor}")
    (size,) = unpack.unpack(_exactly(member, unpack.size, name, "header length"))
    if size > MAX_HEADER:
        raise BadRequest(f"npz member {name!r}: its .npy header claims {size} bytes; at most {MAX_HEADER}")
    text = _exactly(member, size, name, "header").decode("utf-8" if major == 3 else "latin-1")
    fields = _literal(name, text)
    dtype = _dtype(name, fields["descr"])
    shape = _shape(name, fields["shape"])
    if not isinstance(fields["fortran_order"], bool):
        raise BadRequest(f"npz member {name!r}: fortran_order must be True or False")
    count = _count(name, shape, dtype)
    return ArrayHeader(dtype, shape, fields["fortran_order"], count, len(preamble) + unpack.size + size)


def _literal(name: str, text: str) -> dict[str, Any]:
    try:
        fields = ast.literal_eval(text)
    except (SyntaxError, ValueError, TypeError, MemoryError, RecursionError):
        # MemoryError and RecursionError: CPython's parser on deeply nested text (4 KiB at most)
        raise BadRequest(f"npz member {name!r}: its .npy header is not a Python literal") from None
    if not isinstance(fields, dict) or set(fields) != _KEYS:
        raise BadRequest(f"npz member {name!r}: its .npy header must be a dict of {sorted(_KEYS)}")
    return fields


def _dtype(name: str, descr: Any) -> np.dtype:
    if not isinstance(descr, str):  # a list: a structured dtype
        raise BadRequest(f"npz array {name!r}: structured dtypes are not accepted; send one array per field")
    if not _DESCR.fullmatch(descr):  # before numpy parses it: "(2?)f8" made it literal_eval "2?"
        raise BadRequest(f"npz array {name!r}: {descr[:40]!r} is not a plain dtype")
    try:
        dtype = np.dtype(descr)
    except (TypeError, ValueError):
        raise BadRequest(f"npz array {name!r}: {descr[:40]!r} is not a dtype") from None
    plain = dtype.fields is None and dtype.subdtype is None and dtype.itemsize > 0
    if dtype.kind not in _KINDS or not plain:
        raise BadRequest(
            f"npz array {name!r}: dtype {descr[:40]!r} is not accepted: numbers, booleans, "
            "datetimes and sized strings only (no objects, structured or void dtypes)"
        )
    return dtype


def _shape(name: str, shape: Any) -> tuple[int, ...]:
    if not isinstance(shape, tuple) or len(shape) > MAX_NDIM or not all(
        type(size) is int and 0 <= size < 2**63 for size in shape
    ):
        raise BadRequest(
            f"npz array {name!r}: shape must be a tuple of at most {MAX_NDIM} integers in [0, 2**63)"
        )
    return shape


def _count(name: str, shape: tuple[int, ...], dtype: np.dtype) -> int:
    nonzero = dtype.itemsize
    for size in shape:
        if size:
            nonzero *= size
            if nonzero > MAX_ELEMENTS_BYTES:
                raise BadRequest(f"npz array {name!r}: shape {shape[:8]} of {dtype} is too large for numpy")
    return 0 if 0 in shape else nonzero // dtype.itemsize

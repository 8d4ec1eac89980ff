"""numpy dtypes from a pickle's description, rebuilt by us from a closed set of plain descriptors.

A pickled dtype is ``numpy.dtype(typestr, align, copy)`` followed by a BUILD whose state numpy's
own ``__setstate__`` would write into the descriptor as told: flags, item size, field offsets. A
client that forges that state makes numpy read or free memory it does not own, or corrupts the
shared descriptors every array of the process uses (an unsized ``S``/``U``/``V`` scalar set them to
one byte: issue 13). So ``__setstate__`` never runs here: the state is read as data, checked, and
a new dtype is made with numpy's ordinary constructor from what it says:

- plain: bool, integers, floats and complex of the sizes numpy has, ``S``/``U``/``V`` of a
  positive size, datetime64/timedelta64 with a known unit; in the byte order the state names;
- a subarray ``(base, shape)`` and a structured dtype (names, field dtypes, offsets, item size,
  aligned or not), each part checked the same way: no titles, no object or pointer items.

The state must then agree with the dtype we built (item size, alignment, flags): a state numpy
would not have written is refused rather than half believed.
"""

from __future__ import annotations

import re
from typing import Any

import numpy as np

MAX_FIELDS = 4096
MAX_DTYPE_DEPTH = 16
MAX_SUBARRAY_DIMS = 32

_TYPESTR = re.compile(r"([biufcSUV])(\d{1,12})|([Mm])8")
# sizes numpy has for each kind (f16 and c32 are long double where the platform has one)
_SIZES = {"b": {1}, "i": {1, 2, 4, 8}, "u": {1, 2, 4, 8}, "f": {2, 4, 8, 16}, "c": {8, 16, 32}}
_UNITS = frozenset({"Y", "M", "W", "D", "h", "m", "s", "ms", "us", "ns", "ps", "fs", "as", "generic"})
_ALIGNED_STRUCT = 0x80  # NPY_ALIGNED_STRUCT in a dtype's flags
_ORDERS = frozenset("<>|=")


class DtypeRefused(ValueError):
    """The described dtype is not one we build; the message says why."""


_plain_cache: dict[tuple[str, int, str, int, int, int], np.dtype[Any]] = {}


def build_dtype(typestr: str, state: Any) -> tuple[np.dtype[Any], int, int]:
    """The dtype ``numpy.dtype(typestr)`` then ``__setstate__(state)`` describes, made anew; how
    deeply it nests and how many plain fields it has once every nested structure is expanded.

    numpy walks nested dtypes recursively in C and expands shared field dtypes (a field dtype
    reused at each of 16 levels would be exponential): both are bounded."""
    if type(typestr) is not str or type(state) is not tuple or len(state) not in (8, 9):
        raise DtypeRefused("a dtype's state is not numpy's")
    version, order, subarray, names, fields, elsize, alignment, flags = state[:8]
    if (len(state) == 8 and subarray is None and names is None and fields is None and type(version) is int
            and type(order) is str and type(elsize) is int and type(alignment) is int and type(flags) is int):
        # a plain dtype seen before (nearly every one): its state holds only strings and ints,
        # safe to hash; it was checked when it was first built
        cached = _plain_cache.get((typestr, version, order, elsize, alignment, flags))
        if cached is not None:
            return cached, 0, 1
    if (type(version) is not int or version not in (3, 4) or len(state) != version + 5
            or type(order) is not str or order not in _ORDERS
            or not all(type(n) is int for n in (elsize, alignment, flags))):
        raise DtypeRefused("a dtype's state is not numpy's")
    match = _TYPESTR.fullmatch(typestr)
    if match is None:
        kind = typestr[:1]
        if kind == "O":
            raise DtypeRefused("object-dtype arrays are not accepted")
        raise DtypeRefused(f"dtype {typestr[:40]!r} is not a plain numpy dtype")
    if names is None and fields is None and subarray is None:
        if version == 4:  # datetime: the unit is in the metadata (never hashed: client data)
            dtype = _plain(match, order, state[8])
            _agree(dtype, elsize, alignment, flags)
            return dtype, 0, 1
        dtype = _plain(match, order, None)
        _agree(dtype, elsize, alignment, flags)
        if len(_plain_cache) < 1024:  # bounded, whatever clients send
            _plain_cache[(typestr, version, order, elsize, alignment, flags)] = dtype
        return dtype, 0, 1
    if version != 3 or match.group(1) != "V" or order != "|":
        raise DtypeRefused("a structured or subarray dtype's state is not numpy's")
    size = int(match.group(2))
    if size <= 0:
        raise DtypeRefused("a structured or subarray dtype of no size is not accepted")
    if subarray is not None:
        if names is not None or fields is not None:
            raise DtypeRefused("a dtype cannot be both a subarray and structured")
        dtype, depth, leaves = _subarray(subarray, size)
    else:
        dtype, depth, leaves = _structured(names, fields, size, bool(flags & _ALIGNED_STRUCT))
    _agree(dtype, elsize, alignment, flags)
    return dtype, depth, leaves


class DtypeNode:
    """What ``numpy.dtype(typestr, align, copy)`` gives in a pickle: only a typestr until the BUILD
    that follows hands it a state; then the dtype we built from both."""

    __slots__ = ("depth", "dtype", "leaves", "typestr")

    def __init__(self, args: Any) -> None:
        if (type(args) is not tuple or len(args) != 3 or type(args[0]) is not str
                or type(args[1]) is not bool or type(args[2]) is not bool):
            raise DtypeRefused("numpy.dtype is only accepted as numpy's pickles call it")
        self.typestr: str = args[0]
        self.dtype: np.dtype[Any] | None = None
        self.depth = 0  # how deep its fields and subarrays nest
        self.leaves = 1  # its plain fields, counted through every nested structure

    def build(self, state: Any) -> None:
        if self.dtype is not None:
            raise DtypeRefused("a dtype's state is set twice")
        self.dtype, self.depth, self.leaves = build_dtype(self.typestr, state)


def check_built(node: Any) -> np.dtype[Any]:
    """The dtype a node in the payload stands for (a field, a subarray base, an array's dtype)."""
    if type(node) is not DtypeNode:
        raise DtypeRefused("expected a numpy dtype")
    if node.dtype is None:
        raise DtypeRefused("a dtype without its state")
    return node.dtype


def _nested(node: Any) -> tuple[np.dtype[Any], int, int]:
    """A field's or base's dtype, the depth it reaches as a part, and its plain fields."""
    dtype = check_built(node)
    if not dtype.itemsize:
        raise DtypeRefused(f"an unsized {dtype.kind} dtype cannot be a field or a subarray's base")
    if node.depth + 1 > MAX_DTYPE_DEPTH:
        raise DtypeRefused(f"dtype nested deeper than {MAX_DTYPE_DEPTH} levels")
    return dtype, node.depth + 1, node.leaves


def _plain(match: re.Match[str], order: str, metadata: Any) -> np.dtype[Any]:
    kind, size_text, time_kind = match.groups()
    if time_kind is not None:
        unit = metadata[1] if type(metadata) is tuple and len(metadata) == 2 else None
        if (type(unit) is not tuple or len(unit) != 4 or type(unit[0]) is not bytes
                or not all(type(n) is int for n in unit[1:])):
            raise DtypeRefused("a datetime dtype's unit is not numpy's")
        name, count, denominator, events = unit[0].decode("latin-1"), unit[1], unit[2], unit[3]
        if name not in _UNITS or not 1 <= count < 2**31 or denominator != 1 or events != 1:
            raise DtypeRefused(f"datetime unit {name[:20]!r} x {count} is not one numpy has")
        if order not in "<>=":
            raise DtypeRefused("a datetime dtype needs a byte order")
        suffix = "" if name == "generic" else f"[{'' if count == 1 else count}{name}]"
        return np.dtype(f"{order}{time_kind}8{suffix}")
    if metadata is not None:
        raise DtypeRefused("a plain dtype's state carries metadata")
    size = int(size_text)
    if kind in "SUV":
        # size 0: numpy's own unsized descriptor, shared by the process; we hand it out but never
        # change it (numpy's __setstate__ did), and no array or field may use it: only the empty
        # scalar np.bytes_(b"") / np.str_("") / np.void(b"") is made from it
        if kind == "U" and order not in "<>=":
            raise DtypeRefused("a unicode dtype needs a byte order")
        if kind != "U" and order != "|":
            raise DtypeRefused(f"a {kind} dtype has no byte order")
        return np.dtype(f"{order if kind == 'U' else ''}{kind}{size}")
    if size not in _SIZES[kind]:
        raise DtypeRefused(f"numpy has no {kind}{size} dtype")
    if (order == "|") != (size == 1 and kind != "c"):
        raise DtypeRefused(f"byte order {order!r} does not fit {kind}{size}")
    try:
        return np.dtype(f"{'' if order == '|' else order}{kind}{size}")
    except TypeError:  # f16/c32 where the platform has no such long double
        raise DtypeRefused(f"this platform has no {kind}{size} dtype") from None


def _subarray(subarray: Any, size: int) -> tuple[np.dtype[Any], int, int]:
    if type(subarray) is not tuple or len(subarray) != 2:
        raise DtypeRefused("a subarray dtype's state is not numpy's")
    (base, depth, leaves), shape = _nested(subarray[0]), subarray[1]
    if (type(shape) is not tuple or len(shape) > MAX_SUBARRAY_DIMS
            or not all(type(n) is int and 0 <= n < 2**31 for n in shape)):
        raise DtypeRefused("a subarray dtype's shape is not a short tuple of sizes")
    count = 1
    for n in shape:
        count *= n
    if count * base.itemsize != size:
        raise DtypeRefused("a subarray dtype does not fit its item size")
    return np.dtype((base, shape)), depth, leaves


def _structured(names: Any, fields: Any, size: int, aligned: bool) -> tuple[np.dtype[Any], int, int]:
    if (type(names) is not tuple or type(fields) is not dict or len(names) != len(fields)
            or not 0 < len(names) <= MAX_FIELDS):
        raise DtypeRefused("a structured dtype's names and fields do not match")
    formats, offsets, depth, leaves = [], [], 0, 0
    for name in names:
        if type(name) is not str:
            raise DtypeRefused("a structured dtype's field names must be strings")
        field = fields.get(name)
        if type(field) is not tuple or len(field) != 2:  # a third item would be a title
            raise DtypeRefused(f"field {name[:40]!r} of a structured dtype is not (dtype, offset)")
        (dtype, field_depth, field_leaves), offset = _nested(field[0]), field[1]
        depth = max(depth, field_depth)
        leaves += field_leaves
        if leaves > MAX_FIELDS:
            raise DtypeRefused(f"a structured dtype of more than {MAX_FIELDS} fields, nested ones counted")
        if type(offset) is not int or not 0 <= offset <= size - dtype.itemsize:
            raise DtypeRefused("a structured dtype has a field outside its item")
        formats.append(dtype)
        offsets.append(offset)
    try:
        dtype = np.dtype({"names": list(names), "formats": formats, "offsets": offsets,
                          "itemsize": size}, align=aligned)
    except (ValueError, TypeError) as exc:  # repeated names, misaligned offsets for align=True
        raise DtypeRefused(f"a structured dtype numpy refuses: {str(exc)[:200]}") from None
    return dtype, depth, leaves


def _agree(dtype: np.dtype[Any], elsize: int, alignment: int, flags: int) -> None:
    """The state's own numbers must be those of the dtype we built (numpy writes -1 for 'as the
    type says')."""
    if elsize not in (-1, dtype.itemsize) or alignment not in (-1, dtype.alignment):
        raise DtypeRefused("a dtype's state does not fit its item size")
    if flags != dtype.flags:
        raise DtypeRefused(f"a dtype's state has flags {flags}, not numpy's {dtype.flags} for {dtype.str}")

"""What a pickle's calls and containers may make: the names it may call, values from checked parts.

The opcode loop (core/wire/pickle_decoder.py) reads the stream; what REDUCE, BUILD and the
container opcodes then make is decided here. A global is only a token from a closed table
(``GLOBALS``: numpy's reconstructors and a few of Python's own constructors), never an object a
client reaches; REDUCE of a token makes what numpy's pickles mean by it (an array from a checked
(dtype, shape, bytes) triple, a dtype node, a scalar, bytes, a set), and BUILD sets an array's or
a dtype's state once, read as data. Dict keys and set members are plain values whose hash a
client cannot choose to collide.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from core.wire.pickle_dtypes import DtypeNode, check_built
from core.wire.pickle_limits import MAX_NDIM, Limits, PickleRefused, PickleTooLarge


class Global:
    """A name from the table: only a token, which REDUCE knows how to call."""

    __slots__ = ("name",)

    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return self.name


RECONSTRUCT, NDARRAY, DTYPE, FROMBUFFER, SCALAR = (
    Global(name) for name in ("_reconstruct", "numpy.ndarray", "numpy.dtype", "_frombuffer", "scalar"))
ENCODE, BYTES, BYTEARRAY, COMPLEX, SET, FROZENSET = (
    Global(name) for name in ("_codecs.encode", "bytes", "bytearray", "complex", "set", "frozenset"))

GLOBALS: dict[tuple[str, str], Global] = {
    ("numpy", "ndarray"): NDARRAY,
    ("numpy", "dtype"): DTYPE,
    ("_codecs", "encode"): ENCODE,
}
for _builtins in ("builtins", "__builtin__"):  # protocol 2 writes Python 2's name
    GLOBALS.update({(_builtins, g.name): g for g in (BYTES, BYTEARRAY, COMPLEX, SET, FROZENSET)})
for _numpy in ("numpy._core", "numpy.core"):  # numpy 2, numpy 1.x
    GLOBALS[(f"{_numpy}.multiarray", "_reconstruct")] = RECONSTRUCT
    GLOBALS[(f"{_numpy}.multiarray", "scalar")] = SCALAR
    GLOBALS[(f"{_numpy}.numeric", "_frombuffer")] = FROMBUFFER

_EMPTY_SCALARS = {"S": np.bytes_(b""), "U": np.str_(""), "V": np.void(b"")}
_KEY_TYPES = frozenset({str, bytes, int, bool, type(None)})
_HASH_MODULUS = (1 << 61) - 1  # an int below it is its own hash: no two keys collide


class ArrayNode:
    """What ``_reconstruct(ndarray, (0,), b'b')`` gives: an array once the BUILD after it has run."""

    __slots__ = ("array",)

    def __init__(self) -> None:
        self.array: np.ndarray[Any, Any] | None = None


class ValueBuilder:
    """REDUCE and BUILD within the limits: counts the bytes of the arrays it makes.

    The decoder is one (``_Decoder`` in core/wire/pickle_decoder.py adds the opcode loop), so the
    loop calls ``self.reduce`` and ``self.build`` directly: no indirection per opcode."""

    def __init__(self, limits: Limits) -> None:
        self.limits = limits
        self.array_bytes = 0  # bytes of arrays built so far (their data copied or viewed)

    def refuse_size(self, what: str) -> PickleTooLarge:
        return PickleTooLarge(f"{what} would exceed the limit of {self.limits.max_bytes} bytes")

    # --- numbers and shapes ---------------------------------------------------------------

    @staticmethod
    def shape(value: Any) -> tuple[tuple[int, ...], int]:
        """A shape and its number of items, counted from the non-zero dimensions only."""
        if type(value) is not tuple or len(value) > MAX_NDIM:
            raise PickleRefused(f"an array's shape must be a tuple of at most {MAX_NDIM} sizes")
        count = 1
        nonzero = 1
        for dim in value:
            if type(dim) is not int or not 0 <= dim < 1 << 62:
                raise PickleRefused("an array's shape must hold non-negative sizes")
            if dim:
                nonzero *= dim
                if nonzero >= 1 << 62:
                    raise PickleRefused("an array's shape is too big for numpy")
            count *= dim
        return value, count

    def new_array(self, data: Any, dtype: np.dtype[Any], shape: tuple[int, ...], count: int,
                  fortran: bool, copy: bool) -> np.ndarray[Any, Any]:
        """An array over ``data`` (bytes or bytearray of exactly the right length)."""
        if type(data) is not bytes and type(data) is not bytearray:
            raise PickleRefused("an array's data must be bytes")
        if not dtype.itemsize:
            raise PickleRefused(f"an unsized {dtype.kind} dtype cannot hold an array")
        if len(data) != count * dtype.itemsize:
            raise PickleRefused(
                f"an array's data holds {len(data)} bytes, its shape and dtype say {count * dtype.itemsize}")
        self.array_bytes += len(data)
        if self.array_bytes > self.limits.max_bytes:
            raise self.refuse_size("the arrays")
        try:
            flat = np.frombuffer(data, dtype=dtype, count=count) if count else np.empty(0, dtype)
            array = flat.reshape(shape, order="F" if fortran else "C")
        except ValueError as exc:  # a zero-size shape numpy cannot index
            raise PickleRefused(f"numpy refuses the array: {str(exc)[:200]}") from None
        if copy:  # numpy's own __setstate__ copies, and makes a byte order native
            if dtype.byteorder in "<>" and not dtype.isnative:
                array = array.astype(dtype.newbyteorder("="), order="K")
            else:
                array = array.copy(order="K")
        check_text(array)
        return array

    # --- what REDUCE and BUILD may do ------------------------------------------------------

    def reduce(self, func: Any, args: Any) -> Any:
        if type(func) is not Global:
            raise PickleRefused("only numpy's and Python's own constructors may be called")
        if type(args) is not tuple:
            raise PickleRefused(f"{func.name} called without an argument tuple")
        if func is FROMBUFFER:
            if len(args) != 4 or type(args[3]) is not str or args[3] not in ("C", "F"):
                raise PickleRefused("_frombuffer is only accepted as numpy's pickles call it")
            dtype = check_built(args[1])
            shape, count = self.shape(args[2])
            return self.new_array(args[0], dtype, shape, count, args[3] == "F", copy=False)
        if func is RECONSTRUCT:
            # client values are compared only once their type is known: numpy's == is elementwise
            if (len(args) != 3 or args[0] is not NDARRAY or type(args[1]) is not tuple
                    or len(args[1]) != 1 or type(args[1][0]) is not int or args[1][0] != 0
                    or type(args[2]) not in (bytes, str) or args[2] not in (b"b", "b")):
                raise PickleRefused("_reconstruct is only accepted as numpy's pickles call it")
            return ArrayNode()
        if func is DTYPE:
            return DtypeNode(args)
        if func is SCALAR:
            if len(args) != 2 or type(args[1]) is not bytes:
                raise PickleRefused("numpy scalars are only accepted as bytes of a plain dtype")
            dtype = check_built(args[0])
            if len(args[1]) != dtype.itemsize:
                raise PickleRefused("a numpy scalar's bytes do not fit its dtype")
            if not dtype.itemsize:  # an empty string or void, as numpy pickles them
                return _EMPTY_SCALARS[dtype.kind]
            return self.new_array(args[1], dtype, (), 1, False, copy=False)[()]
        if func is ENCODE:  # protocol 2's bytes: _codecs.encode(text, "latin1")
            if (len(args) != 2 or type(args[0]) is not str or type(args[1]) is not str
                    or args[1].lower().replace("_", "-") not in ("latin1", "latin-1")):
                raise PickleRefused("_codecs.encode is only accepted for latin-1 text")
            try:
                return args[0].encode("latin-1")
            except UnicodeEncodeError:
                raise PickleRefused("_codecs.encode of text that is not latin-1") from None
        if func is BYTES:
            if args:
                raise PickleRefused("bytes() is only accepted without arguments")
            return b""
        if func is BYTEARRAY:
            if not args:
                return bytearray()
            if len(args) == 1 and type(args[0]) is bytes:
                return bytearray(args[0])
            return bytearray(self.reduce(ENCODE, args))
        if func is COMPLEX:
            if len(args) not in (1, 2) or not all(type(a) in (int, float) for a in args):
                raise PickleRefused("complex() is only accepted from numbers")
            try:
                return complex(*args)
            except OverflowError:  # an integer past a float's range
                raise PickleRefused("complex() of a number too large for a float") from None
        if func is SET or func is FROZENSET:
            items = args[0] if len(args) == 1 else [] if not args else None
            if type(items) is not list:
                raise PickleRefused(f"{func.name}() is only accepted from a list")
            return (set if func is SET else frozenset)(checked_keys(items))
        raise PickleRefused(f"{func.name} cannot be called in a request")

    def build(self, target: Any, state: Any) -> None:
        if type(target) is DtypeNode:
            target.build(state)
        elif type(target) is ArrayNode:
            if target.array is not None:
                raise PickleRefused("an array's state is set twice")
            # (version, shape, dtype, is_fortran, data); numpy also reads it without the version
            if type(state) is not tuple or len(state) not in (4, 5) or (
                    len(state) == 5 and (type(state[0]) is not int or state[0] != 1)):
                raise PickleRefused("an array's state is not numpy's")
            shape, count = self.shape(state[-4])
            dtype, fortran = check_built(state[-3]), state[-2]
            if type(fortran) is not bool:
                raise PickleRefused("an array's state is not numpy's")
            target.array = self.new_array(state[-1], dtype, shape, count, fortran, copy=True)
        else:
            raise PickleRefused("BUILD is only accepted on numpy arrays and dtypes")


def find_global(module: Any, name: Any) -> Global:
    if type(module) is not str or type(name) is not str:
        raise PickleRefused("a global's module and name must be strings")
    found = GLOBALS.get((module, name))
    if found is None:
        raise PickleRefused(f"{module[:100]}.{name[:100]} is not allowed in a request")
    return found


def set_item(target: Any, key: Any, value: Any) -> None:
    if type(target) is not dict:
        raise PickleRefused("SETITEM needs a dict")
    if type(key) not in _KEY_TYPES or (type(key) is int and not -_HASH_MODULUS < key < _HASH_MODULUS):
        raise PickleRefused(_KEYS_ALLOWED.format("dict keys"))
    target[key] = value


def set_items(target: Any, items: list[Any]) -> None:
    """SETITEMS and DICT: ``items`` are key, value, key, value ..."""
    if type(target) is not dict or len(items) % 2:
        raise PickleRefused("SETITEMS and DICT need a dict and key-value pairs")
    for index in range(0, len(items), 2):
        set_item(target, items[index], items[index + 1])


def checked_keys(items: list[Any]) -> list[Any]:
    for item in items:
        kind = type(item)
        if kind not in _KEY_TYPES or (kind is int and not -_HASH_MODULUS < item < _HASH_MODULUS):
            raise PickleRefused(_KEYS_ALLOWED.format("set members"))
    return items


# str and bytes hash with a per-process secret; ints below 2**61 - 1 are their own hash. Floats,
# large ints and tuples hash to values a client can choose to collide: thousands of keys with
# one hash make each insertion walk them all (quadratic), or recurse in C (nested tuples).
_KEYS_ALLOWED = "{} must be strings, bytes, integers below 2**61 or booleans"


def appendable(target: Any) -> list[Any]:
    if type(target) is not list:
        raise PickleRefused("APPEND needs a list")
    return target


def check_text(array: np.ndarray[Any, Any]) -> None:
    """Unicode items must hold code points: numpy raises when it reads others (a 500 later)."""
    dtype = array.dtype
    if dtype.names:
        for name in dtype.names:
            check_text(array[name])
    elif dtype.kind == "U" and array.size:
        codes = np.ascontiguousarray(array).view(dtype.byteorder.replace("=", "") + "u4")
        if int(codes.max()) > 0x10FFFF:
            raise PickleRefused("a unicode array holds values that are not code points")

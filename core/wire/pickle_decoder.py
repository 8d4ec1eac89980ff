"""A pickle read as data: one linear pass over its opcodes, with limits, never CPython's pickle machine.

The restricted unpickler this replaces allow-listed names but still ran CPython's unpickler and
numpy's C reconstructors on client-chosen state, and small hostile bodies broke the server
through what that machinery does by itself (issue 13, each measured against a real server):
hashing a 10**6-deep tuple used as a dict key overflowed the C stack (SIGSEGV); a forged dtype
state passed every check and crashed numpy later; lists built from memo references grew
exponentially (556 bytes never finished); a 9-byte LONG_BINPUT zero-filled a 32 GB memo; one
buffer backed many arrays (105 KB in, 20 MB out); and an unsized ``S``/``U``/``V`` scalar rewrote
numpy's shared descriptors for the whole process.

Here every opcode is interpreted by us, on values we build:

- containers are plain ``dict``/``list``/``tuple``/``set``; dict keys and set members must be
  strings, bytes or numbers, so nothing is hashed that could recurse;
- memo indices are at most one past the last memoised (pickle writes them in order);
- ``numpy.dtype`` and its BUILD state become a dtype we make with numpy's constructor from a
  closed set of plain descriptors (core/wire/pickle_dtypes.py); ``__setstate__`` never runs;
- an array is made from a checked (dtype, shape, bytes) triple with ``np.frombuffer``: the bytes'
  length must be exactly what the shape and dtype say;
- the opcodes, the time, the bytes of arrays built, the nesting depth and the size of the result
  counted with every shared reference expanded are all bounded (``Limits``), so a DAG of shared
  lists or arrays cannot amplify the body past ``--max-body``, and cycles are refused.

What numpy's pickles and Python's plain values need, at protocols 0 to 5 and with numpy 1.x or
2.x module names, is read; the rest (other globals, NEWOBJ, persistent ids, extension codes,
out-of-band buffers, Python 2 ``str``) is refused with a line that says what.
"""

from __future__ import annotations

import re
import struct
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from core.wire.pickle_dtypes import DtypeNode, DtypeRefused, check_built

MAX_NDIM = 64  # numpy's own maximum
_MAX_INT_BYTES = 1024  # LONG1/LONG4: no legitimate number needs more; hashing one is linear
_MAX_LINE = 1 << 16  # protocol 0 text lines other than strings


class PickleRefused(ValueError):
    """The body is not a pickle of plain data we read; the message says why (a 400)."""


class PickleTooLarge(PickleRefused):
    """Decoding would hold more than the limit allows (a 413)."""


@dataclass(frozen=True)
class Limits:
    max_bytes: int
    """What the result may hold, every shared reference counted again (``--max-body``)."""
    max_depth: int = 64
    max_ops: int = 500_000
    """About 0.15 s of decoding (0.3 us an opcode on a 2-core VM); a legitimate body needs one or
    two per value, and a list of more Python numbers than this belongs in an array."""
    max_seconds: float = 5.0


class _Global:
    """A name from the table: only a token, which REDUCE knows how to call."""

    __slots__ = ("name",)

    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return self.name


RECONSTRUCT, NDARRAY, DTYPE, FROMBUFFER, SCALAR = (
    _Global(name) for name in ("_reconstruct", "numpy.ndarray", "numpy.dtype", "_frombuffer", "scalar"))
ENCODE, BYTES, BYTEARRAY, COMPLEX, SET, FROZENSET = (
    _Global(name) for name in ("_codecs.encode", "bytes", "bytearray", "complex", "set", "frozenset"))

GLOBALS: dict[tuple[str, str], _Global] = {
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
_SCALAR_TYPES = frozenset({str, bytes, int, float, bool, complex, type(None)})
_SMALL = frozenset({int, float, bool, type(None)})  # counted as 8 bytes each (ints are bounded)
_HASH_MODULUS = (1 << 61) - 1  # an int below it is its own hash: no two keys collide


class _ArrayNode:
    """What ``_reconstruct(ndarray, (0,), b'b')`` gives: an array once the BUILD after it has run."""

    __slots__ = ("array",)

    def __init__(self) -> None:
        self.array: np.ndarray[Any, Any] | None = None


class _Decoder:
    def __init__(self, data: bytes, limits: Limits) -> None:
        self.data = data
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
        _check_text(array)
        return array

    # --- what REDUCE and BUILD may do ------------------------------------------------------

    def reduce(self, func: Any, args: Any) -> Any:
        if type(func) is not _Global:
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
            return _ArrayNode()
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
            return (set if func is SET else frozenset)(_keys(items))
        raise PickleRefused(f"{func.name} cannot be called in a request")

    def build(self, target: Any, state: Any) -> None:
        if type(target) is DtypeNode:
            target.build(state)
        elif type(target) is _ArrayNode:
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

    # --- the opcode loop --------------------------------------------------------------------

    def run(self) -> Any:  # one flat dispatch: the fast way to interpret opcodes in Python
        data = self.data
        end = len(data)
        limits = self.limits
        deadline = time.monotonic() + limits.max_seconds
        stack: list[Any] = []
        marks: list[list[Any]] = []
        memo: list[Any] = []
        pos = 0
        ops = 0
        while True:
            # the budget is checked between chunks of opcodes: cheaper than a count per opcode
            ops += _CHUNK_OPS
            if ops > limits.max_ops:
                raise PickleRefused(f"more than {limits.max_ops} opcodes")
            if time.monotonic() > deadline:
                raise PickleRefused(f"took longer than {limits.max_seconds:g} s to decode")
            for _ in _CHUNK:
                op = data[pos]  # IndexError past the end: truncated
                pos += 1
                # the most frequent opcodes of numpy's pickles first (protocols 5 and 2)
                if op == 0x94:  # MEMOIZE
                    memo.append(stack[-1])
                elif op == 0x8C:  # SHORT_BINUNICODE
                    size = data[pos]
                    pos += 1 + size
                    if pos > end:
                        raise PickleRefused("truncated: text runs past the end of the body")
                    stack.append(data[pos - size:pos].decode("utf-8", "surrogatepass"))
                    if data[pos] == 0x94:  # MEMOIZE after it, as pickle writes: one turn saved
                        memo.append(stack[-1])
                        pos += 1
                elif op == 0x71:  # BINPUT 'q'
                    index = data[pos]
                    pos += 1
                    if index == len(memo):
                        memo.append(stack[-1])
                    else:
                        _put(memo, index, stack[-1])
                elif op == 0x4B:  # BININT1 'K'
                    stack.append(data[pos])
                    pos += 1
                elif op == 0x68:  # BINGET 'h'
                    stack.append(memo[data[pos]])  # IndexError: nothing memoised there
                    pos += 1
                elif op == 0x4E:  # NONE 'N'
                    stack.append(None)
                elif op == 0x28:  # MARK '('
                    marks.append(stack)
                    stack = []
                elif op == 0x74:  # TUPLE 't'
                    items = stack
                    stack = marks.pop()
                    stack.append(tuple(items))
                    if data[pos] == 0x94:  # MEMOIZE after it, as pickle writes: one turn saved
                        memo.append(stack[-1])
                        pos += 1
                elif op == 0x52:  # REDUCE 'R'
                    args = stack.pop()
                    stack[-1] = self.reduce(stack[-1], args)
                    if data[pos] == 0x94:  # MEMOIZE after it, as pickle writes: one turn saved
                        memo.append(stack[-1])
                        pos += 1
                elif op == 0x87:  # TUPLE3
                    stack[-3:] = [(stack[-3], stack[-2], stack[-1])]
                    if data[pos] == 0x94:  # MEMOIZE after it, as pickle writes: one turn saved
                        memo.append(stack[-1])
                        pos += 1
                elif op == 0x86:  # TUPLE2
                    stack[-2:] = [(stack[-2], stack[-1])]
                    if data[pos] == 0x94:  # MEMOIZE after it, as pickle writes: one turn saved
                        memo.append(stack[-1])
                        pos += 1
                elif op == 0x85:  # TUPLE1
                    stack[-1] = (stack[-1],)
                    if data[pos] == 0x94:  # MEMOIZE after it, as pickle writes: one turn saved
                        memo.append(stack[-1])
                        pos += 1
                elif op == 0x58:  # BINUNICODE 'X'
                    size = int.from_bytes(data[pos:pos + 4], "little")
                    pos += 4 + size
                    if pos > end:
                        raise PickleRefused("truncated: text runs past the end of the body")
                    stack.append(data[pos - size:pos].decode("utf-8", "surrogatepass"))
                elif op == 0x62:  # BUILD 'b'
                    state = stack.pop()
                    target = stack[-1]
                    self.build(target, state)
                    if type(target) is _ArrayNode:  # the array itself from here on; the memo
                        stack[-1] = target.array  # keeps the node, which the final pass resolves
                elif op == 0x89:  # NEWFALSE
                    stack.append(False)
                elif op == 0x88:  # NEWTRUE
                    stack.append(True)
                elif op == 0x4A:  # BININT 'J'
                    stack.append(int.from_bytes(data[pos:pos + 4], "little", signed=True))
                    pos += 4
                elif op == 0x93:  # STACK_GLOBAL
                    name = stack.pop()
                    module = stack.pop()
                    stack.append(_global(module, name))
                    if data[pos] == 0x94:  # MEMOIZE after it, as pickle writes: one turn saved
                        memo.append(stack[-1])
                        pos += 1
                elif op == 0x72:  # LONG_BINPUT 'r'
                    _put(memo, int.from_bytes(data[pos:pos + 4], "little"), stack[-1])
                    pos += 4
                elif op == 0x6A:  # LONG_BINGET 'j'
                    stack.append(memo[int.from_bytes(data[pos:pos + 4], "little")])
                    pos += 4
                elif op == 0x4D:  # BININT2 'M'
                    stack.append(data[pos] | data[pos + 1] << 8)
                    pos += 2
                elif op == 0x47:  # BINFLOAT 'G'
                    stack.append(_DOUBLE.unpack_from(data, pos)[0])
                    pos += 8
                elif op == 0x73:  # SETITEM 's'
                    value = stack.pop()
                    key = stack.pop()
                    _set_item(stack[-1], key, value)
                elif op == 0x75:  # SETITEMS 'u'
                    items = stack
                    stack = marks.pop()
                    _set_items(stack[-1], items)
                elif op == 0x61:  # APPEND 'a'
                    value = stack.pop()
                    _list(stack[-1]).append(value)
                elif op == 0x65:  # APPENDS 'e'
                    items = stack
                    stack = marks.pop()
                    _list(stack[-1]).extend(items)
                elif op == 0x7D:  # EMPTY_DICT '}'
                    stack.append({})
                elif op == 0x5D:  # EMPTY_LIST ']'
                    stack.append([])
                elif op == 0x29:  # EMPTY_TUPLE ')'
                    stack.append(())
                elif op == 0x8D:  # BINUNICODE8
                    size = int.from_bytes(data[pos:pos + 8], "little")
                    pos += 8 + size
                    stack.append(_text(data, pos - size, pos, end))
                elif op == 0x43 or op == 0x42 or op == 0x8E or op == 0x96:
                    # SHORT_BINBYTES 'C', BINBYTES 'B', BINBYTES8, BYTEARRAY8
                    width = 1 if op == 0x43 else 4 if op == 0x42 else 8
                    size = int.from_bytes(data[pos:pos + width], "little")
                    pos += width + size
                    if pos > end:
                        raise PickleRefused("truncated: bytes run past the end of the body")
                    chunk = data[pos - size:pos]
                    stack.append(bytearray(chunk) if op == 0x96 else chunk)
                    if data[pos] == 0x94:  # MEMOIZE after it, as pickle writes: one turn saved
                        memo.append(stack[-1])
                        pos += 1
                elif op == 0x95:  # FRAME: a hint for buffered readers; the whole body is here
                    size = int.from_bytes(data[pos:pos + 8], "little")
                    pos += 8
                    if size > end - pos:
                        raise PickleRefused("truncated: a frame runs past the end of the body")
                elif op == 0x2E:  # STOP '.'
                    if len(stack) != 1 or marks:
                        raise PickleRefused("malformed: STOP with an unfinished stack")
                    if pos != end:
                        raise PickleRefused("trailing bytes after the pickle's STOP")
                    return stack[0]
                elif op == 0x80:  # PROTO
                    if data[pos] > 5:
                        raise PickleRefused(f"pickle protocol {data[pos]} is not supported")
                    pos += 1
                elif op == 0x8F:  # EMPTY_SET
                    stack.append(set())
                elif op == 0x90:  # ADDITEMS
                    items = stack
                    stack = marks.pop()
                    if type(stack[-1]) is not set:
                        raise PickleRefused("ADDITEMS needs a set")
                    stack[-1].update(_keys(items))
                elif op == 0x91:  # FROZENSET
                    items = stack
                    stack = marks.pop()
                    stack.append(frozenset(_keys(items)))
                elif op == 0x8A or op == 0x8B:  # LONG1, LONG4
                    width = 1 if op == 0x8A else 4
                    size = int.from_bytes(data[pos:pos + width], "little")
                    pos += width + size
                    if size > _MAX_INT_BYTES or pos > end:
                        raise PickleRefused(f"integers of more than {_MAX_INT_BYTES} bytes are not accepted")
                    stack.append(int.from_bytes(data[pos - size:pos], "little", signed=True))
                elif op == 0x63:  # GLOBAL 'c': module and name as text lines
                    module, pos = _line(data, pos, end)
                    name, pos = _line(data, pos, end)
                    stack.append(_global(module.decode("utf-8", "replace"), name.decode("utf-8", "replace")))
                elif op == 0x6C:  # LIST 'l'
                    items = stack
                    stack = marks.pop()
                    stack.append(items)
                elif op == 0x64:  # DICT 'd'
                    items = stack
                    stack = marks.pop()
                    made: dict[Any, Any] = {}
                    _set_items(made, items)
                    stack.append(made)
                elif op == 0x30:  # POP '0'
                    if stack:
                        stack.pop()
                    else:
                        stack = marks.pop()
                elif op == 0x31:  # POP_MARK '1'
                    stack = marks.pop()
                elif op == 0x32:  # DUP '2'
                    stack.append(stack[-1])
                elif op == 0x70:  # PUT 'p' (protocol 0: the index as a text line)
                    line, pos = _line(data, pos, end)
                    _put(memo, _line_int(line), stack[-1])
                elif op == 0x67:  # GET 'g'
                    line, pos = _line(data, pos, end)
                    index = _line_int(line)
                    if index >= len(memo):
                        raise PickleRefused("a memo reference to nothing memoised")
                    stack.append(memo[index])
                elif op == 0x49:  # INT 'I' (protocol 0; "01"/"00" are True/False)
                    line, pos = _line(data, pos, end)
                    stack.append(True if line == b"01" else False if line == b"00" else _line_int(line, True))
                elif op == 0x4C:  # LONG 'L' (protocol 0, Python 2 writes a trailing L)
                    line, pos = _line(data, pos, end)
                    stack.append(_line_int(line.removesuffix(b"L"), True))
                elif op == 0x46:  # FLOAT 'F'
                    line, pos = _line(data, pos, end)
                    try:
                        if len(line) > 100:  # repr(float) is at most 24: no digit strings to parse
                            raise ValueError
                        stack.append(float(line))
                    except ValueError:
                        raise PickleRefused("a FLOAT that is not a short number") from None
                elif op == 0x56:  # UNICODE 'V' (protocol 0)
                    newline = data.find(b"\n", pos)
                    if newline < 0:
                        raise PickleRefused("truncated: a text line without its end")
                    try:
                        stack.append(data[pos:newline].decode("raw-unicode-escape"))
                    except UnicodeDecodeError:
                        raise PickleRefused("malformed text in a UNICODE opcode") from None
                    pos = newline + 1
                elif op == 0x50 or op == 0x51:  # PERSID, BINPERSID
                    raise PickleRefused("persistent ids are not accepted")
                elif op == 0x97 or op == 0x98:  # NEXT_BUFFER, READONLY_BUFFER
                    raise PickleRefused("out-of-band buffers are not accepted; pickle in-band")
                elif op in _REFUSED:
                    raise PickleRefused(f"the {_REFUSED[op]} opcode is not accepted in a request")
                else:
                    raise PickleRefused(f"invalid pickle: unknown opcode 0x{op:02x} at byte {pos - 1}")


_DOUBLE = struct.Struct(">d")
_CHUNK_OPS = 4096
_CHUNK = range(_CHUNK_OPS)
_REFUSED = {
    0x81: "NEWOBJ", 0x92: "NEWOBJ_EX", 0x6F: "OBJ", 0x69: "INST", 0x82: "EXT1", 0x83: "EXT2",
    0x84: "EXT4", 0x53: "STRING (Python 2 str)", 0x54: "BINSTRING (Python 2 str)",
    0x55: "SHORT_BINSTRING (Python 2 str)",
}


def _text(data: bytes, start: int, stop: int, end: int) -> str:
    if stop > end:
        raise PickleRefused("truncated: text runs past the end of the body")
    try:
        return data[start:stop].decode("utf-8", "surrogatepass")  # as pickle decodes it
    except UnicodeDecodeError:
        raise PickleRefused("text that is not UTF-8") from None


def _line(data: bytes, pos: int, end: int) -> tuple[bytes, int]:
    newline = data.find(b"\n", pos, min(end, pos + _MAX_LINE))
    if newline < 0:
        raise PickleRefused("truncated or overlong text line")
    return data[pos:newline], newline + 1


def _line_int(line: bytes, signed: bool = False) -> int:
    if len(line) > 40 or not (_SIGNED if signed else _UNSIGNED).fullmatch(line):
        raise PickleRefused("a text integer that is not a short number")
    return int(line)


_SIGNED = re.compile(rb"-?[0-9]+")
_UNSIGNED = re.compile(rb"[0-9]+")


def _global(module: Any, name: Any) -> _Global:
    if type(module) is not str or type(name) is not str:
        raise PickleRefused("a global's module and name must be strings")
    found = GLOBALS.get((module, name))
    if found is None:
        raise PickleRefused(f"{module[:100]}.{name[:100]} is not allowed in a request")
    return found


def _put(memo: list[Any], index: int, value: Any) -> None:
    # pickle writes memo indices in order: a larger one is a request to zero-fill memory
    if index == len(memo):
        memo.append(value)
    elif index < len(memo):
        memo[index] = value
    else:
        raise PickleRefused("a memo index beyond what was memoised")


def _set_item(target: Any, key: Any, value: Any) -> None:
    if type(target) is not dict:
        raise PickleRefused("SETITEM needs a dict")
    if type(key) not in _KEY_TYPES or (type(key) is int and not -_HASH_MODULUS < key < _HASH_MODULUS):
        raise PickleRefused(_KEYS_ALLOWED.format("dict keys"))
    target[key] = value


def _set_items(target: Any, items: list[Any]) -> None:
    """SETITEMS and DICT: ``items`` are key, value, key, value ..."""
    if type(target) is not dict or len(items) % 2:
        raise PickleRefused("SETITEMS and DICT need a dict and key-value pairs")
    for index in range(0, len(items), 2):
        _set_item(target, items[index], items[index + 1])


def _keys(items: list[Any]) -> list[Any]:
    for item in items:
        kind = type(item)
        if kind not in _KEY_TYPES or (kind is int and not -_HASH_MODULUS < item < _HASH_MODULUS):
            raise PickleRefused(_KEYS_ALLOWED.format("set members"))
    return items


# str and bytes hash with a per-process secret; ints below 2**61 - 1 are their own hash. Floats,
# large ints and tuples hash to values a client can choose to collide: thousands of keys with
# one hash make each insertion walk them all (quadratic), or recurse in C (nested tuples).
_KEYS_ALLOWED = "{} must be strings, bytes, integers below 2**61 or booleans"


def _list(target: Any) -> list[Any]:
    if type(target) is not list:
        raise PickleRefused("APPEND needs a list")
    return target


def _check_text(array: np.ndarray[Any, Any]) -> None:
    """Unicode items must hold code points: numpy raises when it reads others (a 500 later)."""
    dtype = array.dtype
    if dtype.names:
        for name in dtype.names:
            _check_text(array[name])
    elif dtype.kind == "U" and array.size:
        codes = np.ascontiguousarray(array).view(dtype.byteorder.replace("=", "") + "u4")
        if int(codes.max()) > 0x10FFFF:
            raise PickleRefused("a unicode array holds values that are not code points")


def _describe(value: Any) -> str:
    return f"global {value.name}" if type(value) is _Global else type(value).__name__


def decode(data: bytes, limits: Limits) -> Any:
    """The value ``data`` pickles, read as data within ``limits``; ``PickleRefused`` (or its
    ``PickleTooLarge``) otherwise."""
    try:
        return _Finisher(limits).finish(_Decoder(data, limits).run())
    except (IndexError, struct.error):  # a stack, the memo or the body ran out under an opcode
        raise PickleRefused("malformed or truncated pickle") from None
    except UnicodeDecodeError:
        raise PickleRefused("text that is not UTF-8") from None
    except DtypeRefused as exc:
        raise PickleRefused(str(exc)) from None
    except PickleRefused:
        raise
    except (TypeError, ValueError, ArithmeticError) as exc:
        # a value of the wrong kind reached code that did not check for it: a hole in the
        # checks above, which the fuzzer looks for (STRICT); a client still gets a 400
        if STRICT:
            raise
        raise PickleRefused(f"malformed pickle ({type(exc).__name__})") from None


STRICT = False
"""Re-raise errors the checks should have caught (fuzz/pickle_decoder.py sets it)."""


class _Finisher:
    """The decoded graph made final: arrays and dtypes put in place of their nodes, and refused
    when it nests too deep, refers to itself, or holds more than the limit once every shared
    reference is counted again (each node is visited once: linear in the graph)."""

    def __init__(self, limits: Limits) -> None:
        self.limits = limits
        self.done: dict[int, tuple[Any, int, int]] = {}  # id -> (final value, weight, height)
        self.active: set[int] = set()

    def finish(self, root: Any) -> Any:
        return self.visit(root, 0)[0]

    def visit(self, value: Any, depth: int) -> tuple[Any, int, int]:
        kind = type(value)
        if kind is str or kind is bytes or kind is bytearray:
            return value, len(value), 0
        if kind in _SCALAR_TYPES:
            return value, 8, 0
        if kind is np.ndarray:
            return value, value.nbytes, 0
        if isinstance(value, np.generic):
            return value, value.itemsize, 0
        if kind is DtypeNode:
            return check_built(value), 8, 0
        if kind is _ArrayNode:
            if value.array is None:
                raise PickleRefused("an array without its state")
            return value.array, value.array.nbytes, 0
        if kind is not dict and kind is not list and kind is not tuple and kind is not set \
                and kind is not frozenset:
            raise PickleRefused(f"a {_describe(value)} is not data")  # a bare global, say
        if depth >= self.limits.max_depth:
            raise PickleRefused(f"nested deeper than {self.limits.max_depth} levels")
        key = id(value)
        known = self.done.get(key)
        if known is not None:
            if depth + known[2] > self.limits.max_depth:
                raise PickleRefused(f"nested deeper than {self.limits.max_depth} levels")
            return known
        if key in self.active:
            raise PickleRefused("a value that contains itself")
        if kind is set or kind is frozenset:  # members are plain keys, checked when added
            result = (value, 8 * len(value) + sum(self.visit(item, depth + 1)[1] for item in value), 1)
        else:
            self.active.add(key)
            result = self.container(value, kind, depth)
            self.active.discard(key)
        if result[1] > self.limits.max_bytes:
            raise PickleTooLarge(
                f"the decoded values would hold more than {self.limits.max_bytes} bytes "
                "(shared references count each time they are used)")
        self.done[key] = result
        return result

    def container(self, value: Any, kind: type, depth: int) -> tuple[Any, int, int]:
        weight = 8 * len(value)
        height = 0
        if kind is dict:
            for item_key, item in value.items():
                weight += len(item_key) if type(item_key) is str or type(item_key) is bytes else 8
                item_kind = type(item)
                if item_kind is np.ndarray:  # the common items, inline
                    weight += item.nbytes
                elif item_kind in _SMALL:
                    weight += 8
                else:
                    done, item_weight, item_height = self.visit(item, depth + 1)
                    if done is not item:
                        value[item_key] = done
                    weight += item_weight
                    height = max(height, item_height)
        else:  # list or tuple
            final: list[Any] | None = None  # made when the first item changes
            for index, item in enumerate(value):
                item_kind = type(item)
                if item_kind is np.ndarray:
                    weight += item.nbytes
                    done = item
                elif item_kind in _SMALL:
                    weight += 8
                    done = item
                else:
                    done, item_weight, item_height = self.visit(item, depth + 1)
                    weight += item_weight
                    height = max(height, item_height)
                if final is not None:
                    final.append(done)
                elif done is not item:
                    final = [*value[:index], done]
            if final is not None:
                if kind is list:
                    value[:] = final
                else:
                    value = tuple(final)
        return value, weight, height + 1

"""The common request and reply, a dict of plain numpy arrays, pickled without the pickle machinery.

``pickle.dumps({"x": array})`` writes one layout, byte for byte, for a given protocol and dtype:
numpy's own reduce (``_frombuffer`` at protocol 5, ``_reconstruct`` at 4) around the raw data.
``read_arrays`` recognises exactly that layout with a few regular expressions and builds the arrays
straight from the body's bytes; ``write_arrays`` writes it. For a small request that is about half
the restricted unpickler's cost (2.2 us against 4.8) and less than half of ``pickle.dumps``'s
(1.6 us against 3.7); see bench/bench_http.py for what it does to a server.

Nothing here runs what a client chose: the layout is matched, never interpreted, and the dtypes
come from a fixed table. Anything else (other opcodes, memo references, frames split around
large data, another dtype, an inconsistent length) makes ``read_arrays`` return None and the
caller falls back to the restricted unpickler, which gives the same result for every body this
accepts (``tests/core/test_fast_pickle.py`` checks that, body by body and under mutation).

A client sends one layout again and again (the same keys, dtypes and shapes; new values), and a
server answers one: so both directions remember the bytes around the arrays' data (bounded).
A body whose every byte outside the data equals a layout read before, at the same length, is
read without the regular expressions: they never look at the data, so they would read it the
same way. On the identity model's small request that halves decoding and encoding in
instructions (bench/bench_inprocess.py).
"""

from __future__ import annotations

import re
import threading
from typing import Any, Literal

import numpy as np

# dtypes whose pickled form is a fixed fragment: booleans, integers, floats, complex numbers
_CODES = ("b1", "i1", "u1", "i2", "u2", "i4", "u4", "i8", "u8", "f2", "f4", "f8", "c8", "c16")
_DTYPE_GLOBAL = b"\x8c\x05numpy\x94\x8c\x05dtype\x94\x93\x94"

# pickle opcodes, with MEMOIZE (\x94) where pickle.dumps writes it
_ARGS = (rb"\x8c[\x02\x03][a-z0-9]{2,3}\x94\x89\x88\x87\x94R\x94"
         rb"\(K\x03\x8c\x01[<>|]\x94NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00t\x94b")
_INT = rb"(?:K.|M..|J....)"
_SHAPE = (rb"(\)|" + _INT + rb"\x85\x94|" + _INT + rb"{2}\x86\x94|" + _INT + rb"{3}\x87\x94|\("
          + _INT + rb"{4,64}t\x94)")
# protocol 5: _frombuffer(bytearray(data), dtype, shape, order)
_FROMBUFFER = re.compile(
    rb"\x8c(?:\x13numpy\._core|\x12numpy\.core)\.numeric\x94\x8c\x0b_frombuffer\x94\x93\x94\(\x96(.{8})",
    re.S)
_FROMBUFFER_REST = re.compile(
    rb"\x94" + re.escape(_DTYPE_GLOBAL) + b"(" + _ARGS + b")" + _SHAPE + rb"\x8c\x01([CF])\x94t\x94R\x94",
    re.S)
# protocol 4: _reconstruct(ndarray, (0,), b"b"), then BUILD (1, shape, dtype, is_fortran, data);
# the dtype's module name is a memo reference (h\x05) to the "numpy" written just before
_RECONSTRUCT = re.compile(
    rb"\x8c(?:\x16numpy\._core|\x15numpy\.core)\.multiarray\x94\x8c\x0c_reconstruct\x94\x93\x94"
    rb"\x8c\x05numpy\x94\x8c\x07ndarray\x94\x93\x94K\x00\x85\x94C\x01b\x94\x87\x94R\x94\(K\x01"
    + _SHAPE + rb"h\x05\x8c\x05dtype\x94\x93\x94(" + _ARGS + rb")([\x88\x89])(?:C(.)|B(.{4})|\x8e(.{8}))",
    re.S)
_RECONSTRUCT_REST = b"\x94t\x94b"

_FRAGMENTS: dict[bytes, np.dtype[Any]] = {}
_BY_DTYPE: dict[np.dtype[Any], bytes] = {}
_FROMBUFFER_NAME = b""
_TABLES_LOCK = threading.Lock()


def _tables() -> dict[bytes, np.dtype[Any]]:
    """dtype fragment <-> dtype, from numpy's own pickles of each dtype (built on first use, once,
    and published whole: a thread never sees half a table)."""
    global _FROMBUFFER_NAME
    with _TABLES_LOCK:
        if _FRAGMENTS:
            return _FRAGMENTS
        import pickle

        by_dtype: dict[np.dtype[Any], bytes] = {}
        for code in _CODES:
            for order in "<>|":
                dtype = np.dtype(order + code)
                if (order == "|") != (dtype.byteorder == "|"):
                    continue
                pickled = pickle.dumps(dtype, protocol=5)
                start = pickled.find(_DTYPE_GLOBAL)
                if start < 0 or not pickled.endswith(b"."):
                    continue  # a numpy that pickles dtypes otherwise: those go the slow way
                by_dtype[dtype] = pickled[start + len(_DTYPE_GLOBAL):-1]
        frombuffer = np.ndarray.__reduce_ex__(np.zeros(1), 5)[0]  # numpy's own, by its own name
        module = frombuffer.__module__.encode()
        _FROMBUFFER_NAME = (b"\x8c" + bytes((len(module),)) + module + b"\x94\x8c\x0b_frombuffer"
                            b"\x94\x93\x94(\x96")
        _BY_DTYPE.update(by_dtype)
        _FRAGMENTS.update({fragment: dtype for dtype, fragment in by_dtype.items()})
        return _FRAGMENTS


def _int(raw: bytes, at: int) -> tuple[int, int]:
    """The integer opcode at ``raw[at]`` (K, M or J) and where the next one starts."""
    op = raw[at]
    if op == 0x4B:
        return raw[at + 1], at + 2
    if op == 0x4D:
        return raw[at + 1] | raw[at + 2] << 8, at + 3
    return int.from_bytes(raw[at + 1:at + 5], "little", signed=True), at + 5


_SHAPES: dict[bytes, tuple[tuple[int, ...], int]] = {}  # a client sends the same shapes again


def _shape(raw: bytes) -> tuple[tuple[int, ...], int] | None:
    """A shape as matched by ``_SHAPE`` and its number of items; None for a negative dimension."""
    known = _SHAPES.get(raw)
    if known is not None:
        return known
    at, end = (1, len(raw) - 2) if raw[0] == 0x28 else (0, len(raw) - 2)
    dims = []
    size = 1
    while at < end:
        dim, at = _int(raw, at)
        if dim < 0:
            return None
        dims.append(dim)
        size *= dim
    if len(_SHAPES) >= 1024:  # bounded, whatever clients send
        _SHAPES.clear()
    known = _SHAPES[raw] = (tuple(dims), size)
    return known


def read_arrays(body: bytes) -> dict[str, np.ndarray[Any, Any]] | None:
    """The dict of arrays a canonical pickle of one holds, or None when ``body`` is anything else."""
    try:
        known = _LAYOUTS.get(len(body))
        if known is not None:
            literals, specs = known
            for at, literal in literals:
                if not body.startswith(literal, at):
                    break
            else:  # every byte but the arrays' data as in a body read before: the same layout
                arrays = {}
                for key, dtype, shape, order, start, end, frombuffer in specs:
                    if frombuffer:  # _build's, inlined: this is nearly every request
                        arrays[key] = np.ndarray(shape, dtype, bytearray(memoryview(body)[start:end]), 0,
                                                 None, order)
                    else:
                        arrays[key] = _build(body, dtype, shape, order, start, end, frombuffer)
                return arrays
        return _read_arrays(body)
    except ValueError:  # numpy refusing a shape (an empty array too big to index): the unpickler says so
        return None


_Spec = tuple[np.dtype[Any], tuple[int, ...], Literal["C", "F"], int, int, bool]
"""An array's dtype, shape, order, where its data starts and ends in the body, and whether it is
a protocol-5 ``_frombuffer`` (else protocol 4's ``_reconstruct``)."""
_LAYOUTS: dict[int, tuple[tuple[tuple[int, bytes], ...], tuple[tuple[Any, ...], ...]]] = {}
"""Body length -> the layout last read at that length: every byte outside the arrays' data
(``(offset, bytes)``) and each array's key and spec. A client sends the same layout again and
again (same keys, dtypes and shapes, other values); a body whose every byte outside the data is
the same, at the same length, is read the same way by the regular expressions (they never look
at the data), so matching those bytes is enough. Bounded in entries and in bytes per entry."""
_MAX_LAYOUTS = 256
_MAX_LITERAL_BYTES = 4096


def _build(body: bytes, dtype: np.dtype[Any], shape: tuple[int, ...], order: Literal["C", "F"], start: int,
           end: int, frombuffer: bool) -> np.ndarray[Any, Any]:
    if frombuffer:
        # pickle copies the data into a bytearray and numpy views it: writable, like this
        return np.ndarray(shape, dtype, bytearray(memoryview(body)[start:end]), 0, None, order)
    # numpy's __setstate__ copies bytes into an array of its own: so does this
    return np.ndarray(shape, dtype, body, start, None, order).copy(order="K")


def _remember(body: bytes, specs: list[tuple[Any, ...]]) -> None:
    literals = []
    at = 0
    for _key, _dtype, _shape, _order, start, end, _frombuffer in specs:
        literals.append((at, body[at:start]))
        at = end
    literals.append((at, body[at:]))
    if sum(len(literal) for _, literal in literals) > _MAX_LITERAL_BYTES:
        return  # many keys: not a layout worth holding
    if len(_LAYOUTS) >= _MAX_LAYOUTS:  # bounded, whatever clients send
        _LAYOUTS.clear()
    _LAYOUTS[len(body)] = (tuple(literals), tuple(specs))


def _read_arrays(body: bytes) -> dict[str, np.ndarray[Any, Any]] | None:
    fragments = _FRAGMENTS or _tables()
    protocol = body[:2]
    if protocol != b"\x80\x05" and protocol != b"\x80\x04":
        return None
    at = 2
    if body[2:3] == b"\x95":  # FRAME: one, holding everything after it
        if int.from_bytes(body[3:11], "little") != len(body) - 11:
            return None
        at = 11
    if body[at:at + 2] != b"}\x94":
        return None
    at += 2
    several = body[at:at + 1] == b"("  # MARK ... SETITEMS, else one SETITEM
    at += several
    specs: list[tuple[Any, ...]] = []  # (key, *_Spec) per array
    keys: set[str] = set()
    while True:
        op = body[at:at + 1]
        if op == b"\x8c" and at + 1 < len(body):  # SHORT_BINUNICODE
            key_start = at + 2
            at = key_start + body[at + 1]
        elif op == b"X":  # BINUNICODE
            key_start = at + 5
            at = key_start + int.from_bytes(body[at + 1:at + 5], "little")
        else:
            break
        if body[at:at + 1] != b"\x94":
            return None
        try:
            key = body[key_start:at].decode("utf-8", "surrogatepass")  # as pickle decodes it
        except UnicodeDecodeError:
            return None
        if key in keys:
            return None
        spec: _Spec | None
        if protocol == b"\x80\x05":
            spec, at = _read_frombuffer(body, at + 1, fragments)
        elif not specs and not several:
            spec, at = _read_reconstruct(body, at + 1, fragments)
        else:
            return None
        if spec is None:
            return None
        keys.add(key)
        specs.append((key, *spec))
    if body[at:] != (b"u." if several else b"s.") or not specs or (not several and len(specs) != 1):
        return None
    arrays = {key: _build(body, *spec) for key, *spec in specs}  # a ValueError: nothing remembered
    _remember(body, specs)
    return arrays


def _read_frombuffer(body: bytes, at: int, fragments: dict[bytes, np.dtype[Any]]
                     ) -> tuple[_Spec | None, int]:
    head = _FROMBUFFER.match(body, at)
    if head is None:
        return None, at
    data_start = head.end()
    data_end = data_start + int.from_bytes(head.group(1), "little")
    rest = _FROMBUFFER_REST.match(body, data_end) if data_end < len(body) else None
    if rest is None:
        return None, at
    dtype = fragments.get(rest.group(1))
    shape = _shape(rest.group(2))
    if dtype is None or shape is None or shape[1] * dtype.itemsize != data_end - data_start:
        return None, at
    order: Literal["C", "F"] = "F" if rest.group(3) == b"F" else "C"
    return (dtype, shape[0], order, data_start, data_end, True), rest.end()


def _read_reconstruct(body: bytes, at: int, fragments: dict[bytes, np.dtype[Any]]
                      ) -> tuple[_Spec | None, int]:
    head = _RECONSTRUCT.match(body, at)
    if head is None:
        return None, at
    short, medium, long = head.group(4, 5, 6)
    length = short[0] if short is not None else int.from_bytes(medium or long, "little")
    data_start = head.end()
    data_end = data_start + length
    if body[data_end:data_end + len(_RECONSTRUCT_REST)] != _RECONSTRUCT_REST:
        return None, at
    dtype = fragments.get(head.group(2))
    shape = _shape(head.group(1))
    if dtype is None or shape is None or shape[1] * dtype.itemsize != length:
        return None, at
    if not dtype.isnative:  # numpy's setstate makes the array native: leave that to it
        return None, at
    order: Literal["C", "F"] = "F" if head.group(3) == b"\x88" else "C"
    return (dtype, shape[0], order, data_start, data_end, False), data_end + len(_RECONSTRUCT_REST)


def _write_int(value: int) -> bytes:
    if value < 0x100:
        return b"K" + bytes((value,))
    if value < 0x10000:
        return b"M" + value.to_bytes(2, "little")
    return b"J" + value.to_bytes(4, "little")


_TUPLES = {1: b"\x85\x94", 2: b"\x86\x94", 3: b"\x87\x94"}
_ORDER = {True: b"\x8c\x01C\x94t\x94R\x94", False: b"\x8c\x01F\x94t\x94R\x94"}


def write_arrays(payload: Any) -> bytes | None:
    """``payload`` pickled (protocol 5, as ``pickle.dumps`` lays out each array), or None unless it
    is a dict of str -> contiguous numpy arrays of a plain dtype. No frame: pickle reads it all
    the same, and large data is copied once, into the result."""
    if type(payload) is not dict or not payload:
        return None
    several = len(payload) > 1
    parts: list[Any] = [b"\x80\x05}\x94(" if several else b"\x80\x05}\x94"]
    for key, array in payload.items():
        if type(key) is not str or type(array) is not np.ndarray:
            return None
        flags = array.flags
        c_order = flags.c_contiguous
        if not c_order and not flags.f_contiguous:
            return None
        written = _WRITTEN.get((key, array.dtype, array.shape, c_order))
        if written is None:
            written = _written(key, array, c_order)
            if written is None:
                return None
        # the array's memory as it lies: C order, or an F-ordered array's transpose (C order)
        parts += [written[0], array if c_order else array.T, written[1]]
    parts.append(b"u." if several else b"s.")
    return b"".join(parts)


_WRITTEN: dict[tuple[str, np.dtype[Any], tuple[int, ...], bool], tuple[bytes, bytes]] = {}
"""(key, dtype, shape, C order) -> what is written before and after the array's data: a server
answers the same keys, dtypes and shapes again and again. Bounded."""
_MAX_WRITTEN = 256


def _written(key: str, array: np.ndarray[Any, Any], c_order: bool) -> tuple[bytes, bytes] | None:
    """The bytes around one array's data (None: not a plain dtype, or too large a dimension)."""
    if not _BY_DTYPE:
        _tables()
    fragment = _BY_DTYPE.get(array.dtype)
    shape = array.shape
    if fragment is None or (shape and max(shape) >= 1 << 31):
        return None
    if not shape:
        shape_code = b")"
    elif len(shape) <= 3:
        shape_code = b"".join([_write_int(dim) for dim in shape]) + _TUPLES[len(shape)]
    else:
        shape_code = b"(" + b"".join([_write_int(dim) for dim in shape]) + b"t\x94"
    name = key.encode("utf-8", "surrogatepass")
    head = b"".join([
        b"\x8c" + bytes((len(name),)) if len(name) < 0x100 else b"X" + len(name).to_bytes(4, "little"),
        name, b"\x94", _FROMBUFFER_NAME, array.nbytes.to_bytes(8, "little"),
    ])
    written = head, b"\x94" + _DTYPE_GLOBAL + fragment + shape_code + _ORDER[c_order]
    if len(name) <= 256:  # long keys are not worth holding
        if len(_WRITTEN) >= _MAX_WRITTEN:  # bounded, whatever models answer
            _WRITTEN.clear()
        _WRITTEN[(key, array.dtype, shape, c_order)] = written
    return written

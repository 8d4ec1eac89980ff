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

This module is the opcode loop and the public entry (``decode``, ``STRICT``, and the names of
the parts below, re-exported); the rest sits beside it in core/wire/: ``pickle_limits.py`` (the
refusals and ``Limits``), ``pickle_values.py`` (the table of globals, REDUCE and BUILD, dict
keys), ``pickle_dtypes.py`` (dtypes) and ``pickle_finish.py`` (the final pass over the graph).
"""

from __future__ import annotations

import re
import struct
import time
from typing import Any

from core.wire.pickle_dtypes import DtypeRefused
from core.wire.pickle_finish import Finisher
from core.wire.pickle_limits import MAX_NDIM, Limits, PickleRefused, PickleTooLarge
from core.wire.pickle_values import (
    GLOBALS,
    ArrayNode,
    ValueBuilder,
    appendable,
    checked_keys,
    find_global,
    set_item,
    set_items,
)

__all__ = ["GLOBALS", "MAX_NDIM", "STRICT", "Limits", "PickleRefused", "PickleTooLarge", "decode"]

_MAX_INT_BYTES = 1024  # LONG1/LONG4: no legitimate number needs more; hashing one is linear
_MAX_LINE = 1 << 16  # protocol 0 text lines other than strings


class _Decoder(ValueBuilder):
    """The opcode machine: REDUCE and BUILD are its inherited methods (core/wire/pickle_values.py)."""

    def run(self, data: bytes) -> Any:  # one flat dispatch: the fast way to interpret opcodes in Python
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
                    if type(target) is ArrayNode:  # the array itself from here on; the memo
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
                    stack.append(find_global(module, name))
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
                    set_item(stack[-1], key, value)
                elif op == 0x75:  # SETITEMS 'u'
                    items = stack
                    stack = marks.pop()
                    set_items(stack[-1], items)
                elif op == 0x61:  # APPEND 'a'
                    value = stack.pop()
                    appendable(stack[-1]).append(value)
                elif op == 0x65:  # APPENDS 'e'
                    items = stack
                    stack = marks.pop()
                    appendable(stack[-1]).extend(items)
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
                    stack[-1].update(checked_keys(items))
                elif op == 0x91:  # FROZENSET
                    items = stack
                    stack = marks.pop()
                    stack.append(frozenset(checked_keys(items)))
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
                    stack.append(find_global(module.decode("utf-8", "replace"),
                                             name.decode("utf-8", "replace")))
                elif op == 0x6C:  # LIST 'l'
                    items = stack
                    stack = marks.pop()
                    stack.append(items)
                elif op == 0x64:  # DICT 'd'
                    items = stack
                    stack = marks.pop()
                    made: dict[Any, Any] = {}
                    set_items(made, items)
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


def _put(memo: list[Any], index: int, value: Any) -> None:
    # pickle writes memo indices in order: a larger one is a request to zero-fill memory
    if index == len(memo):
        memo.append(value)
    elif index < len(memo):
        memo[index] = value
    else:
        raise PickleRefused("a memo index beyond what was memoised")


def decode(data: bytes, limits: Limits) -> Any:
    """The value ``data`` pickles, read as data within ``limits``; ``PickleRefused`` (or its
    ``PickleTooLarge``) otherwise."""
    try:
        return Finisher(limits).finish(_Decoder(limits).run(data))
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



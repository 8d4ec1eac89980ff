"""A corpus of hostile pickle bodies, shared by the unit tests of the restricted unpickler and the
end-to-end tests against a real server.

Every payload that can run code really references the dangerous callable and, if it were loaded
by plain ``pickle.loads``, would create ``marker`` (``test_payloads_are_live`` proves it). The
rest are malformed or resource-hungry bodies that must be refused cleanly.
"""

from __future__ import annotations

import os
import pickle
import pickletools
import random
import struct
import subprocess
from pathlib import Path
from typing import Any

import numpy as np

PROTO2 = b"\x80\x02"


# --- opcode helpers (protocol 2 unless said otherwise) -----------------------------------------


def text(value: str) -> bytes:
    """BINUNICODE: a str with a 4-byte length."""
    data = value.encode()
    return b"X" + struct.pack("<I", len(data)) + data


def global_(module: str, name: str) -> bytes:
    """GLOBAL: ``module.name`` as a text line, the way protocols 0-3 reference callables."""
    return b"c" + f"{module}\n{name}\n".encode()


def stack_global(module: str, name: str) -> bytes:
    """STACK_GLOBAL (protocol 4+): module and name as strings on the stack; dotted names allowed."""
    return text(module) + text(name) + b"\x93"


def call(func: bytes, *args: bytes) -> bytes:
    """REDUCE: ``func(*args)``, with ``func`` and each argument given as opcodes."""
    return func + b"(" + b"".join(args) + b"tR"


def as_dict(value: bytes, proto: bytes = PROTO2) -> bytes:
    """A whole pickle of ``{"x": value}``, the shape a real request has."""
    return proto + b"}" + text("x") + value + b"s."


class Reduce:
    """An object that pickles as ``func(*args)`` (then ``__setstate__(state)`` if given)."""

    def __init__(self, func: Any, args: tuple[Any, ...], state: Any = None) -> None:
        self.func, self.args, self.state = func, args, state

    def __reduce__(self) -> tuple[Any, ...]:
        if self.state is None:
            return (self.func, self.args)
        return (self.func, self.args, self.state)


def numpy1(data: bytes) -> bytes:
    """``data`` as a numpy 1.x client writes it: ``numpy._core`` -> ``numpy.core``.

    Rewrites the module names in GLOBAL and string opcodes with correct lengths and drops FRAME
    opcodes (their lengths would be stale; framing is optional for the reader).
    """
    ops = list(pickletools.genops(data))
    out = bytearray()
    for index, (op, arg, pos) in enumerate(ops):
        end = ops[index + 1][2] if index + 1 < len(ops) else len(data)
        raw = data[pos:end]
        if op.name == "FRAME":
            continue
        if isinstance(arg, str) and arg.startswith("numpy._core"):
            renamed = arg.replace("numpy._core", "numpy.core", 1)
            if op.name == "GLOBAL":
                module, name = renamed.split(" ", 1)
                raw = global_(module, name)
            elif op.name == "SHORT_BINUNICODE":
                encoded = renamed.encode()
                raw = b"\x8c" + bytes([len(encoded)]) + encoded
            elif op.name == "BINUNICODE":
                raw = text(renamed)
            else:  # pragma: no cover - numpy does not write other string opcodes here
                raise AssertionError(f"cannot rename in {op.name}")
        out += raw
    return bytes(out)


def memo_index_after(data: bytes, module_and_name: str) -> int:
    """The memo slot of the object built by the first REDUCE on the global ``module_and_name``."""
    ops = list(pickletools.genops(data))
    seen_global = False
    for index, (op, arg, _) in enumerate(ops):
        if op.name == "GLOBAL" and arg == module_and_name:
            seen_global = True
        if seen_global and op.name == "REDUCE":
            following = ops[index + 1]
            assert following[0].name in ("BINPUT", "LONG_BINPUT"), following
            return int(following[1])
    raise AssertionError(f"no REDUCE on {module_and_name}")


# --- the corpus -------------------------------------------------------------------------------


def code_payloads(marker: Path, workdir: Path) -> dict[str, bytes]:
    """Pickles that run code creating ``marker`` when loaded by an unrestricted unpickler."""
    touch = f"touch {marker}"
    create = f"open({str(marker)!r}, 'w').close()"
    # numpy.load(path, None, True) unpickles a file that is not an .npy: a second-stage payload
    gadget_file = workdir / "gadget.npy"
    gadget_file.write_bytes(pickle.dumps(Reduce(os.system, (touch,)), protocol=2))
    import_os = call(global_("builtins", "__import__"), text("os"))
    return {
        "os.system": as_dict(call(global_("os", "system"), text(touch))),
        "posix.system": pickle.dumps({"x": Reduce(os.system, (touch,))}, protocol=2),
        "builtins.eval": as_dict(call(global_("builtins", "eval"), text(create))),
        "__builtin__.eval (protocol 2 name)": pickle.dumps({"x": Reduce(eval, (create,))}, protocol=2),
        "builtins.exec": as_dict(call(global_("builtins", "exec"), text(create))),
        "builtins.__import__ + getattr chain": as_dict(
            call(call(global_("builtins", "getattr"), import_os, text("system")), text(touch))
        ),
        "subprocess.Popen": pickle.dumps({"x": Reduce(subprocess.Popen, (["touch", str(marker)],))},
                                         protocol=4),
        "numpy.load gadget": as_dict(
            call(global_("numpy", "load"), text(str(gadget_file)), b"N", b"\x88")
        ),
        "numpy.testing runstring": as_dict(
            call(global_("numpy.testing._private.utils", "runstring"), text(create), b"}")
        ),
        "numpy.f2py os.system (dotted name)": as_dict(
            call(stack_global("numpy.f2py", "os.system"), text(touch)), proto=b"\x80\x04"
        ),
        "numpy.f2py subprocess (dotted name)": as_dict(
            call(stack_global("numpy.f2py", "subprocess.getoutput"), text(touch)), proto=b"\x80\x04"
        ),
        "object array holding os.system": pickle.dumps(
            {"x": np.array([Reduce(os.system, (touch,)), 1], dtype=object)}, protocol=2
        ),
        "object array holding os.system, protocol 5": pickle.dumps(
            {"x": np.array([Reduce(os.system, (touch,)), 1], dtype=object)}, protocol=5
        ),
    }


def _deep(open_op: bytes, close_op: bytes, depth: int) -> bytes:
    # open_op pushes a container, close_op folds the top one into the one below
    return PROTO2 + open_op * depth + close_op * (depth - 1) + b"."


def data_payloads() -> dict[str, bytes]:
    """Bodies that run no code but must still be refused: forbidden data, malformed, too big."""
    real = pickle.dumps({"x": np.arange(100.0), "y": "text"}, protocol=5)
    rng = random.Random(20240601)
    huge = struct.pack("<Q", 2**31)
    bodies: dict[str, bytes] = {
        "object-dtype array (protocol 2)": pickle.dumps({"x": np.array([1, "a", None], dtype=object)},
                                                       protocol=2),
        "object-dtype array (protocol 5)": pickle.dumps({"x": np.array([1, "a", None], dtype=object)},
                                                       protocol=5),
        "object-dtype dtype": pickle.dumps({"x": np.dtype(object)}, protocol=2),
        "structured dtype with an object field": pickle.dumps(
            {"x": np.zeros(2, dtype=[("a", "f8"), ("b", "O")])}, protocol=2
        ),
        "object field set by __setstate__": pickle.dumps({"x": Reduce(
            np.dtype, ("V16", False, True),
            (3, "|", None, ("a", "b"), {"a": (np.dtype("f8"), 0), "b": (np.dtype("O"), 8)}, 16, 1, 27),
        )}, protocol=2),
        "persistent id": as_dict(text("anything") + b"Q"),
        "persistent id (protocol 0)": b"(dp0\nVx\np1\nPanything\ns.",
        "truncated": real[: len(real) // 2],
        "truncated by one byte": real[:-1],
        "empty": b"",
        "claimed 2 GB BINBYTES8": b"\x80\x05\x8e" + huge + b"abc",
        "claimed 2 GB BINUNICODE8": b"\x80\x05\x8d" + huge + b"abc",
        "claimed 2 GB BYTEARRAY8": b"\x80\x05\x96" + huge + b"abc",
        "claimed 4 GB BINBYTES": PROTO2 + b"B" + struct.pack("<I", 2**32 - 1) + b"abc",
        "claimed huge FRAME": b"\x80\x05\x95" + struct.pack("<Q", 2**62) + b"N.",
        "deeply nested lists": _deep(b"]", b"a", 100_000),
        "deeply nested dicts": PROTO2 + (b"}" + text("k")) * 100_000 + b"}" + b"s" * 100_000 + b".",
        "deeply nested tuples": PROTO2 + b"N" + b"\x85" * 100_000 + b".",
        "bytes(10**10)": as_dict(call(global_("builtins", "bytes"), b"\x8a\x05\x00\xe4\x0bT\x02")),
        "bytearray(10**10)": as_dict(call(global_("builtins", "bytearray"), b"\x8a\x05\x00\xe4\x0bT\x02")),
        "_codecs.encode with a non-text codec": as_dict(
            call(global_("_codecs", "encode"), text("eJwrSS0uAQAEXQHB"), text("base64"))
        ),
        "numpy.ndarray called directly (uninitialised memory)": as_dict(
            call(global_("numpy", "ndarray"), b"J\x00\x00\x10\x00\x85", text("u1"))
        ),
        "_reconstruct with a huge shape": as_dict(
            call(global_("numpy._core.multiarray", "_reconstruct"), global_("numpy", "ndarray"),
                 b"J\x00\x00\x00\x40\x85", text("b"))
        ),
        "StringDType (pointers in the buffer)": pickle.dumps(
            {"x": Reduce(np.dtypes.StringDType, ())}, protocol=4
        ),
        "dtype with forged object flags": pickle.dumps(
            {"x": Reduce(np.dtype, ("V8", False, True), (3, "|", None, None, None, 8, 1, 63))}, protocol=2
        ),
        "field outside the item (out-of-bounds reads)": _array_with_dtype_state(
            (3, "|", None, ("a",), {"a": (np.dtype("<f8"), 100_000)}, 8, 1, 16)
        ),
        "field overlapping the end of the item": _array_with_dtype_state(
            (3, "|", None, ("a",), {"a": (np.dtype("<f8"), 4)}, 8, 1, 16)
        ),
        "subarray bigger than its item": _array_with_dtype_state(
            (3, "|", (np.dtype("<f8"), (1000,)), None, None, 8, 1, 16)
        ),
        "array whose dtype has forged refcount flags": _array_with_dtype_state(
            (3, "|", None, None, None, 8, 1, 1)
        ),
        "datetime dtype with a version-3 state (segfaults numpy's own __setstate__)": pickle.dumps(
            {"x": Reduce(np.dtype, ("M8[s]", False, True), (3, "<", None, None, None, -1, -1, 0))}, protocol=2
        ),
        "timedelta dtype with forged flags": pickle.dumps(
            {"x": Reduce(np.dtype, ("m8", False, True), (3, ">", None, None, None, 99, 99, 63))}, protocol=4
        ),
        "field of StringDType": _array_with_dtype_state(
            (3, "|", None, ("a",), {"a": (Reduce(np.dtypes.StringDType, ()), 0)}, 16, 8, 0), size=16
        ),
    }
    for seed in range(5):
        bodies[f"random bytes #{seed}"] = rng.randbytes(rng.randrange(1, 4096))
        bodies[f"random bytes after a pickle header #{seed}"] = b"\x80\x05" + rng.randbytes(512)
    return bodies


def _array_with_dtype_state(state: tuple[Any, ...], size: int = 8) -> bytes:
    """A protocol 2 array of two items whose (void) dtype gets ``state`` by __setstate__."""
    from numpy._core.multiarray import _reconstruct

    dtype = Reduce(np.dtype, (f"V{size}", False, True), state)
    array = Reduce(_reconstruct, (np.ndarray, (0,), b"b"), (1, (2,), dtype, False, b"A" * (2 * size)))
    return pickle.dumps({"x": array}, protocol=2)


def corpus(marker: Path, workdir: Path) -> dict[str, bytes]:
    return {**code_payloads(marker, workdir), **data_payloads()}

"""Hostile request bodies of every class in the hardening issue (#13), for end-to-end tests.

Each generator is a small function returning the bytes a client sends; its docstring names the
class of attack and the mechanism it aims at. ``attacks(max_body)`` puts them together with the
route, headers and the answer a hardened server must give (``Attack``); the end-to-end test
(tests/cli/test_hostile_server.py) sends them to a real server. Unlike tests/hostile_pickles.py,
nothing here runs code: these bodies are data, and the harm is in what a naive reader does with
it (hash it, walk it, allocate for it, or let numpy trust it).

The numbers in the docstrings say what each body did to ``studio-plug serve`` on main before the
fixes (commit 2ba6e8f; numpy 2.4, CPython 3.11, a 2-core VM, the server under a 6 GB RLIMIT_AS).
"""

from __future__ import annotations

import functools
import io
import json
import struct
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from tests.hostile_pickles import PROTO2, Reduce, _array_with_dtype_state, as_dict, call, global_, text

# --- opcode helpers -----------------------------------------------------------------------------


def put(index: int) -> bytes:
    """BINPUT / LONG_BINPUT: store the top of the stack in memo slot ``index``."""
    return b"q" + bytes((index,)) if index < 256 else b"r" + struct.pack("<I", index)


def get(index: int) -> bytes:
    """BINGET / LONG_BINGET: push memo slot ``index`` (the same object again, not a copy)."""
    return b"h" + bytes((index,)) if index < 256 else b"j" + struct.pack("<I", index)


POP = b"0"
TUPLE1, TUPLE2 = b"\x85", b"\x86"
NEWTRUE, NEWFALSE = b"\x88", b"\x89"


# --- crash (SIGSEGV / SIGFPE) -------------------------------------------------------------------


def deep_tuple_key(depth: int = 1_000_000) -> bytes:
    """Crash (SIGSEGV): ``{((((None,),),)...): None}`` with the key nested ``depth`` deep (~1 MB).

    TUPLE1 nests without recursion, but SETITEM hashes the key, and ``tuplehash`` recurses in C
    once per level: the C stack overflows inside the unpickler before any depth check can run."""
    return PROTO2 + b"}" + b"N" + TUPLE1 * depth + b"N" + b"s."


F8 = np.dtype("<f8")


def dtype_names_without_field() -> bytes:
    """Crash later (SIGSEGV): a structured dtype whose pickled state lists ``names`` ("a", "b")
    while ``fields`` has only "a". ``dtype.__setstate__`` takes it as told, every field that
    exists is in bounds, so a field-by-field check passes; ``.copy()``, ``.tolist()`` and the
    JSON encoder then look up "b", get NULL and dereference it. Main: SIGSEGV with a JSON reply
    or in a model that copies it; a 500 (SystemError) with a pickled reply."""
    return _array_with_dtype_state((3, "|", None, ("a", "b"), {"a": (F8, 0)}, 8, 1, 16))


def dtype_alignment_zero() -> bytes:
    """Crash later (SIGFPE): a structured dtype whose pickled state has ``alignment`` 0. Decoded,
    echoed and encoded fine; ``np.concatenate`` (the batching path, when two such requests are
    batched together) and ``.copy()`` divide by the alignment. Main: SIGFPE when batched or
    copied; a 200 with a JSON reply."""
    return _array_with_dtype_state((3, "|", None, ("a",), {"a": (F8, 0)}, 8, 0, 16))


# --- hang (exponential CPU) ---------------------------------------------------------------------


def memo_list_dag(levels: int) -> bytes:
    """Hang: ``{"x": L[levels]}`` with ``L[0] = []``, ``L[i+1] = [L[i], L[i]]``, each level two
    memo references to the one before (9 bytes a level). The pickle is linear, the tree it
    denotes has 2**levels leaves: anything that walks the decoded value as a tree (a check for
    forbidden objects, the reply's encoder) takes exponential time, on main on the event loop.
    24 levels (230 bytes): over 10 s; 60 levels (554 bytes): never finishes, while staying under
    a depth limit of 64."""
    out = PROTO2 + b"}" + text("x") + b"]" + put(0)
    for index in range(levels):
        out += POP + b"(" + get(index) + get(index) + b"l" + put(index + 1)
    return out + b"s."


def memo_tuple_dag(levels: int) -> bytes:
    """Hang: as ``memo_list_dag`` with tuples, ``T[i+1] = (T[i], T[i])``: a walk that rebuilds
    tuples (to swap decoded arrays in) builds 2**levels of them."""
    out = PROTO2 + b"}" + text("x") + b")" + put(0)
    for index in range(levels):
        out += POP + get(index) + get(index) + TUPLE2 + put(index + 1)
    return out + b"s."


def tuple_dag_key(levels: int = 170) -> bytes:
    """Hang: ``{T[levels]: None}`` with ``T[i+1] = (T[i], T[i])`` (1.4 KB). SETITEM hashes
    the key inside the unpickler; CPython does not cache tuple hashes, so hashing visits
    2**levels tuples, in C, holding the GIL: no thread of the process runs meanwhile."""
    out = PROTO2 + b"}" + b")" + put(0)
    for index in range(levels):
        out += POP + get(index) + get(index) + TUPLE2 + put(index + 1)
    return out + b"N" + b"s."


# --- memory -------------------------------------------------------------------------------------


def huge_memo_index(index: int = 2**31) -> bytes:
    """Memory: ``None`` stored at memo slot ``index`` by LONG_BINPUT: 9 bytes. CPython's
    unpickler grows its memo array to hold the index and zero-fills it: 8 bytes a slot,
    2**26: +1 GiB of peak RSS and 4 s; 2**31: 16-32 GB (a MemoryError under a limit, which
    main turns into a 400, else the OOM killer)."""
    return PROTO2 + b"N" + b"r" + struct.pack("<I", index) + b"."


# --- amplification ------------------------------------------------------------------------------


def shared_buffer_arrays(buffer_size: int = 105_000, count: int = 200) -> bytes:
    """Amplification: ``count`` distinct arrays (protocol 2 ``_reconstruct`` + BUILD) whose data
    is one bytes object, written once and then referenced from the memo: a 116 KB body decodes
    to ``count`` copies (21 MB with the defaults), which the identity model echoes: a 200 of
    21 MB, past --max-body 16 MiB."""
    from numpy._core.multiarray import _reconstruct

    data = b"\x01" * buffer_size  # one object: pickle writes it once, then BINGETs it
    dtype = np.dtype("u1")
    arrays = {
        f"a{index}": Reduce(_reconstruct, (np.ndarray, (0,), b"b"), (1, (buffer_size,), dtype, False, data))
        for index in range(count)
    }
    import pickle

    return pickle.dumps(arrays, protocol=2)


# --- process-wide numpy corruption --------------------------------------------------------------


def unsized_scalar(code: str) -> bytes:
    """Corrupts numpy process-wide: ``multiarray.scalar(dtype(code + "0"))`` with no data.
    numpy hands every unsized ``S``/``U``/``V`` dtype out as one shared descriptor, and
    ``scalar`` without data sets that descriptor's itemsize from 0 to 1 in place (main's decoder
    swaps the shared one in even for the copy this pickle asks for). Afterwards, in every model of
    the server: ``U``: ``np.arange(5).astype(str)`` is five empty strings; ``S``:
    ``np.array([12]).astype("S")`` is ``[b"1"]``; ``V``: ``np.dtype("V").itemsize`` is 1."""
    dtype = call(global_("numpy", "dtype"), text(code + "0"), NEWFALSE, NEWTRUE)
    return as_dict(call(global_("numpy._core.multiarray", "scalar"), dtype))


def unsized_scalar_with_data(code: str) -> bytes:
    """Corrupts numpy process-wide (a control): the unsized descriptor as a scalar's dtype, with
    data, as protocol 2 writes ``np.bytes_(b"")``. Harmless on main (numpy sizes a copy when it
    is given data); a decoder that sizes dtypes itself must keep it so."""
    dtype = call(global_("numpy", "dtype"), text(code + "0"), NEWFALSE, NEWFALSE)
    data = call(global_("_codecs", "encode"), text("a"), text("latin1"))
    return as_dict(call(global_("numpy.core.multiarray", "scalar"), dtype, data))


# --- npz ----------------------------------------------------------------------------------------


def _npy_header(descr: str, shape: tuple[int, ...]) -> bytes:
    """A version 1.0 .npy header (magic, length, dict padded to 64 bytes) for ``shape``."""
    header = repr({"descr": descr, "fortran_order": False, "shape": shape}).encode()
    padding = 64 - (10 + len(header) + 1) % 64
    header += b" " * padding + b"\n"
    return b"\x93NUMPY\x01\x00" + struct.pack("<H", len(header)) + header


@functools.cache
def npz_zip_bomb(inflated: int = 200 * 2**20) -> bytes:
    """npz: one member ``x.npy`` of ``inflated`` zero bytes, deflated (about 200 KB for 200 MB):
    ``np.load`` inflates it whole, on the event loop (health stalls ~3 s), and the identity
    model echoes all of it: +850 MiB of peak RSS."""
    buffer = io.BytesIO()
    chunk = bytes(2**20)
    with (zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED, compresslevel=9) as archive,
          archive.open("x.npy", "w", force_zip64=True) as member):
        member.write(_npy_header("|u1", (inflated,)))
        for _ in range(inflated // len(chunk)):
            member.write(chunk)
    return buffer.getvalue()


def npz_claimed_shape(shape: tuple[int, ...] = (10**15,), compressed: bool = False) -> bytes:
    """npz: a member whose .npy header claims ``shape`` (10**15 float64: 8 PB) followed by 16
    bytes of data: ``np.load`` allocates what the header says before reading (a MemoryError, a
    500), or the process is killed."""
    buffer = io.BytesIO()
    method = zipfile.ZIP_DEFLATED if compressed else zipfile.ZIP_STORED
    with zipfile.ZipFile(buffer, "w", method) as archive:
        archive.writestr("x.npy", _npy_header("<f8", shape) + bytes(16))
    return buffer.getvalue()


# --- V2 (Open Inference Protocol) ---------------------------------------------------------------


def v2_json(shape: list[int], datatype: str = "BYTES", data: Any = None) -> bytes:
    """A V2 JSON inference request of one input ``x``."""
    tensor = {"name": "x", "shape": shape, "datatype": datatype, "data": [] if data is None else data}
    return json.dumps({"inputs": [tensor]}, separators=(",", ":")).encode()


def v2_binary(shape: list[int], datatype: str = "BYTES", data: bytes = b"") -> tuple[bytes, int]:
    """A V2 binary-extension request of one input ``x``: the body and its JSON header length
    (``Inference-Header-Content-Length``)."""
    tensor = {"name": "x", "shape": shape, "datatype": datatype,
              "parameters": {"binary_data_size": len(data)}}
    header = json.dumps({"inputs": [tensor]}, separators=(",", ":")).encode()
    return header + data, len(header)


def v2_empty_bytes_rows() -> bytes:
    """V2: BYTES of shape [10**12, 0] (80 bytes). It holds no element, so the element count
    check passes; nesting the (empty) flat list into the shape then builds 10**12 empty lists:
    forever, and all memory (1.4 GB in 10 s)."""
    return v2_json([10**12, 0])


def v2_many_huge_dims(count: int = 40_000) -> bytes:
    """V2: a shape of ``count`` dims of 2**63-1 (about 0.8 MB). ``math.prod`` over them is a
    product of ever larger ints, quadratic in ``count``: 5-10 s of CPU on the event loop, then
    a 500."""
    return v2_json([2**63 - 1] * count, "FP32")


def v2_zero_size_huge_dims() -> bytes:
    """V2: FP32 of shape [2**40, 2**40, 0]: zero elements, so the count check passes, but the
    dims overflow numpy's intp when the empty array is made (a ValueError, a 500). As BYTES, it
    builds 2**40 empty lists instead: a hang, as ``v2_empty_bytes_rows``."""
    return v2_json([2**40, 2**40, 0], "FP32")


def v2_deep_data(depth: int, datatype: str = "FP32") -> bytes:
    """V2: ``data`` nested ``depth`` deep (``[[[...[1]...]]]``), shape [1]."""
    return b'{"inputs":[{"name":"x","shape":[1],"datatype":"%s","data":%s1%s}]}' % (
        datatype.encode(), b"[" * depth, b"]" * depth)


def v2_deep_bytes_data(depth: int) -> bytes:
    """V2: BYTES ``data`` nested ``depth`` deep: the string walk recurses once per level (1000:
    a RecursionError, a 500)."""
    return b'{"inputs":[{"name":"x","shape":[1],"datatype":"BYTES","data":%s"a"%s}]}' % (
        b"[" * depth, b"]" * depth)


# --- JSON codec (POST /) ------------------------------------------------------------------------


def json_deep_arrays(depth: int) -> bytes:
    """JSON: ``{"a": [[[...[0]...]]]}`` nested ``depth`` deep: recursion in the parser, then in
    numpy's conversion of the nested lists, then in the reply's encoder (main refuses or echoes
    these correctly: they guard the rewrite of the codec)."""
    return b'{"a": ' + b"[" * depth + b"0" + b"]" * depth + b"}"


def json_many_zeros(count: int) -> bytes:
    """JSON: ``{"a": [0,0,...]}``, 2 bytes a number: each becomes an 8-byte int64, so the
    decoded arrays (and a pickled reply) are 4x the body: past --max-body from a third of it."""
    return b'{"a": [' + b"0," * (count - 1) + b"0]}"


# --- what a hardened server answers -------------------------------------------------------------


REFUSED = "refused"
"""Only a 4xx will do (the body is not valid data, or is over a limit)."""
BOUNDED = "refused or bounded"
"""A 4xx, or a 200 (the body is valid once read as data) whose reply is no bigger than
--max-body."""


@dataclass(frozen=True)
class Attack:
    name: str
    klass: str
    """The issue's class: crash, hang, memory, amplification, numpy, npz, v2, json."""
    make: Callable[[], bytes]
    """Builds the body (some take a moment: built when sent, not when tests are collected)."""
    path: str = "/"
    headers: dict[str, str] = field(default_factory=dict)
    expect: str = REFUSED
    statuses: tuple[int, ...] = ()
    """When not empty: exactly these statuses (e.g. 413 for an npz bomb)."""
    concurrent: int = 1
    """Send this many copies at once (to be batched together by --max-batch-size)."""

    def body(self) -> bytes:
        return self.make()


PICKLE = {"Content-Type": "application/python-pickle"}
JSON = {"Content-Type": "application/json"}
NPZ = {"Content-Type": "application/x-npz"}


def _v2_binary(name: str, shape: list[int], datatype: str = "BYTES", data: bytes = b"") -> Attack:
    length = v2_binary(shape, datatype, data)[1]
    headers = {"Content-Type": "application/octet-stream", "Inference-Header-Content-Length": str(length)}
    return Attack(name, "v2", lambda: v2_binary(shape, datatype, data)[0], "/v2/models/{model}/infer",
                  headers)


def attacks(max_body: int) -> list[Attack]:
    """Every attack, in the order the end-to-end test sends them. In a path, ``{model}`` is the
    identity model's name, ``{copying}`` a model's that copies its array inputs."""
    # a third of the limit in JSON zeros decodes to 4/3 of it, and a pickled reply of that is
    # past the limit; small enough that parsing it (one C call holding the GIL) takes ~0.25 s
    many_zeros = max_body // 6
    v2 = "/v2/models/{model}/infer"
    json_reply = {**PICKLE, "Accept": "application/json"}
    partial = functools.partial
    return [
        # crash
        Attack("dict key: tuple nested 10**6 deep", "crash", deep_tuple_key, headers=PICKLE),
        Attack("dtype names without field, JSON reply", "crash", dtype_names_without_field,
               headers=json_reply, expect=BOUNDED),
        Attack("dtype names without field, pickle reply", "crash", dtype_names_without_field,
               headers=PICKLE, expect=BOUNDED),
        Attack("dtype alignment 0, batched x4", "crash", dtype_alignment_zero, headers=PICKLE,
               expect=BOUNDED, concurrent=4),
        Attack("dtype alignment 0, JSON reply", "crash", dtype_alignment_zero, headers=json_reply,
               expect=BOUNDED),
        Attack("dtype names without field, copied by the model", "crash", dtype_names_without_field,
               "/models/{copying}", PICKLE, expect=BOUNDED),
        Attack("dtype alignment 0, copied by the model", "crash", dtype_alignment_zero,
               "/models/{copying}", PICKLE, expect=BOUNDED),
        # hang
        Attack("list DAG, 24 levels (230 bytes)", "hang", partial(memo_list_dag, 24), headers=PICKLE,
               expect=BOUNDED),
        Attack("list DAG, 60 levels (554 bytes)", "hang", partial(memo_list_dag, 60), headers=PICKLE,
               expect=BOUNDED),
        Attack("list DAG, 24 levels, JSON reply", "hang", partial(memo_list_dag, 24), headers=json_reply,
               expect=BOUNDED),
        Attack("tuple DAG, 60 levels", "hang", partial(memo_tuple_dag, 60), headers=PICKLE,
               expect=BOUNDED),
        Attack("tuple DAG as dict key (1.4 KB)", "hang", tuple_dag_key, headers=PICKLE),
        # memory
        Attack("memo index 2**31 (9 bytes)", "memory", partial(huge_memo_index, 2**31), headers=PICKLE),
        Attack("memo index 2**26 (9 bytes)", "memory", partial(huge_memo_index, 2**26), headers=PICKLE),
        # amplification
        Attack("one 105 KB buffer behind 200 arrays (116 KB)", "amplification", shared_buffer_arrays,
               headers=PICKLE, expect=BOUNDED),
        # numpy corruption (the test asks the string-cast model afterwards)
        *[Attack(f"unsized {code} scalar, no data", "numpy", partial(unsized_scalar, code),
                 headers=PICKLE, expect=BOUNDED) for code in "SUV"],
        *[Attack(f"unsized {code} scalar, with data", "numpy", partial(unsized_scalar_with_data, code),
                 headers=PICKLE, expect=BOUNDED) for code in "SUV"],
        # npz
        Attack("npz bomb: 200 KB inflating to 200 MB", "npz", npz_zip_bomb, headers=NPZ,
               statuses=(413,)),
        Attack("npz header claiming 10**15 float64", "npz", npz_claimed_shape, headers=NPZ),
        Attack("npz header claiming 10**8 x 10**7, deflated", "npz",
               partial(npz_claimed_shape, (10**8, 10**7), compressed=True), headers=NPZ),
        # V2
        Attack("V2 JSON: BYTES shape [10**12, 0] (80 bytes)", "v2", v2_empty_bytes_rows, v2, JSON),
        _v2_binary("V2 binary: BYTES shape [10**12, 0]", [10**12, 0]),
        Attack("V2 JSON: 40000 dims of 2**63-1 (~0.8 MB)", "v2", v2_many_huge_dims, v2, JSON),
        _v2_binary("V2 binary: 40000 dims of 2**63-1", [2**63 - 1] * 40_000, "FP32"),
        Attack("V2 JSON: FP32 shape [2**40, 2**40, 0]", "v2", v2_zero_size_huge_dims, v2, JSON),
        _v2_binary("V2 binary: FP32 shape [2**40, 2**40, 0]", [2**40, 2**40, 0], "FP32"),
        _v2_binary("V2 binary: BYTES shape [2**40, 2**40, 0]", [2**40, 2**40, 0]),
        Attack("V2 JSON: FP32 data nested 1000 deep", "v2", partial(v2_deep_data, 1000), v2, JSON),
        Attack("V2 JSON: FP32 data nested 100000 deep", "v2", partial(v2_deep_data, 100_000), v2, JSON),
        Attack("V2 JSON: BYTES data nested 1000 deep", "v2", partial(v2_deep_bytes_data, 1000), v2, JSON),
        # JSON codec on POST /
        Attack("JSON: arrays nested 100000 deep", "json", partial(json_deep_arrays, 100_000), headers=JSON),
        Attack("JSON: arrays nested 900 deep", "json", partial(json_deep_arrays, 900), headers=JSON,
               expect=BOUNDED),
        Attack("JSON: arrays nested 70 deep", "json", partial(json_deep_arrays, 70), headers=JSON,
               expect=BOUNDED),
        Attack(f"JSON: {many_zeros} zeros, pickle reply", "json", partial(json_many_zeros, many_zeros),
               headers={**JSON, "Accept": "application/python-pickle"}, expect=BOUNDED),
    ]

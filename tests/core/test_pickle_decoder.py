"""The data-only pickle decoder against each class of attack that broke the restricted unpickler
(issue 13), in process: each is refused quickly, with the status it deserves, without touching
numpy's shared state. The same bodies are sent to a real server in tests/cli/."""

from __future__ import annotations

import gc
import pickle
import resource
import struct
import time
from typing import Any

import numpy as np
import pytest

from core.errors import BadRequest, PayloadTooLarge
from core.wire.pickle_decoder import Limits, PickleRefused, PickleTooLarge, decode
from core.wire.safe_pickle import restricted_loads
from tests.core.test_safe_pickle import assert_same
from tests.hostile_pickles import PROTO2, Reduce, as_dict, text

MiB = 1 << 20


@pytest.fixture(autouse=True)
def frozen_heap() -> Any:
    """The heap frozen, as the server freezes it once its models are loaded (core/process/heap.py).
    Hostile bodies make hundreds of thousands of objects; in a test process that holds the whole
    suite's objects (torch, keras, ...) the collections they trigger walk all of those and took a
    decode past its 5 s budget under load (refused "took longer", not "more than N opcodes"),
    where the served process would not."""
    gc.freeze()
    yield
    gc.unfreeze()


def quickly(body: bytes, expected: type[Exception] = BadRequest, limit: int = 64 * MiB,
            match: str | None = None) -> None:
    started = time.thread_time()
    with pytest.raises(expected, match=match):
        restricted_loads(body, limit)
    # the worst (the whole opcode budget) takes ~0.3 s of CPU; this thread's CPU time, not the
    # wall clock, so a machine busy with other processes cannot fail it, while a hang still does
    assert time.thread_time() - started < 2.0


def memo_dag(levels: int) -> bytes:
    """``L[i+1] = [L[i], L[i]]`` through memo references: ``levels`` doublings, 10 bytes each."""
    body = bytearray(PROTO2 + b"]q\x000")
    for level in range(levels):
        body += b"](h%ch%ceq%c0" % (level, level, level + 1)
    return bytes(body + b"h%c." % levels)


def test_a_deep_tuple_as_a_dict_key_is_refused_before_it_is_hashed() -> None:
    # 10**6 nested tuples: CPython's hash recursed in C and overflowed the stack (SIGSEGV)
    body = PROTO2 + b"}" + b"N" + b"\x85" * 1_000_000 + text("v") + b"s."
    quickly(body, match="opcodes")  # 10**6 opcodes are past the budget before the key is used
    body = PROTO2 + b"}" + b"N" + b"\x85" * 100_000 + text("v") + b"s."
    quickly(body, match="dict keys must be strings")


def test_a_tuple_dag_as_a_dict_key_is_refused() -> None:
    # a 1.2 KB DAG of tuples: hashing it walked 2**n paths
    dag = PROTO2 + b"}N\x85q\x000" + b"".join(b"h%ch%c\x86q%c0" % (i, i, i + 1) for i in range(200))
    quickly(dag + b"h\xc8" + text("v") + b"s.", match="dict keys")


@pytest.mark.parametrize("levels", [30, 55, 63])
def test_lists_shared_through_the_memo_cannot_grow_exponentially(levels: int) -> None:
    body = memo_dag(levels)
    assert len(body) < 1300
    quickly(body, PayloadTooLarge, match="shared references")


def test_a_few_shared_references_are_data_and_stay_shared() -> None:
    shared = restricted_loads(memo_dag(3))
    assert shared[0] is shared[1] and len(shared[0][0][0]) == 0
    array = np.arange(4.0)
    restored = restricted_loads(pickle.dumps({"a": array, "b": [array, array]}, protocol=4))
    assert restored["b"][0] is restored["a"] is restored["b"][1]


def test_one_buffer_behind_many_arrays_counts_each_time() -> None:
    # a 100 KB buffer memoised once and referenced by 200 arrays: 20 MB of reply from 100 KB
    body = many_views(100_000, 200)
    assert len(body) < 110_000
    quickly(body, PayloadTooLarge, limit=16 * MiB)
    views = restricted_loads(body, limit=32 * MiB)["x"]  # within the limit it is data
    assert len(views) == 200 and views[0].shape == (12_500,)


def many_views(size: int, count: int) -> bytes:
    """``{"x": [_frombuffer(B, float64, (n,), "C")] * count}`` with one BYTEARRAY8 ``B``,
    written once and referenced ``count`` times through the memo."""
    dtype = (text("numpy") + text("dtype") + b"\x93" + text("f8") + b"\x89\x88\x87R"
             + b"(K\x03" + text("<") + b"NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00tb")
    shape = b"J" + struct.pack("<i", size // 8) + b"\x85"
    first = (text("numpy._core.numeric") + text("_frombuffer") + b"\x93\x94"  # memo 0
             + b"(\x96" + struct.pack("<Q", size) + bytes(size) + b"\x94"  # memo 1
             + dtype + b"\x94" + shape + text("C") + b"tR")  # memo 2: the dtype
    again = b"h\x00(h\x01h\x02" + shape + text("C") + b"tR"
    return b"\x80\x05}" + text("x") + b"](" + first + again * (count - 1) + b"es."


def test_a_huge_memo_index_costs_no_memory() -> None:
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    for index in (2**24, 2**31, 2**32 - 1):
        quickly(PROTO2 + b"N" + b"r" + struct.pack("<I", index) + b".", match="memo index")
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 32 * 1024  # KiB


@pytest.mark.parametrize("kind", ["S", "U", "V"])
def test_an_unsized_flexible_scalar_cannot_resize_numpy_s_shared_descriptor(kind: str) -> None:
    # numpy's own __setstate__ set its shared unsized S/U/V descriptors' item size to what the
    # state said: every later astype(str) in the process gave empty strings. The decoder never
    # calls it: a forged size is refused, an honest empty scalar is read, numpy stays whole.
    from numpy._core.multiarray import scalar

    order = "<" if kind == "U" else "|"
    forged = Reduce(np.dtype, (f"{kind}0", False, True), (3, order, None, None, None, 1, 1, 0))
    for protocol in (2, 5):
        quickly(pickle.dumps({"x": Reduce(scalar, (forged, b"a"))}, protocol=protocol),
                match="does not fit")
        empty = {"S": np.bytes_(b""), "U": np.str_(""), "V": np.void(b"")}[kind]
        assert_same(restricted_loads(pickle.dumps({"x": empty}, protocol=protocol)), {"x": empty})
        unsized_array = Reduce(np.dtype, (f"{kind}0", False, True), np.dtype(kind).__reduce__()[2])
        from numpy._core.multiarray import _reconstruct
        array = Reduce(_reconstruct, (np.ndarray, (0,), b"b"), (1, (3,), unsized_array, False, b""))
        quickly(pickle.dumps({"x": array}, protocol=protocol), match="unsized")
    assert np.arange(5).astype(str).tolist() == ["0", "1", "2", "3", "4"]
    assert np.array([1.5]).astype("U").tolist() == ["1.5"] and np.dtype(kind).itemsize == 0


@pytest.mark.parametrize(
    "state",
    [
        (3, "|", None, ("a", "b"), {"a": (np.dtype("<f8"), 0)}, 8, 1, 16),  # a name without a field
        (3, "|", None, ("a",), {"a": (np.dtype("<f8"), 0)}, 8, 0, 16),  # alignment 0 (SIGFPE)
        (3, "|", None, ("a",), {"a": (np.dtype("<f8"), 0, "title")}, 8, 1, 16),  # titles
        (3, "|", None, ("a",), {"a": (np.dtype("<f8"), 0)}, 8, 1, 0),  # flags numpy would not write
    ],
    ids=["names without fields", "alignment 0", "a title", "forged flags"],
)
def test_inconsistent_structured_dtype_states_are_refused(state: tuple[Any, ...]) -> None:
    from numpy._core.multiarray import _reconstruct

    dtype = Reduce(np.dtype, ("V8", False, True), state)
    array = Reduce(_reconstruct, (np.ndarray, (0,), b"b"), (1, (2,), dtype, False, b"A" * 16))
    for protocol in (2, 4):
        quickly(pickle.dumps({"x": array}, protocol=protocol))


def test_a_structured_dtype_reusing_its_fields_at_every_level_is_refused() -> None:
    # 8 fields at each of 6 levels, one dtype object each: 8**6 fields for numpy to walk
    level = np.dtype("<f8")
    for _ in range(6):
        level = np.dtype({"names": [f"f{i}" for i in range(8)], "formats": [level] * 8,
                          "offsets": [0] * 8, "itemsize": level.itemsize})
    quickly(pickle.dumps({"x": np.zeros(1, level)}, protocol=4), match="fields")


def test_unicode_that_is_not_code_points_is_refused() -> None:
    array = np.frombuffer(b"\xff\xff\xff\xff", "<U1")
    quickly(pickle.dumps({"x": array}, protocol=5), match="code points")
    quickly(pickle.dumps({"x": array}, protocol=2), match="code points")


def test_a_value_that_contains_itself_is_refused() -> None:
    looped: list[Any] = []
    looped.append(looped)
    quickly(pickle.dumps({"x": looped}, protocol=4), match="contains itself")


def test_depth_built_through_the_memo_is_bounded() -> None:
    # each list is made at the top of the stack and takes the previous one by reference: the
    # stack never gets deep, the value does (L[i+1] = [L[i]])
    body = PROTO2 + b"]q\x00" + b"".join(b"]q%ch%ca0" % (i + 1, i) for i in range(100)) + b"0h\x64."
    quickly(body, match="deeper than 64")
    shallow = PROTO2 + b"]q\x00" + b"".join(b"]q%ch%ca0" % (i + 1, i) for i in range(10)) + b"0h\x0a."
    assert restricted_loads(shallow) == [[[[[[[[[[[]]]]]]]]]]]


@pytest.mark.parametrize(
    ("body", "limits"),
    [
        (PROTO2 + b"N0" * 100_000 + b"N.", Limits(max_bytes=MiB, max_ops=50_000)),
        (PROTO2 + b"N0" * 100_000 + b"N.", Limits(max_bytes=MiB, max_seconds=0.0)),
    ],
    ids=["opcodes", "time"],
)
def test_work_is_bounded(body: bytes, limits: Limits) -> None:
    with pytest.raises(PickleRefused, match=r"opcodes|longer"):
        decode(body, limits)


def test_claims_beyond_the_body_are_refused_without_allocating() -> None:
    for op, width in ((b"X", 4), (b"\x8d", 8), (b"B", 4), (b"\x8e", 8), (b"\x96", 8), (b"\x8b", 4)):
        quickly(PROTO2 + op + (2**31).to_bytes(width, "little") + b"ab.")


def test_an_array_s_bytes_must_match_its_shape_and_dtype() -> None:
    from numpy._core.multiarray import _reconstruct

    short = Reduce(_reconstruct, (np.ndarray, (0,), b"b"), (1, (1000,), np.dtype("f8"), False, b"A" * 8))
    quickly(pickle.dumps({"x": short}, protocol=2), match="holds 8 bytes")
    huge_empty = Reduce(_reconstruct, (np.ndarray, (0,), b"b"), (1, (0, 2**61, 2**61), np.dtype("f8"),
                                                                 False, b""))
    quickly(pickle.dumps({"x": huge_empty}, protocol=2), match="too big")


def test_zero_size_arrays_with_large_other_dimensions_are_data() -> None:
    array = np.zeros((0, 2**20, 3), "f4")
    assert restricted_loads(pickle.dumps({"x": array}, protocol=2))["x"].shape == (0, 2**20, 3)


def test_limit_errors_are_413_and_refusals_400() -> None:
    with pytest.raises(PickleTooLarge):
        decode(memo_dag(40), Limits(max_bytes=MiB))
    assert PayloadTooLarge.status == 413 and BadRequest.status == 400
    with pytest.raises(BadRequest, match="not allowed"):
        restricted_loads(as_dict(b"cos\nsystem\n" + b"(" + text("true") + b"tR"))


def test_a_global_left_uncalled_is_not_data() -> None:
    # found by the fuzzer (tests/corpus/pickle_decoder/bare-global-in-a-list)
    quickly(as_dict(b"]cnumpy\ndtype\na"), match="global numpy.dtype is not data")
    quickly(PROTO2 + b"cnumpy\ndtype\n.", match="is not data")


@pytest.mark.parametrize("line", [b"--1", b"1-", b"", b"+1", b"1" * 41, b"\xd9\xa1"])
def test_protocol_0_integers_are_short_decimal_numbers(line: bytes) -> None:
    # b"--1" found by the fuzzer (tests/corpus/pickle_decoder/text-int-with-two-minus-signs)
    quickly(b"I" + line + b"\n.", match="short number")
    assert restricted_loads(b"I-12\n.") == -12 and restricted_loads(b"I01\n.") is True


@pytest.mark.parametrize(
    "value",
    [
        # numpy's == is elementwise: comparing a client's array with a constant raised ValueError
        Reduce(np._core.numeric._frombuffer, (bytearray(8), np.dtype("f8"), (1,), np.zeros(0))),
        Reduce(np._core.multiarray._reconstruct, (np.ndarray, (np.zeros(2),), b"b")),
        Reduce(np._core.multiarray._reconstruct, (np.ndarray, (0,), b"b"),
               (np.zeros(2), (1,), np.dtype("f8"), False, bytes(8))),
    ],
    ids=["frombuffer order", "reconstruct shape", "state version"],
)
def test_client_arrays_are_never_compared_as_values(value: Reduce, monkeypatch: pytest.MonkeyPatch) -> None:
    # found by the fuzzer (tests/corpus/pickle_decoder/array-as-frombuffer-order); STRICT makes
    # an error the checks missed raise instead of becoming a 400
    from core.wire import pickle_decoder

    monkeypatch.setattr(pickle_decoder, "STRICT", True)
    for protocol in (2, 5):
        quickly(pickle.dumps({"x": value}, protocol=protocol))


@pytest.mark.parametrize(
    "keys",
    [[(2**61 - 1) * i for i in range(1, 4)], [1.5, 2.5], [2 + 1j]],
    ids=["ints with one hash", "floats", "complex"],
)
def test_keys_whose_hash_a_client_chooses_are_refused(keys: list[Any]) -> None:
    # ints past 2**61 - 1, floats and complex numbers can be chosen to share one hash: thousands
    # of them make a dict or set quadratic to build
    quickly(pickle.dumps({"x": dict.fromkeys(keys, 1)}, protocol=4), match="integers below 2")
    quickly(pickle.dumps({"x": set(keys)}, protocol=4), match="integers below 2")
    quickly(pickle.dumps({"x": set(keys)}, protocol=2), match="integers below 2")


def colliding_keys(count: int) -> bytes:
    """``{"x": {k: None, ...}}`` whose ``count`` int keys all hash to 0, written opcode by opcode:
    building the dict itself to pickle it would take the test seconds of quadratic inserts."""
    items = bytearray()
    for i in range(1, count + 1):
        key = (2**61 - 1) * i
        raw = key.to_bytes((key.bit_length() + 8) // 8, "little", signed=True)
        items += b"\x8a" + bytes([len(raw)]) + raw + b"N"  # LONG1, None
    return b"\x80\x04}" + text("x") + b"}(" + bytes(items) + b"us."


def test_a_thousand_keys_with_one_hash_are_refused_at_once() -> None:
    assert pickle.loads(colliding_keys(50)) == {"x": {(2**61 - 1) * i: None for i in range(1, 51)}}
    quickly(colliding_keys(30_000))


def test_a_dtype_left_without_its_state_is_refused() -> None:
    # found by the fuzzer (tests/corpus/pickle_decoder/dtype-without-state-in-result): the node
    # of numpy.dtype(...) with no BUILD after it, left in the result
    quickly(as_dict(b"cnumpy\ndtype\n" + text("f8") + b"\x89\x88\x87R"), match="without its state")


@pytest.mark.parametrize("version", [{}, ((((),),),), [3]], ids=["dict", "nested tuple", "list"])
def test_a_dtype_state_is_hashed_only_once_its_parts_are_strings_and_ints(version: Any) -> None:
    # a dict as the state's version made the dtype cache hash it (found by the fuzzer:
    # tests/corpus/pickle_decoder/dict-as-dtype-state-version); a deep tuple would recurse in C
    dtype = Reduce(np.dtype, ("f8", False, True), (version, "<", None, None, None, -1, -1, 0))
    quickly(pickle.dumps({"x": dtype}, protocol=4), match="not numpy's")


def test_a_reply_echoing_shared_values_stays_small_and_readable() -> None:
    # plain_data copied each reference apart: the echo of a shared structure grew into a reply
    # our own client refused (found by the fuzzer: tests/corpus/pickle_decoder/shared-tuples-echoed)
    from core.wire.safe_pickle import dumps

    value = restricted_loads(memo_dag(16))  # 2**16 paths to one empty list
    reply = dumps({"x": value})
    assert len(reply) < 1000
    again = restricted_loads(reply)["x"]
    assert again[0] is again[1]


def test_complex_from_an_integer_past_a_float_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    from core.wire import pickle_decoder

    monkeypatch.setattr(pickle_decoder, "STRICT", True)  # refused by its own check, not the net
    quickly(pickle.dumps({"x": Reduce(complex, (10**400, 0))}, protocol=2), match="too large")

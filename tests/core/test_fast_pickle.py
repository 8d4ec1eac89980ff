"""The fast path for dicts of plain arrays (core/wire/fast_pickle.py) agrees with the restricted unpickler.

Whatever ``read_arrays`` accepts, the restricted unpickler decodes to the same arrays (values,
dtype, shape, layout, writability); whatever it refuses, it leaves to the unpickler. Checked on
real ``pickle.dumps`` output of many dtypes, shapes and keys, on numpy 1.x names, on thousands of
random mutations of such bodies and on the hostile corpus. ``write_arrays`` writes the layout
``pickle.dumps`` writes, which plain pickle, the restricted unpickler and ``read_arrays`` all read.
"""

from __future__ import annotations

import pickle
import random
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from core.errors import BadRequest
from core.wire import fast_pickle
from core.wire.fast_pickle import read_arrays, write_arrays
from core.wire.safe_pickle import decode_general, dumps, restricted_loads
from tests.hostile_pickles import corpus, numpy1

PLAIN_CODES = ("?", "i1", "u1", "<i2", ">u2", "<i4", ">i4", "<u4", "<i8", ">u8",
               "<f2", ">f2", "<f4", ">f4", "<f8", ">f8", "<c8", ">c16", "<c16")
SHAPES = [(), (0,), (1,), (10,), (3, 4), (2, 0, 3), (1, 2, 3, 4, 5), (300,), (2, 70000), (1, 784)]


def values(code: str, shape: tuple[int, ...], seed: int = 0) -> np.ndarray[Any, Any]:
    rng = np.random.default_rng(seed)
    dtype = np.dtype(code)
    count = int(np.prod(shape))
    return rng.integers(0, 256, count * dtype.itemsize, dtype=np.uint8).view(dtype).reshape(shape)


def same(fast: dict[str, Any], slow: Any) -> bool:
    if type(slow) is not dict or list(fast) != list(slow):
        return False
    for key, array in fast.items():
        other = slow[key]
        if not (type(other) is np.ndarray and array.dtype == other.dtype
                and array.shape == other.shape and array.tobytes() == other.tobytes()
                and array.flags.writeable == other.flags.writeable
                and array.flags.c_contiguous == other.flags.c_contiguous
                and array.flags.f_contiguous == other.flags.f_contiguous):
            return False
    return True


def slow_or_error(body: bytes) -> Any:
    try:
        return decode_general(body)
    except BadRequest as exc:
        return exc


def agrees(body: bytes) -> bool:
    """The invariant: refused, or read exactly as the restricted unpickler reads it."""
    fast = read_arrays(body)
    return fast is None or same(fast, slow_or_error(body))


@pytest.mark.parametrize("protocol", [4, 5])
@pytest.mark.parametrize("code", PLAIN_CODES)
def test_every_plain_dtype_is_read_fast_and_alike(code: str, protocol: int) -> None:
    for shape in SHAPES[:8]:
        body = pickle.dumps({"x": values(code, shape)}, protocol=protocol)
        fast = read_arrays(body)
        if protocol == 4 and code.startswith(">"):
            assert fast is None  # numpy's setstate turns these native: left to it
            continue
        assert fast is not None, (code, shape)  # the fast path really runs
        assert same(fast, decode_general(body)), (code, shape)


@pytest.mark.parametrize("protocol", [4, 5])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_shapes_orders_and_keys_agree(shape: tuple[int, ...], protocol: int) -> None:
    array = values("<f4", shape)
    for payload in ({"x": array}, {"x": np.asfortranarray(array)}, {"é" * 200: array},
                    {"k" * 300: array}, {"": array}, {"a": array, "b": array.copy()}):
        body = pickle.dumps(payload, protocol=protocol)
        assert agrees(body), (list(payload), shape)


def test_small_single_arrays_never_fall_back() -> None:
    """Every common request is read fast: one array, up to the pickler's 64 KiB frame."""
    for protocol in (4, 5):
        for payload in ({"x": values("<f4", (1, 784))}, {"image": values("u1", (1, 64, 64, 3))},
                        {"x": np.asfortranarray(values("<f8", (30, 20)))}, {"ids": values("<i8", (7,))}):
            assert read_arrays(pickle.dumps(payload, protocol=protocol)) is not None


def test_numpy1_names_agree() -> None:
    for protocol in (4, 5):
        body = numpy1(pickle.dumps({"x": values("<f8", (3, 2))}, protocol=protocol))
        assert b"numpy.core" in body
        fast = read_arrays(body)
        assert fast is not None and same(fast, decode_general(body))


@pytest.mark.parametrize("payload", [
    {"x": values("<f8", (3,)), "y": values("<f8", (3,))},  # second array: memo references
    {"x": values("<f8", (200, 200))},  # data outside the frame
    {"x": np.array(["a", "b"])}, {"x": np.arange(3).astype("M8[s]")},
    {"x": np.zeros(2, [("a", "<f4")])}, {"x": np.float64(1.0)}, {"x": [1, 2]},
    {1: values("<f4", (2,))}, {}, {"x": {"y": values("<f4", (2,))}},
])
def test_other_payloads_fall_back_and_still_decode(payload: dict[Any, Any]) -> None:
    for protocol in (2, 3, 4, 5):
        body = pickle.dumps(payload, protocol=protocol)
        assert read_arrays(body) is None
        decoded = restricted_loads(body)
        assert pickle.dumps(decoded, protocol=5) == pickle.dumps(decode_general(body), protocol=5)


def test_strided_arrays_agree() -> None:
    """Protocol 4 pickles a strided array's data as if contiguous; 5 uses numpy's other reduce."""
    array = values("<f8", (6, 4))[::2, 1:]
    assert read_arrays(pickle.dumps({"x": array}, protocol=4)) is not None
    assert read_arrays(pickle.dumps({"x": array}, protocol=5)) is None
    for protocol in (4, 5):
        assert agrees(pickle.dumps({"x": array}, protocol=protocol))


def test_object_arrays_stay_refused() -> None:
    body = pickle.dumps({"x": np.array([1, "a"], dtype=object)}, protocol=5)
    assert read_arrays(body) is None
    with pytest.raises(BadRequest, match="object-dtype"):
        restricted_loads(body)


def test_random_mutations_are_refused_or_read_alike() -> None:
    """Flip, drop, insert, truncate and splice bytes of canonical bodies: the fast path reads a
    mutant only when the restricted unpickler reads the very same arrays from it."""
    rng = random.Random(1234)
    bases = [pickle.dumps(payload, protocol=protocol) for protocol in (4, 5) for payload in (
        {"x": values("<f4", (2, 3))}, {"ab": values(">i2", (4,))}, {"x": values("?", ())},
        {"x": values("<c8", (1, 2, 1, 2))}, {"x": np.asfortranarray(values("<f8", (2, 3)))},
    )] + [dumps({"a": values("<f4", (2,)), "b": values("u1", (3, 1))}),
          dumps({"x": values("u1", (1, 300, 0, 70000))})]  # K, M and J dimensions
    read_fast = 0
    for _ in range(10000):
        body = bytearray(rng.choice(bases))
        for _ in range(rng.randint(1, 3)):
            if not body:
                break
            at = rng.randrange(len(body))
            kind = rng.randrange(5)
            if kind == 0:
                body[at] = rng.randrange(256)
            elif kind == 1:
                del body[at]
            elif kind == 2:
                body.insert(at, rng.randrange(256))
            elif kind == 3:
                del body[at:]
            else:
                body[at:at] = body[rng.randrange(len(body)):][:8]
        mutant = bytes(body)
        fast = read_arrays(mutant)
        if fast is not None:
            read_fast += 1
            assert same(fast, slow_or_error(mutant)), mutant
    assert read_fast > 50  # mutations inside the data are still read (the check is not vacuous)


@pytest.mark.parametrize("protocol", [4, 5])
def test_an_empty_array_too_big_to_index_is_a_bad_request(protocol: int) -> None:
    body = pickle.dumps({"x": np.zeros((0, 3, 3))}, protocol=protocol)
    body = body.replace(b"K\x00K\x03K\x03\x87", b"K\x00J\xff\xff\xff\x7fJ\xff\xff\xff\x7f\x87")
    body = body[:3] + (len(body) - 11).to_bytes(8, "little") + body[11:]  # the FRAME's length
    assert read_arrays(body) is None  # left to the unpickler, which decides
    if protocol == 5:  # numpy's setstate (protocol 4) builds it; its reshape (5) refuses it
        with pytest.raises(BadRequest, match="too big"):
            restricted_loads(body)


def test_hostile_corpus_never_takes_the_fast_path(tmp_path: Path) -> None:
    for name, body in corpus(tmp_path / "marker", tmp_path).items():
        assert read_arrays(body) is None, name


@pytest.mark.parametrize("payload", [
    {"x": values("<f4", (1, 784))}, {"x": values(">f8", ())}, {"x": values("?", (0, 2))},
    {"x": np.asfortranarray(values("<i8", (3, 4)))}, {"k" * 300: values("u1", (5,))},
    {"a": values("<f4", (2,)), "b": values("<f4", (2,)), "é": values("<c16", (1, 2, 3, 4, 1))},
    {"big": values("<f4", (70000, 2))},
])
def test_written_arrays_read_back_everywhere(payload: dict[str, np.ndarray[Any, Any]]) -> None:
    body = write_arrays(payload)
    assert body is not None and dumps(payload) == body
    for decoded in (pickle.loads(body), decode_general(body), read_arrays(body)):
        assert isinstance(decoded, dict) and list(decoded) == list(payload)
        for key, array in payload.items():
            assert decoded[key].dtype == array.dtype and decoded[key].tobytes() == array.tobytes()
            assert decoded[key].flags.f_contiguous == array.flags.f_contiguous


def test_one_array_is_written_as_pickle_writes_it() -> None:
    payload = {"x": values("<f4", (1, 784))}
    framed = pickle.dumps(payload, protocol=5)
    assert write_arrays(payload) == framed[:2] + framed[11:]  # the same, less the optional FRAME


@pytest.mark.parametrize("payload", [
    {"x": values("<f4", (4,))[::2]}, {"x": np.array(["a"])}, {"x": np.zeros(2, object)},
    {"x": np.float32(1)}, {"x": [1.0]}, {1: values("<f4", (2,))}, {}, [values("<f4", (2,))],
    {"x": np.ma.masked_array([1.0])}, {"x": np.zeros(2, "M8[s]")},
])
def test_anything_else_is_left_to_the_pickler(payload: Any) -> None:
    assert write_arrays(payload) is None


def test_threads_that_start_at_once_all_see_whole_tables(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fast_pickle, "_FRAGMENTS", {})
    monkeypatch.setattr(fast_pickle, "_BY_DTYPE", {})
    monkeypatch.setattr(fast_pickle, "_FROMBUFFER_NAME", b"")
    payload = {"x": values("<f8", (2, 3)), "y": values("u1", (4,))}
    body = pickle.dumps({"x": payload["x"]}, protocol=5)
    start = threading.Barrier(8)
    results: list[Any] = []

    def work() -> None:
        start.wait()
        results.append((write_arrays(payload), read_arrays(body)))

    threads = [threading.Thread(target=work) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(results) == 8
    for written, read in results:
        assert written is not None and same(pickle.loads(written), payload)
        assert read is not None and same(read, decode_general(body))


@pytest.mark.parametrize("protocol", [4, 5])
def test_a_remembered_layout_reads_new_data_and_nothing_else(protocol: int) -> None:
    """A body of a layout read before is matched byte for byte outside its data: new values are
    read as new values, and a change to any other byte is refused or read as the unpickler
    reads it (never taken for the remembered layout)."""
    # two arrays as write_arrays lays them (pickle.dumps's second one is a memo reference)
    first = (dumps({"a": values("<f4", (2, 3)), "bc": values("<i8", (4,), 1)}) if protocol == 5
             else pickle.dumps({"a": values("<f4", (2, 3))}, protocol=4))
    assert read_arrays(first) is not None
    assert len(first) in fast_pickle._LAYOUTS  # remembered: the next bodies take that path
    changed = {key: value + 1 for key, value in pickle.loads(first).items()}
    other = dumps(changed) if protocol == 5 else pickle.dumps(changed, protocol=4)
    assert len(other) == len(first)
    fast = read_arrays(other)
    assert fast is not None and same(fast, decode_general(other))
    data = set()
    for start, end in [spec[4:6] for spec in fast_pickle._LAYOUTS[len(first)][1]]:
        data.update(range(start, end))
    for at in range(len(first)):
        if at in data:
            continue
        for value in {first[at] ^ 1, first[at] ^ 0x80, 0}:
            if value == first[at]:
                continue
            mutant = first[:at] + bytes((value,)) + first[at + 1:]
            assert read_arrays(first) is not None  # the original layout remembered again
            assert agrees(mutant), at


def test_remembered_layouts_are_bounded() -> None:
    for size in range(fast_pickle._MAX_LAYOUTS + 10):
        assert read_arrays(pickle.dumps({"x": values("u1", (size,))}, protocol=5)) is not None
    assert len(fast_pickle._LAYOUTS) <= fast_pickle._MAX_LAYOUTS
    assert read_arrays(pickle.dumps({f"k{i}": values("u1", (1,)) for i in range(500)}, protocol=5)) is None


def test_written_layouts_follow_each_array() -> None:
    """The bytes around an array's data are remembered per key, dtype, shape and order: a reply
    of another shape, dtype or order under the same key is written as its own."""
    for payload in ({"x": values("<f4", (2, 3))}, {"x": values("<f4", (3, 2))}, {"x": values("<f8", (2, 3))},
                    {"x": np.asfortranarray(values("<f4", (2, 3)))}, {"x": values("<f4", (2, 3), 5)}):
        for _ in range(2):  # the second time from what was remembered
            body = write_arrays(payload)
            assert body is not None and same(pickle.loads(body), payload)
    for size in range(fast_pickle._MAX_WRITTEN + 10):
        assert write_arrays({"x": values("u1", (size,))}) is not None
    assert len(fast_pickle._WRITTEN) <= fast_pickle._MAX_WRITTEN

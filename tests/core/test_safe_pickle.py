"""The restricted unpickler admits numpy data as real clients pickle it and refuses everything else.

Admitted: arrays of every data dtype (any layout), numpy scalars and dtypes, plain containers and
values, for pickle protocols 2 to 5 and with numpy 1.x module names; they round-trip exactly.
Refused (``BadRequest``, and nothing runs): the corpus in ``tests/hostile_pickles.py``.
"""

from __future__ import annotations

import pickle
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from studio_plugins import BadRequest, restricted_loads
from tests.hostile_pickles import (
    PROTO2,
    Reduce,
    code_payloads,
    corpus,
    memo_index_after,
    numpy1,
    text,
)

PROTOCOLS = (2, 3, 4, 5)

STRUCTURED = np.dtype([("a", "<f8"), ("b", ">i2"), ("c", "U3", (2,)), ("d", [("e", "?"), ("f", "S2")])])
DTYPES = [
    *(np.dtype(code) for code in "?" + np.typecodes["AllInteger"] + np.typecodes["AllFloat"]),
    np.dtype(">i4"), np.dtype(">f8"), np.dtype(">c16"),
    np.dtype("U5"), np.dtype(">U2"), np.dtype("S4"), np.dtype("V3"),
    np.dtype("M8[ns]"), np.dtype("m8[s]"),
    STRUCTURED,
    np.dtype([("x", "i1"), ("y", "f8")], align=True),
    np.dtype({"names": ["a"], "formats": ["<f4"], "offsets": [8], "itemsize": 16}),
]


def sample(dtype: np.dtype[Any], shape: tuple[int, ...] = (3, 4)) -> np.ndarray[Any, Any]:
    """An array of ``dtype`` with distinct, non-trivial values (random bytes for void types)."""
    count = int(np.prod(shape))
    raw = np.random.default_rng(7).integers(0, 256, count * dtype.itemsize, dtype=np.uint8)
    if dtype.kind in "biufc":
        values = np.arange(count).astype(dtype) * (-1 if dtype.kind in "ifc" else 1)
        if dtype.kind == "c":
            values = values + 1j * np.arange(count)
        return np.asarray(values, dtype).reshape(shape)
    if dtype.kind == "U":
        return np.array([f"é{i}"[: dtype.itemsize // 4] for i in range(count)], dtype).reshape(shape)
    if dtype.kind == "S":
        return np.array([b"\x00a%d" % i for i in range(count)], dtype).reshape(shape)
    if dtype.kind in "Mm":
        return np.arange(count).astype(dtype).reshape(shape)
    array = raw.view(dtype).reshape(shape)
    if dtype.fields and "a" in dtype.fields and dtype["a"].kind == "f":
        array = array.copy()
        array["a"] = np.arange(count).reshape(shape)  # random float bits could be NaN: keep it exact
    if dtype.fields and "c" in dtype.fields:
        array["c"] = "xy"
    return array


def assert_same(restored: Any, original: Any) -> None:
    assert type(restored) is type(original), (type(restored), type(original))
    if isinstance(original, np.ndarray):
        assert restored.shape == original.shape
        if restored.dtype.str != original.dtype.str:
            # numpy's own unpickling turns a non-native byte order native (protocols 2 to 4)
            assert restored.dtype.isnative and not original.dtype.isnative
            restored = restored.astype(original.dtype)
        assert restored.dtype == original.dtype and restored.dtype.str == original.dtype.str
        if original.dtype.names:  # field by field: padding bytes are not data
            for name in original.dtype.names:
                assert_same(restored[name], original[name])
        else:
            assert restored.tobytes() == original.tobytes()  # exact, NaN-safe, every dtype
        if original.flags.f_contiguous and not original.flags.c_contiguous:
            assert restored.flags.f_contiguous
    elif isinstance(original, np.generic):
        assert restored.dtype == original.dtype and restored.tobytes() == original.tobytes()
    elif isinstance(original, np.dtype):
        assert restored == original and restored.descr == original.descr
        assert restored.flags == original.flags and restored.itemsize == original.itemsize
    elif isinstance(original, dict):
        assert list(restored) == list(original)
        for key in original:
            assert_same(restored[key], original[key])
    elif isinstance(original, list | tuple):
        assert len(restored) == len(original)
        for left, right in zip(restored, original, strict=True):
            assert_same(left, right)
    else:
        assert restored == original


def dumps(value: Any, protocol: int, old_numpy: bool) -> bytes:
    data = pickle.dumps(value, protocol=protocol)
    if old_numpy:
        data = numpy1(data)
        assert b"numpy._core" not in data
    return data


client = pytest.mark.parametrize(
    ("protocol", "old_numpy"),
    [(p, old) for p in PROTOCOLS for old in (False, True)],
    ids=[f"p{p}-{'numpy1' if old else 'numpy2'}" for p in PROTOCOLS for old in (False, True)],
)


# --- what must be admitted --------------------------------------------------------------------


@client
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_arrays_of_every_data_dtype_round_trip(dtype: np.dtype[Any], protocol: int, old_numpy: bool) -> None:
    array = sample(dtype)
    layouts = {
        "c": array,
        "fortran": np.asfortranarray(array),
        "strided": array[:, ::2],
        "0-d": array.ravel()[:1].reshape(()),
        "zero-size": array[:0],
        "empty 2-d": np.zeros((0, 5), dtype),
    }
    data = dumps(layouts, protocol, old_numpy)
    restored = restricted_loads(data)
    assert_same(restored, layouts)
    reference = pickle.loads(pickle.dumps(layouts, protocol=protocol))  # what numpy itself gives
    for name, array in reference.items():
        assert restored[name].dtype.str == array.dtype.str
        assert restored[name].flags.f_contiguous == array.flags.f_contiguous


def test_the_numpy1_rewrite_really_uses_numpy1_names() -> None:
    for protocol in PROTOCOLS:
        data = numpy1(pickle.dumps({"x": np.arange(3.0), "s": np.float32(1)}, protocol=protocol))
        assert b"numpy.core.multiarray" in data or b"numpy.core.numeric" in data
        assert b"numpy._core" not in data


@client
def test_scalars_dtypes_and_plain_values_round_trip(protocol: int, old_numpy: bool) -> None:
    payload = {
        "scalars": [
            np.float16(1.5), np.float32(-2.25), np.float64(np.pi), np.longdouble(1) / 3,
            np.int8(-8), np.int64(-(2**62)), np.uint64(2**64 - 1), np.bool_(True),
            np.complex64(1 - 2j), np.clongdouble(3 + 4j), np.str_("héllo"), np.bytes_(b"\x00b"),
            np.void(b"\x01\x02"), np.datetime64("2024-06-01T12:00", "s"), np.timedelta64(5, "ms"),
            np.zeros(1, STRUCTURED)[0],
        ],
        "dtypes": [*DTYPES[:5], STRUCTURED, np.dtype(("f4", (2, 3)))],
        "nested": {"a": [np.arange(3), (np.ones((2, 2), "f4"), {"b": np.float64(2)})], "c": ()},
        "plain": ["text", b"bytes", 0, -(10**30), 1.5, float("inf"), None, True, 2 + 3j],
        "containers": (bytearray(b"ab"), {1, 2}, frozenset({"x"})),
    }
    restored = restricted_loads(dumps(payload, protocol, old_numpy))
    assert_same(restored, payload)


def test_shared_and_repeated_arrays_stay_shared() -> None:
    array = np.arange(4.0)
    payload = {"a": array, "b": [array, (array,)]}
    for protocol in PROTOCOLS:
        restored = restricted_loads(pickle.dumps(payload, protocol=protocol))
        assert restored["b"][0] is restored["a"] and restored["b"][1][0] is restored["a"]
        assert type(restored["a"]) is np.ndarray


def test_a_late_build_on_a_used_dtype_is_refused() -> None:
    # numpy's __setstate__ would rewrite a dtype already in use (a memo reference, then BUILD with
    # forged flags); the decoder builds each dtype once, from data, and refuses a second state
    data = pickle.dumps([np.arange(2.0)], protocol=2)
    slot = memo_index_after(data, "numpy dtype")
    forged = b"(K\x03" + text("<") + b"NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x01t"
    tampered = data[:-1] + b"h" + bytes([slot]) + forged + b"b0."
    with pytest.raises(BadRequest, match="set twice"):
        restricted_loads(tampered)


# --- what must be refused ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def hostile(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, bytes]]:
    workdir = tmp_path_factory.mktemp("hostile")
    marker = workdir / "pwned"
    return marker, corpus(marker, workdir)


def test_every_hostile_pickle_is_refused_and_runs_nothing(hostile: tuple[Path, dict[str, bytes]]) -> None:
    marker, bodies = hostile
    assert len(bodies) > 40
    for name, body in bodies.items():
        started = time.perf_counter()
        with pytest.raises(BadRequest) as refused:
            restricted_loads(body)
        assert refused.value.status == 400, name
        assert time.perf_counter() - started < 2, f"{name} took too long to refuse"
        assert not marker.exists(), f"{name} ran code"
    time.sleep(0.2)  # a spawned process would have touched it by now
    assert not marker.exists()


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_hostile_pickles_with_numpy1_names_are_refused_too(protocol: int) -> None:
    for value in (np.array([1, None], dtype=object), np.zeros(2, [("a", "O")])):
        with pytest.raises(BadRequest, match="object-dtype"):
            restricted_loads(numpy1(pickle.dumps({"x": value}, protocol=protocol)))


@pytest.mark.parametrize(
    "name",
    ["claimed 2 GB BINBYTES8", "claimed 2 GB BINUNICODE8", "claimed 2 GB BYTEARRAY8", "claimed 4 GB BINBYTES",
     "claimed huge FRAME", "bytes(10**10)", "bytearray(10**10)", "_reconstruct with a huge shape",
     "numpy.ndarray called directly (uninitialised memory)"],
)
def test_claimed_sizes_cost_no_memory(hostile: tuple[Path, dict[str, bytes]], name: str) -> None:
    # CPython's unpickler mallocs a claimed BINBYTES8/BYTEARRAY8 size before it finds the data
    # short, but never touches it: what must not grow is the memory actually used (peak RSS).
    _, bodies = hostile
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    started = time.perf_counter()
    with pytest.raises(BadRequest):
        restricted_loads(bodies[name])
    assert time.perf_counter() - started < 0.5
    grown_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
    assert grown_kib < 64 * 1024, f"{name}: peak RSS grew by {grown_kib} KiB"


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (Reduce(np.dtype, ("V8", False, True), (3, "|", None, None, None, 8, 1, 63)), "has flags 63"),
        (Reduce(np.dtype, ("f8", False, True), (3, "<", None, None, None, -1, -1, 1)), "has flags 1"),
        (Reduce(np.dtype, ("V8", False, True), (3, "|", None, ("a",), {"a": (np.dtype("f8"), 1)}, 8, 1, 16)),
         "outside its item"),
        (Reduce(np.dtype, ("V8", False, True), (3, "|", (np.dtype("f8"), (2,)), None, None, 8, 1, 16)),
         "does not fit"),
        (Reduce(np.dtype, ("U2", False, True), (3, "<", None, None, None, 7, 4, 8)), "does not fit"),
    ],
    ids=["void with object flags", "float with refcount flag", "field outside", "subarray too big",
         "odd unicode size"],
)
def test_dtypes_forged_by_setstate_are_refused_alone_and_in_arrays(value: Reduce, message: str) -> None:
    from numpy._core.multiarray import _reconstruct

    itemsize = 8
    array = Reduce(_reconstruct, (np.ndarray, (0,), b"b"), (1, (1,), value, False, b"A" * itemsize))
    for payload in ({"dtype": value}, {"array": array}):
        for old_numpy in (False, True):
            with pytest.raises(BadRequest, match=message):
                restricted_loads(dumps(payload, 2, old_numpy))


def test_a_non_dict_top_level_is_decoded_but_stays_data() -> None:
    # the dict check belongs to the server (400 for a non-dict); the unpickler returns plain data
    assert restricted_loads(pickle.dumps([1, "a"], protocol=2)) == [1, "a"]
    with pytest.raises(BadRequest):
        restricted_loads(PROTO2 + b"N")  # no STOP


@pytest.mark.timeout(60)
def test_payloads_are_live(tmp_path: Path) -> None:
    """Proof that the corpus is not a straw man: plain ``pickle.loads`` really runs each payload."""
    markers = {}
    for index, name in enumerate(code_payloads(tmp_path / "unused", tmp_path)):
        markers[name] = tmp_path / f"marker-{index}"
    script = f"""
import pickle, sys, time
from pathlib import Path
sys.path.insert(0, {str(Path(__file__).resolve().parents[2])!r})
from tests.hostile_pickles import code_payloads
names = {list(markers)!r}
for index, name in enumerate(names):
    marker = Path({str(tmp_path)!r}) / f"marker-{{index}}"
    body = code_payloads(marker, Path({str(tmp_path)!r}))[name]
    try:
        pickle.loads(body)
    except Exception as exc:  # the object arrays run the payload, then numpy complains
        print(name, "raised", type(exc).__name__, file=sys.stderr)
"""
    subprocess.run([sys.executable, "-c", script], check=True, cwd=tmp_path, timeout=50,
                   stdout=subprocess.DEVNULL)
    deadline = time.monotonic() + 5  # subprocess.Popen's child runs on its own
    while time.monotonic() < deadline and not all(path.exists() for path in markers.values()):
        time.sleep(0.05)
    missing = [name for name, path in markers.items() if not path.exists()]
    assert not missing, f"these payloads do not really run code: {missing}"

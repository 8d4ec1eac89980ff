"""The npz codec: what numpy.savez writes still decodes exactly; hostile archives (bombs, lying
headers and sizes, odd members) are a 400 or a 413 at once, before anything large is inflated."""

from __future__ import annotations

import time
import tracemalloc
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from plugins.codecs.npz import MAX_MEMBERS, NpzCodec
from studio_plugins import BadRequest, PayloadTooLarge, StudioError
from tests.npz_bodies import Member, npy, savez, zip_bytes

LIMIT = 1 << 20
codec = NpzCodec()

ARRAYS: dict[str, np.ndarray] = {
    "f8": np.arange(6.0).reshape(2, 3),
    "fortran": np.asfortranarray(np.arange(12, dtype=np.int16).reshape(3, 4)),
    "big_endian": np.arange(4, dtype=">i4"),
    "bool": np.array([True, False]),
    "u64": np.array([0, 2**64 - 1], np.uint64),
    "c16": np.array([1 + 2j]),
    "f2": np.array([0.5], np.float16),
    "strings": np.array(["a", "bcd"]),
    "bytes": np.array([b"x", b"yz"]),
    "dates": np.array(["2020-01-01", "NaT"], "M8[D]"),
    "delta": np.array([5], "m8[s]"),
    "scalar": np.array(7.5),
    "empty": np.empty((0, 3), np.float32),
    "huge_but_empty": np.empty((10**12, 0), np.uint8),
}


@pytest.mark.parametrize("compressed", [False, True])
def test_what_numpy_writes_round_trips_exactly(compressed: bool) -> None:
    decoded = codec.decode(savez(compressed, **ARRAYS), LIMIT)
    assert list(decoded) == list(ARRAYS)
    for name, expected in ARRAYS.items():
        got = decoded[name]
        assert got.dtype == expected.dtype and got.shape == expected.shape, name
        np.testing.assert_array_equal(got, expected)
        assert got.flags.writeable
    assert decoded["fortran"].flags.f_contiguous
    assert codec.decode(codec.encode({"y": np.arange(3)}), LIMIT)["y"].tolist() == [0, 1, 2]
    assert codec.decode(zip_bytes(), LIMIT) == {}


@contextmanager
def at_once(most_bytes: int = 4 << 20) -> Iterator[None]:
    """The block finishes within a second, allocating (Python and numpy) at most ``most_bytes``."""
    tracemalloc.start()
    started = time.perf_counter()
    try:
        yield
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    assert time.perf_counter() - started < 1.0
    assert peak < most_bytes, f"{peak} bytes allocated"


def refused(body: bytes, kind: type[StudioError] = BadRequest, limit: int = LIMIT) -> str:
    with at_once(), pytest.raises(kind) as caught:
        codec.decode(body, limit)
    return caught.value.message


def test_the_issues_bomb_is_refused_before_inflating() -> None:
    bomb = (Path(__file__).parents[1] / "corpus" / "npz_codec" / "issue13-bomb-200MB-of-zeros").read_bytes()
    assert len(bomb) < 200_000 and bomb.startswith(b"PK")  # savez_compressed of 200 MB of zeros
    assert "limit is 1048576" in refused(bomb, PayloadTooLarge)


def test_a_header_claiming_10_to_the_15_elements_is_a_413_not_a_memory_error() -> None:
    body = zip_bytes(Member("x.npy", npy("<f8", (10**15,), b"\x00" * 8)))
    assert "'x' holds 8000000000000000 bytes" in refused(body, PayloadTooLarge)


def test_the_limit_counts_every_member() -> None:
    half = np.zeros(LIMIT // 2 // 8 + 1)
    assert "'b' holds" in refused(savez(a=half, b=half), PayloadTooLarge)
    assert set(codec.decode(savez(a=half, b=half), 2 * LIMIT)) == {"a", "b"}


def test_sizes_that_lie_are_bad_requests() -> None:
    data = np.arange(100.0).tobytes()
    file = npy("<f8", (100,), data)
    # the headers declare less than the member holds, or more
    assert "declares 900 bytes" in refused(zip_bytes(Member("x.npy", file, declared=900)))
    assert "declares 2000 bytes" in refused(zip_bytes(Member("x.npy", file, declared=2000)))
    # the zip sizes agree with the npy header, but the data is short or long
    short = npy("<f8", (100,), data[:80])
    assert "ends before its 800 bytes" in refused(zip_bytes(Member("x.npy", short, declared=len(file))))
    deflated_long = Member("x.npy", file + b"\x00" * 5000, method=8, declared=len(file))
    assert "Bad CRC-32" in refused(zip_bytes(deflated_long))
    assert "Bad CRC-32" in refused(zip_bytes(Member("x.npy", file, crc=1)))
    # ZIP64: a member declaring 2**40 bytes
    assert "declares 1099511627776" in refused(
        zip_bytes(Member("x.npy", file, declared=2**40, zip64=True)), PayloadTooLarge
    )


@pytest.mark.parametrize(
    ("file", "message"),
    [
        (npy("|O", (1,), b"\x00" * 8), "'|O' is not accepted"),
        (npy("|V8", (1,), b"\x00" * 8), "'|V8' is not accepted"),
        (npy("<f8", (1,), header="{'descr': [('a', '<f8')], 'fortran_order': False, 'shape': (1,)}"),
         "structured dtypes are not accepted"),
        (npy("|S0", (1,)), "'|S0' is not accepted"),
        (npy("<U0", (3,)), "'<U0' is not accepted"),
        (npy("f8,i4", (1,)), "'f8,i4' is not a plain dtype"),
        (npy("<x9", (1,)), "'<x9' is not a plain dtype"),
        (npy(",i0", (1,)), "',i0' is not a plain dtype"),  # found by the fuzzer: numpy's SyntaxError
        (npy("(2?)f8", (1,)), "'(2?)f8' is not a plain dtype"),
        (npy("<f99", (1,)), "'<f99' is not a dtype"),
        (npy("<f8", (2**40, 2**40, 0)), "too large for numpy"),
        (npy("<f8", (-1,)), "shape must be a tuple"),
        (npy("<f8", (1,) * 33), "shape must be a tuple of at most 32"),
        (npy("<f8", (1,), header="{'descr': '<f8', 'shape': (1,)}"), "must be a dict of"),
        (npy("<f8", (1,), header="{'descr': '<f8', 'fortran_order': 1, 'shape': (1,)}"), "fortran_order"),
        (npy("<f8", (1,), header="[" * 2000 + "]" * 2000), "not a Python literal"),
        (npy("<f8", (1,), header="-" * 3000 + "1"), "not a Python literal"),
        (npy("<f8", (1,), header="__import__('os')"), "not a Python literal"),
        (npy("<f8", (1,), version=2, length=2**32 - 1), "claims 4294967295 bytes"),
        (npy("<f8", (1,), version=7), "unknown .npy format version 7.0"),
        (savez(inner=np.arange(3)), "not a .npy array"),  # a nested zip
        (b"\x93NUM", "ends inside its npy magic"),
    ],
)
def test_members_that_are_not_plain_arrays_are_bad_requests(file: bytes, message: str) -> None:
    assert message in refused(zip_bytes(Member("x.npy", file)))


def test_archive_oddities_are_bad_requests() -> None:
    file = npy("<i1", (1,), b"\x01")
    assert "names the array 'x' twice" in refused(zip_bytes(Member("x.npy", file), Member("x.npy", file)))
    assert "names the array 'x' twice" in refused(zip_bytes(Member("x.npy", file), Member("x", file)))
    assert "encrypted" in refused(zip_bytes(Member("x.npy", file, flags=1)))
    assert "compression 12 is not supported" in refused(zip_bytes(Member("x.npy", file, method=12)))
    many = zip_bytes(*(Member(f"a{i}.npy", file) for i in range(MAX_MEMBERS + 1)))
    assert f"at most {MAX_MEMBERS} arrays" in refused(many)
    assert "not a zip archive" in refused(b"PK\x03\x04" + b"\x00" * 100)
    assert "invalid npz body" in refused(zip_bytes(Member("x.npy", file))[:-30] + b"\x00" * 30)


def test_a_huge_directory_is_refused_before_zipfile_parses_it() -> None:
    """200,000 empty entries take zipfile seconds to parse: the end record says how large the
    directory is, and that is checked first."""
    entries = zip_bytes(*(Member(str(i), b"") for i in range(60_000)))
    with at_once(most_bytes=64 << 20):
        message = refused(entries)
    assert "zip directory is" in message


def test_names_follow_np_load() -> None:
    file = npy("<i1", (2,), b"\x01\x02")
    decoded: dict[str, Any] = codec.decode(zip_bytes(Member("a.npy", file), Member("b", file)), LIMIT)
    assert sorted(decoded) == ["a", "b"]


def test_any_name_echoes() -> None:
    """Names are not numpy.savez's keyword arguments: ``file`` once made the reply a 500."""
    names = ("file", "allow_pickle", "args", "a b/c", "é", "")
    body = zip_bytes(*(Member(f"{name}.npy", npy("<i1", (1,), b"\x07")) for name in names))
    decoded = codec.decode(codec.encode(codec.decode(body, LIMIT)), LIMIT)
    assert list(decoded) == list(names) and all(array.tolist() == [7] for array in decoded.values())

"""The JSON codec: legitimate bodies decode as before; depth and the arrays' decoded size are
bounded, each refusal a 400 or 413 naming the input, before numpy allocates anything large."""

from __future__ import annotations

import json
import time
import tracemalloc
from typing import Any

import numpy as np
import pytest

from plugins.codecs.json import MAX_DEPTH, JsonCodec
from studio_plugins import BadRequest, PayloadTooLarge, StudioError

LIMIT = 1 << 20
codec = JsonCodec()


def decode(value: Any, limit: int = LIMIT) -> Any:
    return codec.decode(json.dumps(value).encode(), limit)


def test_legitimate_bodies_decode_as_before() -> None:
    decoded = decode({
        "x": [[1, 2], [3, 4]], "f": [0.5, 1], "b": [True, False], "mixed": [True, 2],
        "s": "b", "ragged": [[1], [2, 3]], "strings": ["a", 1], "none": [1, None],
        "big": [2**70], "u64": [2**64 - 1, 0], "scalar": 3, "obj": {"k": [1, 2]},
        "empty": [], "empty_rows": [[], []],
    })
    assert decoded["x"].dtype == np.int64 and decoded["x"].shape == (2, 2)
    assert decoded["f"].tolist() == [0.5, 1.0] and decoded["b"].dtype == np.bool_
    assert decoded["mixed"].tolist() == [1, 2]
    # exact, where numpy alone made float64 of it (2**64 - 1 rounded): see the uint64 test below
    assert decoded["u64"].dtype == np.uint64 and decoded["u64"].tolist() == [2**64 - 1, 0]
    for kept in ("s", "ragged", "strings", "none", "big", "scalar", "obj", "empty"):
        assert not isinstance(decoded[kept], np.ndarray), kept
    assert decoded["empty_rows"].shape == (2, 0)
    nan = codec.decode(b'{"x": [NaN, Infinity]}', LIMIT)["x"]
    assert np.isnan(nan[0]) and np.isinf(nan[1])


def refused(body: bytes, kind: type[StudioError] = BadRequest, limit: int = LIMIT) -> str:
    tracemalloc.start()
    started = time.perf_counter()
    try:
        with pytest.raises(kind) as caught:
            codec.decode(body, limit)
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    assert time.perf_counter() - started < 2.0
    assert peak < 64 * len(body) + (1 << 20)  # what json.loads' objects take, nothing more
    return caught.value.message


@pytest.mark.parametrize("depth", [MAX_DEPTH + 1, 900, 5000, 100_000])
def test_nesting_is_bounded(depth: int) -> None:
    lists = b'{"a": ' + b"[" * depth + b"]" * depth + b"}"
    objects = b'{"a": ' + b'{"k": ' * depth + b"1" + b"}" * depth + b"}"
    for body in (lists, objects):
        message = refused(body)
        assert "invalid JSON" in message or f"'a' nests lists or objects more than {MAX_DEPTH}" in message
    ok = b'{"a": ' + b"[" * MAX_DEPTH + b"1" + b"]" * MAX_DEPTH + b"}"
    assert codec.decode(ok, LIMIT)["a"].ndim == MAX_DEPTH


def test_the_arrays_decoded_size_is_bounded_across_inputs() -> None:
    numbers = LIMIT // 8
    assert decode({"x": [0] * numbers})["x"].nbytes == LIMIT
    assert "'x': 131073 JSON values would decode to 1048584 bytes" in refused(
        json.dumps({"x": [0] * (numbers + 1)}).encode(), PayloadTooLarge
    )
    assert "'y'" in refused(json.dumps({"x": [0.5] * (numbers // 2), "y": [1] * (numbers // 2 + 1)})
                            .encode(), PayloadTooLarge)
    assert decode({"b": [True] * LIMIT})["b"].nbytes == LIMIT  # a boolean takes a byte


def test_a_long_string_among_numbers_is_kept_without_numpy_allocating_its_width() -> None:
    body = json.dumps({"x": ["x" * 1_000_000, *([1] * 100_000)]}).encode()
    tracemalloc.start()
    try:
        decoded = codec.decode(body, 1 << 40)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert isinstance(decoded["x"], list) and peak < 32 << 20


@pytest.mark.parametrize("small", ["0", "false"])
def test_integers_past_int64_keep_their_value_beside_small_ones(small: str) -> None:
    # numpy made float64 (rounded) of [2**64 - 450, 0] but uint64 of [2**64 - 450, false], so the
    # echo of the second changed type (found by the fuzzer: tests/corpus/json_codec)
    body = b'{"f": [18446744073709551166, %s]}' % small.encode()
    decoded = codec.decode(body, 1 << 20)["f"]
    assert decoded.dtype == np.uint64 and decoded.tolist() == [18446744073709551166, 0]
    echo = codec.decode(codec.encode({"f": decoded}), 1 << 20)["f"]
    assert echo.dtype == np.uint64 and echo.tolist() == decoded.tolist()
    assert codec.decode(b'{"f": [18446744073709551166, -1]}', 1 << 20)["f"].dtype == np.float64


def test_lists_beside_values_are_kept() -> None:
    """Found by the fuzzer: a list beside a number once made the shape walk take len() of 1180."""
    assert decode({"big": [1180, [2, 3]], "deeper": [[1, [2]], [3, 4]]}) == {
        "big": [1180, [2, 3]], "deeper": [[1, [2]], [3, 4]]
    }


def test_replies_are_strict_json_with_non_finite_values_as_null() -> None:
    torch = pytest.importorskip("torch")

    def refuse(constant: str) -> Any:
        raise ValueError(constant)

    nan, inf = float("nan"), float("inf")
    reply = codec.encode({
        "scalars": [np.float32(nan), np.float64(-inf), np.float16(1.5), nan], "tuple": (inf, 1),
        "set": {inf}, "tensor": torch.tensor([[nan, 2.0]]), "objects": np.array([nan, "a"], object),
        "deep": {"k": [[{"v": -inf}]]}, "ints": np.arange(2), "bytes": b"\xff",
    })
    assert json.loads(reply, parse_constant=refuse) == {
        "scalars": [None, None, 1.5, None], "tuple": [None, 1], "set": [None],
        "tensor": [[None, 2.0]], "objects": [None, "a"], "deep": {"k": [[{"v": None}]]},
        "ints": [0, 1], "bytes": {"b64": "/w=="},
    }


def test_an_unencodable_reply_still_raises() -> None:
    with pytest.raises(TypeError, match="complex"):
        codec.encode({"z": np.array([1j, np.nan])})
    circular: list[Any] = [float("nan")]
    circular.append(circular)
    with pytest.raises((ValueError, RecursionError)):
        codec.encode({"c": circular})


@pytest.mark.parametrize(("body", "kind"), [
    (b"[1, 2]", "an array"), (b"3.5", "a number"), (b'"x"', "a string"), (b"null", "null"),
    (b"true", "true or false"),
])
def test_a_body_that_is_not_an_object_says_what_it_is_and_what_to_send(body: bytes, kind: str) -> None:
    with pytest.raises(BadRequest) as caught:
        codec.decode(body, LIMIT)
    assert caught.value.message == f"the JSON body is {kind}; it must be an object of named inputs"
    assert caught.value.hint is not None and '{"x": [[1, 2, 3]]}' in caught.value.hint

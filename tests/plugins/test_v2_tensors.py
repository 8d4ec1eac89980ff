"""V2 tensors and messages without a server: every datatype in JSON and binary, the values that do
not fit, sizes that disagree with the body, and the response layout."""

from __future__ import annotations

import struct
import time
from typing import Any

import numpy as np
import orjson
import pytest

from plugins.protocols.v2_limits import Budget
from plugins.protocols.v2_messages import encode_response, header_length, parse_request
from plugins.protocols.v2_tensors import DTYPES, decode_binary, decode_json, encode
from studio_plugins import BadRequest, ModelError, PayloadTooLarge, StudioError

LIMIT = 1 << 20

EXTREMES: dict[str, list[Any]] = {
    "BOOL": [True, False, True, True],
    "UINT8": [0, 1, 254, 255],
    "UINT16": [0, 1, 65534, 65535],
    "UINT32": [0, 7, 2**32 - 2, 2**32 - 1],
    "UINT64": [0, 7, 2**64 - 2, 2**64 - 1],
    "INT8": [-128, -1, 0, 127],
    "INT16": [-(2**15), -1, 0, 2**15 - 1],
    "INT32": [-(2**31), -1, 0, 2**31 - 1],
    "INT64": [-(2**63), -1, 0, 2**63 - 1],
    "FP16": [-65504.0, 0.0999755859375, 6.103515625e-05, 65504.0],
    "FP32": [-3.4028234663852886e38, 0.10000000149011612, 1.401298464324817e-45, 3.4028234663852886e38],
    "FP64": [-1.7976931348623157e308, 0.1, 5e-324, 1.7976931348623157e308],
}


@pytest.mark.parametrize("datatype", sorted(EXTREMES))
def test_json_decodes_every_datatype_exactly_nested_or_flat(datatype: str) -> None:
    values = EXTREMES[datatype]
    expected = np.array(values, DTYPES[datatype]).reshape(2, 2)
    for data in (values, [values[:2], values[2:]]):
        array = decode_json("x", datatype, [2, 2], data)
        assert array.dtype == DTYPES[datatype] and array.shape == (2, 2)
        np.testing.assert_array_equal(array, expected)


@pytest.mark.parametrize("datatype", sorted(EXTREMES))
def test_binary_decodes_every_datatype_without_a_copy(datatype: str) -> None:
    expected = np.array(EXTREMES[datatype], DTYPES[datatype])
    body = b"HEADER" + expected.tobytes()
    view = memoryview(body)[6:]
    array = decode_binary("x", datatype, [4], view)
    np.testing.assert_array_equal(array, expected)
    assert array.dtype == DTYPES[datatype]
    assert np.shares_memory(array, np.frombuffer(body, np.uint8))  # a view of the body


@pytest.mark.parametrize("datatype", sorted(EXTREMES))
def test_encode_then_decode_round_trips(datatype: str) -> None:
    array = np.array(EXTREMES[datatype], DTYPES[datatype]).reshape(2, 2)
    tensor = encode("y", array)
    assert tensor.datatype == datatype and tensor.shape == [2, 2]
    json_data = orjson.loads(orjson.dumps(tensor.json_data(), option=orjson.OPT_SERIALIZE_NUMPY))
    np.testing.assert_array_equal(decode_json("y", datatype, [2, 2], json_data), array)
    binary = memoryview(tensor.binary_data())
    np.testing.assert_array_equal(decode_binary("y", datatype, [2, 2], binary), array)


def length_prefixed(*items: bytes) -> bytes:
    return b"".join(struct.pack("<I", len(item)) + item for item in items)


def test_bytes_become_nested_lists_of_bytes() -> None:
    assert decode_json("s", "BYTES", [2, 1], ["a", "é"]) == [[b"a"], ["é".encode()]]
    assert decode_json("s", "BYTES", [2], [["a"], ["b"]]) == [b"a", b"b"]  # nested is fine too
    assert decode_json("s", "BYTES", [], ["only"]) == b"only"
    raw = [b"", b"\x00\xff", b"abc\x00"]  # empty, not UTF-8, trailing NUL: all kept exactly
    assert decode_binary("s", "BYTES", [3], memoryview(length_prefixed(*raw))) == raw
    tensor = encode("s", [[b"x", "y"]])
    assert (tensor.datatype, tensor.shape, tensor.items) == ("BYTES", [1, 2], [b"x", b"y"])
    assert tensor.binary_data() == length_prefixed(b"x", b"y")
    assert encode("s", np.array(["a", "bc"])).items == [b"a", b"bc"]
    assert encode("s", [], hint="BYTES").shape == [0]
    assert encode("e", [], hint="INT8").datatype == "INT8"


@pytest.mark.parametrize(
    ("datatype", "shape", "data", "message"),
    [
        ("FP32", [3], [1.0, 2.0], "holds 3 elements but data has 2"),
        ("FP32", [1, 2], [[1.0, 2.0], [3.0, 4.0]], "holds 2 elements but data has 4"),
        ("FP8", [1], [1.0], "unknown datatype 'FP8'"),
        ("UINT8", [1], [300], "300 is out of range for UINT8"),
        ("UINT8", [1], [-1], "-1 is out of range for UINT8"),
        ("UINT64", [1], [-1], "out of range for UINT64"),
        ("INT64", [1], [2**63], "out of range for INT64"),
        ("INT64", [1], [9.3e18], "out of range for INT64"),
        ("INT8", [1], [128.0], "out of range for INT8"),
        ("INT32", [2], [1, 1.5], "1.5 is not a INT32 value"),
        ("INT32", [1], [True], "is not a INT32 value"),
        ("FP32", [2], [1.0, "x"], "is not a FP32 value"),
        ("FP32", [1], [1e39], "1e+39 is out of range for FP32"),
        ("FP16", [1], [70000], "70000 is out of range for FP16"),
        ("BOOL", [1], [1], "BOOL data must be true or false"),
        ("BYTES", [1], [1], "BYTES data must be strings"),
        ("FP32", [2], [[1.0], [2.0, 3.0]], "not a rectangular array"),
        ("FP32", [-1], [], "shape must be a list of non-negative integers"),
        ("FP32", "3", [1, 2, 3], "shape must be a list"),
    ],
)
def test_json_values_that_do_not_fit_are_bad_requests(
    datatype: str, shape: Any, data: Any, message: str
) -> None:
    with pytest.raises(BadRequest) as caught:
        decode_json("x", datatype, shape, data)
    assert message in caught.value.message and "'x'" in caught.value.message


def test_integral_floats_fit_integer_datatypes() -> None:
    np.testing.assert_array_equal(decode_json("x", "INT32", [2], [2.0, -3.0]), [2, -3])


@pytest.mark.parametrize(
    ("datatype", "shape", "body", "message"),
    [
        ("FP32", [2], b"\x00" * 7, "binary_data_size is 7 bytes but shape [2] of FP32 takes 8"),
        ("BOOL", [1], b"\x02", "BOOL bytes must be 0 or 1"),
        ("BYTES", [2], length_prefixed(b"a"), "cannot hold 2 BYTES elements"),
        ("BYTES", [2], length_prefixed(b"a") + b"\x00\x00\x00", "ends inside an element's length"),
        ("BYTES", [1], struct.pack("<I", 9) + b"abc", "runs past its data"),
        ("BYTES", [1], length_prefixed(b"a") + b"!", "its 1 BYTES elements take 5"),
    ],
)
def test_binary_sizes_that_disagree_are_bad_requests(
    datatype: str, shape: list[int], body: bytes, message: str
) -> None:
    with pytest.raises(BadRequest) as caught:
        decode_binary("x", datatype, shape, memoryview(body))
    assert message in caught.value.message


# --- messages -----------------------------------------------------------------------------------


def binary_request(header: dict[str, Any], *chunks: bytes) -> tuple[bytes, int]:
    head = orjson.dumps(header)
    return head + b"".join(chunks), len(head)


def test_parse_request_mixes_json_and_binary_inputs_in_order() -> None:
    a = np.arange(3, dtype="<i4")
    b = np.array([[0.5, 1.5]], "<f8")
    body, length = binary_request({
        "id": "req-7",
        "parameters": {"binary_data_output": True},
        "inputs": [
            {"name": "a", "shape": [3], "datatype": "INT32", "parameters": {"binary_data_size": 12}},
            {"name": "j", "shape": [1], "datatype": "UINT8", "data": [5]},
            {"name": "b", "shape": [1, 2], "datatype": "FP64", "parameters": {"binary_data_size": 16}},
        ],
        "outputs": [{"name": "b"}, {"name": "a", "parameters": {"binary_data": False}}],
    }, a.tobytes(), b.tobytes())
    request = parse_request(body, length, limit=LIMIT)
    assert list(request.inputs) == ["a", "j", "b"] and request.id == "req-7"
    np.testing.assert_array_equal(request.inputs["a"], a)
    np.testing.assert_array_equal(request.inputs["b"], b)
    assert request.inputs["j"].dtype == np.uint8
    assert [(o.name, o.binary) for o in request.outputs or ()] == [("b", True), ("a", False)]


@pytest.mark.parametrize(
    ("header", "tail", "length_delta", "message"),
    [
        ({"inputs": [{"name": "a", "shape": [2], "datatype": "FP32",
                      "parameters": {"binary_data_size": 8}}]}, b"\x00" * 4, 0, "declare 8 bytes"),
        ({"inputs": [{"name": "a", "shape": [1], "datatype": "FP32",
                      "parameters": {"binary_data_size": 4}}]}, b"\x00" * 9, 0, "the body has 9"),
        ({"inputs": [{"name": "a", "shape": [1], "datatype": "FP32",
                      "parameters": {"binary_data_size": 4}}]}, b"\x00" * 4, 100, "but the body has"),
        ({"inputs": [{"name": "a", "shape": [1], "datatype": "FP32",
                      "parameters": {"binary_data_size": -4}}]}, b"", 0, "non-negative integer"),
        ({"inputs": [{"name": "a", "shape": [1], "datatype": "FP32", "data": [1]}]}, b"xx", 0,
         "declare 0 bytes"),
    ],
)
def test_binary_sizes_that_disagree_with_the_body_are_bad_requests(
    header: dict[str, Any], tail: bytes, length_delta: int, message: str
) -> None:
    body, length = binary_request(header, tail)
    with pytest.raises(BadRequest) as caught:
        parse_request(body, length + length_delta, limit=LIMIT)
    assert message in caught.value.message


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"{not json", "invalid JSON"),
        (b"[1, 2]", "must be a JSON object"),
        (b"{}", "missing field 'inputs'"),
        (b'{"inputs": []}', "non-empty list"),
        (b'{"inputs": [{"shape": [1], "datatype": "FP32", "data": [1]}]}', "missing field 'name'"),
        (b'{"inputs": [{"name": "a", "datatype": "FP32", "data": [1]}]}', "missing field 'shape'"),
        (b'{"inputs": [{"name": "a", "shape": [1], "data": [1]}]}', "missing field 'datatype'"),
        (b'{"inputs": [{"name": "a", "shape": [1], "datatype": "FP32"}]}', "missing field 'data'"),
        (b'{"id": 5, "inputs": [{"name": "a", "shape": [1], "datatype": "FP32", "data": [1]}]}',
         "id must be a string"),
        (b'{"inputs": [{"name": "a", "shape": [1], "datatype": "FP32", "data": [1]},'
         b' {"name": "a", "shape": [1], "datatype": "FP32", "data": [1]}]}', "given twice"),
        # an output asked for N times was encoded N times: a reply N times the size of the result
        (b'{"inputs": [{"name": "a", "shape": [1], "datatype": "FP32", "data": [1]}],'
         b' "outputs": [{"name": "a"}, {"name": "a"}]}', "output 'a' is asked for twice"),
    ],
)
def test_malformed_requests_are_bad_requests(body: bytes, message: str) -> None:
    with pytest.raises(BadRequest) as caught:
        parse_request(body, limit=LIMIT)
    assert message in caught.value.message


def test_header_length_must_be_a_non_negative_number() -> None:
    assert header_length(None) is None and header_length(b"12") == 12
    for bad in (b"twelve", b"-1"):
        with pytest.raises(BadRequest):
            header_length(bad)


def test_binary_response_layout_and_output_selection() -> None:
    request = parse_request(orjson.dumps({
        "id": "r", "inputs": [{"name": "a", "shape": [1], "datatype": "FP32", "data": [1]}],
        "outputs": [{"name": "y", "parameters": {"binary_data": True}}, {"name": "s"}],
    }), limit=LIMIT)
    result = {"x": np.zeros(3), "y": np.array([[1, 2]], np.int16), "s": ["é"]}
    body, length = encode_response("m", "1", request, result)
    assert length is not None
    header = orjson.loads(body[:length])
    assert header["id"] == "r" and header["model_name"] == "m" and header["model_version"] == "1"
    assert [o["name"] for o in header["outputs"]] == ["y", "s"]  # x was not asked for
    y, s = header["outputs"]
    assert y == {"name": "y", "datatype": "INT16", "shape": [1, 2], "parameters": {"binary_data_size": 4}}
    assert s == {"name": "s", "datatype": "BYTES", "shape": [1], "data": ["é"]}
    assert body[length:] == np.array([1, 2], "<i2").tobytes()

    plain = orjson.dumps({"inputs": [{"name": "a", "shape": [1], "datatype": "FP32", "data": [1]}]})
    json_only, no_length = encode_response("m", "1", parse_request(plain, limit=LIMIT), {"x": np.ones(2)})
    assert no_length is None and orjson.loads(json_only)["outputs"][0]["data"] == [1.0, 1.0]

    with pytest.raises(BadRequest, match="no output 'y'"):
        encode_response("m", "1", request, {"s": ["a"]})


def test_outputs_json_cannot_carry() -> None:
    request = parse_request(orjson.dumps({"inputs": [{"name": "a", "shape": [1], "datatype": "FP32",
                                                      "data": [1]}]}), limit=LIMIT)
    with pytest.raises(BadRequest, match="not UTF-8"):
        encode_response("m", "1", request, {"s": [b"\xff"]})
    with pytest.raises(ModelError, match="is a dict"):
        encode_response("m", "1", request, {"d": {"inner": np.ones(1)}})
    with pytest.raises(ModelError, match="complex128"):
        encode_response("m", "1", request, {"c": np.ones(1, complex)})


# --- what a client may ask the server to build (issue 13) ------------------------------------


def refused(call: Any, *args: Any, kind: type[Exception] = BadRequest) -> str:
    """The message of the error ``call(*args)`` raises, which must come at once."""
    started = time.perf_counter()
    with pytest.raises(kind) as caught:
        call(*args)
    assert time.perf_counter() - started < 1.0
    assert isinstance(caught.value, StudioError)
    return caught.value.message


@pytest.mark.parametrize("decode", [decode_json, decode_binary])
def test_shapes_are_bounded_before_anything_is_multiplied_or_built(decode: Any) -> None:
    data: Any = [] if decode is decode_json else memoryview(b"")
    # the quadratic math.prod: thousands of 63-bit dims
    assert "at most 32" in refused(decode, "x", "FP32", [2**63 - 1] * 100_000, data)
    assert "at most 32" in refused(decode, "x", "FP32", [1] * 33, data)
    assert "below 2**63" in refused(decode, "x", "FP32", [2**63, 0], data)
    assert "below 2**63" in refused(decode, "x", "FP32", [1.0], data)
    # the 500: numpy cannot hold it even empty
    assert "more than 2**59 elements" in refused(decode, "x", "FP32", [2**40, 2**40, 0], data)
    assert "more than 2**59 elements" in refused(decode, "x", "BYTES", [2**40, 2**40, 0], data)
    # exactly 2**60 8-byte elements pass 2**63 - 1 bytes: numpy's ValueError was a 500 (found by
    # the fuzzer: tests/corpus/v2_struct/2-to-the-60-empty-fp64)
    assert "more than 2**59 elements" in refused(decode, "x", "FP64", [2**60, 0], data)
    assert decode("x", "FP64", [2**59, 0], data).shape == (2**59, 0)
    empty = decode("x", "FP32", [10**12, 0], data)  # zero-size: cheap
    assert empty.shape == (10**12, 0) and empty.dtype == np.float32


@pytest.mark.parametrize("decode", [decode_json, decode_binary])
def test_an_empty_bytes_tensor_builds_few_lists(decode: Any) -> None:
    data: Any = [] if decode is decode_json else memoryview(b"")
    # the hang: 10**12 empty lists from an 83-byte body
    assert "nested empty lists" in refused(decode, "s", "BYTES", [10**12, 0], data)
    assert "nested empty lists" in refused(decode, "s", "BYTES", [256, 256, 0, 5], data)
    assert decode("s", "BYTES", [3, 0], data) == [[], [], []]
    assert decode("s", "BYTES", [2, 2, 0], data) == [[[], []], [[], []]]
    assert decode("s", "BYTES", [0, 10**12], data) == []
    assert len(decode("s", "BYTES", [65535, 0], data)) == 65535


def test_json_data_is_bounded_in_depth_and_checked_before_numpy_sees_it() -> None:
    deep: Any = [1.0]
    for _ in range(40):
        deep = [deep]
    assert "nested more than 32 deep" in refused(decode_json, "x", "FP32", [1], deep)
    assert "nested more than 32 deep" in refused(decode_json, "x", "BYTES", [1], deep)
    # a long string among numbers: numpy would allocate its width for every element
    wide = ["x" * 1_000_000, *([1.0] * 100_000)]
    assert "is not a FP32 value" in refused(decode_json, "x", "FP32", [100_001], wide)
    assert "not a rectangular array" in refused(decode_json, "x", "FP32", [2], [1.0, [2.0]])
    # a datatype a client nested 1000 deep is named, not repr'd recursively
    nested: Any = "FP32"
    for _ in range(1000):
        nested = [nested]
    assert "unknown datatype a list of 1 items" in refused(decode_json, "x", nested, [1], [1.0])


def test_the_decoded_size_is_bounded_across_a_requests_inputs() -> None:
    decode_json("x", "FP64", [4], [1.0] * 4, Budget(32))
    assert "would decode to 40 bytes" in refused(
        decode_json, "x", "FP64", [5], [1.0] * 5, Budget(32), kind=PayloadTooLarge
    )
    # JSON numbers of a UINT8 tensor cost a byte each; a binary FP32 its 4
    budget = Budget(10)
    decode_json("a", "UINT8", [6], [1] * 6, budget)
    assert "'b' would decode to 8 bytes" in refused(
        decode_binary, "b", "FP32", [2], memoryview(b"\x00" * 8), budget, kind=PayloadTooLarge
    )
    assert "'s' would decode to 5 bytes" in refused(
        decode_json, "s", "BYTES", [1], ["hello"], Budget(4), kind=PayloadTooLarge
    )
    header = {"inputs": [
        {"name": "a", "shape": [1000], "datatype": "FP64", "data": [0.5] * 1000},
        {"name": "b", "shape": [1], "datatype": "FP64", "data": [0.5]},
    ]}
    parse_request(orjson.dumps(header), limit=8008)
    with pytest.raises(PayloadTooLarge, match="'b'"):
        parse_request(orjson.dumps(header), limit=8007)


def test_deeply_nested_request_json_is_a_bad_request() -> None:
    for depth in (500, 1000, 2000):  # orjson's own limit is 1024
        data = b"[" * depth + b"1.0" + b"]" * depth
        body = b'{"inputs": [{"name": "x", "shape": [1], "datatype": "FP32", "data": ' + data + b"}]}"
        started = time.perf_counter()
        with pytest.raises(BadRequest, match=r"nested more than 32 deep|depth limit"):
            parse_request(body, limit=LIMIT)
        assert time.perf_counter() - started < 1.0

"""Write the targets' seed corpora: small valid requests, so the fuzzer starts from real
structure (every datatype, nested and flat data, binary and BYTES inputs, npz as numpy writes
it, stored and deflated). Run from the repository root: ``PYTHONPATH=. python fuzz/seeds/make.py``."""

from __future__ import annotations

import io
import json
import struct
from pathlib import Path
from typing import Any

import numpy as np
import orjson

SEEDS = Path(__file__).resolve().parent


def write(target: str, name: str, data: bytes) -> None:
    folder = SEEDS / target
    folder.mkdir(exist_ok=True)
    (folder / name).write_bytes(data)


def tensor(name: str, datatype: str, shape: list[int], data: Any, **extra: Any) -> dict[str, Any]:
    return {"name": name, "datatype": datatype, "shape": shape, "data": data, **extra}


def v2_json() -> None:
    requests = {
        "fp32": {"inputs": [tensor("x", "FP32", [2, 2], [1.5, -2.0, 0.0, 3.25])]},
        "nested_int": {"id": "r1", "inputs": [tensor("x", "INT64", [2, 2], [[1, -2], [3, 2**62]])]},
        "every_type": {"inputs": [
            tensor("b", "BOOL", [2], [True, False]), tensor("u8", "UINT8", [1], [255]),
            tensor("u64", "UINT64", [1], [2**64 - 1]), tensor("i8", "INT8", [1], [-128]),
            tensor("f16", "FP16", [1], [0.5]), tensor("f64", "FP64", [1], [1e300]),
        ]},
        "bytes": {"inputs": [tensor("s", "BYTES", [2, 1], ["a", "é"]), tensor("t", "BYTES", [], "x")]},
        "empty": {"inputs": [tensor("e", "FP32", [0, 3], []), tensor("s", "BYTES", [2, 0], [[], []])]},
        "outputs": {"inputs": [tensor("x", "UINT16", [3], [1, 2, 3])],
                    "outputs": [{"name": "x", "parameters": {"binary_data": False}}],
                    "parameters": {"binary_data_output": False}},
    }
    for name, message in requests.items():
        write("v2_json", name, orjson.dumps(message))


def binary(header: dict[str, Any], *chunks: bytes) -> bytes:
    head = orjson.dumps(header)
    return struct.pack("<H", len(head)) + head + b"".join(chunks)


def v2_binary() -> None:
    x = np.arange(6, dtype="<f4")
    strings = b"".join(struct.pack("<I", len(s)) + s for s in (b"ab", b"", b"\xff"))
    write("v2_binary", "fp32", binary({"inputs": [
        {"name": "x", "datatype": "FP32", "shape": [2, 3], "parameters": {"binary_data_size": 24}}]},
        x.tobytes()))
    write("v2_binary", "mixed", binary({"parameters": {"binary_data_output": True}, "inputs": [
        {"name": "s", "datatype": "BYTES", "shape": [3], "parameters": {"binary_data_size": len(strings)}},
        {"name": "j", "datatype": "INT8", "shape": [1], "data": [5]},
        {"name": "b", "datatype": "BOOL", "shape": [2], "parameters": {"binary_data_size": 2}}]},
        strings, b"\x01\x00"))
    write("v2_binary", "empty", binary({"inputs": [
        {"name": "e", "datatype": "UINT64", "shape": [4, 0], "parameters": {"binary_data_size": 0}}]}))


def v2_grpc() -> None:
    """ModelInferRequests: every datatype raw, and typed; BYTES both ways; empty tensors."""
    from plugins.protocols.grpc import grpc_service_pb2 as pb

    raw = pb.ModelInferRequest(model_name="m", id="r1")
    typed = pb.ModelInferRequest(model_name="m")
    values = {"BOOL": np.array([True, False]), "UINT8": np.array([0, 255], "<u1"),
              "UINT16": np.array([1, 65535], "<u2"), "UINT32": np.array([2**32 - 1], "<u4"),
              "UINT64": np.array([2**64 - 1], "<u8"), "INT8": np.array([-128, 127], "<i1"),
              "INT16": np.array([-1], "<i2"), "INT32": np.array([-(2**31)], "<i4"),
              "INT64": np.array([2**62], "<i8"), "FP16": np.array([0.5], "<f2"),
              "FP32": np.array([1.5, -2.0], "<f4"), "FP64": np.array([1e300], "<f8")}
    fields = {"BOOL": "bool_contents", "INT8": "int_contents", "INT16": "int_contents",
              "INT32": "int_contents", "INT64": "int64_contents", "UINT8": "uint_contents",
              "UINT16": "uint_contents", "UINT32": "uint_contents", "UINT64": "uint64_contents",
              "FP32": "fp32_contents", "FP64": "fp64_contents"}
    for datatype, value in values.items():
        raw.inputs.add(name=datatype.lower(), datatype=datatype, shape=list(value.shape))
        raw.raw_input_contents.append(value.tobytes())
        if datatype in fields:
            tensor = typed.inputs.add(name=datatype.lower(), datatype=datatype, shape=list(value.shape))
            getattr(tensor.contents, fields[datatype]).extend(value.tolist())
    strings = [b"ab", b"", b"\xff"]
    raw.inputs.add(name="s", datatype="BYTES", shape=[3, 1])
    raw.raw_input_contents.append(b"".join(struct.pack("<I", len(s)) + s for s in strings))
    typed.inputs.add(name="s", datatype="BYTES", shape=[3]).contents.bytes_contents.extend(strings)
    typed.outputs.add(name="s")
    empty = pb.ModelInferRequest(model_name="m")
    empty.inputs.add(name="e", datatype="FP32", shape=[0, 3])
    empty.inputs.add(name="b", datatype="BYTES", shape=[2, 0])
    empty.raw_input_contents.extend([b"", b""])
    for name, request in (("raw", raw), ("typed", typed), ("empty", empty)):
        write("v2_grpc", name, request.SerializeToString())


def savez(compressed: bool, **arrays: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    writer: Any = np.savez_compressed if compressed else np.savez  # names as keyword arguments
    writer(buffer, **arrays)
    return buffer.getvalue()


def npz_codec() -> None:
    arrays = {
        "numbers": {"x": np.arange(6, dtype=np.float32).reshape(2, 3), "i": np.array([-1, 2], ">i8")},
        "kinds": {"b": np.array([True]), "s": np.array(["ab", "c"]), "y": np.array([b"z"]),
                  "t": np.array(["2020-01-01"], "M8[D]"), "c": np.array([1j], np.complex64)},
        "shapes": {"scalar": np.array(3.5), "empty": np.empty((0, 2)), "f": np.asfortranarray(np.eye(2))},
    }
    for name, contents in arrays.items():
        write("npz_codec", name, savez(False, **contents))
        write("npz_codec", name + "_compressed", savez(True, **contents))


def json_codec() -> None:
    bodies = {
        "arrays": {"x": [[1, 2], [3, 4]], "f": [0.5, -1e-300], "b": [True, False]},
        "values": {"s": "text", "n": None, "o": {"k": [1, "a"]}, "big": [2**70], "r": [[1], [2, 3]]},
        "empty": {"e": [], "rows": [[], []]},
    }
    for name, body in bodies.items():
        write("json_codec", name, json.dumps(body).encode())
    write("json_codec", "nan", b'{"x": [NaN, Infinity, -0.0]}')


def pickle_decoder() -> None:
    """Real pickles (protocols 0, 2, 4, 5, and numpy 1.x names) of every kind of value the
    decoder admits: numpy writes these layouts, so the fuzzer starts from them."""
    import pickle

    from bench.bench_codec import mixed_payload
    from tests.hostile_pickles import numpy1

    values = {
        "mixed": mixed_payload(np.random.default_rng(0)),
        "one_array": {"x": np.arange(6, dtype="f4").reshape(2, 3)},
        "structured": {"x": np.zeros(2, [("a", "<f8"), ("b", ">i2"), ("c", "U3", (2,))])},
        "scalars": {"s": [np.float16(1.5), np.int8(-3), np.str_("hé"), np.bytes_(b"a"), np.void(b"\x01"),
                          np.datetime64("2024-06-01", "s"), np.timedelta64(5, "ms"), 2 + 3j, {1, 2},
                          frozenset({"x"}), bytearray(b"ab"), None, True, -(10**30)]},
        "layouts": {"f": np.asfortranarray(np.arange(6.0).reshape(2, 3)), "z": np.zeros((0, 3)),
                    "d": np.array(5), "b": np.arange(4).astype(">i4")},
    }
    for name, value in values.items():
        for protocol in (0, 2, 4, 5):
            write("pickle_decoder", f"{name}-p{protocol}", pickle.dumps(value, protocol=protocol))
        write("pickle_decoder", f"{name}-numpy1", numpy1(pickle.dumps(value, protocol=2)))


if __name__ == "__main__":
    v2_json()
    v2_binary()
    v2_grpc()
    npz_codec()
    json_codec()
    pickle_decoder()

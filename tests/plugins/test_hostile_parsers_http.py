"""Issue 13's hostile V2, npz and JSON bodies through the built app, in process (ASGI): each is a
400 or 413 with a JSON error naming the input, answered within a second, and an ordinary
request is answered correctly afterwards. The parsers' own tests are test_v2_tensors.py,
test_npz_codec.py and test_json_codec.py."""

from __future__ import annotations

import json
import struct
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pytest

from tests import asgi
from tests.npz_bodies import Member, npy, savez, zip_bytes
from tests.web_app import toy_app

MAX_BODY = 1 << 20
NPZ = "application/x-npz"
JSON = "application/json"


@pytest.fixture(scope="module")
def app(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """The app serving experiment ``exp`` (the identity model) with ``--max-body 1 MiB``."""
    yield toy_app(tmp_path_factory.mktemp("studioml"), {"exp": None},
                  serve={"max_body": MAX_BODY, "metrics": False}, max_body=MAX_BODY, metrics=False)


def post(app: Any, path: str, body: bytes, content_type: str,
         headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    """One POST through the ASGI app: status, headers, body."""
    reply = asgi.call(app, "POST", path, {"Content-Type": content_type, **(headers or {})}, body)
    return reply.status, reply.headers, reply.body


def tensor(name: str, datatype: str, shape: list[int], data: Any) -> dict[str, Any]:
    return {"name": name, "datatype": datatype, "shape": shape, "data": data}


def binary_header(name: str, datatype: str, shape: list[int], size: int) -> dict[str, Any]:
    return {"inputs": [{"name": name, "datatype": datatype, "shape": shape,
                        "parameters": {"binary_data_size": size}}]}


V2 = "/v2/models/exp/infer"
BOMB = Path(__file__).parents[1] / "corpus" / "npz_codec" / "issue13-bomb-200MB-of-zeros"
"""The issue's: 195 KB of savez_compressed, inflating to 200 MB."""
HOSTILE: list[tuple[str, str, bytes, str, dict[str, str], int, str]] = [
    # (what, path, body, content type, headers, status, a fragment of the error)
    ("V2 BYTES [10**12, 0]", V2, orjson.dumps({"inputs": [tensor("s", "BYTES", [10**12, 0], [])]}),
     JSON, {}, 400, "nested empty lists"),
    ("V2 [2**40, 2**40, 0]", V2, orjson.dumps({"inputs": [tensor("x", "FP32", [2**40, 2**40, 0], [])]}),
     JSON, {}, 400, "more than 2**59 elements"),
    ("V2 40000 dims of 2**63-1", V2, orjson.dumps({"inputs": [tensor("x", "FP32", [2**63 - 1] * 40000, [])]}),
     JSON, {}, 400, "at most 32"),
    ("V2 data 1000 deep", V2, b'{"inputs":[{"name":"x","datatype":"BYTES","shape":[1],"data":'
     + b"[" * 1000 + b'"a"' + b"]" * 1000 + b"}]}", JSON, {}, 400, "nested more than 32 deep"),
    ("V2 JSON over the decoded limit", V2,
     orjson.dumps({"inputs": [tensor("x", "FP64", [MAX_BODY // 16], [0] * (MAX_BODY // 16)),
                              tensor("y", "FP64", [MAX_BODY // 16 + 1], [0] * (MAX_BODY // 16 + 1))]}),
     JSON, {}, 413, "input 'y' would decode"),
    ("V2 binary BYTES [10**12, 0]", V2, orjson.dumps(binary_header("s", "BYTES", [10**12, 0], 0)),
     "application/octet-stream",
     {"Inference-Header-Content-Length": str(len(orjson.dumps(binary_header("s", "BYTES", [10**12, 0], 0))))},
     400, "nested empty lists"),
    ("npz bomb", "/", BOMB.read_bytes(), NPZ, {}, 413, "limit is 1048576"),
    ("npz header of 10**15 elements", "/", zip_bytes(Member("x.npy", npy("<f8", (10**15,), b"\x00" * 8))),
     NPZ, {}, 413, "'x' holds 8000000000000000 bytes"),
    ("npz object dtype", "/", zip_bytes(Member("x.npy", npy("|O", (1,), b"\x00" * 8))), NPZ, {}, 400,
     "is not accepted"),
    ("JSON 900 deep", "/", b'{"a": ' + b"[" * 900 + b"]" * 900 + b"}", JSON, {}, 400, "'a' nests"),
    ("JSON past the decoded limit", "/", json.dumps({"x": [0] * (MAX_BODY // 8 + 1)}).encode(), JSON, {},
     413, "'x'"),
]


@pytest.mark.parametrize(("what", "path", "body", "content_type", "headers", "status", "fragment"),
                         HOSTILE, ids=[case[0] for case in HOSTILE])
def test_hostile_bodies_are_refused_at_once_and_the_server_answers_after(
    app: Any, what: str, path: str, body: bytes, content_type: str, headers: dict[str, str],
    status: int, fragment: str,
) -> None:
    assert len(body) <= MAX_BODY, what
    started = time.perf_counter()
    got, _, content = post(app, path, body, content_type, headers)
    assert time.perf_counter() - started < 1.0, what
    assert got == status, f"{what}: {got} {content[:300]!r}"
    error = json.loads(content)
    assert fragment in error["error"], f"{what}: {error}"
    assert error["type"] in ("BadRequest", "PayloadTooLarge")

    # and afterwards an ordinary request of each kind is answered exactly
    ok, _, reply = post(app, V2, orjson.dumps({"inputs": [tensor("x", "INT32", [2], [1, -2])]}), JSON)
    assert ok == 200 and orjson.loads(reply)["outputs"][0]["data"] == [1, -2]
    ok, _, reply = post(app, "/", savez(x=np.arange(3.0)), NPZ)
    assert ok == 200 and reply.startswith(b"PK")
    ok, _, reply = post(app, "/", b'{"x": [[1, 2]]}', JSON)
    assert ok == 200 and json.loads(reply) == {"x": [[1, 2]]}


def test_zero_size_tensors_echo_through_v2(app: Any) -> None:
    """A zero-size tensor is cheap to hold, whatever its other dims, and comes back as sent."""
    message = {"inputs": [tensor("e", "FP32", [10**12, 0], []), tensor("s", "BYTES", [3, 0], [])]}
    status, _, reply = post(app, V2, orjson.dumps(message), JSON)
    assert status == 200, reply
    outputs = {o["name"]: o for o in orjson.loads(reply)["outputs"]}
    assert outputs["e"]["shape"] == [10**12, 0] and outputs["e"]["data"] == []
    assert outputs["s"]["shape"] == [3, 0] and outputs["s"]["datatype"] == "BYTES"
    binary = struct.pack("<I", 2) + b"ab"
    header = orjson.dumps(binary_header("b", "BYTES", [1], len(binary)))
    status, _, reply = post(app, V2, header + binary, "application/octet-stream",
                            {"Inference-Header-Content-Length": str(len(header))})
    assert status == 200 and orjson.loads(reply)["outputs"][0]["data"] == ["ab"]

"""JSON as strict parsers see it, through the app in process (ASGI) serving the identity model:
replies holding NaN or infinities parse with ``parse_constant`` refused (JavaScript's
``JSON.parse``, Go and jq refuse ``NaN``), on ``POST /`` and V2; a top-level JSON array sent
without a Content-Type is recognised as JSON and answered with a JSON 400 that says what to send."""

from __future__ import annotations

import json
import pickle
import struct
from typing import Any

import numpy as np
import orjson
import pytest

from core.http.app import AppSettings, build_app
from core.http.codecs import CodecSet
from core.models.repository import ModelRepository
from studio_plugins.testing import make_host
from tests.core.test_failed_keys import call

NON_FINITE = [1.5, float("nan"), float("inf"), float("-inf")]


def strict(body: bytes) -> Any:
    """``json.loads`` as a strict parser reads: ``NaN``, ``Infinity`` and ``-Infinity`` refused."""
    def refuse(constant: str) -> Any:
        raise ValueError(f"not JSON: {constant}")

    return json.loads(body, parse_constant=refuse)


@pytest.fixture
def app(identity_repository: ModelRepository) -> Any:
    host = make_host()
    return build_app(identity_repository, AppSettings(codecs=CodecSet(host.codecs())), host.route_factories())


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_non_finite_floats_are_null_in_a_json_reply_to_post(app: Any, dtype: Any) -> None:
    request = {"x": np.array([NON_FINITE, NON_FINITE[::-1]], dtype), "s": float("nan"),
               "nested": [1.0, float("inf")], "text": "NaN"}
    status, _, body = call(app, "POST", "/", pickle.dumps(request),
                           {"Content-Type": "application/python-pickle", "Accept": "application/json"})
    assert status == 200, body
    assert strict(body) == {"x": [[1.5, None, None, None], [None, None, None, 1.5]], "s": None,
                            "nested": [1.0, None], "text": "NaN"}


def test_a_json_request_with_nan_is_answered_in_strict_json(app: Any) -> None:
    # Python's json reads NaN (the codec takes it, as before); the reply is strict all the same
    status, _, body = call(app, "POST", "/", b'{"x": [NaN, 2.0, -Infinity]}',
                           {"Content-Type": "application/json"})
    assert status == 200 and strict(body) == {"x": [None, 2.0, None]}


def test_finite_replies_are_written_as_before(app: Any) -> None:
    request = {"x": np.array([0.1, 2.5], np.float32), "i": np.arange(3), "b": b"hi"}
    status, _, body = call(app, "POST", "/", pickle.dumps(request),
                           {"Content-Type": "application/python-pickle", "Accept": "application/json"})
    assert status == 200
    assert body == json.dumps({"x": [float(np.float32(0.1)), 2.5], "i": [0, 1, 2], "b": "hi"}).encode()


@pytest.mark.parametrize("datatype", ["FP32", "FP64"])
def test_non_finite_floats_are_null_in_a_v2_json_reply(app: Any, datatype: str) -> None:
    # V2 JSON cannot carry NaN in a request: it comes in binary, and goes out as JSON
    data = struct.pack(f"<4{'f' if datatype == 'FP32' else 'd'}", *NON_FINITE)
    header = orjson.dumps({"inputs": [{"name": "x", "datatype": datatype, "shape": [4],
                                       "parameters": {"binary_data_size": len(data)}}]})
    status, _, body = call(app, "POST", "/v2/models/exp/infer", header + data, {
        "Content-Type": "application/octet-stream", "Inference-Header-Content-Length": str(len(header))})
    assert status == 200, body
    [output] = strict(body)["outputs"]
    assert output["datatype"] == datatype and output["data"] == [1.5, None, None, None]


@pytest.mark.parametrize("content_type", [None, "application/x-www-form-urlencoded", "application/json"])
@pytest.mark.parametrize("body", [b"[[1, 2, 3]]", b'\n  [{"x": [1]}]', b"\xef\xbb\xbf[1]"])
def test_a_top_level_array_is_json_and_a_clear_400(app: Any, content_type: str | None, body: bytes) -> None:
    headers = {"Content-Type": content_type} if content_type else {}
    status, reply_headers, reply = call(app, "POST", "/", body, headers)
    assert status == 400 and reply_headers["content-type"] == "application/json"
    error = strict(reply)
    assert error["type"] == "BadRequest"
    assert error["error"] == "the JSON body is an array; it must be an object of named inputs"
    assert '{"x": [[1, 2, 3]]}' in error["hint"]
    # the same body as an object is answered
    status, _, reply = call(app, "POST", "/", b'{"x": [[1, 2, 3]]}', headers)
    assert status == 200 and strict(reply) == {"x": [[1, 2, 3]]}

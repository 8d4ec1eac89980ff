"""Which ``None`` is a failure: a ``ModelPipe`` served in process (ASGI) answers its failed keys
as ``None`` and names them in ``X-Studio-Failed-Keys`` (percent-encoded, bounded) with
``X-Studio-Failed-Count``, in every format: pickle and JSON keep the ``None``, npz and V2 (which
cannot carry one) leave the key out. The metrics count them. The real client reads the headers
in tests/cli/test_wrapper.py and tests/cli/test_seed_pipeline.py."""

from __future__ import annotations

import io
import json
import pickle
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import numpy as np
import orjson
import pytest

from core.http.failed_keys import MAX_KEYS_BYTES, failed_headers, parse_failed
from core.wire.safe_pickle import restricted_loads
from tests import asgi
from tests.web_app import toy_app

# Each item's value says what the pipe does with it: a stage raises for "raise" and answers
# None for "none"; anything else passes through.
WRAPPER = '''
from studio_plugins.model_util import ModelPipe


def behave(value):
    marker = value[0] if isinstance(value, list) and value else value  # V2 BYTES: [b"raise"]
    if isinstance(marker, bytes):
        marker = marker.decode()
    if not isinstance(marker, str):
        return value
    if marker == "raise":
        raise ValueError("asked to fail")
    return None if marker == "none" else value


def create_model(modeldir):
    return ModelPipe().add(behave, num_workers=2)
'''
HOSTILE_KEY = "a, b\r\nX-Injected: 1 %2C ünï"
PICKLE = "application/python-pickle"


@pytest.fixture(scope="module")
def app(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """One app serving ``pipe`` (the wrapper above) as its default model."""
    home: Path = tmp_path_factory.mktemp("studioml")
    wrapper = home / "behaviour_pipe.py"
    wrapper.write_text(WRAPPER)
    yield toy_app(home, {"pipe": None}, serve={"wrapper": str(wrapper)})


def call(app: Any, method: str, path: str, body: bytes = b"",
         headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    reply = asgi.call(app, method, path, headers, body)
    return reply.status, reply.headers, reply.body


def named(headers: dict[str, str]) -> tuple[tuple[str, ...], int]:
    return parse_failed(headers.get("x-studio-failed-keys"), headers.get("x-studio-failed-count"))


REQUEST = {"ok": np.arange(3.0), HOSTILE_KEY: "raise", "quiet": "none", "late": "raise"}


# --- the headers ------------------------------------------------------------------------------


def test_keys_round_trip_whatever_their_text() -> None:
    keys = [HOSTILE_KEY, "", ",", "%", "日本語", "a b", "x" * 100]
    headers = dict(failed_headers(keys))
    assert headers[b"x-studio-failed-count"] == b"7"
    assert headers[b"x-studio-failed-keys"].isascii()
    assert parse_failed(headers[b"x-studio-failed-keys"].decode(), "7") == (tuple(keys), 7)
    assert failed_headers([]) == []


def test_the_keys_header_is_bounded_and_the_count_says_how_many_failed() -> None:
    keys = [f"image-{index:05d}" for index in range(2000)]
    headers = dict(failed_headers(keys))
    value = headers[b"x-studio-failed-keys"]
    assert len(value) <= MAX_KEYS_BYTES
    listed, count = parse_failed(value.decode(), headers[b"x-studio-failed-count"].decode())
    assert count == 2000 and 0 < len(listed) < 2000 and listed == tuple(keys[: len(listed)])
    # not even the first key fits: the count alone
    assert failed_headers(["k" * (MAX_KEYS_BYTES + 1)]) == [(b"x-studio-failed-count", b"1")]


def test_a_client_reads_what_a_hostile_server_sends_without_trusting_it() -> None:
    assert parse_failed("a,b", "1") == (("a", "b"), 2)  # never fewer than listed
    assert parse_failed(None, "9" * 5000) == ((), 0)  # past int()'s digit limit
    assert parse_failed("%ZZ,%FF", "-3") == (("%ZZ", "\ufffd"), 2)


# --- through the app --------------------------------------------------------------------------


def test_a_pickle_reply_keeps_the_nones_and_names_the_failed_keys(app: Any) -> None:
    status, headers, body = call(app, "POST", "/", pickle.dumps(REQUEST), {"Content-Type": PICKLE})
    assert status == 200, body
    result = restricted_loads(body)
    assert type(result) is dict and list(result) == list(REQUEST)
    assert result[HOSTILE_KEY] is None and result["quiet"] is None and result["late"] is None
    np.testing.assert_array_equal(result["ok"], REQUEST["ok"])
    assert named(headers) == ((HOSTILE_KEY, "late"), 2)
    assert headers["x-studio-failed-keys"] == f"{quote(HOSTILE_KEY, safe='')},late"


def test_a_reply_with_no_failure_has_no_failure_headers(app: Any) -> None:
    status, headers, body = call(app, "POST", "/", pickle.dumps({"quiet": "none", "x": np.ones(2)}),
                                 {"Content-Type": PICKLE})
    assert status == 200 and restricted_loads(body)["quiet"] is None
    assert "x-studio-failed-keys" not in headers and "x-studio-failed-count" not in headers


def test_a_json_reply_writes_null_and_names_the_failed_keys(app: Any) -> None:
    body = json.dumps({"ok": [1, 2], "bad": "raise", "quiet": "none"}).encode()
    status, headers, reply = call(app, "POST", "/", body, {"Content-Type": "application/json"})
    assert status == 200
    assert json.loads(reply) == {"ok": [1, 2], "bad": None, "quiet": None}
    assert named(headers) == (("bad",), 1)


def test_an_npz_reply_leaves_the_failed_keys_out(app: Any) -> None:
    status, headers, reply = call(app, "POST", "/", pickle.dumps({"ok": np.arange(3), "bad": "raise"}),
                                  {"Content-Type": PICKLE, "Accept": "application/x-npz"})
    assert status == 200, reply
    with np.load(io.BytesIO(reply), allow_pickle=False) as archive:
        assert archive.files == ["ok"] and archive["ok"].tolist() == [0, 1, 2]
    assert named(headers) == (("bad",), 1)


@pytest.mark.parametrize("binary", [False, True])
def test_a_v2_reply_leaves_the_failed_outputs_out_and_names_them(app: Any, binary: bool) -> None:
    request = {"inputs": [
        {"name": "x", "datatype": "FP32", "shape": [2], "data": [1.5, 2.5]},
        {"name": "bad", "datatype": "BYTES", "shape": [1], "data": ["raise"]},
    ], "parameters": {"binary_data_output": binary}}
    status, headers, reply = call(app, "POST", "/v2/models/pipe/infer", orjson.dumps(request),
                                  {"Content-Type": "application/json"})
    assert status == 200, reply
    length = int(headers.get("inference-header-content-length", len(reply)))
    outputs = orjson.loads(reply[:length])["outputs"]
    assert [output["name"] for output in outputs] == ["x"]
    assert named(headers) == (("bad",), 1)
    # asked for by name, it is left out all the same (it is not a 400: the request was right)
    request["outputs"] = [{"name": "bad"}, {"name": "x"}]
    status, headers, reply = call(app, "POST", "/v2/models/pipe/infer", orjson.dumps(request),
                                  {"Content-Type": "application/json"})
    assert status == 200, reply
    length = int(headers.get("inference-header-content-length", len(reply)))
    assert [output["name"] for output in orjson.loads(reply[:length])["outputs"]] == ["x"]


def test_the_metrics_count_the_failed_items(app: Any) -> None:
    def counted() -> float:
        text = call(app, "GET", "/metrics")[2].decode()
        series = 'studio_failed_items_total{model="pipe"}'
        lines = [line for line in text.splitlines() if line.startswith(series)]
        return float(lines[0].split()[-1]) if lines else 0.0

    before = counted()
    call(app, "POST", "/", pickle.dumps(REQUEST), {"Content-Type": PICKLE})  # 2 failed, 1 None
    call(app, "POST", "/", pickle.dumps({"quiet": "none"}), {"Content-Type": PICKLE})  # 0 failed
    assert counted() == before + 2

"""Choosing the codec: Content-Type first, sniffing for generic types, Accept for the reply."""

from __future__ import annotations

import json
import pickle

import numpy as np
import pytest

from core.errors import BadRequest, UnsupportedMediaType
from core.http.codecs import CodecSet
from studio_plugins.testing import make_host


@pytest.fixture
def codecs() -> CodecSet:
    return CodecSet(make_host().codecs())


def npz_body() -> bytes:
    import io

    buffer = io.BytesIO()
    np.savez(buffer, x=np.arange(3))
    return buffer.getvalue()


@pytest.mark.parametrize("content_type", ["", "application/octet-stream"])
@pytest.mark.parametrize(
    ("body", "name"),
    [
        (pickle.dumps({"a": 1}, protocol=2), "pickle"),
        (pickle.dumps({"a": 1}, protocol=5), "pickle"),
        (b'  {"a": 1}', "json"),
        (b"\n[[1, 2]]", "json"),  # an array: the codec answers what it means (a 400)
        (b'\xef\xbb\xbf{"a": 1}', "json"),  # a byte-order mark, as some Windows tools write
        (npz_body(), "npz"),
    ],
)
def test_generic_content_type_sniffs_the_body(
    codecs: CodecSet, content_type: str, body: bytes, name: str
) -> None:
    assert codecs.for_request(content_type, body).name == name


def test_content_type_wins_and_parameters_are_ignored(codecs: CodecSet) -> None:
    assert codecs.for_request("application/json; charset=utf-8", b"\x80\x05").name == "json"
    assert codecs.for_request("Application/Python-Pickle", b"{").name == "pickle"


def test_unknown_content_type_is_415(codecs: CodecSet) -> None:
    with pytest.raises(UnsupportedMediaType, match="text/csv"):
        codecs.for_request("text/csv", b"a,b")


def test_unsniffable_body_is_415_and_empty_is_400(codecs: CodecSet) -> None:
    with pytest.raises(UnsupportedMediaType):
        codecs.for_request("", b"hello")
    with pytest.raises(UnsupportedMediaType):  # JSON scalars look like text: no format of ours
        codecs.for_request("", b"42")
    with pytest.raises(BadRequest):
        codecs.for_request("", b"")


def test_reply_follows_accept_else_the_request(codecs: CodecSet) -> None:
    pickle_codec = codecs.for_request("application/python-pickle", b"")
    assert codecs.for_reply("", pickle_codec) is pickle_codec
    assert codecs.for_reply("*/*", pickle_codec) is pickle_codec
    assert codecs.for_reply("application/json", pickle_codec).name == "json"
    assert codecs.for_reply("text/html, application/x-npz;q=0.9", pickle_codec).name == "npz"
    assert codecs.for_reply("text/html", pickle_codec) is pickle_codec


def test_json_numeric_lists_become_arrays_and_strings_stay(codecs: CodecSet) -> None:
    codec = codecs.codecs[[c.name for c in codecs.codecs].index("json")]
    decoded = codec.decode(b'{"x": [[1, 2], [3, 4]], "s": "b", "ragged": [[1], [2, 3]]}', 1 << 20)
    assert isinstance(decoded["x"], np.ndarray) and decoded["x"].shape == (2, 2)
    assert decoded["s"] == "b" and decoded["ragged"] == [[1], [2, 3]]
    encoded = json.loads(codec.encode({"y": np.float32(1.5), "z": np.arange(2), "b": b"hi"}))
    assert encoded == {"y": 1.5, "z": [0, 1], "b": "hi"}
    with pytest.raises(BadRequest):
        codec.decode(b"[1, 2]", 1 << 20)

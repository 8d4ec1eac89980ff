"""Hostile and malformed bodies against a real `studio-plug serve`: every one is a clean 4xx, nothing
the client sent runs, and the next ordinary request is answered correctly.

One server (identity model) is shared by the whole module; the corpus is ``tests/hostile_pickles.py``.
"""

from __future__ import annotations

import http.client
import io
import json
import os
import pickle
import socket
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from urllib.parse import urlparse

import numpy as np
import pytest

from studio_plugins.client import predict
from studio_plugins.testing import ServerProcess
from tests.hostile_pickles import Reduce, corpus

MAX_BODY = 4 * 2**20
PICKLE = "application/python-pickle"
CONTENT_TYPES = (PICKLE, "application/octet-stream", None)


class Running:
    def __init__(self, server: ServerProcess, marker: Path, workdir: Path) -> None:
        self.server, self.marker, self.workdir = server, marker, workdir
        parsed = urlparse(server.url)
        self.host, self.port = parsed.hostname or "127.0.0.1", parsed.port or 80


@pytest.fixture(scope="module")
def running(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Running]:
    """The server on an empty experiment ``exp`` (identity model) of a fresh embedded store."""
    home = tmp_path_factory.mktemp("studioml")
    (home / "experiments" / "exp" / "modeldir").mkdir(parents=True)
    workdir = tmp_path_factory.mktemp("hostile")
    server = ServerProcess("exp", "--max-body", str(MAX_BODY), env={"STUDIOML_HOME": str(home)})
    for variable in ("STUDIO_STORE", "STUDIO_TOKEN", "STUDIO_PLUGINS_DISABLE", "STUDIO_PLUGINS_LOAD"):
        server.env.pop(variable, None)
    with server:
        yield Running(server, workdir / "pwned", workdir)


def post(running: Running, body: bytes, content_type: str | None,
         headers: dict[str, str] | None = None) -> tuple[int, bytes]:
    """POST with exactly the headers given (urllib would add a form Content-Type of its own)."""
    connection = http.client.HTTPConnection(running.host, running.port, timeout=30)
    try:
        all_headers = dict(headers or {})
        if content_type is not None:
            all_headers["Content-Type"] = content_type
        connection.request("POST", "/", body=body, headers=all_headers)
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


def assert_clean_error(status: int, body: bytes, allowed: tuple[int, ...], what: str) -> dict[str, str]:
    assert status in allowed, f"{what}: {status} {body[:300]!r}"
    content = json.loads(body)
    assert isinstance(content, dict) and {"error", "type"} <= set(content), f"{what}: {content}"
    assert "Traceback" not in body.decode() and 'File "' not in body.decode(), f"{what}: {content}"
    return content


def assert_still_serving(running: Running) -> None:
    x = np.arange(12, dtype=np.float32).reshape(3, 4)
    result = predict(running.server.url, {"x": x, "s": "ok"}, timeout=30)
    np.testing.assert_array_equal(result["x"], x)
    assert result["x"].dtype == np.float32 and result["s"] == "ok"
    assert running.server.process is not None and running.server.process.poll() is None


@pytest.mark.timeout(120)
@pytest.mark.parametrize("content_type", CONTENT_TYPES, ids=["python-pickle", "octet-stream", "none"])
def test_hostile_pickles_are_refused_and_nothing_runs(running: Running, content_type: str | None) -> None:
    bodies = corpus(running.marker, running.workdir)
    for name, body in bodies.items():
        status, reply = post(running, body, content_type)
        # a declared pickle is always decoded, so always a 400; otherwise an unrecognisable body
        # (random bytes, an empty one, protocol 0) may be a 415 instead
        allowed = (400,) if content_type == PICKLE else (400, 415)
        assert_clean_error(status, reply, allowed, name)
        assert not running.marker.exists(), f"{name} ran code on the server"
        assert_still_serving(running)
    time.sleep(0.3)  # a process spawned by a payload would have touched the marker by now
    assert not running.marker.exists()
    assert not any("Traceback" in line for line in running.server.stderr_lines), running.server.output()


def test_refusals_say_what_was_refused(running: Running) -> None:
    bodies = corpus(running.marker, running.workdir)
    status, reply = post(running, bodies["os.system"], PICKLE)
    content = assert_clean_error(status, reply, (400,), "os.system")
    assert content["type"] == "BadRequest" and "os.system is not allowed" in content["error"]
    status, reply = post(running, bodies["object-dtype array (protocol 5)"], PICKLE)
    assert "object-dtype" in assert_clean_error(status, reply, (400,), "object array")["error"]


def raw_request(running: Running, head: bytes, chunks: Iterable[bytes] = ()) -> tuple[int, bytes]:
    """Send ``head`` then ``chunks`` on a raw socket and read the reply, which may come (and the
    server may close) before every chunk was sent."""
    with socket.create_connection((running.host, running.port), timeout=30) as sock:
        sock.sendall(head)
        try:
            for chunk in chunks:
                sock.sendall(chunk)
        except (BrokenPipeError, ConnectionResetError):
            pass
        response = http.client.HTTPResponse(sock)
        response.begin()
        return response.status, response.read()


def test_body_over_max_body_with_content_length_is_413_before_it_is_sent(running: Running) -> None:
    # the declared length is refused at once: the client need not send (nor the server read) it
    head = (b"POST / HTTP/1.1\r\nHost: test\r\nContent-Type: application/python-pickle\r\n"
            b"Content-Length: %d\r\nConnection: close\r\n\r\n" % (MAX_BODY + 1))
    status, reply = raw_request(running, head)
    content = assert_clean_error(status, reply, (413,), "Content-Length over the limit")
    assert content["type"] == "PayloadTooLarge"
    assert_still_serving(running)


def test_chunked_body_over_max_body_is_413(running: Running) -> None:
    chunk = b"\x00" * 65536
    head = (b"POST / HTTP/1.1\r\nHost: test\r\nContent-Type: application/python-pickle\r\n"
            b"Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n")
    # one chunk more than the limit: the server has read (nearly) all of it when it answers
    body = (b"%x\r\n%s\r\n" % (len(chunk), chunk) for _ in range(MAX_BODY // len(chunk) + 1))
    status, reply = raw_request(running, head, [*body, b"0\r\n\r\n"])
    content = assert_clean_error(status, reply, (413,), "chunked body over the limit")
    assert content["type"] == "PayloadTooLarge"
    assert_still_serving(running)


def test_body_at_the_limit_is_served(running: Running) -> None:
    x = np.arange((MAX_BODY - 4096) // 8, dtype=np.float64)
    np.testing.assert_array_equal(predict(running.server.url, {"x": x}, timeout=30)["x"], x)


def test_unknown_content_type_is_415(running: Running) -> None:
    body = pickle.dumps({"x": np.arange(3)}, protocol=5)
    for content_type in ("text/plain", "application/x-yaml", "image/png"):
        status, reply = post(running, body, content_type)
        content = assert_clean_error(status, reply, (415,), content_type)
        assert content["type"] == "UnsupportedMediaType"
    assert_still_serving(running)


@pytest.mark.parametrize(
    ("body", "content_type"),
    [
        (pickle.dumps([np.arange(3)], protocol=5), PICKLE),
        (pickle.dumps(np.arange(3), protocol=2), PICKLE),
        (pickle.dumps({1: np.arange(3)}, protocol=5), PICKLE),
        (pickle.dumps("a string", protocol=4), None),
        (b'{"a": [1, 2', "application/json"),
        (b"{'a': 1}", "application/json"),
        (b"[1, 2, 3]", "application/json"),
        (b"\xff\xfe{}", "application/json"),
        (b"", PICKLE),
        (b"", None),
    ],
    ids=["pickled list", "pickled array", "non-str keys", "pickled str", "truncated JSON",
         "single quotes", "JSON array", "bad UTF-8", "empty pickle", "empty untyped"],
)
def test_non_dict_and_invalid_bodies_are_400(running: Running, body: bytes, content_type: str | None) -> None:
    status, reply = post(running, body, content_type)
    assert assert_clean_error(status, reply, (400,), repr(body[:30]))["type"] == "BadRequest"
    assert_still_serving(running)


def test_npz_with_pickled_objects_is_refused_and_runs_nothing(running: Running) -> None:
    buffer = io.BytesIO()
    touch = f"touch {running.marker}"
    np.savez(buffer, x=np.array([Reduce(os.system, (touch,)), 1], dtype=object))
    body = buffer.getvalue()
    assert b"system" in body  # the archive really carries the payload
    for content_type in ("application/x-npz", "application/octet-stream", None):
        status, reply = post(running, body, content_type)
        assert_clean_error(status, reply, (400,), f"npz with objects as {content_type}")
    time.sleep(0.2)
    assert not running.marker.exists()
    assert_still_serving(running)

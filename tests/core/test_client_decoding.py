"""The Python client reads replies with the server's data-only decoder: a hostile server cannot run
code in it, hang it or bloat it (issue 13). The server here is a plain ``http.server`` on
127.0.0.1 that answers every POST with the body the test chose."""

from __future__ import annotations

import http.server
import pickle
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from studio_plugins.client import PredictionError, predict
from tests.core.test_pickle_decoder import many_views, memo_dag
from tests.hostile_pickles import Reduce


class HostileServer:
    def __init__(self) -> None:
        self.reply = b""
        self.delay = 0.0
        self.authorization: list[str | None] = []
        self.redirect: tuple[int, str] | None = None  # answer POSTs with this status and Location
        self.gets: list[str | None] = []  # the Authorization of each GET
        owner = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                self.rfile.read(int(self.headers["Content-Length"]))
                owner.authorization.append(self.headers.get("Authorization"))
                if owner.redirect is not None:
                    self.send_response(owner.redirect[0])
                    self.send_header("Location", owner.redirect[1])
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                time.sleep(owner.delay)
                self.send_response(200)
                self.send_header("Content-Type", "application/python-pickle")
                self.send_header("Content-Length", str(len(owner.reply)))
                self.end_headers()
                self.wfile.write(owner.reply)

            def do_GET(self) -> None:
                owner.gets.append(self.headers.get("Authorization"))
                self.send_response(405)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()


@pytest.fixture(scope="module")
def server() -> Iterator[HostileServer]:
    hostile = HostileServer()
    yield hostile
    hostile.httpd.shutdown()


def test_a_plain_reply_is_read(server: HostileServer) -> None:
    server.reply = pickle.dumps({"y": np.arange(3.0), "note": "ok"}, protocol=4)
    reply = predict(server.url, {"x": np.zeros(1)}, timeout=10)
    assert reply["y"].tolist() == [0.0, 1.0, 2.0] and reply["note"] == "ok"


def test_a_reply_that_would_run_code_is_refused(server: HostileServer, tmp_path: Path) -> None:
    import os

    marker = tmp_path / "pwned"
    server.reply = pickle.dumps({"y": Reduce(os.system, (f"touch {marker}",))}, protocol=2)
    with pytest.raises(PredictionError, match=r"not plain data.*posix.system is not allowed"):
        predict(server.url, {"x": np.zeros(1)}, timeout=10)
    assert not marker.exists()


@pytest.mark.parametrize("reply", [memo_dag(60), many_views(100_000, 200)], ids=["memo DAG", "shared buffer"])
def test_a_reply_that_expands_past_max_reply_is_refused_at_once(server: HostileServer, reply: bytes) -> None:
    server.reply = reply
    started = time.perf_counter()
    with pytest.raises(PredictionError, match=r"(more than|limit of) 4194304 bytes"):
        predict(server.url, {"x": np.zeros(1)}, timeout=10, max_reply=4 << 20)
    assert time.perf_counter() - started < 2


def test_a_reply_longer_than_max_reply_is_not_read_whole(server: HostileServer) -> None:
    server.reply = pickle.dumps({"y": np.zeros(1 << 20)}, protocol=5)
    with pytest.raises(PredictionError, match="larger than max_reply"):
        predict(server.url, {"x": np.zeros(1)}, timeout=10, max_reply=1 << 20)


def test_the_token_comes_from_studio_token_like_the_server_s(server: HostileServer,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    server.reply = pickle.dumps({"y": 1}, protocol=4)
    monkeypatch.setenv("STUDIO_TOKEN", "s3cret")
    predict(server.url, {"x": np.zeros(1)})
    predict(server.url, {"x": np.zeros(1)}, token="given")
    monkeypatch.delenv("STUDIO_TOKEN")
    predict(server.url, {"x": np.zeros(1)})
    assert server.authorization[-3:] == ["Bearer s3cret", "Bearer given", None]


def test_a_server_that_never_answers_does_not_hang_the_client(server: HostileServer,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    from studio_plugins import client

    server.reply = pickle.dumps({"y": 1}, protocol=4)
    server.delay = 3.0
    monkeypatch.setattr(client, "DEFAULT_TIMEOUT", 0.5)  # the default applies with no timeout given
    started = time.perf_counter()
    with pytest.raises(PredictionError, match=r"no reply .* within 0.5 s"):
        predict(server.url, {"x": np.zeros(1)})
    assert time.perf_counter() - started < 2.5
    server.delay = 0.0


@pytest.mark.parametrize("status", [301, 302, 303, 307, 308])
def test_a_redirect_is_not_followed_with_the_token(server: HostileServer, status: int) -> None:
    # urllib followed a 301-303 as a GET to wherever Location pointed, Authorization included
    elsewhere = HostileServer()
    try:
        server.redirect = (status, elsewhere.url + "steal")
        message = rf"^{status}: .* redirects to {elsewhere.url}steal; not followed"
        with pytest.raises(PredictionError, match=message):
            predict(server.url, {"x": np.zeros(1)}, token="s3cret", timeout=10)
        assert elsewhere.gets == [] and elsewhere.authorization == []
    finally:
        server.redirect = None
        elsewhere.httpd.shutdown()


def test_a_redirect_to_https_says_the_server_wants_it(server: HostileServer) -> None:
    server.redirect = (301, server.url.replace("http:", "https:"))
    try:
        with pytest.raises(PredictionError, match=r"redirects to https://.*\(the server wants HTTPS\)"):
            predict(server.url, {"x": np.zeros(1)}, timeout=10)
        assert server.gets == []
    finally:
        server.redirect = None

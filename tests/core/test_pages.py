"""GET / from a browser and GET /docs, in process: who gets HTML (only what prefers it; API
clients get the 405 JSON of before), escaping of what came from outside (a checkpoint's file name,
the Host header), curl lines that are safe to paste, and the pages' security headers (issue 14).
tests/cli/test_browser.py renders the pages in a real browser."""

from __future__ import annotations

import html
import re
import shlex
import subprocess
from pathlib import Path
from typing import Any

import pytest

from core.http.pages import DOCS_PAGE, curl_line, prefers_html
from tests.web_app import BROWSER_ACCEPT, call, toy_app

HOSTILE_FILE = "<img src=x onerror=alert(1)>'$(touch pwned)'.toy"
"""A checkpoint is any file someone put in a modeldir."""
BEFORE = b'{"error": "GET /: inference routes take POST", "type": "MethodNotAllowed"}'
"""What GET / answered before there were pages; API clients still get it."""


@pytest.fixture(scope="module")
def app(tmp_path_factory: pytest.TempPathFactory) -> Any:
    return toy_app(tmp_path_factory.mktemp("studioml"), {
        "exp": ("model.toy", {"x": ["FP32", [-1, 3]]}),
        "evil": (HOSTILE_FILE, {"image": ["UINT8", [-1, 224, 224, 3]]}),
        "plain": None,
        "guess": ("script.toy", {"x": None}),
    })


@pytest.mark.parametrize(("accept", "html_wanted"), [
    (BROWSER_ACCEPT, True),  # Chromium
    ("text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8", True),  # Firefox
    ("text/html", True),
    (None, False),  # urllib, requests' default is */*
    ("*/*", False),  # curl
    ("application/json", False),
    ("application/json, text/html", False),  # a tie: JSON, as before
    ("text/html;q=0.5, application/json", False),
    ("application/json;q=0.1, text/html", True),
    ("text/html;q=nan", False),
    ("text/html;q=2", False),
    ("text/html;q=oops", False),
    ("text/*", False),
    (",,;;=;q", False),
])
def test_who_prefers_html(accept: str | None, html_wanted: bool) -> None:
    assert prefers_html(accept) is html_wanted
    assert prefers_html(accept.encode() if accept else None) is html_wanted


@pytest.mark.parametrize("accept", [None, "*/*", "application/json", "application/python-pickle"])
def test_api_clients_get_get_slash_exactly_as_before(app: Any, accept: str | None) -> None:
    reply = call(app, "GET", "/", {"Accept": accept} if accept else {})
    assert reply.status == 405 and reply.body == BEFORE and reply.headers["allow"] == "POST"


def test_a_browser_gets_the_models_with_a_curl_line_each(app: Any) -> None:
    reply = call(app, "GET", "/", {"Accept": BROWSER_ACCEPT})
    assert reply.status == 200 and reply.headers["content-type"].startswith("text/html")
    page = reply.text
    for name in ("exp", "evil", "plain"):
        assert f'id="model-{name}"' in page
    assert "<dd>model.toy</dd>" in page and "<dd>toy</dd>" in page and "<dd>identity</dd>" in page
    assert "<td>x</td><td>FP32</td><td>(N, 3)</td>" in page
    assert '<a href="docs">' in page
    lines = [html.unescape(line) for line in re.findall(r"<pre>(.*?)</pre>", page)]
    assert len(lines) == 4
    words = shlex.split(lines[0])
    assert words[:4] == ["curl", "-s", "-X", "POST"] and words[4] == "http://127.0.0.1:5000/models/exp"
    assert words[-2:] == ["-d", '{"x": [[0.0, 0.0, 0.0]]}']
    assert "--data-binary @body.npz" in lines[1]  # 224x224x3 is no line to paste
    assert "<td>x</td><td>any</td><td>not declared</td>" in page and "UNKNOWN" not in page
    assert lines[3].endswith('{"x": [[1.0, 2.0, 3.0]]}\'') and "a guess" in page
    assert call(app, "POST", "/models/exp", {"Content-Type": "application/json"},
                words[-1].encode()).status == 200


def test_text_from_outside_is_escaped_and_shell_quoted(app: Any, tmp_path: Path) -> None:
    host = "a';$(touch$IFS'pwned')&b"  # Starlette takes it as a Host (it refuses "<", '"', "/")
    page = call(app, "GET", "/", {"Accept": BROWSER_ACCEPT, "Host": host}).text
    assert "<img" not in page and html.escape(HOSTILE_FILE) in page
    for line in re.findall(r"<pre>(.*?)</pre>", page):
        line = html.unescape(line)
        # bash itself reads the line (printf in curl's place): each argument arrives as it was
        # meant, and nothing in it runs
        shown = subprocess.run(["bash", "-c", "printf '%s\\n' " + line.removeprefix("curl ")],
                               cwd=tmp_path, capture_output=True, text=True, check=True).stdout
        assert shown.splitlines() == shlex.split(line)[1:]
        assert shown.splitlines()[3].startswith(f"http://{host}/models/")
    assert not (tmp_path / "pwned").exists()


def test_the_token_is_never_written_into_a_page(tmp_path: Path) -> None:
    app = toy_app(tmp_path, {"exp": None}, token="s3cret")
    denied = call(app, "GET", "/", {"Accept": BROWSER_ACCEPT})
    assert denied.status == 401 and denied.headers["www-authenticate"] == "Bearer"
    assert denied.headers["content-type"].startswith("text/html") and '<a href="docs">' in denied.text
    assert "exp" not in denied.text
    assert call(app, "GET", "/").body == call(app, "GET", "/openapi.json").body  # the JSON 401
    assert call(app, "GET", "/").json()["type"] == "Unauthorized"
    page = call(app, "GET", "/", {"Accept": BROWSER_ACCEPT, "Authorization": "Bearer s3cret"}).text
    assert "s3cret" not in page and '-H "Authorization: Bearer $STUDIO_TOKEN"' in html.unescape(page)
    docs = call(app, "GET", "/docs")  # public: a page with no data of the server in it
    assert docs.status == 200 and docs.body == DOCS_PAGE


def test_pages_allow_nothing_but_their_own_script_style_and_this_server(app: Any) -> None:
    docs = call(app, "GET", "/docs")
    assert docs.status == 200 and b"<script src" not in docs.body and b"http" not in docs.body
    policy = docs.headers["content-security-policy"]
    assert "default-src 'none'" in policy and "connect-src 'self'" in policy
    assert re.search(r"script-src 'sha256-[A-Za-z0-9+/=]+'", policy)
    assert docs.headers["x-content-type-options"] == "nosniff"
    index = call(app, "GET", "/", {"Accept": BROWSER_ACCEPT})
    assert "script-src" not in index.headers["content-security-policy"]  # no script at all
    assert "<script" not in index.text


def test_curl_line_quotes_what_it_is_given() -> None:
    line = curl_line("http://h/models/a b", "{\"x\": \"it's\"}", token=True)
    assert shlex.split(line) == ["curl", "-s", "-X", "POST", "http://h/models/a b", "-H",
                                 "Authorization: Bearer $STUDIO_TOKEN", "-H",
                                 "Content-Type: application/json", "-d", "{\"x\": \"it's\"}"]

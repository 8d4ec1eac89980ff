"""--cors ORIGIN, in process: preflights answered for the named origins only (before auth: a
preflight carries no token), the token's header allowed, no CORS headers at all without the option,
and bad origins refused before the server starts. tests/cli/test_browser.py checks a server with
--workers (issue 14)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from core.errors import ConfigurationError
from core.http.cors import check_origin
from core.process.launch import Launch
from core.types import ServeOptions
from studio_plugins.cli import build_cli
from studio_plugins.testing import make_host
from tests.web_app import call, toy_app

APP_ORIGIN = "https://app.example.com"
TOKEN = {"Authorization": "Bearer s3cret"}
JSON_BODY = {"Content-Type": "application/json"}


def preflight(origin: str, method: str = "POST", headers: str = "authorization, content-type"
              ) -> dict[str, str]:
    return {"Origin": origin, "Access-Control-Request-Method": method,
            "Access-Control-Request-Headers": headers}


@pytest.fixture(scope="module")
def app(tmp_path_factory: pytest.TempPathFactory) -> Any:
    return toy_app(tmp_path_factory.mktemp("studioml"), {"exp": None}, token="s3cret",
                   cors=(APP_ORIGIN, "http://localhost:3000"))


def cors_headers(headers: dict[str, str]) -> set[str]:
    return {name for name in headers if name.startswith("access-control-")}


def test_without_cors_there_are_no_cors_headers(tmp_path: Path) -> None:
    app = toy_app(tmp_path, {"exp": None})
    answered = call(app, "OPTIONS", "/", preflight(APP_ORIGIN))
    assert answered.status == 405 and not cors_headers(answered.headers)  # as before
    posted = call(app, "POST", "/", {"Origin": APP_ORIGIN, **JSON_BODY}, b'{"a": 1}')
    assert posted.status == 200 and not cors_headers(posted.headers)


@pytest.mark.parametrize("path", ["/", "/models/exp", "/v2/models/exp/infer", "/openapi.json"])
def test_a_preflight_from_a_named_origin_needs_no_token(app: Any, path: str) -> None:
    reply = call(app, "OPTIONS", path, preflight(APP_ORIGIN))
    assert reply.status == 200
    assert reply.headers["access-control-allow-origin"] == APP_ORIGIN
    allowed = {h.strip().lower() for h in reply.headers["access-control-allow-headers"].split(",")}
    assert {"authorization", "content-type", "inference-header-content-length"} <= allowed
    assert "POST" in reply.headers["access-control-allow-methods"]
    assert "Origin" in reply.headers["vary"]


def test_the_request_itself_still_needs_the_token_and_can_read_the_reply(app: Any) -> None:
    denied = call(app, "POST", "/", {"Origin": APP_ORIGIN, **JSON_BODY}, b'{"a": 1}')
    assert denied.status == 401  # a page can read why: the error carries the CORS headers
    assert denied.headers["access-control-allow-origin"] == APP_ORIGIN
    served = call(app, "POST", "/", {"Origin": APP_ORIGIN, **JSON_BODY, **TOKEN}, b'{"a": 1}')
    assert served.status == 200 and served.json() == {"a": 1}
    assert served.headers["access-control-allow-origin"] == APP_ORIGIN
    exposed = served.headers["access-control-expose-headers"].split(", ")
    # a page reads the request id, Retry-After on a 503, and which pipeline items failed
    assert {"X-Request-Id", "Retry-After", "X-Studio-Failed-Count", "X-Studio-Failed-Keys"} <= set(exposed)


@pytest.mark.parametrize("origin", ["https://evil.example", "https://app.example.com.evil.example",
                                    "http://app.example.com", "null"])
def test_other_origins_are_refused(app: Any, origin: str) -> None:
    reply = call(app, "OPTIONS", "/", preflight(origin))
    assert reply.status == 400 and "access-control-allow-origin" not in reply.headers
    assert reply.json()["type"] == "BadRequest" and "origin" in reply.json()["error"]
    posted = call(app, "POST", "/", {"Origin": origin, **JSON_BODY, **TOKEN}, b'{"a": 1}')
    assert posted.status == 200 and "access-control-allow-origin" not in posted.headers


def test_a_header_not_allowed_is_refused_in_the_preflight(app: Any) -> None:
    reply = call(app, "OPTIONS", "/", preflight(APP_ORIGIN, headers="x-api-key"))
    assert reply.status == 400 and "headers" in reply.json()["error"]


def test_any_origin_when_asked_for_explicitly(tmp_path: Path) -> None:
    app = toy_app(tmp_path, {"exp": None}, cors=("*",))
    reply = call(app, "OPTIONS", "/models/exp", preflight("https://anyone.example"))
    assert reply.status == 200 and reply.headers["access-control-allow-origin"] == "*"
    private = call(app, "OPTIONS", "/", {**preflight("https://anyone.example"),
                                         "Access-Control-Request-Private-Network": "true"})
    assert private.status == 400  # any page on the internet reaching a local server: not for "*"
    posted = call(app, "POST", "/", {"Origin": "https://anyone.example", **JSON_BODY}, b'{"a": 1}')
    assert posted.headers["access-control-allow-origin"] == "*"


@pytest.mark.parametrize(("origin", "hint"), [
    ("https://app.example.com/", "--cors https://app.example.com"),
    ("https://app.example.com/path", "--cors https://app.example.com"),
    ("app.example.com", "scheme://host[:port]"),
    ("null", "sandboxed"),
    ("ftp://x", "scheme://host[:port]"),
    ("http://bad host", "scheme://host[:port]"),
])
def test_a_value_that_is_no_origin_is_refused_with_what_to_write(origin: str, hint: str) -> None:
    with pytest.raises(ConfigurationError) as caught:
        check_origin(origin)
    assert hint in str(caught.value.hint)


def test_origins_as_browsers_write_them_are_taken() -> None:
    for origin in ("http://localhost:3000", "https://App.Example.com", "http://[::1]:8080",
                   "http://127.0.0.1", "*"):
        assert check_origin(origin) == origin.lower()


def test_serve_refuses_a_bad_origin_before_starting_and_passes_good_ones_on() -> None:
    result = CliRunner().invoke(build_cli(make_host()), ["serve", "exp", "--cors", "http://a.example/"])
    assert result.exit_code == 1
    assert "error: --cors 'http://a.example/' is not an origin" in result.output
    assert "hint: no path or trailing slash: --cors http://a.example" in result.output
    argv = Launch(make_host(), ServeOptions(keys=("exp",), cors=("http://a.example", "*"))).serve_argv()
    assert " ".join(argv).count("--cors") == 2 and "http://a.example" in argv and "*" in argv
    assert "--cors" not in Launch(make_host(), ServeOptions(keys=("exp",))).serve_argv()

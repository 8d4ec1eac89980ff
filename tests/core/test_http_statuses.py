"""Every status README.md lists, in process (408, a body too slow, is in
tests/core/test_body_guard.py): the status, the JSON error body ``{"error", "type"[, "hint"]}``,
and the headers the status needs (``Retry-After``, ``Allow``, ``WWW-Authenticate``), with an
``X-Request-Id`` on every reply, for ``POST /``, ``/models/{name}``, the V2 plugin's routes and
Starlette's own 404/405 alike: one error reply (core/http/replies.py) behind them all."""

from __future__ import annotations

import asyncio
import io
import json
import pickle
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from core.dataplane.plane import DataPlaneOptions
from core.http.body_guard import FLOOR
from studio_plugins import BadRequest, Loader, LoadOptions, ServedModel, hookimpl
from tests.asgi import acall
from tests.web_app import BROWSER_ACCEPT, Reply, call, toy_app

PICKLE = "application/python-pickle"
NPZ = "application/x-npz"
JSON = "application/json"
V2_BODY = json.dumps(
    {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 3], "data": [1, 2, 3]}]}).encode()


class BoomLoader(Loader):
    """``*.boom``: a model that raises (a bug in the model) when the request has ``explode``, and
    takes ``sleep`` seconds when it has that."""

    name = "boom"
    patterns = ("*.boom",)

    def load(self, checkpoint: Path | None, options: LoadOptions) -> ServedModel:
        def predict(payload: dict[str, Any]) -> dict[str, Any]:
            if "explode" in payload:
                raise RuntimeError("kaboom")
            if "sleep" in payload:
                time.sleep(float(payload["sleep"]))
            return payload

        return ServedModel(predict, "boom", checkpoint)


async def buggy_route(request: Request) -> Response:
    raise RuntimeError("a bug in a route at /srv/secret/route.py")


class BoomPlugin:
    @staticmethod
    @hookimpl
    def studio_register_loaders(register: Any) -> None:
        register(BoomLoader())

    @staticmethod
    @hookimpl
    def studio_register_routes(register: Any) -> None:
        register(lambda context: [Route("/buggy", buggy_route, methods=["GET"])])


MODELS: dict[str, tuple[str, dict[str, Any]] | None] = {
    "exp": ("model.toy", {"x": ["FP32", [-1, 3]]}),
    "plain": None,
    "boom": ("model.boom", {}),
}


@pytest.fixture(scope="module")
def app(tmp_path_factory: pytest.TempPathFactory) -> Any:
    return toy_app(tmp_path_factory.mktemp("studioml"), MODELS, plugins=(BoomPlugin(),))


def post(app: Any, path: str, body: bytes, content_type: str = PICKLE, **headers: str) -> Reply:
    return call(app, "POST", path, {"Content-Type": content_type, **headers}, body)


def assert_error(reply: Reply, status: int, kind: str, *words: str) -> dict[str, Any]:
    """``reply`` is our JSON error of ``status``: its fields, the message naming ``words``."""
    assert reply.status == status, (reply.status, reply.body)
    error = reply.json()
    assert set(error) <= {"error", "type", "hint"} and error["type"] == kind, error
    assert isinstance(error["error"], str) and error["error"], error
    for word in words:
        assert word in error["error"], error
    assert "traceback" not in reply.text.lower() and "/srv/secret" not in reply.text
    assert reply.headers["x-request-id"], reply.headers
    assert int(reply.headers["content-length"]) == len(reply.body)
    return error


def pickled(**arrays: Any) -> bytes:
    return pickle.dumps(arrays, protocol=5)


# --- 200: the codecs, both ways ---------------------------------------------------------------


@pytest.mark.parametrize("path", ["/", "/models/plain"])
def test_200_pickle_in_pickle_out(app: Any, path: str) -> None:
    x = np.arange(6.0).reshape(2, 3)
    reply = post(app, path.replace("/models/plain", "/models/exp"), pickled(x=x))
    assert reply.status == 200 and reply.headers["content-type"] == PICKLE
    np.testing.assert_array_equal(pickle.loads(reply.body)["x"], x)
    assert reply.headers["x-request-id"]


def test_200_json_in_json_out(app: Any) -> None:
    reply = post(app, "/models/plain", json.dumps({"x": [[1, 2, 3]]}).encode(), JSON)
    assert reply.status == 200 and reply.json() == {"x": [[1, 2, 3]]}


def test_200_npz_in_npz_out(app: Any) -> None:
    buffer = io.BytesIO()
    np.savez(buffer, x=np.arange(3, dtype=np.int32))
    reply = post(app, "/models/plain", buffer.getvalue(), NPZ)
    assert reply.status == 200 and reply.headers["content-type"] == NPZ
    with np.load(io.BytesIO(reply.body)) as arrays:
        np.testing.assert_array_equal(arrays["x"], np.arange(3, dtype=np.int32))


def test_200_accept_picks_the_reply_codec(app: Any) -> None:
    reply = post(app, "/models/plain", pickled(x=np.array([1.5, 2.5])), Accept=JSON)
    assert reply.status == 200 and reply.json() == {"x": [1.5, 2.5]}


def test_200_v2_infer_versioned_and_not(app: Any) -> None:
    for path in ("/v2/models/exp/infer", "/v2/models/exp/versions/1/infer"):
        reply = post(app, path, V2_BODY, JSON)
        assert reply.status == 200, reply.body
        assert reply.json()["outputs"][0]["data"] == [1.0, 2.0, 3.0]
        assert reply.headers["x-request-id"]


def test_request_ids_are_echoed_when_sane_and_replaced_when_not(app: Any) -> None:
    for path, body in (("/models/plain", pickled(x=np.ones(1))), ("/models/nope", b"")):
        sane = post(app, path, body, **{"X-Request-Id": "client-42.a:b"})
        assert sane.headers["x-request-id"] == "client-42.a:b"
        bad = post(app, path, body, **{"X-Request-Id": "two words"})
        assert bad.headers["x-request-id"] not in ("", "two words")
    assert call(app, "GET", "/nope", {"X-Request-Id": "r1"}).headers["x-request-id"] == "r1"
    assert call(app, "GET", "/v2/health/live", {"X-Request-Id": "r2"}).headers["x-request-id"] == "r2"


# --- 400 ---------------------------------------------------------------------------------------


def test_400_bad_bodies(app: Any) -> None:
    assert_error(post(app, "/models/plain", b"{not json", JSON), 400, "BadRequest")
    assert_error(post(app, "/models/plain", b"[1, 2]", JSON), 400, "BadRequest", "object")
    assert_error(post(app, "/models/exp", pickled(x=np.ones((1, 2), np.float32))), 400, "BadRequest",
                 "shape")
    assert_error(post(app, "/", b"", "application/octet-stream"), 400, "BadRequest", "empty")
    assert_error(post(app, "/v2/models/exp/infer", b"[]", JSON), 400, "BadRequest")
    assert_error(post(app, "/v2/repository/index", b'{"ready": 1}', JSON), 400, "BadRequest", "ready")


def test_400_invalid_content_length(app: Any) -> None:
    for path in ("/models/plain", "/v2/models/exp/infer"):
        reply = call(app, "POST", path, {"Content-Type": JSON, "Content-Length": "12abc"}, b"{}")
        assert_error(reply, 400, "BadRequest", "Content-Length")


# --- 401 ---------------------------------------------------------------------------------------


def test_401_without_the_token_everywhere_but_health_and_docs(tmp_path: Path) -> None:
    app = toy_app(tmp_path, {"plain": None}, token="s3cret")
    for method, path in (("POST", "/"), ("POST", "/models/plain"), ("POST", "/v2/models/plain/infer"),
                         ("GET", "/metrics"), ("GET", "/openapi.json"), ("GET", "/nope")):
        for authorization in (None, "Bearer wrong", "Basic czNjcmV0", "s3cret"):
            headers = {"Authorization": authorization} if authorization else {}
            reply = call(app, method, path, headers)
            assert_error(reply, 401, "Unauthorized", "token")
            assert reply.headers["www-authenticate"] == "Bearer"
    page = call(app, "GET", "/", {"Accept": BROWSER_ACCEPT})
    assert page.status == 401 and page.headers["content-type"].startswith("text/html")
    assert page.headers["www-authenticate"] == "Bearer" and page.headers["x-request-id"]
    assert call(app, "GET", "/v2/health/live").status == 200
    assert call(app, "GET", "/docs").status == 200
    good = call(app, "POST", "/", {"Authorization": "bearer s3cret", "Content-Type": PICKLE},
                pickled(x=np.ones(2)))
    assert good.status == 200, good.body


# --- 404 and 405 -------------------------------------------------------------------------------


def test_404_unknown_models_versions_and_routes(app: Any) -> None:
    assert_error(post(app, "/models/nope", pickled(x=np.ones(1))), 404, "NotFound", "nope")
    assert_error(post(app, "/v2/models/nope/infer", V2_BODY, JSON), 404, "NotFound", "nope")
    assert_error(call(app, "GET", "/v2/models/nope"), 404, "NotFound", "nope")
    assert_error(post(app, "/v2/models/exp/versions/2/infer", V2_BODY, JSON), 404, "NotFound", "version")
    error = assert_error(call(app, "GET", "/no/such/route"), 404, "NotFound", "GET /no/such/route")
    assert "POST /models/NAME" in error["error"]  # what there is
    assert_error(post(app, "/models/a/b", b""), 404, "NotFound")  # a name has no slash


def test_405_says_what_the_route_allows(app: Any) -> None:
    for method, path in (("GET", "/models/exp"), ("PUT", "/"), ("GET", "/")):
        reply = call(app, method, path)
        assert_error(reply, 405, "MethodNotAllowed", "POST")
        assert reply.headers["allow"] == "POST"
    for method, path in (("GET", "/v2/models/exp/infer"), ("DELETE", "/v2/repository/index")):
        reply = call(app, method, path)
        assert_error(reply, 405, "MethodNotAllowed", path)
        assert reply.headers["allow"] == "POST"
    assert call(app, "GET", "/", {"Accept": BROWSER_ACCEPT}).status == 200  # a browser: the page


# --- 409, 413, 415 -----------------------------------------------------------------------------


def test_409_loading_in_a_worker(tmp_path: Path) -> None:
    app = toy_app(tmp_path, {"plain": None}, in_worker=True)
    error = assert_error(post(app, "/v2/repository/models/plain/load", b"{}", JSON), 409, "Conflict")
    assert "--watch" in error["hint"]


def test_413_over_max_body_and_503_over_the_body_budget(tmp_path: Path) -> None:
    """The budget refuses a body that fits --max-body but not what is left of --body-budget
    (a 503 to retry), for the hot path and for V2's reads alike."""
    app = toy_app(tmp_path, {"plain": ("model.toy", {"x": None})}, max_body=4 * FLOOR,
                  body_budget=FLOOR, read_timeout=0)
    for path in ("/models/plain", "/v2/models/plain/infer"):
        over = post(app, path, b"x" * (4 * FLOOR + 1), JSON)
        assert_error(over, 413, "PayloadTooLarge", "--max-body")
        busy = post(app, path, b"x" * (2 * FLOOR), JSON)
        assert_error(busy, 503, "Overloaded", "--body-budget")
        assert busy.headers["retry-after"] == "1"
    assert post(app, "/models/plain", json.dumps({"x": [1.0]}).encode(), JSON).status == 200


def test_415_unknown_formats(app: Any) -> None:
    assert_error(post(app, "/models/plain", b"1,2", "text/csv"), 415, "UnsupportedMediaType", "text/csv")
    assert_error(post(app, "/", b"garbage!", "application/octet-stream"), 415, "UnsupportedMediaType")


# --- 500 ---------------------------------------------------------------------------------------


def test_500_a_model_that_raises_says_so_without_a_traceback(app: Any) -> None:
    error = assert_error(post(app, "/models/boom", pickled(explode=np.ones(1))), 500, "ModelError",
                         "RuntimeError")
    assert "hint" not in error
    assert post(app, "/models/boom", pickled(x=np.ones(1))).status == 200  # and it serves on


def test_500_with_debug_has_the_traceback(tmp_path: Path) -> None:
    app = toy_app(tmp_path, MODELS, plugins=(BoomPlugin(),), debug=True)
    reply = post(app, "/models/boom", pickled(explode=np.ones(1)))
    assert reply.status == 500 and "kaboom" in reply.json()["traceback"]


def test_500_a_bug_in_a_plugin_route_is_our_json_not_starlettes_text(app: Any) -> None:
    """Starlette re-raises it after the reply (for the server's log); the client got JSON."""
    sent: list[dict[str, Any]] = []
    scope = {"type": "http", "method": "GET", "path": "/buggy", "raw_path": b"/buggy", "query_string": b"",
             "root_path": "", "http_version": "1.1", "scheme": "http", "server": ("127.0.0.1", 5000),
             "client": ("127.0.0.1", 1), "headers": [(b"host", b"127.0.0.1")]}

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    with pytest.raises(RuntimeError, match="a bug in a route"):
        asyncio.run(app(scope, receive, send))
    start, body = sent[0], b"".join(m.get("body", b"") for m in sent[1:])
    headers = dict(start["headers"])
    assert start["status"] == 500 and headers[b"content-type"] == b"application/json"
    assert headers[b"x-request-id"]
    assert json.loads(body) == {"error": "internal error: RuntimeError", "type": "StudioError"}


# --- 503 ---------------------------------------------------------------------------------------


def test_503_an_unloaded_model(tmp_path: Path) -> None:
    app = toy_app(tmp_path, {"exp": ("model.toy", {"x": ["FP32", [-1, 3]]}), "plain": None})
    app.repository.unload("exp")
    assert_error(post(app, "/models/exp", pickled(x=np.ones((1, 3), np.float32))), 503, "NotReady",
                 "not ready")
    assert_error(post(app, "/v2/models/exp/infer", V2_BODY, JSON), 503, "NotReady")
    ready = call(app, "GET", "/v2/models/exp/ready")
    assert ready.status == 400 and ready.json()["ready"] is False  # the protocol's "no"
    assert post(app, "/models/plain", pickled(x=np.ones(1))).status == 200


def test_503_overloaded_past_max_queue_says_when_to_retry(tmp_path: Path) -> None:
    """With ``--max-queue 1`` and a request running, the next is refused at once, with
    ``Retry-After``; once the first is answered, the next is served."""
    app = toy_app(tmp_path, MODELS, plugins=(BoomPlugin(),), dataplane=DataPlaneOptions(max_queue=1))

    async def both() -> tuple[Reply, Reply]:
        slow = asyncio.ensure_future(acall(app, "POST", "/models/boom", {"Content-Type": PICKLE},
                                           pickled(sleep=np.float64(0.5))))
        await asyncio.sleep(0.1)  # the slow one is admitted and running
        refused = await acall(app, "POST", "/models/boom", {"Content-Type": PICKLE}, pickled(x=np.ones(1)))
        return await slow, refused

    served, refused = asyncio.run(both())
    assert served.status == 200, served.body
    assert_error(refused, 503, "Overloaded", "--max-queue")
    assert refused.headers["retry-after"] == "1"
    assert post(app, "/models/boom", pickled(x=np.ones(1))).status == 200


# --- 504 ---------------------------------------------------------------------------------------


def test_504_past_the_timeout_and_the_server_serves_on(tmp_path: Path) -> None:
    app = toy_app(tmp_path, MODELS, plugins=(BoomPlugin(),), dataplane=DataPlaneOptions(timeout=0.2))
    started = time.monotonic()
    assert_error(post(app, "/models/boom", pickled(sleep=np.float64(1.0))), 504, "DeadlineExceeded",
                 "--timeout")
    assert time.monotonic() - started < 0.9  # answered at the deadline, not when the model returned
    assert_error(post(app, "/v2/models/boom/infer", json.dumps({"inputs": [
        {"name": "sleep", "datatype": "FP64", "shape": [], "data": [1.0]}]}).encode(), JSON),
        504, "DeadlineExceeded")
    assert post(app, "/models/boom", pickled(x=np.ones(1))).status == 200


# --- metric labels: the routes' own templates ---------------------------------------------------


def test_metric_labels_are_the_route_templates_plugins_included(tmp_path: Path) -> None:
    app = toy_app(tmp_path, {"exp": ("model.toy", {"x": ["FP32", [-1, 3]]})})
    post(app, "/v2/models/exp/versions/1/infer", V2_BODY, JSON)
    call(app, "GET", "/v2/models/exp/ready")
    call(app, "GET", "/somewhere/else")
    post(app, "/models/exp", b"", JSON)
    text = call(app, "GET", "/metrics").text
    for route, model, status in (("/v2/models/{name}/versions/{version}/infer", "exp", 200),
                                 ("/v2/models/{name}/ready", "exp", 200), ("other", "", 404),
                                 ("/models/{name}", "exp", 400)):
        line = f'studio_requests_total{{model="{model}",route="{route}",status="{status}"}} 1.0'
        assert line in text, (line, [t for t in text.splitlines() if t.startswith("studio_requests_total")])


# --- plugin routes of plain ASGI, called past Starlette's router ---------------------------------


class AsgiRoute:
    """A plugin's plain ASGI endpoint (as V2's inference is): answers its path parameters, or
    raises what the request's ``x-raise`` header names."""

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        kind = dict(scope["headers"]).get(b"x-raise")
        if kind == b"bug":
            raise RuntimeError("a bug at /srv/secret/asgi.py")
        if kind == b"studio":
            raise BadRequest("you sent x-raise")
        body = json.dumps({"params": scope["path_params"], "app": type(scope["app"]).__name__,
                           "router": type(scope["router"]).__name__,
                           "endpoint": type(scope["endpoint"]).__name__}).encode()
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"application/json")]})
        await send({"type": "http.response.body", "body": body})


async def shadowing(request: Request) -> Response:
    return Response(b"the function route, registered first", media_type="text/plain")


class AsgiPlugin:
    @staticmethod
    @hookimpl
    def studio_register_routes(register: Any) -> None:
        register(lambda context: [
            Route("/asgi/{item:int}/{name}", AsgiRoute(), methods=["POST"]),
            Route("/shadowed", shadowing, methods=["POST"]),
            Route("/shadowed", AsgiRoute(), methods=["POST"]),
            Route("/get-only", AsgiRoute(), methods=["GET"]),
        ])


@pytest.fixture(scope="module")
def asgi_app(tmp_path_factory: pytest.TempPathFactory) -> Any:
    return toy_app(tmp_path_factory.mktemp("studioml"), {"exp": None}, plugins=(AsgiPlugin(),))


def test_plain_asgi_routes_get_the_scope_starlettes_router_gives(asgi_app: Any) -> None:
    reply = call(asgi_app, "POST", "/asgi/7/seven")
    assert reply.status == 200 and reply.headers["x-request-id"]
    assert reply.json() == {"params": {"item": 7, "name": "seven"}, "app": "Starlette", "router": "Router",
                            "endpoint": "AsgiRoute"}
    for item in (8, 7, 8):  # the route is remembered per path; its parameters are each its own
        assert call(asgi_app, "POST", f"/asgi/{item}/n").json()["params"] == {"item": item, "name": "n"}
    for item in range(1100):  # what is remembered stays bounded
        call(asgi_app, "POST", f"/asgi/{item}/n")
    assert len(asgi_app._routed) <= 1024
    assert call(asgi_app, "POST", "/shadowed").text == "the function route, registered first"
    assert call(asgi_app, "GET", "/get-only").status == 200
    assert_error(call(asgi_app, "POST", "/get-only"), 405, "MethodNotAllowed")
    assert_error(call(asgi_app, "POST", "/asgi/seven/7"), 404, "NotFound")  # {item:int} as Starlette's
    labels = call(asgi_app, "GET", "/metrics").text
    assert 'route="/asgi/{item:int}/{name}",status="200"' in labels


def test_plain_asgi_routes_answer_errors_as_the_app_does(asgi_app: Any) -> None:
    assert_error(call(asgi_app, "POST", "/asgi/1/x", {"x-raise": "studio"}), 400, "BadRequest", "x-raise")
    sent: list[dict[str, Any]] = []
    scope = {"type": "http", "method": "POST", "path": "/asgi/1/x", "raw_path": b"/asgi/1/x",
             "query_string": b"", "root_path": "", "http_version": "1.1", "scheme": "http",
             "server": ("127.0.0.1", 5000), "client": ("127.0.0.1", 1),
             "headers": [(b"host", b"127.0.0.1"), (b"x-raise", b"bug")]}

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    with pytest.raises(RuntimeError, match="a bug at"):  # re-raised after the reply, for the log
        asyncio.run(asgi_app(scope, receive, send))
    assert sent[0]["status"] == 500 and dict(sent[0]["headers"])[b"x-request-id"]
    assert json.loads(sent[1]["body"]) == {"error": "internal error: RuntimeError", "type": "StudioError"}
    assert call(asgi_app, "POST", "/asgi/2/y").status == 200  # and it serves on

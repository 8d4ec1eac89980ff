"""The Starlette app for a mapping name -> model. ``POST /`` goes to the first (default) model.

Routes: ``POST /``, ``POST /models/{name}``, ``GET /metrics``, ``GET /v2/health/live``,
``GET /v2/health/ready``. Every error is JSON ``{"error", "type"}`` with a fitting status and
never a traceback unless ``debug``. ``EdgeMiddleware`` (plain ASGI: Starlette's
``BaseHTTPMiddleware`` costs a task per request) does request ids, auth, activity counting,
metrics and the access log.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import re
import time
import traceback
import uuid
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from core.activity import Activity
from core.codecs import CodecSet
from core.dataplane import DataPlane, DataPlaneOptions
from core.errors import (
    BadRequest,
    ModelError,
    NotFound,
    Overloaded,
    PayloadTooLarge,
    StudioError,
    Unauthorized,
)
from core.metrics import Metrics
from core.types import Codec, Payload, ServedModel

log = logging.getLogger("studio_plugins.app")
access_log = logging.getLogger("studio_plugins.access")

HEALTH_PREFIX = "/v2/health/"
UNCOUNTED = ("/v2/health/", "/metrics")
_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")


@dataclass
class AppSettings:
    codecs: CodecSet
    token: str | None = None
    max_body: int = 64 * 1024 * 1024
    debug: bool = False
    dataplane: DataPlaneOptions = field(default_factory=DataPlaneOptions)
    metrics: bool = True
    access_log: bool = False
    activity: Activity = field(default_factory=Activity)
    load_seconds: Mapping[str, float] = field(default_factory=dict)
    on_ready: Callable[[], None] | None = None


def error_response(exc: StudioError, debug: bool = False) -> JSONResponse:
    content: dict[str, object] = {"error": exc.message, "type": exc.type_name}
    if exc.hint:
        content["hint"] = exc.hint
    if debug and exc.__cause__ is not None:
        content["traceback"] = "".join(traceback.format_exception(exc.__cause__))
    response = JSONResponse(content, status_code=exc.status)
    if isinstance(exc, Overloaded):
        response.headers["Retry-After"] = "1"
    return response


def _route_of(path: str) -> str:
    if path == "/":
        return "/"
    if path.startswith("/models/"):
        return "/models/{name}"
    return "other"


class EdgeMiddleware:
    """Request ids, bearer-token auth (constant time), activity, metrics and the access log.

    Health paths skip auth and counting; ``/metrics`` needs the token but is not counted."""

    def __init__(self, app: ASGIApp, settings: AppSettings, metrics: Metrics | None) -> None:
        self.app = app
        self.settings = settings
        self.metrics = metrics
        self.expected = f"Bearer {settings.token}".encode() if settings.token else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path: str = scope["path"]
        headers = dict(scope["headers"])
        given_id = headers.get(b"x-request-id", b"").decode("latin-1")
        request_id = given_id if _REQUEST_ID.fullmatch(given_id) else uuid.uuid4().hex
        status_seen = [500]

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                status_seen[0] = message["status"]
                message["headers"] = [*message.get("headers", []),
                                      (b"x-request-id", request_id.encode())]
            await send(message)

        if path.startswith(HEALTH_PREFIX):
            await self.app(scope, receive, send_with_id)
            return
        if self.expected is not None and not hmac.compare_digest(
            headers.get(b"authorization", b""), self.expected
        ):
            response = error_response(Unauthorized("missing or wrong bearer token"))
            response.headers["WWW-Authenticate"] = "Bearer"
            await response(scope, receive, send_with_id)
            return
        if path == "/metrics":
            await self.app(scope, receive, send_with_id)
            return
        activity = self.settings.activity
        activity.started()
        metrics = self.metrics
        if metrics is not None:
            metrics.in_flight.inc()
        started = time.perf_counter()
        info: dict[str, Any] = {}
        scope["studio"] = info
        try:
            await self.app(scope, receive, send_with_id)
        finally:
            activity.finished()
            elapsed = time.perf_counter() - started
            model = str(info.get("model", ""))
            if metrics is not None:
                metrics.in_flight.dec()
                route = _route_of(path)
                metrics.requests.labels(route, model, str(status_seen[0])).inc()
                metrics.latency.labels(route, model).observe(elapsed)
            if self.settings.access_log:
                access_log.info(
                    "method=%s path=%s status=%d duration_ms=%.2f batch=%s model=%s request_id=%s",
                    scope["method"], path, status_seen[0], elapsed * 1000,
                    info.get("batch", "-"), model or "-", request_id,
                )


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refusing more than ``limit`` bytes before reading them all."""
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            size = int(declared)
        except ValueError:
            raise BadRequest("invalid Content-Length") from None
        if size > limit:
            raise PayloadTooLarge(f"body of {size} bytes exceeds the limit of {limit} bytes")
    chunks: list[bytes] = []
    received = 0
    async for chunk in request.stream():
        received += len(chunk)
        if received > limit:
            raise PayloadTooLarge(f"body exceeds the limit of {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


async def _until_disconnect(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


async def unless_disconnected(request: Request, work: Any) -> Any:
    """Await ``work`` (a coroutine), cancelling it if the client goes away first: a request
    whose client left stops counting against the queue and the model."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_until_disconnect(request.receive))
    try:
        await asyncio.wait((task, watcher), return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
    if not task.done():
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task
        raise ClientGone()
    return task.result()


class ClientGone(Exception):
    """The client disconnected before its answer was ready; nothing is sent."""


def build_app(models: Mapping[str, ServedModel], settings: AppSettings) -> ASGIApp:
    """An ASGI app serving ``models`` (the first is the default for ``POST /``)."""
    if not models:
        raise ValueError("build_app needs at least one model")
    default_name = next(iter(models))
    metrics = Metrics() if settings.metrics else None
    if metrics is not None:
        for name, model in models.items():
            metrics.describe_model(name, model, settings.load_seconds.get(name, 0.0))
    dataplane = DataPlane(settings.dataplane, metrics)
    codecs = settings.codecs
    ready = {"value": False}

    def encode(codec: Codec, result: Payload) -> bytes:
        try:
            return codec.encode(result)
        except StudioError:
            raise
        except Exception as exc:
            raise ModelError(f"model output cannot be encoded: {type(exc).__name__}: {exc}") from exc

    async def predict(request: Request, name: str) -> Response:
        info = request.scope.setdefault("studio", {})
        info["model"] = name
        try:
            body = await read_body(request, settings.max_body)
            codec = codecs.for_request(request.headers.get("content-type", ""), body)
            payload = codec.decode(body)
            if not isinstance(payload, dict) or not all(isinstance(k, str) for k in payload):
                raise BadRequest("the body must be a dict with string keys (names -> arrays)")
            result, rows = await unless_disconnected(
                request, dataplane.infer(models[name], payload, name)
            )
            info["batch"] = rows
            reply_codec = codecs.for_reply(request.headers.get("accept", ""), codec)
            return Response(encode(reply_codec, result), media_type=reply_codec.media_type)
        except StudioError as exc:
            if exc.status >= 500:
                log.warning("%s %s -> %d: %s", request.method, request.url.path, exc.status, exc)
            return error_response(exc, settings.debug)
        except ClientGone:
            log.info("%s %s: client disconnected; request dropped", request.method, request.url.path)
            return Response(status_code=499)
        except Exception as exc:  # a bug of ours: log it, never show it
            log.exception("internal error")
            wrapped = StudioError(f"internal error: {type(exc).__name__}")
            wrapped.__cause__ = exc
            return error_response(wrapped, settings.debug)

    async def predict_default(request: Request) -> Response:
        return await predict(request, default_name)

    async def predict_named(request: Request) -> Response:
        name = request.path_params["name"]
        if name not in models:
            return error_response(NotFound(f"no model named {name!r}"))
        return await predict(request, name)

    async def live(request: Request) -> Response:
        return JSONResponse({"live": True})

    async def is_ready(request: Request) -> Response:
        ok = ready["value"] and not settings.activity.draining
        return JSONResponse({"ready": ok}, status_code=200 if ok else 503)

    async def metrics_endpoint(request: Request) -> Response:
        assert metrics is not None
        return Response(metrics.render(), media_type=metrics.content_type)

    async def http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        return JSONResponse({"error": exc.detail, "type": "HTTPError"}, status_code=exc.status_code)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        ready["value"] = True
        if settings.on_ready is not None:
            settings.on_ready()
        try:
            yield
        finally:
            ready["value"] = False
            dataplane.close()

    routes = [
        Route("/", predict_default, methods=["POST"]),
        Route("/models/{name}", predict_named, methods=["POST"]),
        Route("/v2/health/live", live, methods=["GET"]),
        Route("/v2/health/ready", is_ready, methods=["GET"]),
    ]
    if metrics is not None:
        routes.append(Route("/metrics", metrics_endpoint, methods=["GET"]))
    app = Starlette(routes=routes, exception_handlers={HTTPException: http_error}, lifespan=lifespan)
    return EdgeMiddleware(app, settings, metrics)

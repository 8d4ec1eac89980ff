"""The Starlette app for a mapping name -> model. ``POST /`` goes to the first (default) model.

Routes: ``POST /``, ``POST /models/{name}``, ``GET /v2/health/live``, ``GET /v2/health/ready``.
Every error is JSON ``{"error", "type"}`` with a fitting status and never a traceback unless
``debug``; the middleware below does auth and counts activity without Starlette's
``BaseHTTPMiddleware`` (which costs a task per request).
"""

from __future__ import annotations

import contextlib
import hmac
import logging
import traceback
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from core.activity import Activity
from core.codecs import CodecSet
from core.dataplane import DataPlane
from core.errors import (
    BadRequest,
    ModelError,
    NotFound,
    PayloadTooLarge,
    StudioError,
    Unauthorized,
)
from core.types import Codec, Payload, ServedModel

log = logging.getLogger("studio_plugins.app")

HEALTH_PREFIX = "/v2/health/"


@dataclass
class AppSettings:
    codecs: CodecSet
    token: str | None = None
    max_body: int = 64 * 1024 * 1024
    debug: bool = False
    threads: int = 4
    activity: Activity = field(default_factory=Activity)
    on_ready: Callable[[], None] | None = None


def error_response(exc: StudioError, debug: bool = False) -> JSONResponse:
    content: dict[str, object] = {"error": exc.message, "type": exc.type_name}
    if exc.hint:
        content["hint"] = exc.hint
    if debug and exc.__cause__ is not None:
        content["traceback"] = "".join(traceback.format_exception(exc.__cause__))
    return JSONResponse(content, status_code=exc.status)


class GuardMiddleware:
    """Bearer-token auth (constant-time) and activity counting, for every path but health."""

    def __init__(self, app: ASGIApp, settings: AppSettings) -> None:
        self.app = app
        self.settings = settings
        self.expected = f"Bearer {settings.token}".encode() if settings.token else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"].startswith(HEALTH_PREFIX):
            await self.app(scope, receive, send)
            return
        if self.expected is not None:
            given = dict(scope["headers"]).get(b"authorization", b"")
            if not hmac.compare_digest(given, self.expected):
                error = Unauthorized("missing or wrong bearer token")
                response = error_response(error)
                response.headers["WWW-Authenticate"] = "Bearer"
                await response(scope, receive, send)
                return
        activity = self.settings.activity
        activity.started()
        try:
            await self.app(scope, receive, send)
        finally:
            activity.finished()


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


def build_app(models: Mapping[str, ServedModel], settings: AppSettings) -> ASGIApp:
    """An ASGI app serving ``models`` (the first is the default for ``POST /``)."""
    if not models:
        raise ValueError("build_app needs at least one model")
    default_name = next(iter(models))
    dataplane = DataPlane(settings.threads)
    codecs = settings.codecs
    ready = {"value": False}

    async def predict(request: Request, name: str) -> Response:
        body = await read_body(request, settings.max_body)
        codec = codecs.for_request(request.headers.get("content-type", ""), body)
        payload = codec.decode(body)
        if not isinstance(payload, dict) or not all(isinstance(k, str) for k in payload):
            raise BadRequest("the body must be a dict with string keys (names -> arrays)")
        result = await dataplane.infer(models[name], payload)
        reply_codec = codecs.for_reply(request.headers.get("accept", ""), codec)
        return Response(_encode(reply_codec, result), media_type=reply_codec.media_type)

    def _encode(codec: Codec, result: Payload) -> bytes:
        try:
            return codec.encode(result)
        except StudioError:
            raise
        except Exception as exc:
            raise ModelError(f"model output cannot be encoded: {type(exc).__name__}: {exc}") from exc

    async def predict_default(request: Request) -> Response:
        return await guarded(predict, request, default_name)

    async def predict_named(request: Request) -> Response:
        name = request.path_params["name"]
        if name not in models:
            return error_response(NotFound(f"no model named {name!r}"))
        return await guarded(predict, request, name)

    async def guarded(handler: Callable[..., object], request: Request, name: str) -> Response:
        try:
            return await handler(request, name)  # type: ignore[misc]
        except StudioError as exc:
            if exc.status >= 500:
                log.warning("%s %s -> %d: %s", request.method, request.url.path, exc.status, exc)
            return error_response(exc, settings.debug)
        except Exception as exc:  # a bug of ours: log it, never show it
            log.exception("internal error")
            wrapped = StudioError(f"internal error: {type(exc).__name__}")
            wrapped.__cause__ = exc
            return error_response(wrapped, settings.debug)

    async def live(request: Request) -> Response:
        return JSONResponse({"live": True})

    async def is_ready(request: Request) -> Response:
        ok = ready["value"] and not settings.activity.draining
        return JSONResponse({"ready": ok}, status_code=200 if ok else 503)

    async def http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        return JSONResponse(
            {"error": exc.detail, "type": "HTTPError"}, status_code=exc.status_code
        )

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

    app = Starlette(
        routes=[
            Route("/", predict_default, methods=["POST"]),
            Route("/models/{name}", predict_named, methods=["POST"]),
            Route("/v2/health/live", live, methods=["GET"]),
            Route("/v2/health/ready", is_ready, methods=["GET"]),
        ],
        exception_handlers={HTTPException: http_error},
        lifespan=lifespan,
    )
    app.state.ready = ready
    return GuardMiddleware(app, settings)

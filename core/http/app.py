"""The ASGI app for a mapping name -> model. ``POST /`` goes to the first (default) model.

Routes: ``POST /``, ``POST /models/{name}`` (the hot path, core/http/inference.py, plain ASGI),
``GET /metrics``, ``GET /v2/health/live``, ``GET /v2/health/ready``, ``GET /openapi.json``
(core/http/openapi.py), ``GET /docs`` and, for a browser, ``GET /`` (core/http/pages.py), then the route
plugins' (V2): one Starlette route list. Every error is JSON ``{"error", "type"}`` with a fitting
status and never a traceback unless ``debug`` (core/http/replies.py). ``EdgeMiddleware`` (plain ASGI:
Starlette's ``BaseHTTPMiddleware`` costs a task per request) does request ids, auth, activity
counting, metrics, the access log, and calls the inference endpoint straight when one of its
routes matches. ``--cors`` puts core/http/cors.py around it all.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import re
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import BaseRoute, Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from core.dataplane.metrics import Metrics
from core.dataplane.plane import DataPlane, DataPlaneOptions
from core.errors import MethodNotAllowed, StudioError, Unauthorized
from core.http.activity import Activity
from core.http.bearer import bearer_matches
from core.http.body import BodyReader
from core.http.body_guard import FLOOR, MIN_RATE, READ_TIMEOUT, BodyGuard, default_budget
from core.http.codecs import CodecSet
from core.http.context import ServerContext
from core.http.cors import with_cors
from core.http.counting import RequestCounter
from core.http.inference import InferenceEndpoint, send_reply
from core.http.listeners import ListenerGroup
from core.http.openapi import DocumentBuilder
from core.http.pages import (
    DOCS_HEADERS,
    DOCS_PAGE,
    INDEX_HEADERS,
    UNAUTHORIZED_PAGE,
    index_page,
    prefers_html,
)
from core.http.record import SCOPE_KEY, UNMATCHED, RequestRecord
from core.http.replies import error_reply
from core.models.repository import ModelRepository
from core.types import ModelState, RouteFactory, ServedModel
from core.version import __version__

log = logging.getLogger("studio_plugins.app")
access_log = logging.getLogger("studio_plugins.access")

HEALTH_PREFIX = "/v2/health/"
UNCOUNTED = ("/v2/health/", "/metrics")
PUBLIC_PATHS = frozenset({"/docs"})
"""Answered without the token: a static page that holds no data of the server (it fetches
/openapi.json, which needs the token, and asks the user for it)."""
_REQUEST_ID = re.compile(rb"[A-Za-z0-9._:-]{1,128}")


class SwapKeeper(Protocol):
    """What the app tells about a model swap: the process above it (core/process/heap.py) keeps
    the heap frozen, and must see a swapped-out model let go of."""

    def retire(self, old_model: Any) -> None: ...

    async def keep(self) -> None: ...


@dataclass
class AppSettings:
    codecs: CodecSet
    token: str | None = None
    max_body: int = 64 * 1024 * 1024
    """The largest request body (``--max-body``): the one source of it for the body reads, the
    decoders and ``ServingContext.max_body`` (launch copies it here from ``ServeOptions``)."""
    read_timeout: float = READ_TIMEOUT
    """Seconds a body may take to start (0: no read timeout); see core/http/body_guard.py."""
    min_rate: int = MIN_RATE
    body_budget: int | None = None
    """Bytes of bodies held at once; None: ``default_budget(max_body)``; 0: unbounded."""
    debug: bool = False
    dataplane: DataPlaneOptions = field(default_factory=DataPlaneOptions)
    metrics: bool = True
    access_log: bool = False
    activity: Activity = field(default_factory=Activity)
    watch: float = 0.0
    in_worker: bool = False
    """One of several worker processes (--workers): models are swapped by the parent only."""
    heap: SwapKeeper | None = None
    """Refreezes the heap after a model swap (core/process/heap.py's ``HeapKeeper``, given by the
    process that froze it); None: the heap is left alone."""
    on_ready: Callable[[], None] | None = None
    cors: tuple[str, ...] = ()
    """Origins (``*``: any) whose pages may call the server from a browser; (): no CORS."""
    listeners: ListenerGroup | None = None
    """The plugins' listeners (gRPC) on this app's data plane: started in its lifespan before
    ``on_ready``, stopped before the data plane closes (core/http/listeners.py)."""


class RouteLabels:
    """The metric label of a request: the path template of the route its path matches
    (``route.path``, as Starlette matches it), whatever route (a plugin's among them); a path no
    route has is ``"other"``. Bounded however many paths clients send."""

    def __init__(self, routes: Sequence[BaseRoute]) -> None:
        self.routes = [(route.path_regex.match, str(route.path)) for route in routes
                       if isinstance(route, Route)]

    def __call__(self, path: str) -> str:
        for match, template in self.routes:
            if match(path) is not None:
                return template
        return UNMATCHED


class EdgeMiddleware:
    """Request ids, bearer-token auth (constant time), activity, metrics and the access log.

    Health paths skip auth and counting; ``/metrics`` needs the token but is not counted. A
    POST to one of the inference routes goes to its endpoint straight (the hot path); all else
    to the Starlette app."""

    def __init__(
        self, app: Starlette, endpoint: InferenceEndpoint, settings: AppSettings, bodies: BodyGuard,
        counter: RequestCounter,
    ) -> None:
        self.app = app
        self.endpoint = endpoint
        # the inference routes: a path of its own (``/``: the default model) is looked up, one
        # with ``{name}`` matched by the route's own regex (a lookup costs a fifth of a match)
        routes = endpoint.routes()
        self.exact = {route.path: route.path for route in routes if not route.param_convertors}
        self.named = [(route.path_regex.match, route.path) for route in routes if route.param_convertors]
        assert all(set(route.param_convertors) == {"name"} for route in routes if route.param_convertors)
        self.labels = RouteLabels(app.routes)
        self.direct = direct_routes(app.routes)
        self._routed: dict[tuple[str, str], tuple[Route, dict[str, Any]] | None] = {}
        self.bodies = bodies
        self.settings = settings
        self.counter = counter
        self.expected = settings.token.encode() if settings.token else None
        self._id_prefix = uuid.uuid4().hex[:16].encode()
        self._ids = itertools.count(1)

    def authorized(self, header: bytes) -> bool:
        assert self.expected is not None
        return bearer_matches(header, self.expected)

    def next_id(self) -> bytes:
        """Unique per server run: a random prefix and a counter (cheaper than uuid4 each time)."""
        return b"%s%016x" % (self._id_prefix, next(self._ids))

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path: str = scope["path"]
        headers = dict(scope["headers"])
        request_id = headers.get(b"x-request-id")
        if request_id is None or not _REQUEST_ID.fullmatch(request_id):
            request_id = self.next_id()
        if path.startswith(HEALTH_PREFIX):
            await self._uncounted(scope, receive, self._with_id(send, request_id, None))
            return
        if (self.expected is not None and path not in PUBLIC_PATHS
                and not self.authorized(headers.get(b"authorization", b""))):
            if self.for_browser(scope, path, headers):
                response: Response = HTMLResponse(UNAUTHORIZED_PAGE, 401, headers=INDEX_HEADERS)
                response.headers["WWW-Authenticate"] = "Bearer"
            else:
                response = error_reply(Unauthorized("missing or wrong bearer token")).response()
            await response(scope, receive, self._with_id(send, request_id, None))
            return
        if path == "/metrics":
            await self._uncounted(scope, receive, self._with_id(send, request_id, None))
            return
        started = self.counter.start()
        record = RequestRecord(request_id, headers)
        model_name: str | None = None
        template = self.exact.get(path)
        if template is not None:
            record.route = template
            model_name = self.endpoint.default
        else:
            for match, template in self.named:
                found = match(path)
                if found is not None:
                    record.route = template
                    model_name = found.group("name")
                    break
        bodies = self.bodies
        charged = 0
        try:
            if bodies.budget:
                # every request's first share of the body budget (a body read grows it to its
                # size), given back below on every path: core/http/body_guard.py
                if bodies.free < FLOOR:
                    refusal = error_reply(bodies.overloaded(FLOOR))
                    await send_reply(send, refusal.status, refusal.body, list(refusal.headers), record)
                    return
                bodies.free -= FLOOR
                charged = FLOOR
            if model_name is not None and scope["method"] == "POST":
                # the hot path sends the request id itself: no wrapper around send
                await self.endpoint.answer(scope, receive, send, model_name, record)
            else:
                await self._other(scope, receive, send, path, model_name, record)
        finally:
            if charged:
                bodies.free += charged
                if bodies.grown:  # some body in flight is larger than FLOOR: was it this one?
                    bodies.release_grown(asyncio.current_task())
            self._count(scope, path, record, started)

    async def _uncounted(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Health and metrics: neither counted nor charged; a route there that reads a large
        body is still charged for it (core/http/body_guard.py), and given it back here."""
        try:
            await self.app(scope, receive, send)
        finally:
            if self.bodies.grown:
                self.bodies.release_grown(asyncio.current_task())

    @staticmethod
    def for_browser(scope: Scope, path: str, headers: dict[bytes, bytes]) -> bool:
        """``GET /`` from a browser: the index page (anyone else gets the 405 of before)."""
        return path == "/" and scope["method"] in ("GET", "HEAD") and prefers_html(headers.get(b"accept"))

    async def _other(self, scope: Scope, receive: Receive, send: Send, path: str,
                     model_name: str | None, record: RequestRecord) -> None:
        """A counted request off the hot path: route plugins (V2), pages, or a wrong method."""
        scope[SCOPE_KEY] = record  # route plugins record the model and batch size here
        send = self._with_id(send, record.request_id, record)
        if model_name is None or self.for_browser(scope, path, record.headers):
            direct = self._direct_route(scope["method"], path)
            if direct is None:
                await self.app(scope, receive, send)
            else:
                record.route = direct[0].path
                await self._direct(direct[0], dict(direct[1]), scope, receive, send, record)
        else:
            error = MethodNotAllowed(f"{scope['method']} {path}: inference routes take POST")
            await error_reply(error).send(send)

    def _direct_route(self, method: str, path: str) -> tuple[Route, dict[str, Any]] | None:
        """The route Starlette's router would pick for the request, and its path parameters,
        when it is plain ASGI; else None. Remembered per method and path (a client sends the
        same few; bounded whatever it sends)."""
        known = self._routed.get((method, path), False)
        if known is not False:
            return known  # type: ignore[return-value]
        chosen = None
        for match, route in self.direct:
            found = match(path)
            if found is None or (route.methods and method not in route.methods):
                continue  # a wrong method (405) is only answered if no later route matches
            if route.app is route.endpoint:  # plain ASGI: called past Starlette, as it would be
                params = found.groupdict()
                for key, value in params.items():
                    params[key] = route.param_convertors[key].convert(value)
                chosen = route, params
            break
        if len(path) <= 256:
            if len(self._routed) >= 1024:
                self._routed.clear()
            self._routed[(method, path)] = chosen
        return chosen

    async def _direct(self, route: Route, params: dict[str, Any], scope: Scope, receive: Receive,
                      send: Send, record: RequestRecord) -> None:
        """A plugin's plain ASGI route (V2 inference) as Starlette's router would call it (the
        same scope keys), without its router, request object and exception middleware: those
        cost as much as the route itself on a small request. Its errors are answered as the
        app's exception handlers answer them."""
        scope["app"] = self.app
        scope.setdefault("router", self.app.router)
        scope["endpoint"] = route.endpoint
        scope["path_params"] = params
        record.status = 0  # no reply started yet
        try:
            await route.app(scope, receive, send)
        except Exception as exc:
            if record.status:
                raise  # the reply started: nothing to answer with (Hypercorn closes it)
            await error_reply(exc, scope, debug=self.settings.debug).send(send)
            if not isinstance(exc, StudioError | HTTPException):
                raise  # a bug: re-raised after the reply for the server's log, as Starlette does
        finally:
            if not record.status:
                record.status = 500

    @staticmethod
    def _with_id(send: Send, request_id: bytes, record: RequestRecord | None) -> Send:
        """``send`` adding the request's id to the reply's headers (and noting its status)."""

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                if record is not None:
                    record.status = message["status"]
                message["headers"] = [*message.get("headers", []), (b"x-request-id", request_id)]
            await send(message)

        return send_with_id

    def _count(self, scope: Scope, path: str, record: RequestRecord, started: float) -> None:
        model = record.model
        route = record.route
        if route == UNMATCHED and self.counter.metrics is not None:
            route = self.labels(path)
        elapsed = self.counter.finish(route, model, record.status, started)
        if self.settings.access_log:
            access_log.info(
                "method=%s path=%s status=%d duration_ms=%.2f batch=%s model=%s request_id=%s",
                scope["method"], path, record.status, elapsed * 1000,
                "-" if record.batch is None else record.batch, model or "-",
                record.request_id.decode("latin-1"),
            )


def direct_routes(routes: Sequence[BaseRoute]) -> list[tuple[Callable[[str], re.Match[str] | None], Route]]:
    """The routes, in the router's order, that the edge middleware may call past Starlette:
    it looks for the first one that matches a request fully, as the router does, and calls it
    when it is plain ASGI (else leaves the request to Starlette). Up to the first route that is
    not a ``Route`` (a mount, ...): past it, only Starlette's router knows."""
    direct: list[tuple[Callable[[str], re.Match[str] | None], Route]] = []
    for route in routes:
        if not isinstance(route, Route):
            break
        direct.append((route.path_regex.match, route))
    return direct


def build_app(
    repository: ModelRepository,
    settings: AppSettings,
    route_factories: Sequence[RouteFactory] = (),
) -> ASGIApp:
    """An ASGI app serving the repository's models (the first is the default for ``POST /``),
    with the routes plugins registered (the V2 protocol among them)."""
    if not repository.names():
        raise ValueError("build_app needs at least one model")
    metrics = Metrics() if settings.metrics else None
    dataplane = DataPlane(settings.dataplane, metrics)
    budget = settings.body_budget
    guard = BodyGuard(default_budget(settings.max_body) if budget is None else budget,
                      settings.read_timeout, settings.min_rate)
    context = ServerContext(repository, dataplane, BodyReader(settings.max_body, guard),
                            in_worker=settings.in_worker, token=settings.token,
                            activity=settings.activity)
    endpoint = InferenceEndpoint(context, settings.codecs, settings.debug)

    def on_swap(name: str, model: ServedModel | None, seconds: float, old: ServedModel | None) -> None:
        if metrics is not None and model is not None:
            metrics.describe_model(name, repository.slot(name).spec.key, model, seconds)
        if old is not None:
            dataplane.forget(old)
            if settings.heap is not None:
                settings.heap.retire(old)

    repository.on_swap.append(on_swap)
    if metrics is not None:
        for name in repository.names():
            slot = repository.slot(name)
            if slot.model is not None:
                metrics.describe_model(name, slot.spec.key, slot.model, slot.load_seconds)
        if not metrics.multiprocess:  # read at scrape time; across processes they are counted
            metrics.in_flight.set_function(lambda: settings.activity.in_flight)
            metrics.queue_depth.set_function(lambda: dataplane.admitted)
    started = False  # between the lifespan's start and its end

    def is_ready() -> bool:
        return started and not settings.activity.draining and repository.any_ready()

    context.is_ready = is_ready  # for other protocols' readiness (gRPC's ServerReady)

    async def live(request: Request) -> Response:
        return JSONResponse({"live": True})

    async def ready(request: Request) -> Response:
        ok = is_ready()
        return JSONResponse({"ready": ok}, status_code=200 if ok else 503)

    async def metrics_endpoint(request: Request) -> Response:
        assert metrics is not None
        return Response(metrics.render(), media_type=metrics.content_type)

    async def on_error(request: Request, exc: Exception) -> Response:
        """A route's error (or Starlette's own: no route, wrong method) as ours."""
        return error_reply(exc, request.scope, debug=settings.debug).response()

    def states() -> list[ModelState]:
        return [repository.state(name) for name in repository.names()]

    async def index(request: Request) -> Response:
        """The served models for a browser (EdgeMiddleware sends only those here)."""
        formats = [codec.media_type for codec in settings.codecs.codecs]
        page = index_page(states(), str(request.base_url), formats=formats,
                          token=settings.token is not None, version=__version__)
        return HTMLResponse(page, headers=INDEX_HEADERS)

    async def openapi(request: Request) -> Response:
        return JSONResponse(document.document())

    async def docs(request: Request) -> Response:
        return HTMLResponse(DOCS_PAGE, headers=DOCS_HEADERS)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        nonlocal started
        if settings.listeners:  # first: if one cannot start, nothing else was started
            await settings.listeners.start(context)
        background = []
        if settings.watch > 0:
            background.append(asyncio.create_task(repository.watch(settings.watch)))
        if settings.heap is not None:
            background.append(asyncio.create_task(settings.heap.keep()))
        started = True
        if settings.on_ready is not None:
            settings.on_ready()
        try:
            yield
        finally:
            started = False
            if settings.listeners:
                await settings.listeners.stop()  # at once, or waits for the drain under way
            for task in background:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            dataplane.close()
            guard.close()

    routes: list[BaseRoute] = [
        *endpoint.routes(),
        Route("/v2/health/live", live, methods=["GET"]),
        Route("/v2/health/ready", ready, methods=["GET"]),
        Route("/", index, methods=["GET"]),
        Route("/openapi.json", openapi, methods=["GET"]),
        Route("/docs", docs, methods=["GET"]),
    ]
    if metrics is not None:
        routes.append(Route("/metrics", metrics_endpoint, methods=["GET"]))
    for factory in route_factories:
        routes.extend(factory(context))
    app = Starlette(
        routes=routes,
        # Exception: a bug in a route is answered our 500 (Starlette then re-raises it, for the
        # server's log)
        exception_handlers={HTTPException: on_error, StudioError: on_error, Exception: on_error},
        lifespan=lifespan,
    )
    app.state.ready = is_ready
    document = DocumentBuilder(lambda: app.routes, settings.codecs, states, title=context.server_name,
                               version=__version__, token=settings.token is not None)
    edge = EdgeMiddleware(app, endpoint, settings, guard, context.counter)
    return with_cors(edge, settings.cors) if settings.cors else edge

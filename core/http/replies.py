"""Every error reply the server sends is made here, whoever meets the error: the inference
routes, auth, the body guard, Starlette's exception handlers and route plugins (V2, through
``studio_plugins.error_reply``). One place, so the body is always JSON ``{"error", "type"[,
"hint"]}``, the status fitting, the headers the status needs (``Retry-After`` on a 503,
``Allow`` on a 405, ``WWW-Authenticate`` on a 401) always there, and a traceback never shown
unless ``--debug``.
"""

from __future__ import annotations

import json
import logging
import traceback
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from starlette.exceptions import HTTPException
from starlette.responses import Response
from starlette.types import Send

from core.errors import MethodNotAllowed, Overloaded, StudioError, Unauthorized

log = logging.getLogger("studio_plugins.app")

JSON = b"application/json"
NOT_FOUND_HINT = " (POST / or POST /models/NAME to infer; GET /docs lists every route)"
"""Core names only its own routes: a plugin's (V2's) are on the /docs page with the rest."""
_HTTP_TYPES = {404: "NotFound", 405: "MethodNotAllowed"}


@dataclass(frozen=True, slots=True)
class ErrorReply:
    status: int
    body: bytes
    headers: list[tuple[bytes, bytes]]
    """``content-type`` first, then what the status needs; no ``content-length``."""

    def response(self) -> Response:
        """As a Starlette response (exception handlers, auth)."""
        return Response(self.body, status_code=self.status, media_type="application/json",
                        headers={k.decode("latin-1"): v.decode("latin-1") for k, v in self.headers[1:]})

    async def send(self, send: Send) -> None:
        await send_whole(send, self.status, self.body, list(self.headers))


def error_reply(exc: BaseException, scope: Mapping[str, Any] | None = None, *,
                debug: bool = False) -> ErrorReply:
    """The reply for ``exc``: a ``StudioError`` as it says; Starlette's ``HTTPException`` (no
    route, wrong method) with the request in its message and its own headers (a 405's
    ``Allow``); anything else is a bug of ours: logged with its traceback, answered 500 without
    it. ``scope``: the request's (for the message and the log line)."""
    where = f"{scope['method']} {scope['path']}" if scope is not None else "request"
    if isinstance(exc, HTTPException):
        message = f"{exc.detail}: {where}"
        if exc.status_code == 404:
            message += NOT_FOUND_HINT
        headers = [(b"content-type", JSON)]
        # Starlette's own headers: a 405 carries the route's Allow
        headers += [(k.lower().encode("latin-1"), v.encode("latin-1"))
                    for k, v in (exc.headers or {}).items()]
        body = json.dumps({"error": message, "type": _HTTP_TYPES.get(exc.status_code, "HTTPError")})
        return ErrorReply(exc.status_code, body.encode(), headers)
    if not isinstance(exc, StudioError):
        log.exception("internal error in %s", where, exc_info=exc)
        wrapped = StudioError(f"internal error: {type(exc).__name__}")
        wrapped.__cause__ = exc
        exc = wrapped
    elif exc.status >= 500:
        log.warning("%s -> %d: %s", where, exc.status, exc)
    return ErrorReply(exc.status, _body(exc, debug), _headers(exc))


def _body(exc: StudioError, debug: bool) -> bytes:
    content: dict[str, object] = {"error": exc.message, "type": exc.type_name}
    if exc.hint:
        content["hint"] = exc.hint
    if debug and exc.__cause__ is not None:
        content["traceback"] = "".join(traceback.format_exception(exc.__cause__))
    return json.dumps(content).encode()


def _headers(exc: StudioError) -> list[tuple[bytes, bytes]]:
    headers = [(b"content-type", JSON)]
    if isinstance(exc, Overloaded):
        headers.append((b"retry-after", b"1"))
    elif isinstance(exc, MethodNotAllowed):
        headers.append((b"allow", exc.allow.encode("latin-1")))
    elif isinstance(exc, Unauthorized):
        headers.append((b"www-authenticate", b"Bearer"))
    return headers


async def send_whole(send: Send, status: int, body: bytes, headers: list[tuple[bytes, bytes]]) -> None:
    """A whole reply in two messages, its length given (``headers`` is extended)."""
    headers.append((b"content-length", b"%d" % len(body)))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})

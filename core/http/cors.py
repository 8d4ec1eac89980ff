"""``--cors ORIGIN``: let web pages from these origins call the server from a browser.

Starlette's ``CORSMiddleware``, outermost (so a preflight ``OPTIONS``, which never carries a
token, is answered before auth), with the headers our clients send allowed (``Authorization``
among them, for ``--token``) and the ones they may need to read exposed. Without ``--cors`` it is
not in the stack at all: no CORS headers, as before, and no cost on the hot path.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence

from starlette.datastructures import Headers
from starlette.middleware.cors import CORSMiddleware
from starlette.responses import Response
from starlette.types import ASGIApp

from core.errors import ConfigurationError

ANY = "*"
METHODS = ("GET", "HEAD", "POST")
ALLOWED_HEADERS = ("Authorization", "Content-Type", "Accept", "X-Request-Id",
                   "Inference-Header-Content-Length")
EXPOSED_HEADERS = ("X-Request-Id", "Retry-After", "Inference-Header-Content-Length",
                   "X-Studio-Failed-Count", "X-Studio-Failed-Keys")
_ORIGIN = re.compile(r"https?://(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9]([A-Za-z0-9.-]*[A-Za-z0-9])?)(:[0-9]{1,5})?")


def check_origin(origin: str) -> str:
    """``origin`` as a browser sends it (``scheme://host[:port]``), or ``*``; else a
    ConfigurationError that says what is wrong (a path or a trailing slash never matches)."""
    if origin == ANY:
        return origin
    if _ORIGIN.fullmatch(origin):
        return origin.lower()
    hint = "an origin is scheme://host[:port], as the browser's Origin header has it"
    base = re.match(r"(https?://[^/]+)/", origin)
    if base:
        hint = f"no path or trailing slash: --cors {base.group(1)}"
    elif origin == "null":
        hint = "'null' is the origin of files and sandboxed frames, which any page can be: not allowed"
    raise ConfigurationError(f"--cors {origin!r} is not an origin", hint=hint)


class Cors(CORSMiddleware):
    """Starlette's middleware; a refused preflight is our JSON error, not plain text."""

    def preflight_response(self, request_headers: Headers) -> Response:
        response = super().preflight_response(request_headers)
        if response.status_code == 400:
            reason = bytes(response.body).decode().removeprefix("Disallowed CORS ")
            body = json.dumps({"error": f"CORS preflight refused: this {reason} is not allowed "
                               "(see the server's --cors)", "type": "BadRequest"})
            headers = {k: v for k, v in response.headers.items() if k.lower().startswith(("vary", "access"))}
            return Response(body, 400, headers=headers, media_type="application/json")
        return response


def with_cors(app: ASGIApp, origins: Sequence[str]) -> ASGIApp:
    """``app`` answering CORS for ``origins`` (``*``: any). Chrome's Private Network Access (a
    public page calling a server on this machine or network) is allowed for origins named one by
    one, never for ``*``."""
    allowed = [check_origin(origin) for origin in origins]
    return Cors(
        app,
        allow_origins=allowed,
        allow_methods=METHODS,
        allow_headers=ALLOWED_HEADERS,
        expose_headers=EXPOSED_HEADERS,
        allow_private_network=ANY not in allowed,
        max_age=600,
    )

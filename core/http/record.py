"""What the server notes about one request as it goes: the record the access log and the
metrics are written from when it ends.

The edge middleware (core/http/app.py) makes one per counted request and puts it in the ASGI scope
under ``"studio"``; the inference routes and route plugins fill it in (plugins through
``ServingContext.record``). Slots, not a dict: it is made on every request of the hot path.
"""

from __future__ import annotations

from dataclasses import dataclass

SCOPE_KEY = "studio"
"""Where the record is in the ASGI scope."""
UNMATCHED = "other"
"""The route label of a path no route has (labels stay bounded)."""


@dataclass(slots=True)
class RequestRecord:
    request_id: bytes
    headers: dict[bytes, bytes]
    """The request's headers (read once by the middleware; a repeated one: its last value)."""
    route: str = UNMATCHED
    """The path template of the route that answered (``route.path``), for metric labels."""
    model: str = ""
    batch: int | None = None
    """Rows of the model call that answered the request (several requests' when batched)."""
    status: int = 500
    """What was answered; 500 until a reply starts, 499 when the client went away first."""

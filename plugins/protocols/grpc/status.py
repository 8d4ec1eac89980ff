"""Which gRPC status answers an error: the HTTP status our errors carry, in gRPC's terms.

The same refusals as V2 over HTTP, so a client sees the same reason whichever protocol it
speaks: 400 -> ``INVALID_ARGUMENT``, 401 -> ``UNAUTHENTICATED``, 404 -> ``NOT_FOUND``, 413 ->
``RESOURCE_EXHAUSTED``, 503 -> ``UNAVAILABLE``, 504 -> ``DEADLINE_EXCEEDED``, a model failure
(500) -> ``INTERNAL``. Never ``UNKNOWN``: that is what grpc answers for an exception a handler
lets out, with its text.
"""

from __future__ import annotations

from typing import Any

STATUS_CODES = {
    400: "INVALID_ARGUMENT",
    401: "UNAUTHENTICATED",
    403: "PERMISSION_DENIED",
    404: "NOT_FOUND",
    405: "UNIMPLEMENTED",
    408: "DEADLINE_EXCEEDED",
    409: "FAILED_PRECONDITION",  # loading a model with --workers
    413: "RESOURCE_EXHAUSTED",
    415: "INVALID_ARGUMENT",
    500: "INTERNAL",
    502: "UNAVAILABLE",  # the experiment store
    503: "UNAVAILABLE",
    504: "DEADLINE_EXCEEDED",
}


def status_code(status: int) -> Any:
    """The ``grpc.StatusCode`` for an HTTP status (other 4xx: ``INVALID_ARGUMENT``, 5xx:
    ``INTERNAL``)."""
    import grpc

    name = STATUS_CODES.get(status) or ("INVALID_ARGUMENT" if status < 500 else "INTERNAL")
    return getattr(grpc.StatusCode, name)

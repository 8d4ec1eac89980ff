"""Reading a request body on plain ASGI, never more than the server's ``--max-body``.

Shared by the inference hot path and route plugins (re-exported by ``studio_plugins``)."""

from __future__ import annotations

from starlette.types import Receive

from core.errors import BadRequest, PayloadTooLarge


class ClientGone(Exception):
    """The client disconnected; there is no one to answer."""


async def read_body(receive: Receive, declared: bytes | None, limit: int) -> bytes:
    """The whole body; 413 as soon as it (or its ``Content-Length``) exceeds ``limit`` bytes,
    before the rest is read."""
    if declared is not None:
        try:
            size = int(declared)
        except ValueError:
            raise BadRequest("invalid Content-Length") from None
        if size > limit:
            raise PayloadTooLarge(f"body of {size} bytes exceeds the limit of {limit} bytes (--max-body)")
    chunks: list[bytes] = []
    received = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientGone()
        chunk = message.get("body", b"")
        if chunk:
            received += len(chunk)
            if received > limit:
                raise PayloadTooLarge(f"body exceeds the limit of {limit} bytes (--max-body)")
            chunks.append(chunk)
        if not message.get("more_body", False):
            break
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)

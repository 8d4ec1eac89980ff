"""Reading a request body on plain ASGI, never more than the server's ``--max-body``.

``read_body`` is the plain bounded read (re-exported by ``studio_plugins``). ``BodyReader`` is
the server's: the same read under the server-wide guards of core/http/body_guard.py (a read timeout
with a minimum rate, and a budget of body bytes across all requests). Route plugins get it as
``ServingContext.read_body``.
"""

from __future__ import annotations

import asyncio
from typing import Any

from starlette.types import Receive

from core.errors import BadRequest, PayloadTooLarge, RequestTimeout
from core.http.body_guard import FLOOR, BodyGuard


class ClientGone(Exception):
    """The client disconnected; there is no one to answer."""


def declared_size(declared: bytes | None, limit: int) -> int:
    """The ``Content-Length`` (0 when absent); 400 when invalid, 413 when over ``limit``."""
    if declared is None:
        return 0
    try:
        size = int(declared)
    except ValueError:
        raise BadRequest("invalid Content-Length") from None
    if size < 0:
        raise BadRequest("invalid Content-Length")
    if size > limit:
        raise PayloadTooLarge(f"body of {size} bytes exceeds the limit of {limit} bytes (--max-body)")
    return size


async def read_body(receive: Receive, declared: bytes | None, limit: int) -> bytes:
    """The whole body; 413 as soon as it (or its ``Content-Length``) exceeds ``limit`` bytes,
    before the rest is read. No budget and no read timeout: route plugins should read through
    ``ServingContext.read_body``, which has both."""
    return await BodyReader(limit).read(receive, declared)


class BodyReader:
    """``read_body`` under a server's ``BodyGuard``: 413 over ``--max-body``, 503 (with
    Retry-After) when the body does not fit the budget, before it is read; 408 when it does not
    start within ``--read-timeout`` or falls below ``--min-rate`` (the connection is then closed:
    the body was not read to its end, so Hypercorn cannot reuse it).

    The budget: the app's edge middleware charges every request ``FLOOR`` bytes; a body over
    that is charged the rest here (``guard.grow``), and the middleware gives it all back when the
    request ends, on every path."""

    def __init__(self, limit: int, guard: BodyGuard | None = None) -> None:
        self.limit = limit
        self.guard = guard if guard is not None else _UNGUARDED

    async def read(self, receive: Receive, declared: bytes | None, task: Any = None) -> bytes:
        """``task``: the request's (``asyncio.current_task()``), when the caller has it already."""
        guard = self.guard
        limit = self.limit
        size = 0
        if declared is not None:  # inlined declared_size (a call costs ~900 instructions here)
            try:
                size = int(declared)
            except ValueError:
                raise BadRequest("invalid Content-Length") from None
            if size > limit or size < 0:
                declared_size(declared, limit)  # raises the 400 or 413
        # what the body may reach before its budget charge must grow; never above ``limit``, so
        # one comparison per chunk guards both
        reserved = limit
        if guard.budget:
            reserved = FLOOR if limit > FLOOR else limit  # charged by the edge middleware
            if size > reserved:  # a larger declared body: charged now, 503 before reading
                guard.grow(size - reserved)
                reserved = size
        reading = guard.reading if guard.read_timeout > 0 else None
        if reading is not None:  # inlined: this runs on every request (bench/bench_inprocess.py)
            if task is None:
                task = asyncio.current_task()
            reading[task] = 0
            if guard.sweeper is None:
                guard.start_sweep()
        try:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise ClientGone()
            chunk = message.get("body", b"")
            if not message.get("more_body", False):  # the usual case: the whole body at once
                if len(chunk) > reserved:
                    if len(chunk) > limit:
                        raise PayloadTooLarge(f"body exceeds the limit of {limit} bytes (--max-body)")
                    guard.grow(len(chunk) - reserved)
                return chunk
            chunks = [chunk]
            received = len(chunk)
            while True:
                if received > reserved:  # a chunked body (or a server that lets one run over)
                    if received > limit:
                        raise PayloadTooLarge(f"body exceeds the limit of {limit} bytes (--max-body)")
                    guard.grow(received - reserved)
                    reserved = received
                if reading is not None:
                    reading[task] = received
                message = await receive()
                if message["type"] == "http.disconnect":
                    raise ClientGone()
                chunk = message.get("body", b"")
                if chunk:
                    received += len(chunk)
                    chunks.append(chunk)
                if not message.get("more_body", False):
                    break
            if received > reserved:
                if received > limit:
                    raise PayloadTooLarge(f"body exceeds the limit of {limit} bytes (--max-body)")
                guard.grow(received - reserved)
            return b"".join(chunks)
        except asyncio.CancelledError:
            if task is not None and guard.timed_out(task):
                raise RequestTimeout(guard.timeout_message()) from None
            raise
        finally:
            if reading is not None:
                del reading[task]
                if guard.started:
                    guard.started.pop(task, None)
                if guard.expired:
                    guard.expired.discard(task)


_UNGUARDED = BodyGuard()
"""No budget (never charged: ``reserved`` is the limit) and no read timeout."""

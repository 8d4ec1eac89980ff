"""The inference hot path (``POST /``, ``POST /models/{name}``) as plain ASGI.

Read the body (bounded), pick the codec, decode, run the model on the data plane, encode, send.
It bypasses Starlette's router, request object and middleware stack on purpose: on a small
request those cost as much as everything else we do (see bench/bench_http.py). The rest of the
app (health, metrics, errors for unknown routes) stays on Starlette.
"""

from __future__ import annotations

import asyncio
import json
import logging
import traceback
from typing import Any

from starlette.types import Receive, Scope, Send

from core.body import ClientGone, read_body
from core.codecs import CodecSet
from core.context import ServerContext
from core.errors import BadRequest, ModelError, Overloaded, StudioError
from core.types import Codec, Payload

log = logging.getLogger("studio_plugins.app")

JSON = b"application/json"


def error_body(exc: StudioError, debug: bool = False) -> bytes:
    content: dict[str, object] = {"error": exc.message, "type": exc.type_name}
    if exc.hint:
        content["hint"] = exc.hint
    if debug and exc.__cause__ is not None:
        content["traceback"] = "".join(traceback.format_exception(exc.__cause__))
    return json.dumps(content).encode()


def error_headers(exc: StudioError) -> list[tuple[bytes, bytes]]:
    headers = [(b"content-type", JSON)]
    if isinstance(exc, Overloaded):
        headers.append((b"retry-after", b"1"))
    return headers


async def send_reply(
    send: Send, status: int, body: bytes, headers: list[tuple[bytes, bytes]], info: dict[str, Any]
) -> None:
    """Send a whole reply with the request's id, and note its status for the access log."""
    headers.append((b"content-length", b"%d" % len(body)))
    headers.append((b"x-request-id", info["request_id"]))
    info["status"] = status
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class DisconnectWatch:
    """Cancels a request's task if its client disconnects, so a request whose client left stops
    counting against the queue and the model.

    Listening for a disconnect costs a task per request, and a timer per request is not free
    either; so a request is only noted in a dict, and a sweep every ``after`` seconds starts a
    listener for each request it already saw on its previous sweep (so after ``after`` to
    ``2 * after`` seconds): fast requests (most of them) pay for a dict entry."""

    def __init__(self, after: float = 0.05) -> None:
        self.after = after
        self.pending: dict[asyncio.Task[Any], Receive] = {}
        self.listeners: dict[asyncio.Task[Any], asyncio.Task[None]] = {}
        self.gone: set[asyncio.Task[Any]] = set()
        self.sweeper: asyncio.Task[None] | None = None

    def enter(self, receive: Receive) -> asyncio.Task[Any] | None:
        task = asyncio.current_task()
        if task is not None:
            self.pending[task] = receive
            if self.sweeper is None:
                self.sweeper = asyncio.ensure_future(self._sweep())
        return task

    def leave(self, task: asyncio.Task[Any] | None) -> None:
        if task is not None:
            del self.pending[task]
            if self.listeners:
                listener = self.listeners.pop(task, None)
                if listener is not None:
                    listener.cancel()
                    self.gone.discard(task)

    async def _sweep(self) -> None:
        seen: set[asyncio.Task[Any]] = set()
        try:
            while self.pending:
                await asyncio.sleep(self.after)
                for task, receive in list(self.pending.items()):
                    if task in seen and task not in self.listeners:
                        self.listeners[task] = asyncio.ensure_future(self._listen(task, receive))
                seen = set(self.pending)
        finally:
            self.sweeper = None

    async def _listen(self, task: asyncio.Task[Any], receive: Receive) -> None:
        while (await receive())["type"] != "http.disconnect":
            pass
        self.gone.add(task)
        task.cancel()

    def absorb(self, task: asyncio.Task[Any] | None) -> bool:
        """After a CancelledError: True (and the cancellation undone) if we caused it."""
        if task is not None and task in self.gone:
            self.gone.discard(task)
            task.uncancel()
            return True
        return False


class InferenceEndpoint:
    """Answers ``POST /`` (the default model) and ``POST /models/{name}``."""

    def __init__(self, context: ServerContext, codecs: CodecSet, max_body: int, debug: bool = False) -> None:
        self.context = context
        self.disconnects = DisconnectWatch()
        self.default = context.default_model
        self.dataplane = context.dataplane
        self.codecs = codecs
        self.max_body = max_body
        self.debug = debug

    def model_for(self, path: str) -> str | None:
        """The model a path addresses, None when the path is not an inference route."""
        if path == "/":
            return self.default
        if path.startswith("/models/"):
            name = path[len("/models/") :]
            if name and "/" not in name:
                return name
        return None

    async def __call__(
        self, scope: Scope, receive: Receive, send: Send, name: str, headers: dict[bytes, bytes],
        info: dict[str, Any],
    ) -> None:
        info["model"] = name
        try:
            model = self.context.ready_model(name)
            body = await read_body(receive, headers.get(b"content-length"), self.max_body)
            codec = self.codecs.for_request(headers.get(b"content-type", b"").decode("latin-1"), body)
            payload = codec.decode(body)
            if not isinstance(payload, dict) or not all(isinstance(key, str) for key in payload):
                raise BadRequest("the body must be a dict with string keys (names -> arrays)")
            task = self.disconnects.enter(receive)
            try:
                result, info["batch"] = await self.dataplane.infer(model, payload, name)
            except asyncio.CancelledError:
                if not self.disconnects.absorb(task):
                    raise
                raise ClientGone() from None
            finally:
                self.disconnects.leave(task)
            accept = headers.get(b"accept")
            reply_codec = codec if accept is None else self.codecs.for_reply(accept.decode("latin-1"), codec)
            reply = self.encode(reply_codec, result)
        except StudioError as exc:
            if exc.status >= 500:
                log.warning("POST %s -> %d: %s", scope["path"], exc.status, exc)
            await send_reply(send, exc.status, error_body(exc, self.debug), error_headers(exc), info)
            return
        except ClientGone:
            log.info("POST %s: client disconnected; request dropped", scope["path"])
            info["status"] = 499
            return
        except Exception as exc:  # a bug of ours: log it, never show it
            log.exception("internal error")
            wrapped = StudioError(f"internal error: {type(exc).__name__}")
            wrapped.__cause__ = exc
            await send_reply(send, 500, error_body(wrapped, self.debug), error_headers(wrapped), info)
            return
        await send_reply(send, 200, reply, [(b"content-type", self.codecs.content_type(reply_codec))], info)

    @staticmethod
    def encode(codec: Codec, result: Payload) -> bytes:
        try:
            return codec.encode(result)
        except StudioError:
            raise
        except Exception as exc:
            raise ModelError(f"model output cannot be encoded: {type(exc).__name__}: {exc}") from exc

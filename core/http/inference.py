"""The inference hot path (``POST /``, ``POST /models/{name}``) as plain ASGI.

Read the body (bounded), pick the codec, decode, run the model on the data plane, encode, send.
Its two routes are in the app's route list like any other (``InferenceEndpoint.routes``: the
OpenAPI document, Starlette's 404s and the metric labels see them), but the edge middleware
(core/http/app.py) calls the endpoint as soon as one of them matches, past Starlette's router,
request object and exception middleware: on a small request those cost as much as everything
else we do (see bench/bench_inprocess.py). Errors are answered here, by core/http/replies.py.
"""

from __future__ import annotations

import logging
from asyncio import current_task

from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from core.errors import BadRequest, ModelError, StudioError
from core.http.body import ClientGone
from core.http.codecs import CodecSet
from core.http.context import ServerContext
from core.http.failed_keys import failed_headers
from core.http.offload import INLINE_BYTES, decode_off_loop
from core.http.record import SCOPE_KEY, RequestRecord
from core.http.replies import error_reply
from core.types import Codec, Payload, Reply

log = logging.getLogger("studio_plugins.app")

INFERENCE_ROUTES = (("/", "POST"), ("/models/{name}", "POST"))
"""The routes answered here, for the route list and the OpenAPI document."""


async def send_reply(
    send: Send, status: int, body: bytes, headers: list[tuple[bytes, bytes]], record: RequestRecord
) -> None:
    """Send a whole reply with the request's id, and note its status for the access log."""
    headers.append((b"content-length", b"%d" % len(body)))
    headers.append((b"x-request-id", record.request_id))
    record.status = status
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class InferenceEndpoint:
    """Answers ``POST /`` (the default model) and ``POST /models/{name}``."""

    def __init__(self, context: ServerContext, codecs: CodecSet, debug: bool = False) -> None:
        self.context = context
        self.default = context.default_model
        self.dataplane = context.dataplane
        self.codecs = codecs
        self.max_body = context.max_body
        self.debug = debug

    def routes(self) -> list[Route]:
        """Its routes (``scope["path_params"]["name"]``, when there is one, names the model)."""
        return [Route(path, self, methods=[method]) for path, method in INFERENCE_ROUTES]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """As a plain ASGI route endpoint, after the edge middleware put the record in the scope."""
        name = scope.get("path_params", {}).get("name", self.default)
        await self.answer(scope, receive, send, name, scope[SCOPE_KEY])

    async def answer(self, scope: Scope, receive: Receive, send: Send, name: str,
                     record: RequestRecord) -> None:
        record.model = name
        headers = record.headers
        try:
            model = self.context.ready_model(name)
            task = current_task()  # once: the body read and the disconnect watch both note it
            body = await self.context.bodies.read(receive, headers.get(b"content-length"), task)
            codec = self.codecs.for_request(headers.get(b"content-type", b"").decode("latin-1"), body)
            if len(body) <= INLINE_BYTES:  # decode_off_loop's own test, without its coroutine
                payload = codec.decode(body, self.max_body)
            else:
                payload = await decode_off_loop(codec.decode, body, self.max_body)
            if not isinstance(payload, dict):
                raise BadRequest("the body must be a dict with string keys (names -> arrays)")
            for key in payload:  # a loop, not all() over a generator: this runs on every request
                if not isinstance(key, str):
                    raise BadRequest("the body must be a dict with string keys (names -> arrays)")
            result, record.batch = await self.context.run(model, name, payload, receive, task=task)
            accept = headers.get(b"accept")
            reply_codec = codec if accept is None else self.codecs.for_reply(accept.decode("latin-1"), codec)
            failed: tuple[object, ...] = ()
            if type(result) is Reply:
                failed = result.failed
                if not failed:  # a plain dict: the pickle codec's fast path takes only those
                    result = dict(result)
            reply = self.encode(reply_codec, result)
        except ClientGone:
            log.info("POST %s: client disconnected; request dropped", scope["path"])
            record.status = 499
            return
        except Exception as exc:  # a StudioError, or a bug of ours (logged, never shown)
            error = error_reply(exc, scope, debug=self.debug)
            await send_reply(send, error.status, error.body, list(error.headers), record)
            return
        reply_headers = [(b"content-type", self.codecs.content_type(reply_codec))]
        if failed:  # which Nones are failures: core/http/failed_keys.py
            reply_headers += failed_headers(failed)
        # send_reply's, inlined (a coroutine less on every request)
        reply_headers.append((b"content-length", b"%d" % len(reply)))
        reply_headers.append((b"x-request-id", record.request_id))
        record.status = 200
        await send({"type": "http.response.start", "status": 200, "headers": reply_headers})
        await send({"type": "http.response.body", "body": reply})

    @staticmethod
    def encode(codec: Codec, result: Payload) -> bytes:
        try:
            return codec.encode(result)
        except StudioError:
            raise
        except Exception as exc:
            raise ModelError(f"model output cannot be encoded: {type(exc).__name__}: {exc}") from exc

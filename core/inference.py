"""The inference hot path (``POST /``, ``POST /models/{name}``) as plain ASGI.

Read the body (bounded), pick the codec, decode, run the model on the data plane, encode, send.
It bypasses Starlette's router, request object and middleware stack on purpose: on a small
request those cost as much as everything else we do (see bench/bench_http.py). The rest of the
app (health, metrics, errors for unknown routes) stays on Starlette.
"""

from __future__ import annotations

import json
import logging
import traceback
from typing import Any

from starlette.types import Receive, Scope, Send

from core.body import ClientGone
from core.codecs import CodecSet
from core.context import ServerContext
from core.errors import BadRequest, MethodNotAllowed, ModelError, Overloaded, StudioError
from core.failed_keys import failed_headers
from core.offload import decode_off_loop
from core.types import Codec, Payload, Reply

log = logging.getLogger("studio_plugins.app")

JSON = b"application/json"
INFERENCE_ROUTES = (("/", "POST"), ("/models/{name}", "POST"))
"""The routes answered here (see ``InferenceEndpoint.model_for``), for the OpenAPI document."""


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
    elif isinstance(exc, MethodNotAllowed):
        headers.append((b"allow", exc.allow.encode("latin-1")))
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


class InferenceEndpoint:
    """Answers ``POST /`` (the default model) and ``POST /models/{name}``."""

    def __init__(self, context: ServerContext, codecs: CodecSet, max_body: int, debug: bool = False) -> None:
        self.context = context
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
            body = await self.context.bodies.read(receive, headers.get(b"content-length"))
            codec = self.codecs.for_request(headers.get(b"content-type", b"").decode("latin-1"), body)
            payload = await decode_off_loop(codec.decode, body, self.max_body)
            if not isinstance(payload, dict) or not all(isinstance(key, str) for key in payload):
                raise BadRequest("the body must be a dict with string keys (names -> arrays)")
            result, info["batch"] = await self.context.run(model, name, payload, receive)
            accept = headers.get(b"accept")
            reply_codec = codec if accept is None else self.codecs.for_reply(accept.decode("latin-1"), codec)
            failed: tuple[object, ...] = ()
            if type(result) is Reply:
                failed = result.failed
                if not failed:  # a plain dict: the pickle codec's fast path takes only those
                    result = dict(result)
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
        reply_headers = [(b"content-type", self.codecs.content_type(reply_codec))]
        if failed:  # which Nones are failures: core/failed_keys.py
            reply_headers += failed_headers(failed)
        await send_reply(send, 200, reply, reply_headers, info)

    @staticmethod
    def encode(codec: Codec, result: Payload) -> bytes:
        try:
            return codec.encode(result)
        except StudioError:
            raise
        except Exception as exc:
            raise ModelError(f"model output cannot be encoded: {type(exc).__name__}: {exc}") from exc

"""One request through an ASGI app in process, as Hypercorn would make it: the in-process HTTP
tests' client (no server to start, so a status or header costs microseconds to check)."""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from typing import Any


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    """Lower-case names; a repeated header's values joined with ", "."""
    body: bytes

    def json(self) -> Any:
        assert self.headers["content-type"].startswith("application/json"), self.headers
        return json.loads(self.body)

    @property
    def text(self) -> str:
        return self.body.decode()


def call(app: Any, method: str, path: str, headers: dict[str, str] | None = None,
         body: bytes = b"") -> Reply:
    """One request through the ASGI app, as Hypercorn would make it."""
    return asyncio.run(asyncio.wait_for(acall(app, method, path, headers, body), timeout=30))


async def acall(app: Any, method: str, path: str, headers: dict[str, str] | None = None,
                body: bytes = b"") -> Reply:
    """``call`` on a running loop: several at once share the app's data plane (queue, deadline)."""
    headers = {"Host": "127.0.0.1:5000", **(headers or {})}
    all_headers = [(b"content-length", str(len(body)).encode())]
    all_headers += [(k.lower().encode(), v.encode()) for k, v in headers.items()]
    scope = {"type": "http", "method": method, "path": path, "raw_path": path.encode(),
             "query_string": b"", "root_path": "", "http_version": "1.1", "scheme": "http",
             "server": ("127.0.0.1", 5000), "client": ("127.0.0.1", 1), "headers": all_headers}
    messages = [{"type": "http.request", "body": body, "more_body": False}]
    replies: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        if messages:
            return messages.pop()
        await asyncio.sleep(3600)  # the client waits for its answer
        raise AssertionError("unreachable")

    async def send(message: dict[str, Any]) -> None:
        replies.append(message)

    await app(scope, receive, send)
    start = next(m for m in replies if m["type"] == "http.response.start")
    for name, value in start.get("headers", []):  # what h11 would refuse to send, ending the connection
        assert b"\r" not in value and b"\n" not in value and value.isascii(), (name, value)
    reply_headers: dict[str, str] = {}
    for name, value in start.get("headers", []):
        key = name.decode().lower()
        seen = reply_headers.get(key)
        reply_headers[key] = value.decode() if seen is None else f"{seen}, {value.decode()}"
    content = b"".join(m.get("body", b"") for m in replies if m["type"] == "http.response.body")
    return Reply(start["status"], reply_headers, content)

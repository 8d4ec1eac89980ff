"""A slow body is decoded off the event loop: health checks keep answering meanwhile (issue 13).

In process, on the ASGI app itself: a hostile pickle that takes the decoder its whole opcode
budget is sent while health checks run on the same loop."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import numpy as np
import pytest

from core.http.app import AppSettings, build_app
from core.http.codecs import CodecSet
from core.http.offload import INLINE_BYTES, decode_off_loop
from core.models.repository import ModelRepository
from core.wire.safe_pickle import dumps, restricted_loads
from studio_plugins.testing import make_host


async def asgi_request(app: Any, method: str, path: str, body: bytes = b"",
                       headers: tuple[tuple[bytes, bytes], ...] = ()) -> tuple[int, bytes]:
    """One request through the app as Hypercorn would make it; (status, body)."""
    scope = {"type": "http", "method": method, "path": path, "raw_path": path.encode(),
             "query_string": b"", "headers": list(headers), "http_version": "1.1",
             "scheme": "http", "server": ("127.0.0.1", 80), "client": ("127.0.0.1", 1234),
             "root_path": "", "asgi": {"version": "3.0"}}
    sent = False
    replies: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        nonlocal sent
        if sent:
            await asyncio.sleep(3600)  # no disconnect while the app works
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        replies.append(message)

    await app(scope, receive, send)
    return replies[0]["status"], b"".join(m.get("body", b"") for m in replies[1:])


@pytest.fixture
def app(identity_repository: ModelRepository) -> Any:
    return build_app(identity_repository, AppSettings(codecs=CodecSet(make_host().codecs())))


SLOW = b"\x80\x05" + b"N0" * 400_000 + b"N."  # 800 KB of opcodes: the decoder's whole budget


def test_health_checks_answer_while_a_slow_body_decodes(app: Any) -> None:
    started = time.perf_counter()
    with pytest.raises(Exception, match="opcodes"):
        restricted_loads(SLOW)
    decode_seconds = time.perf_counter() - started

    async def main() -> tuple[int, list[float]]:
        hostile = asyncio.create_task(asgi_request(
            app, "POST", "/", SLOW, ((b"content-type", b"application/python-pickle"),)))
        latencies = []
        while not hostile.done():
            asked = time.perf_counter()
            status, _ = await asgi_request(app, "GET", "/v2/health/live")
            assert status == 200
            latencies.append(time.perf_counter() - asked)
            await asyncio.sleep(0.005)
        status, _ = await hostile
        return status, latencies

    status, latencies = asyncio.run(main())
    assert status == 400
    assert len(latencies) >= 3  # the loop kept turning while the body decoded
    # on the loop, one check would have waited for the whole decode
    assert max(latencies) < decode_seconds / 2, (max(latencies), decode_seconds)


def test_a_normal_request_still_round_trips_in_and_out_of_place(app: Any) -> None:
    for size in (10, INLINE_BYTES):  # decoded in place, and on a thread
        body = dumps({"x": np.arange(size, dtype="f8"), "y": [1, "a"]})
        status, reply = asyncio.run(asgi_request(app, "POST", "/", body))
        assert status == 200
        decoded = restricted_loads(reply)
        assert decoded["x"].tolist() == list(range(size)) and decoded["y"] == [1, "a"]


def test_decode_off_loop_runs_large_bodies_on_another_thread() -> None:
    import threading

    seen: list[str] = []

    def decode(body: bytes, limit: int) -> int:
        seen.append(threading.current_thread().name)
        return len(body)

    assert asyncio.run(decode_off_loop(decode, b"x" * 10, 100)) == 10
    assert asyncio.run(decode_off_loop(decode, b"x" * (INLINE_BYTES + 1), 100)) == INLINE_BYTES + 1
    assert seen[0] == "MainThread" and seen[1].startswith("studio-decode")

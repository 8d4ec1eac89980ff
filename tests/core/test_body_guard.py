"""Bodies under the server's guards, in process (plain ASGI calls, no sockets): the read timeout
with its minimum rate (408), the body budget (503 with Retry-After before the body is read, given
back on every path), for ``POST /`` and the V2 routes alike."""

from __future__ import annotations

import asyncio
import json
import pickle
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from core.http import sweeping
from core.http.app import AppSettings, build_app
from core.http.body_guard import FLOOR, BodyGuard
from core.http.codecs import CodecSet
from core.models.repository import ModelRepository
from core.types import ServeOptions
from studio_plugins.testing import make_host

Receive = Callable[[], Awaitable[dict[str, Any]]]
SMALL = pickle.dumps({"x": np.arange(3.0)})


@pytest.fixture
def make_app(modeldir: Path) -> Callable[..., Any]:
    def make(**settings: Any) -> Any:
        host = make_host()
        repository = ModelRepository(host, ServeOptions(keys=("exp",)))
        repository.load_all()
        return build_app(repository, AppSettings(codecs=CodecSet(host.codecs()), **settings),
                         host.route_factories())

    return make


def guard_of(app: Any) -> BodyGuard:
    return app.bodies  # type: ignore[no-any-return]


class Reply:
    def __init__(self) -> None:
        self.status = 0
        self.headers: dict[bytes, bytes] = {}
        self.body = b""

    async def send(self, message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            self.status = message["status"]
            self.headers = dict(message.get("headers", []))
        elif message["type"] == "http.response.body":
            self.body += message.get("body", b"")


def scope_of(path: str, length: int | None, method: str = "POST") -> dict[str, Any]:
    headers = [(b"host", b"test"), (b"content-type", b"application/python-pickle")]
    if length is not None:
        headers.append((b"content-length", b"%d" % length))
    return {"type": "http", "method": method, "path": path, "raw_path": path.encode(),
            "query_string": b"", "root_path": "", "http_version": "1.1", "scheme": "http",
            "server": ("127.0.0.1", 5000), "client": ("127.0.0.1", 1), "headers": headers}


async def call(app: Any, path: str, receive: Receive, length: int | None) -> Reply:
    reply = Reply()
    await app(scope_of(path, length), receive, reply.send)
    return reply


def whole(body: bytes) -> Receive:
    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": body, "more_body": False}

    return receive


def trickle(chunk: bytes, every: float, count: int = 10**9) -> Receive:
    """``chunk`` every ``every`` seconds, ``count`` times (then the end of the body)."""
    sent = [0]

    async def receive() -> dict[str, Any]:
        await asyncio.sleep(every)
        sent[0] += 1
        return {"type": "http.request", "body": chunk, "more_body": sent[0] < count}

    return receive


def never() -> Receive:
    async def receive() -> dict[str, Any]:
        await asyncio.Event().wait()
        raise AssertionError("unreachable")

    return receive


# --- read timeout ---------------------------------------------------------------------------


def test_a_body_that_never_starts_is_answered_408(make_app: Callable[..., Any]) -> None:
    app = make_app(read_timeout=0.2, min_rate=1000)

    async def main() -> tuple[Reply, float]:
        started = time.monotonic()
        reply = await call(app, "/", never(), 100)
        return reply, time.monotonic() - started

    reply, took = asyncio.run(main())
    assert reply.status == 408, reply.body
    assert json.loads(reply.body)["type"] == "RequestTimeout"
    assert 0.2 <= took < 1.0  # between T and T + 2 sweeps (0.05 s each here)
    assert not guard_of(app).reading and guard_of(app).free == guard_of(app).budget


def test_one_sweeper_serves_requests_that_need_no_waiting_and_ends_when_idle(
        make_app: Callable[..., Any], monkeypatch: pytest.MonkeyPatch) -> None:
    """A small body leaves the guard's dict in the step it entered it; its sweeper must outlive
    that, or nearly every request would start a task of its own (core/http/disconnects.py)."""
    monkeypatch.setattr(sweeping, "LINGER", 0.2)
    app = make_app(read_timeout=0.2, min_rate=1000)
    guard = guard_of(app)

    async def main() -> None:
        assert (await call(app, "/", whole(SMALL), len(SMALL))).status == 200
        sweeper = guard.sweeper
        assert sweeper is not None
        for _ in range(3):
            await asyncio.sleep(0.06)  # the sweeper ran and found nothing to watch
            assert (await call(app, "/", whole(SMALL), len(SMALL))).status == 200
            assert guard.sweeper is sweeper and not sweeper.done()
        await asyncio.sleep(0.5)
        assert sweeper.done() and guard.sweeper is None  # idle for LINGER: it ended

    asyncio.run(main())


def test_a_body_below_the_minimum_rate_is_cut_one_above_it_is_read(make_app: Callable[..., Any]) -> None:
    app = make_app(read_timeout=0.3, min_rate=1000)

    async def main() -> tuple[Reply, float, Reply]:
        started = time.monotonic()
        # 50 bytes / 0.1 s = 500 B/s: the deadline 0.3 + received/1000 s is passed at ~0.6 s
        slow = await call(app, "/", trickle(b"x" * 50, 0.1), 10**6)
        took = time.monotonic() - started
        # 5 KB / 0.1 s for 1 s, well past --read-timeout: each 1000 bytes add a second
        body = pickle.dumps({"x": np.zeros(6000, np.uint8)})
        step = len(body) // 10 + 1
        chunks = [body[i:i + step] for i in range(0, len(body), step)]
        pieces = iter(chunks)

        async def receive() -> dict[str, Any]:
            await asyncio.sleep(0.1)
            chunk = next(pieces)
            return {"type": "http.request", "body": chunk, "more_body": chunk is not chunks[-1]}

        fast = await call(app, "/", receive, len(body))
        return slow, took, fast

    slow, took, fast = asyncio.run(main())
    assert slow.status == 408 and 0.5 <= took < 1.5, (slow.status, took)
    assert fast.status == 200, fast.body


def test_read_timeout_0_waits(make_app: Callable[..., Any]) -> None:
    app = make_app(read_timeout=0)

    async def main() -> Reply:
        return await call(app, "/", trickle(SMALL, 0.3, count=1), len(SMALL))

    assert asyncio.run(main()).status == 200


# --- budget ---------------------------------------------------------------------------------


def test_a_body_over_the_budget_gets_503_before_it_is_read_and_the_budget_comes_back(
    make_app: Callable[..., Any],
) -> None:
    app = make_app(max_body=4 * FLOOR, body_budget=4 * FLOOR, read_timeout=0)
    guard = guard_of(app)

    async def main() -> None:
        # one client declares 3 x FLOOR and holds it while it trickles
        gate = asyncio.Event()
        big = pickle.dumps({"x": np.zeros(3 * FLOOR - 200, np.uint8)})
        assert len(big) <= 3 * FLOOR

        async def held() -> dict[str, Any]:
            await gate.wait()
            return {"type": "http.request", "body": big, "more_body": False}

        holder = asyncio.ensure_future(call(app, "/", held, len(big)))
        await asyncio.sleep(0.05)
        left = guard.budget - len(big)
        assert guard.free == left < 2 * FLOOR

        read: list[str] = []

        def refused_unread(path: str) -> Receive:
            async def receive() -> dict[str, Any]:
                read.append(path)
                return {"type": "http.request", "body": b"", "more_body": False}
            return receive

        for path in ("/", "/models/exp", "/v2/models/exp/infer"):
            reply = await call(app, path, refused_unread(path), 2 * FLOOR)
            assert reply.status == 503, (path, reply.body)
            assert reply.headers[b"retry-after"] == b"1"
            assert json.loads(reply.body)["type"] == "Overloaded"
        assert read == []  # refused before a byte was read
        assert guard.free == left  # each refusal gave back what it took

        # a small body still fits beside it
        assert (await call(app, "/", whole(SMALL), len(SMALL))).status == 200

        gate.set()
        assert (await holder).status == 200
        assert guard.free == guard.budget and not guard.grown
        # and the refused size is served now
        body = pickle.dumps({"x": np.zeros(2 * FLOOR - 200, np.uint8)})
        assert (await call(app, "/", whole(body), len(body))).status == 200
        assert guard.free == guard.budget

    asyncio.run(main())


def test_the_budget_comes_back_on_every_path(make_app: Callable[..., Any]) -> None:
    app = make_app(max_body=8 * FLOOR, body_budget=8 * FLOOR, read_timeout=0.2, min_rate=10**6)
    guard = guard_of(app)
    big = pickle.dumps({"x": np.zeros(3 * FLOOR, np.uint8)})

    async def gone() -> dict[str, Any]:
        return {"type": "http.disconnect"}

    chunks = [big[i:i + 1000] for i in range(0, len(big), 1000)]
    bad = b"\x80\x05garbage" * 20000
    bad_json = b"{not json" * 20000

    def chunked() -> Receive:  # no Content-Length: charged as it grows
        pieces = iter(chunks)

        async def receive() -> dict[str, Any]:
            chunk = next(pieces)
            return {"type": "http.request", "body": chunk, "more_body": chunk is not chunks[-1]}
        return receive

    async def main() -> None:
        cases: list[tuple[str, Receive, int | None, int]] = [
            ("success", whole(big), len(big), 200),
            ("chunked", chunked(), None, 200),
            ("bad body", whole(bad), len(bad), 400),
            ("too large", whole(b"x"), 9 * FLOOR, 413),
            ("disconnect", gone, len(big), 0),
            ("timeout", never(), len(big), 408),
            ("v2", whole(bad_json), len(bad_json), 400),
        ]
        for name, receive, length, status in cases:
            path = "/v2/models/exp/infer" if name == "v2" else "/"
            reply = await call(app, path, receive, length)
            assert reply.status == status, (name, reply.body)
            assert guard.free == guard.budget and not guard.grown, name

    asyncio.run(main())


def test_a_chunked_body_past_the_budget_gets_503(make_app: Callable[..., Any]) -> None:
    app = make_app(max_body=2 * FLOOR, body_budget=2 * FLOOR, read_timeout=0)
    guard = guard_of(app)

    async def main() -> None:
        gate = asyncio.Event()

        async def held() -> dict[str, Any]:  # charged FLOOR, never grows
            await gate.wait()
            return {"type": "http.request", "body": SMALL, "more_body": False}

        holder = asyncio.ensure_future(call(app, "/", held, None))
        await asyncio.sleep(0.01)
        reply = await call(app, "/", trickle(b"x" * 4096, 0, count=40), None)
        assert reply.status == 503 and reply.headers[b"retry-after"] == b"1"
        gate.set()
        assert (await holder).status == 200
        assert guard.free == guard.budget

    asyncio.run(main())

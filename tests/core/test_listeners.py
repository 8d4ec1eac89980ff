"""Listeners (``studio_register_listeners``): a protocol on a port of its own, started with the
app on its data plane, stopped before the data plane closes. Here a throwaway line protocol on a
real asyncio TCP server, the app's lifespan driven as Hypercorn drives it."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import numpy as np
import pytest

from core.http.app import AppSettings, build_app
from core.http.codecs import CodecSet
from core.http.listeners import ListenerGroup
from core.models.repository import ModelRepository
from core.types import ServeOptions
from studio_plugins import Listener, OpenListener, ServingContext, hookimpl
from studio_plugins.testing import make_host


class LinePort(OpenListener):
    """Reads a JSON list per line, answers the default model's reply to it (``{"x": list}``)."""

    def __init__(self, events: list[str], fail: bool = False) -> None:
        self.events = events
        self.fail = fail
        self.server: asyncio.Server | None = None
        self.description = "lines"

    async def start(self, context: ServingContext) -> None:
        if self.fail:
            self.events.append("failed")
            raise RuntimeError("cannot start")
        serving = context

        async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            line = await reader.readline()
            with serving.counted("lines") as scope:
                reply = await serving.infer(serving.default_model, {"x": np.array(json.loads(line))})
                serving.record(scope, serving.default_model, status=200)
            writer.write(json.dumps(reply.payload["x"].tolist()).encode() + b"\n")
            await writer.drain()
            writer.close()

        self.server = await asyncio.start_server(answer, "127.0.0.1", 0)
        self.events.append("started")

    @property
    def port(self) -> int:
        assert self.server is not None
        return int(self.server.sockets[0].getsockname()[1])

    async def stop(self, grace: float) -> None:
        self.events.append(f"stop {grace}")
        assert self.server is not None
        self.server.close()
        await self.server.wait_closed()


class LineListener(Listener):
    name = "lines"

    def reserve(self, options: ServeOptions) -> OpenListener | None:
        return None


def lifespan_app(repository: ModelRepository, listeners: ListenerGroup, events: list[str]) -> Any:
    host = make_host()
    settings = AppSettings(codecs=CodecSet(host.codecs()), listeners=listeners,
                           on_ready=lambda: events.append("ready"))
    return build_app(repository, settings), settings


async def run_lifespan(app: Any, during: Any) -> None:
    """startup, ``await during()``, shutdown: the messages Hypercorn sends."""
    inbox: asyncio.Queue[dict[str, str]] = asyncio.Queue()
    outbox: list[str] = []

    async def send(message: dict[str, Any]) -> None:
        outbox.append(message["type"])
        if message["type"].endswith("failed"):
            outbox.append(message.get("message", ""))

    task = asyncio.create_task(app({"type": "lifespan", "asgi": {"version": "3.0"}, "state": {}},
                                   inbox.get, send))
    await inbox.put({"type": "lifespan.startup"})
    while not outbox:
        await asyncio.sleep(0.01)
    if outbox[0] != "lifespan.startup.complete":
        await task
        raise RuntimeError(str(outbox))
    await during()
    await inbox.put({"type": "lifespan.shutdown"})
    await task


def test_a_listener_serves_on_the_apps_data_plane_between_start_and_stop(
        identity_repository: ModelRepository) -> None:
    events: list[str] = []
    port = LinePort(events)
    listeners = ListenerGroup([port], grace=7.0)
    app, settings = lifespan_app(identity_repository, listeners, events)

    async def during() -> None:
        assert events == ["started", "ready"]  # up before the server says it is
        reader, writer = await asyncio.open_connection("127.0.0.1", port.port)
        writer.write(b"[1.5, 2.5]\n")
        assert json.loads(await reader.readline()) == [1.5, 2.5]  # the identity model's answer
        writer.close()
        assert settings.activity.in_flight == 0 and settings.activity.idle_for() < 5

    asyncio.run(run_lifespan(app, during))
    assert events == ["started", "ready", "stop 7.0"]


def test_stop_is_once_however_often_it_is_asked(identity_repository: ModelRepository) -> None:
    events: list[str] = []
    listeners = ListenerGroup([LinePort(events)])
    app, _ = lifespan_app(identity_repository, listeners, events)

    async def during() -> None:
        # the process layer stops the listeners as Hypercorn stops accepting; the lifespan's
        # end then waits for that stop instead of starting another
        await asyncio.gather(listeners.stop(2.0), listeners.stop(5.0))

    asyncio.run(run_lifespan(app, during))
    assert events == ["started", "ready", "stop 2.0"]


def test_a_listener_that_cannot_start_stops_the_others_and_the_server(
        identity_repository: ModelRepository) -> None:
    events: list[str] = []
    listeners = ListenerGroup([LinePort(events), LinePort(events, fail=True)])
    app, _ = lifespan_app(identity_repository, listeners, events)
    with pytest.raises(RuntimeError, match="cannot start"):
        asyncio.run(run_lifespan(app, asyncio.sleep))
    assert events == ["started", "failed", "stop 30.0"]  # never ready


def test_listeners_are_registered_and_reserved_only_when_asked() -> None:
    class Plugin:
        @staticmethod
        @hookimpl
        def studio_register_listeners(register: Any) -> None:
            register(LineListener())

    host = make_host(Plugin())
    assert set(host.listeners()) == {"grpc", "lines"}
    assert host.listeners()["grpc"].reserve(ServeOptions(keys=("exp",))) is None  # no --grpc-port
    info = {p.name: p.registered for p in host.plugins()}
    assert info["protocols.grpc.listener"] == ["listener:grpc"]

"""A ``grpc.aio`` server in process around a real app's ``ServingContext``, for the gRPC tests.

The app is built as ``tests/web_app.py``'s ``toy_app`` builds one (a real host, repository and
``build_app``), its lifespan started (so the server is ready); the servicer is the one
``studio-plug serve --grpc-port`` serves (``add_v2_servicer``), on a ``grpc.aio`` server in a
background thread with its own event loop, bound to 127.0.0.1 with ``--max-body`` as its message
size limit, as the listener builds it. Clients talk to it with ``tritonclient.grpc``.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from core.http.app import AppSettings, build_app
from core.http.codecs import CodecSet
from core.models.repository import ModelRepository
from core.types import ServeOptions
from plugins.protocols.grpc.servicer import add_v2_servicer
from studio_plugins import Loader, LoadOptions, Reply, ServedModel, hookimpl
from studio_plugins.testing import make_host
from tests.asgi import Reply as HttpReply
from tests.asgi import acall
from tests.web_app import ToyPlugin

grpc = pytest.importorskip("grpc")


class SlowLoader(Loader):
    """``*.slow``: JSON ``{"seconds": S}``; the model sleeps S seconds (or what its input
    ``sleep`` says) and answers its inputs; an input named ``boom`` makes it raise, one named
    ``fail`` is answered as a failed key (a ``Reply``'s ``None``, as a ModelPipe's item)."""

    name = "slow"
    patterns = ("*.slow",)

    def load(self, checkpoint: Path | None, options: LoadOptions) -> ServedModel:
        assert checkpoint is not None
        seconds = json.loads(checkpoint.read_text())["seconds"]

        def run(payload: dict[str, Any]) -> dict[str, Any]:
            if "boom" in payload:
                raise RuntimeError("the model broke")
            time.sleep(float(np.asarray(payload.get("sleep", seconds)).ravel()[0]))
            if "fail" in payload:
                return Reply({**payload, "fail": None}, ("fail",))
            return dict(payload)

        return ServedModel(run, "slow", checkpoint)


class SlowPlugin:
    @staticmethod
    @hookimpl
    def studio_register_loaders(register: Any) -> None:
        register(SlowLoader())


class GrpcServer:
    """The app and its gRPC server, each on the background loop; ``address`` is host:port."""

    def __init__(self, app: Any, max_body: int, patch: pytest.MonkeyPatch) -> None:
        self.app = app
        self.patch = patch  # the store's environment, for loads while it serves
        self.context = app.endpoint.context  # the ServingContext the app's routes get
        self.max_body = max_body
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.address = self.run(self._start())

    def run(self, coroutine: Coroutine[Any, Any, Any], timeout: float = 60) -> Any:
        """Run ``coroutine`` on the server's loop and wait for its result."""
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout)

    async def _start(self) -> str:
        self.lifespan_messages: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self.lifespan_sent: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        await self.lifespan_messages.put({"type": "lifespan.startup"})
        self.lifespan = asyncio.ensure_future(self.app(
            {"type": "lifespan", "asgi": {"version": "3.0"}, "state": {}},
            self.lifespan_messages.get, self.lifespan_sent.put))
        started = await self.lifespan_sent.get()
        assert started["type"] == "lifespan.startup.complete", started
        self.server = grpc.aio.server(options=[
            ("grpc.max_receive_message_length", self.max_body),
            ("grpc.max_send_message_length", -1),
        ])
        add_v2_servicer(self.server, self.context)
        port = self.server.add_insecure_port("127.0.0.1:0")
        await self.server.start()
        return f"127.0.0.1:{port}"

    def http(self, method: str, path: str, headers: dict[str, str] | None = None) -> HttpReply:
        """One HTTP request through the same app (``/metrics``, V2 over HTTP)."""
        return self.run(acall(self.app, method, path, headers))

    def close(self) -> None:
        async def stop() -> None:
            await self.server.stop(0)
            await self.lifespan_messages.put({"type": "lifespan.shutdown"})
            await self.lifespan

        self.run(stop())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()
        self.patch.undo()


def grpc_server(home: Path, models: dict[str, tuple[str, str] | None], *, max_body: int = 1 << 20,
                serve: dict[str, Any] | None = None, **settings: Any) -> GrpcServer:
    """A gRPC server for ``models`` (key -> (checkpoint file name, its text), or None: the identity
    model) in the store at ``home``, whose modeldirs may hold more already (a Keras model).
    ``serve``: more ServeOptions; ``settings``: AppSettings."""
    for key, model in models.items():
        modeldir = home / "experiments" / key / "modeldir"
        modeldir.mkdir(parents=True, exist_ok=True)
        if model is not None:
            (modeldir / model[0]).write_text(model[1])
    host = make_host(ToyPlugin(), SlowPlugin())
    patch = pytest.MonkeyPatch()
    patch.setenv("STUDIOML_HOME", str(home))
    for variable in ("STUDIO_STORE", "STUDIO_TOKEN", "STUDIO_PLUGINS_DISABLE", "STUDIO_PLUGINS_LOAD"):
        patch.delenv(variable, raising=False)
    try:
        repository = ModelRepository(host, ServeOptions(keys=tuple(models), **(serve or {})))
        repository.load_all()
        app = build_app(repository, AppSettings(codecs=CodecSet(host.codecs()), max_body=max_body,
                                                **settings), host.route_factories())
        return GrpcServer(app, max_body, patch)
    except BaseException:
        patch.undo()
        raise

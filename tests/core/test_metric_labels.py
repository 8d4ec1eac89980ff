"""Metric labels stay bounded whatever names clients send: only the served model names (the
repository's, at the time of the request) become labels; any other name is counted under ""."""

from __future__ import annotations

import asyncio
import pickle
import uuid
from pathlib import Path
from typing import Any

import numpy as np

from core.http.app import AppSettings, build_app
from core.http.codecs import CodecSet
from core.models.repository import ModelRepository
from core.types import ServeOptions
from studio_plugins.testing import make_host

SMALL = pickle.dumps({"x": np.arange(3.0)})


def scope_of(path: str, method: str = "POST") -> dict[str, Any]:
    return {"type": "http", "method": method, "path": path, "raw_path": path.encode(),
            "query_string": b"", "root_path": "", "http_version": "1.1", "scheme": "http",
            "server": ("127.0.0.1", 5000), "client": ("127.0.0.1", 1),
            "headers": [(b"host", b"test"), (b"content-type", b"application/python-pickle")]}


async def call(app: Any, path: str, body: bytes, method: str = "POST") -> tuple[int, bytes]:
    reply: dict[str, Any] = {"body": b""}

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": body, "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            reply["status"] = message["status"]
        elif message["type"] == "http.response.body":
            reply["body"] += message.get("body", b"")

    await app(scope_of(path, method), receive, send)
    return reply["status"], reply["body"]


def test_unknown_model_names_share_one_label(modeldir: Path) -> None:
    host = make_host()
    repository = ModelRepository(host, ServeOptions(keys=("exp",)))
    repository.load_all()
    app = build_app(repository, AppSettings(codecs=CodecSet(host.codecs())), host.route_factories())

    async def main() -> bytes:
        for _ in range(3000):
            assert (await call(app, f"/models/{uuid.uuid4().hex}", SMALL))[0] == 404
        for _ in range(300):
            assert (await call(app, f"/v2/models/{uuid.uuid4().hex}/infer", b"{}"))[0] == 404
        assert (await call(app, "/models/exp", SMALL))[0] == 200
        repository.unload("exp")  # a name the repository has stays a label when unloaded
        assert (await call(app, "/models/exp", SMALL))[0] == 503
        return (await call(app, "/metrics", b"", "GET"))[1]

    text = asyncio.run(main()).decode()
    assert len(text) < 20_000, len(text)
    assert 'studio_requests_total{model="",route="/models/{name}",status="404"} 3000.0' in text
    assert 'studio_requests_total{model="",route="/v2/models/{name}/infer",status="404"} 300.0' in text
    assert 'studio_requests_total{model="exp",route="/models/{name}",status="200"} 1.0' in text
    assert 'studio_requests_total{model="exp",route="/models/{name}",status="503"} 1.0' in text

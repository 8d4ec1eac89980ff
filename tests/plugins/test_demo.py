"""`studio-plug demo`: writes the doubling Keras model into experiment `demo` and serves it."""

from __future__ import annotations

import json
import os
import sys
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from studio_plugins.client import predict
from studio_plugins.testing import ServerProcess

os.environ.setdefault("KERAS_BACKEND", "torch")
pytest.importorskip("keras")


class DemoProcess(ServerProcess):
    """`studio-plug demo ARGS --port 0 --host 127.0.0.1` instead of `serve`."""

    @property
    def command(self) -> list[str]:
        return [sys.executable, "-m", "studio_plugins", "demo", *self.args]


def test_demo_model_is_written_once(studio_home: Path) -> None:
    from plugins.commands.demo import ensure_demo_model

    path, written = ensure_demo_model()
    assert written and path == studio_home / "experiments" / "demo" / "modeldir" / "demo.keras"
    mtime = path.stat().st_mtime_ns
    again, written = ensure_demo_model()
    assert (again, written) == (path, False) and path.stat().st_mtime_ns == mtime
    assert [p.name for p in path.parent.iterdir()] == ["demo.keras"]  # no temp file left


@pytest.mark.timeout(150)
def test_demo_serves_the_doubling_model_and_prints_a_curl_line(studio_home: Path) -> None:
    # The demo uses the embedded store even when STUDIO_STORE names another one.
    env = {"STUDIO_STORE": "file:///nonexistent/store"}
    with DemoProcess("--killafter", "60", env=env) as demo:
        body = json.dumps({"x": [[1.0, 2.0, 3.0]]}).encode()
        request = urllib.request.Request(demo.url, data=body, method="POST",
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=30) as response:
            assert json.loads(response.read()) == {"x": [[2.0, 4.0, 6.0]]}  # the key sent
        x = np.random.default_rng(0).normal(size=(4, 3)).astype(np.float32)
        np.testing.assert_allclose(predict(demo.url, {"x": x})["x"], 2 * x, rtol=1e-6)
        np.testing.assert_allclose(predict(demo.url, {"any": x})["any"], 2 * x, rtol=1e-6)
    output = "\n".join(demo.stdout_lines)
    assert f"wrote {studio_home / 'experiments' / 'demo' / 'modeldir' / 'demo.keras'}" in output
    assert "curl -s -X POST http://127.0.0.1:PORT/ -H 'Content-Type: application/json'" in output
    assert """-d '{"x": [[1.0, 2.0, 3.0]]}'""" in output
    assert any("demo.keras with loader keras" in line for line in demo.stderr_lines)

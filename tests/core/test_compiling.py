"""Compiling after load (core/models/compiling.py) through a real repository and app, with a
throwaway loader whose models say how to compile them: the compiled model is swapped into the
slot as a reload would be, a failed compile leaves the loaded model serving with a log line, and
a model replaced while it compiled is not overwritten."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from core.http.app import AppSettings, build_app
from core.http.codecs import CodecSet
from core.models.repository import ModelRepository
from core.types import Loader, LoadOptions, Payload, ServedModel, ServeOptions
from studio_plugins import hookimpl
from studio_plugins.testing import make_host
from tests.asgi import call

GATE = threading.Event()
"""Held clear, a compile waits on it (a compile still running)."""


def scaling(factor: float) -> Callable[[Payload], Payload]:
    def predict(data: Payload) -> Payload:
        return {key: [factor * v for v in value] for key, value in data.items()}
    return predict


class ScaleLoader(Loader):
    """``*.scale`` files hold a factor, or ``refuse``: the compiled model adds one to it."""

    name = "scale"
    patterns = ("*.scale",)

    def load(self, checkpoint: Path | None, options: LoadOptions) -> ServedModel:
        assert checkpoint is not None
        text = checkpoint.read_text()
        factor = 1.0 if text == "refuse" else float(text)
        loaded = ServedModel(predict=scaling(factor), platform="scale", checkpoint=checkpoint)

        def compiler() -> ServedModel:
            GATE.wait(10)
            if text == "refuse":
                raise ValueError("this model cannot be compiled\nsecond line")
            return ServedModel(predict=scaling(factor + 1), platform="scale",
                               checkpoint=checkpoint, compiled="by adding one")

        loaded.compiler = compiler
        return loaded


class ScalePlugin:
    @hookimpl
    def studio_register_loaders(self, register: Callable[[Loader], None]) -> None:
        register(ScaleLoader())


@pytest.fixture(autouse=True)
def gate_open() -> None:
    GATE.set()


def repository(studio_home: Path, content: str = "2", **options: object) -> ModelRepository:
    modeldir = studio_home / "experiments" / "exp" / "modeldir"
    modeldir.mkdir(parents=True, exist_ok=True)
    (modeldir / "m.scale").write_text(content)
    loaded = ModelRepository(make_host(ScalePlugin()), ServeOptions(keys=("exp",), **options))  # type: ignore[arg-type]
    loaded.load_all()
    return loaded


def answer(app: object) -> list[float]:
    reply = call(app, "POST", "/", {"Content-Type": "application/json"}, b'{"x": [1.0]}')
    assert reply.status == 200, reply.text
    return list(reply.json()["x"])


def test_the_compiled_model_is_swapped_in_and_answers(studio_home: Path,
                                                      caplog: pytest.LogCaptureFixture) -> None:
    repo = repository(studio_home)
    app = build_app(repo, AppSettings(codecs=CodecSet(make_host().codecs())))
    assert repo.compiler is not None and not repo.compiler.started
    assert answer(app) == [2.0]  # not started: the loaded model serves, the compile waits
    eager = repo.slot("exp").model
    swaps: list[tuple[ServedModel | None, ServedModel | None]] = []
    repo.on_swap.append(lambda name, new, seconds, old: swaps.append((new, old)))
    with caplog.at_level(logging.INFO, "studio_plugins.compiling"):
        assert repo.compiler.run_pending() == ["exp"]
    compiled = repo.slot("exp").model
    assert compiled is not None and compiled.compiled == "by adding one"
    assert swaps == [(compiled, eager)]  # the app let go of the loaded one, as after a reload
    assert answer(app) == [3.0]
    assert "model exp compiled in" in caplog.text and "(by adding one) and swapped in" in caplog.text
    assert repo.compiler.run_pending() == []  # compiled once


def test_a_failed_compile_keeps_the_loaded_model_with_a_log_line(
        studio_home: Path, caplog: pytest.LogCaptureFixture) -> None:
    repo = repository(studio_home, "refuse")
    assert repo.compiler is not None
    eager = repo.slot("exp").model
    with caplog.at_level(logging.WARNING, "studio_plugins.compiling"):
        assert repo.compiler.run_pending() == []
    assert repo.slot("exp").model is eager
    assert ("model exp is not compiled (ValueError: this model cannot be compiled); it keeps "
            "serving as loaded") in caplog.text


def test_started_it_compiles_in_the_background_and_a_reload_compiles_too(studio_home: Path) -> None:
    repo = repository(studio_home)
    assert repo.compiler is not None
    repo.compiler.start()

    def compiled_factor() -> float:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            model = repo.slot("exp").model
            if model is not None and model.compiled:
                return float(model.predict({"x": [1.0]})["x"][0])  # type: ignore[index]
            time.sleep(0.01)
        raise AssertionError("not compiled in 10 s")

    assert compiled_factor() == 3.0
    (studio_home / "experiments" / "exp" / "modeldir" / "m.scale").write_text("5")
    repo.load("exp")  # a reload (--watch, V2 load): the new checkpoint is compiled in turn
    assert compiled_factor() == 6.0


def test_a_model_replaced_while_it_compiled_is_not_overwritten(
        studio_home: Path, caplog: pytest.LogCaptureFixture) -> None:
    repo = repository(studio_home)
    assert repo.compiler is not None
    GATE.clear()
    outcome: list[list[str]] = []
    compiling = threading.Thread(target=lambda: outcome.append(repo.compiler.run_pending()))  # type: ignore[union-attr]
    with caplog.at_level(logging.INFO, "studio_plugins.compiling"):
        compiling.start()
        repo.unload("exp")
        GATE.set()
        compiling.join(10)
    assert outcome == [[]] and repo.slot("exp").model is None
    assert "model exp was replaced while it compiled" in caplog.text


def test_no_compile_compiles_nothing(studio_home: Path) -> None:
    repo = repository(studio_home, compile=False)
    assert repo.compiler is None
    model = repo.slot("exp").model
    assert model is not None and model.compiler is not None and model.compiled is None

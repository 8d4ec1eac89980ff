"""Several models on one server, and live checkpoint reload under load (real server, real
Keras checkpoints written here)."""

from __future__ import annotations

import json
import os
import shutil
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from studio_plugins.client import PredictionError, predict
from studio_plugins.testing import ServerProcess
from tests.cli.test_serve import WRAPPER, get, post

os.environ.setdefault("KERAS_BACKEND", "torch")
keras = pytest.importorskip("keras")


def save_scaler(path: Path, factor: float) -> Path:
    """A Keras model x -> factor * x (3-vectors), saved to ``path`` via a temp file and a rename
    unless the test wants to watch a file being written."""
    inputs = keras.Input((3,), name="x")
    dense = keras.layers.Dense(3, use_bias=False)
    model = keras.Model(inputs, dense(inputs))
    dense.set_weights([factor * np.eye(3, dtype="float32")])
    temp = path.parent.parent / f".{path.name}.tmp{path.suffix}"
    model.save(temp)
    shutil.move(temp, path)
    return path


@pytest.fixture
def two_experiments(studio_home: Path) -> tuple[Path, Path]:
    dirs = []
    for key in ("double", "triple"):
        directory = studio_home / "experiments" / key / "modeldir"
        directory.mkdir(parents=True)
        dirs.append(directory)
    save_scaler(dirs[0] / "ckpt-1.keras", 2.0)
    save_scaler(dirs[1] / "ckpt-1.keras", 3.0)
    return dirs[0], dirs[1]


X = np.array([[1.0, 2.0, 3.0]], np.float32)


@pytest.mark.timeout(120)
def test_two_experiments_answer_by_name(two_experiments: tuple[Path, Path]) -> None:
    with ServerProcess("double", "--model", "t=triple:ckpt-1.keras") as server:
        assert server.url and "Serving double, t on" in server.output()
        np.testing.assert_allclose(predict(server.url, {"a": X})["a"], 2 * X)
        np.testing.assert_allclose(predict(server.url + "models/double", {"a": X})["a"], 2 * X)
        np.testing.assert_allclose(predict(server.url + "models/t", {"a": X})["a"], 3 * X)
        with pytest.raises(PredictionError) as caught:
            predict(server.url + "models/triple", {"a": X})
        assert caught.value.status == 404


@pytest.mark.timeout(120)
def test_per_model_wrapper(two_experiments: tuple[Path, Path]) -> None:
    with ServerProcess("double", "triple", "--wrapper", f"triple={WRAPPER}") as server:
        np.testing.assert_allclose(predict(server.url, {"a": X})["a"], 2 * X)
        assert predict(server.url + "models/triple", {"a": X})["done"] is True


@pytest.mark.timeout(120)
def test_a_model_that_fails_to_load_fails_the_start_naming_it(
    two_experiments: tuple[Path, Path],
) -> None:
    (two_experiments[1] / "ckpt-2.keras").write_bytes(b"not a keras file")
    server = ServerProcess("double", "triple")
    with pytest.raises(RuntimeError) as caught:
        server.start()
    errors = [line for line in server.stderr_lines if line.startswith("error:")]
    assert len(errors) == 1 and "model 'triple' (experiment triple)" in errors[0], caught.value
    assert any("--allow-partial" in line for line in server.stderr_lines)


@pytest.mark.timeout(120)
def test_allow_partial_serves_the_others(two_experiments: tuple[Path, Path]) -> None:
    (two_experiments[1] / "ckpt-2.keras").write_bytes(b"not a keras file")
    with ServerProcess("double", "triple", "--allow-partial") as server:
        np.testing.assert_allclose(predict(server.url, {"a": X})["a"], 2 * X)
        with pytest.raises(PredictionError) as caught:
            predict(server.url + "models/triple", {"a": X})
        assert caught.value.status == 503 and "not ready" in caught.value.server_message
        assert get(server.url + "v2/health/ready")[0] == 200


class Hammer:
    """Sends requests in a loop from a thread; records every answer (or failure)."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.answers: list[tuple[float, Any]] = []
        self.failures: list[Exception] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)

    def run(self) -> None:
        # two keys: each is its own model call; both must come from the same model
        payload = {"a": X, "b": 10 * X}
        while not self.stop.is_set():
            try:
                reply = predict(self.url, payload, timeout=30)
                self.answers.append((time.monotonic(), reply))
            except Exception as exc:
                self.failures.append(exc)

    def factors(self) -> list[float]:
        found = []
        for _, reply in self.answers:
            factor_a = float(reply["a"][0, 0] / X[0, 0])
            factor_b = float(reply["b"][0, 0] / (10 * X[0, 0]))
            assert factor_a == pytest.approx(factor_b), "a mixture inside one response"
            found.append(round(factor_a, 3))
        return found

    def __enter__(self) -> Hammer:
        self.thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop.set()
        self.thread.join(30)


def wait_for(condition: Any, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return False


@pytest.mark.timeout(180)
def test_reload_under_load_switches_without_failing_a_request(
    two_experiments: tuple[Path, Path],
) -> None:
    modeldir = two_experiments[0]
    with ServerProcess("double", "--watch", "0.3") as server, Hammer(server.url) as hammer:
        assert wait_for(lambda: len(hammer.answers) > 20, 30)
        # a corrupt newer checkpoint: logged, retried only when it changes, the old one serves
        (modeldir / "ckpt-2.keras").write_bytes(b"half-written garbage")
        assert wait_for(lambda: any("failed to load" in line for line in server.stderr_lines), 30)
        settled = len(hammer.answers)
        assert wait_for(lambda: len(hammer.answers) > settled + 20, 30)
        assert set(hammer.factors()) == {2.0}
        # a good newer checkpoint with other weights
        written = time.monotonic()
        save_scaler(modeldir / "ckpt-3.keras", 5.0)
        assert wait_for(lambda: 5.0 in hammer.factors()[-5:], 30)
        switched_after = next(t for t, r in hammer.answers if r["a"][0, 0] == 5.0) - written
        count = len(hammer.answers)
        assert wait_for(lambda: len(hammer.answers) > count + 20, 30)
    factors = hammer.factors()
    assert hammer.failures == []
    first_new = factors.index(5.0)
    assert set(factors[:first_new]) == {2.0} and set(factors[first_new:]) == {5.0}  # no flapping
    assert switched_after < 0.3 * 2 + 15  # two polls (the file must hold still) + load
    assert any("now serves ckpt-3.keras" in line for line in server.stderr_lines)


@pytest.mark.timeout(120)
def test_metrics_name_the_served_checkpoint_after_a_reload(
    two_experiments: tuple[Path, Path],
) -> None:
    modeldir = two_experiments[0]
    with ServerProcess("double", "--watch", "0.2") as server:
        assert 'checkpoint="ckpt-1.keras"' in get(server.url + "metrics")[1].decode()
        save_scaler(modeldir / "ckpt-2.keras", 4.0)
        assert wait_for(
            lambda: 'checkpoint="ckpt-2.keras"' in get(server.url + "metrics")[1].decode(), 30
        )
        np.testing.assert_allclose(predict(server.url, {"a": X})["a"], 4 * X)


def test_model_names_are_validated(studio_home: Path) -> None:
    server = ServerProcess("--model", "../x=double")
    with pytest.raises(RuntimeError):
        server.start()
    assert any("invalid experiment key" in line for line in server.stderr_lines)


def test_json_error_for_unknown_model_route(two_experiments: tuple[Path, Path]) -> None:
    with ServerProcess("double") as server:
        status, _, body = post(server.url + "models/nope", b"{}", "application/json")
        assert status == 404 and "nope" in json.loads(body)["error"]


@pytest.mark.timeout(120)
def test_a_keras_and_a_torch_model_load_in_parallel(studio_home: Path) -> None:
    # the models load in parallel threads; torch does not survive two threads importing it
    torch = pytest.importorskip("torch")
    keras_dir = studio_home / "experiments" / "k" / "modeldir"
    torch_dir = studio_home / "experiments" / "t" / "modeldir"
    keras_dir.mkdir(parents=True)
    torch_dir.mkdir(parents=True)
    save_scaler(keras_dir / "m.keras", 2.0)
    linear = torch.nn.Linear(3, 3, bias=False)
    with torch.no_grad():
        linear.weight.copy_(3 * torch.eye(3))
    torch.jit.save(torch.jit.script(linear), str(torch_dir / "m.pt"))
    with ServerProcess("k", "t") as server:
        np.testing.assert_allclose(predict(server.url + "models/k", {"a": X})["a"], 2 * X)
        np.testing.assert_allclose(predict(server.url + "models/t", {"a": X})["a"], 3 * X)

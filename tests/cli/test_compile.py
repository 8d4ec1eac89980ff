"""The compiled call path end to end: a real server compiles its Keras models after it serves,
swaps the compiled one in (a ``--watch`` reload's checkpoint too), keeps serving a model that
cannot be compiled as loaded, with a log line; under ``--workers`` the parent compiles before
it forks."""

from __future__ import annotations

import os
import shutil
import signal
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from studio_plugins.client import predict
from studio_plugins.testing import ServerProcess

os.environ.setdefault("KERAS_BACKEND", "torch")
keras = pytest.importorskip("keras")

X = np.random.default_rng(11).normal(size=(5, 784)).astype(np.float32)


def save_mlp(path: Path, seed: int) -> Any:
    keras.utils.set_random_seed(seed)
    model = keras.Sequential([keras.Input((784,)), keras.layers.Dense(64, activation="relu"),
                              keras.layers.Dense(10, activation="softmax")])
    temp = path.parent.parent / f".{path.name}"  # written aside, renamed in: --watch sees it whole
    model.save(temp)
    shutil.move(temp, path)
    return model


def save_branching(path: Path) -> None:
    """x * 2 where its largest value is positive, else x - 1: a trace bakes the branch in."""
    inputs = keras.Input((3,), name="x")
    branch = keras.layers.Lambda(lambda x: x * 2.0 if float(x.max()) > 0 else x - 1.0,
                                 output_shape=(3,))
    keras.Model(inputs, branch(inputs)).save(path)


def experiment(home: Path, key: str) -> Path:
    directory = home / "experiments" / key / "modeldir"
    directory.mkdir(parents=True)
    return directory


def wait_for_lines(server: ServerProcess, text: str, count: int = 1, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while sum(text in line for line in server.stderr_lines) < count:
        assert time.monotonic() < deadline, f"no {count} x {text!r} in:\n{server.output()}"
        time.sleep(0.05)


def answers_as(model: Any, url: str) -> None:
    want = keras.ops.convert_to_numpy(model(X, training=False))
    np.testing.assert_allclose(predict(url, {"x": X})["x"], want, rtol=1e-4, atol=1e-5)


@pytest.mark.timeout(180)
def test_served_models_are_compiled_reloads_too_and_the_uncompilable_serve_as_loaded(
        studio_home: Path) -> None:
    mlp_dir = experiment(studio_home, "mlp")
    first = save_mlp(mlp_dir / "mlp-1.keras", seed=1)
    save_branching(experiment(studio_home, "branch") / "branch.keras")
    with ServerProcess("mlp", "--model", "branch=branch", "--trust-checkpoint",
                       "--watch", "0.3") as server:
        answers_as(first, server.url)  # at once: the loaded model serves while it compiles
        wait_for_lines(server, "model mlp compiled in")
        assert any("(torch.jit.trace, frozen) and swapped in" in line for line in server.stderr_lines)
        answers_as(first, server.url)

        wait_for_lines(server, "model branch is not compiled")
        line = next(line for line in server.stderr_lines if "model branch is not compiled" in line)
        assert "disagrees with the loaded one on the priming batch" in line
        assert "it keeps serving as loaded" in line and "WARNING" in line
        x = np.array([[1.0, -2.0, 0.5]], np.float32)
        np.testing.assert_allclose(predict(server.url + "models/branch", {"x": x})["x"], 2 * x)
        np.testing.assert_allclose(predict(server.url + "models/branch", {"x": -x * x})["x"],
                                   -x * x - 1)

        second = save_mlp(mlp_dir / "mlp-2.keras", seed=2)  # a --watch reload is compiled too
        wait_for_lines(server, "now serves mlp-2.keras")
        wait_for_lines(server, "model mlp compiled in", count=2)
        answers_as(second, server.url)


@pytest.mark.timeout(180)
def test_with_workers_the_parent_compiles_before_the_fork(studio_home: Path) -> None:
    model = save_mlp(experiment(studio_home, "mlp") / "mlp.keras", seed=3)
    with ServerProcess("mlp", "--workers", "2") as server:
        for _ in range(4):
            answers_as(model, server.url)
        lines = server.stderr_lines
        compiled = next(i for i, line in enumerate(lines) if "model mlp compiled in" in line)
        forked = next(i for i, line in enumerate(lines) if "2 workers serving" in line)
        assert compiled < forked and not any("rolling reload" in line for line in lines)


@pytest.mark.timeout(120)
def test_no_compile_serves_the_model_as_loaded(studio_home: Path) -> None:
    model = save_mlp(experiment(studio_home, "mlp") / "mlp.keras", seed=4)
    with ServerProcess("mlp", "--no-compile") as server:
        answers_as(model, server.url)
        time.sleep(1.0)  # a compile would have logged by now (it takes well under a second)
        assert not any("compil" in line for line in server.stderr_lines), server.output()


@pytest.mark.timeout(120)
def test_a_server_stopped_while_it_compiles_exits_cleanly(studio_home: Path) -> None:
    # torch aborts a process that exits while another thread traces ("terminate called without
    # an active exception", status -6): the server waits for the compile instead
    save_mlp(experiment(studio_home, "mlp") / "mlp.keras", seed=5)
    server = ServerProcess("mlp").start()
    try:
        assert server.process is not None
        server.process.send_signal(signal.SIGTERM)  # at once: the compile has just begun
        assert server.process.wait(60) == 0, server.output()
    finally:
        server.kill()

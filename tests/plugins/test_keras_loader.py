"""The Keras loader with real checkpoints written here: choice of checkpoint, request semantics,
safe mode, broken files, and `studio-plug serve` end to end."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from core.models.assembly import choose, load_model
from studio_plugins import BadRequest, LoadError, LoadOptions, MissingDependencyError, ServeOptions
from studio_plugins.client import PredictionError, predict
from studio_plugins.testing import ServerProcess, make_host

os.environ.setdefault("KERAS_BACKEND", "torch")
keras = pytest.importorskip("keras")


def scaler(factor: float, name: str = "scale") -> keras.Model:
    """x (a batch of 3-vectors) -> factor * x: one Dense layer, kernel factor * I, no bias."""
    inputs = keras.Input((3,), name="x")
    dense = keras.layers.Dense(3, use_bias=False, name=name)
    model = keras.Model(inputs, dense(inputs))
    dense.set_weights([factor * np.eye(3, dtype="float32")])
    return model


def save(model: keras.Model, path: Path, mtime: float | None = None) -> Path:
    if path.suffix == ".hdf":  # Studio.ML's name: Keras writes it as .h5
        model.save(path.with_suffix(".h5"))
        path.with_suffix(".h5").rename(path)
    else:
        model.save(path)
    if mtime is not None:
        os.utime(path, (mtime, mtime))
    return path


def keras_loader():
    return make_host().loaders()["keras"]


X = np.array([[1.0, 2.0, 3.0], [-1.0, 0.5, 4.0]], np.float32)


# --- loading and request semantics (in process) ------------------------------------------


@pytest.mark.parametrize("name", ["model.keras", "model.h5", "model.hdf5", "checkpoint.03-0.45.hdf"])
def test_each_checkpoint_format_loads_and_doubles(tmp_path: Path, name: str) -> None:
    path = save(scaler(2.0), tmp_path / name)
    loader = keras_loader()
    assert loader.recognises(path)
    model = loader.load(path, LoadOptions())
    assert model.platform == "keras" and model.checkpoint == path
    # the seed's contract: each key is an input batch answered under the same key, the model's
    # own input name included; named outputs are V2's (predict_named)
    reply = model.predict({"x": X})
    assert set(reply) == {"x"}
    np.testing.assert_allclose(reply["x"], 2 * X, rtol=1e-6)
    assert model.predict_named is not None
    named = model.predict_named({"x": X})
    assert set(named) == {"scale"}
    np.testing.assert_allclose(named["scale"], 2 * X, rtol=1e-6)
    per_key = model.predict({"a": X, "b": X[:1] * 10})
    np.testing.assert_allclose(per_key["a"], 2 * X, rtol=1e-6)
    np.testing.assert_allclose(per_key["b"], 20 * X[:1], rtol=1e-6)
    assert per_key["a"].dtype == np.float32


def test_metadata_names_inputs_and_outputs(tmp_path: Path) -> None:
    model = keras_loader().load(save(scaler(2.0, name="double"), tmp_path / "m.keras"), LoadOptions())
    assert [(s.name, s.datatype, s.shape) for s in model.inputs] == [("x", "FP32", (-1, 3))]
    assert [(s.name, s.datatype, s.shape) for s in model.outputs] == [("double", "FP32", (-1, 3))]


def test_several_named_inputs_and_outputs(tmp_path: Path) -> None:
    a, b = keras.Input((2,), name="a"), keras.Input((3,), name="b")
    joined = keras.layers.Concatenate()([a, b])
    total = keras.layers.Dense(1, use_bias=False, kernel_initializer="ones", name="total")(joined)
    first = keras.layers.Dense(2, use_bias=False, kernel_initializer="ones", name="pair")(joined)
    path = save(keras.Model([a, b], [total, first]), tmp_path / "two.keras")
    model = keras_loader().load(path, LoadOptions())
    result = model.predict({"a": np.ones((4, 2)), "b": np.full((4, 3), 2.0)})  # float64: cast
    assert set(result) == {"total", "pair"}
    np.testing.assert_allclose(result["total"], np.full((4, 1), 8.0))
    with pytest.raises(BadRequest, match="takes the inputs a, b"):
        model.predict({"a": np.ones((4, 2))})


def test_a_batch_of_the_wrong_shape_is_a_bad_request(tmp_path: Path) -> None:
    model = keras_loader().load(save(scaler(2.0), tmp_path / "m.keras"), LoadOptions())
    with pytest.raises(BadRequest, match=r"shape \(3,\).*takes \(N, 3\)"):
        model.predict({"x": [1.0, 2.0, 3.0]})  # no batch axis
    with pytest.raises(BadRequest, match="not a numeric array"):
        model.predict({"x": [["a", "b", "c"]]})


def test_concurrent_calls_from_threads_give_each_their_own_answer(tmp_path: Path) -> None:
    model = keras_loader().load(save(scaler(3.0), tmp_path / "m.keras"), LoadOptions())
    batches = [np.random.default_rng(i).normal(size=(1 + i % 5, 3)).astype(np.float32) for i in range(64)]
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda batch: model.predict({"k": batch})["k"], batches))
    for batch, answer in zip(batches, answers, strict=True):
        np.testing.assert_allclose(answer, 3 * batch, rtol=1e-5)


def test_lambda_layer_is_refused_unless_trusted(tmp_path: Path) -> None:
    inputs = keras.Input((3,), name="x")
    path = save(keras.Model(inputs, keras.layers.Lambda(lambda t: t * 5)(inputs)), tmp_path / "lam.h5")
    with pytest.raises(LoadError) as refused:
        keras_loader().load(path, LoadOptions())
    assert "Lambda" in refused.value.message and "--trust-checkpoint" in (refused.value.hint or "")
    model = keras_loader().load(path, LoadOptions(trust_checkpoint=True))
    np.testing.assert_allclose(next(iter(model.predict({"x": X}).values())), 5 * X, rtol=1e-6)


def test_corrupt_and_weights_only_files(tmp_path: Path) -> None:
    corrupt = tmp_path / "broken.h5"
    corrupt.write_bytes(b"\x89HDF\r\n\x1a\n" + b"\0" * 64)
    with pytest.raises(LoadError, match=r"broken\.h5 is not a Keras model"):
        keras_loader().load(corrupt, LoadOptions())
    weights = tmp_path / "legacy.h5"
    scaler(2.0).save_weights(tmp_path / "w.weights.h5")
    (tmp_path / "w.weights.h5").rename(weights)  # a Keras-2 style weights file named .h5
    with pytest.raises(LoadError, match="weights only"):
        keras_loader().load(weights, LoadOptions())
    # Keras 3 weights files say what they are: never picked as a checkpoint
    assert not keras_loader().recognises(tmp_path / "epoch1.weights.h5")


def test_a_truncated_keras_file_says_so(tmp_path: Path) -> None:
    whole = tmp_path / "whole.keras"
    scaler(2.0).save(whole)
    cut = tmp_path / "cut.keras"
    cut.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    with pytest.raises(LoadError, match=r"cut\.keras is corrupt or truncated"):
        keras_loader().load(cut, LoadOptions())


def test_missing_keras_is_one_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "keras", None)  # `import keras` now raises ImportError
    with pytest.raises(MissingDependencyError) as missing:
        keras_loader().load(tmp_path / "m.keras", LoadOptions())
    assert missing.value.hint == "pip install 'studio-plugins[keras]'"


# --- which checkpoint is served -----------------------------------------------------------


def test_the_newest_checkpoint_answers_and_checkpoint_option_picks_another(modeldir: Path) -> None:
    save(scaler(2.0), modeldir / "checkpoint.01-0.90.hdf", mtime=1_700_000_000)
    save(scaler(3.0), modeldir / "checkpoint.02-0.40.keras", mtime=1_700_000_100)
    host = make_host()
    model = load_model(host, ServeOptions(keys=("exp",)), "exp")
    assert model.checkpoint is not None and model.checkpoint.name == "checkpoint.02-0.40.keras"
    np.testing.assert_allclose(model.predict({"x": X})["x"], 3 * X, rtol=1e-6)

    older = load_model(host, ServeOptions(keys=("exp",), checkpoint="checkpoint.01-0.90.hdf"), "exp")
    np.testing.assert_allclose(older.predict({"x": X})["x"], 2 * X, rtol=1e-6)

    # touching the older one makes it the newest
    os.utime(modeldir / "checkpoint.01-0.90.hdf", (1_700_000_200, 1_700_000_200))
    loader, path = choose(modeldir, host.loaders(), None, None)
    assert (loader.name, path and path.name) == ("keras", "checkpoint.01-0.90.hdf")


def test_weights_only_files_are_never_picked_and_are_named(modeldir: Path) -> None:
    scaler(2.0).save_weights(modeldir / "epoch3.weights.h5")
    scaler(3.0).save_weights(modeldir / "legacy.weights.h5")
    (modeldir / "legacy.weights.h5").rename(modeldir / "epoch4.hdf5")  # Keras 2 style: weights in .hdf5
    save(scaler(4.0), modeldir / "old.h5", mtime=1_700_000_000)  # a whole model, older
    loader, path = choose(modeldir, make_host().loaders(), None, None)
    assert (loader.name, path and path.name) == ("keras", "old.h5")
    (modeldir / "old.h5").unlink()
    with pytest.raises(LoadError) as nothing:
        load_model(make_host(), ServeOptions(keys=("exp",)), "exp")
    message = nothing.value.message
    assert "epoch3.weights.h5 (Keras weights saved by save_weights, no model)" in message
    assert "epoch4.hdf5 (Keras weights in HDF5, no model config)" in message
    assert "--wrapper FILE whose create_model(modeldir) builds the model" in message
    # named with --checkpoint, a weights file says what it is too
    with pytest.raises(LoadError, match=r"epoch4\.hdf5 is Keras weights in HDF5, no model config; "
                                        r"serve it with --wrapper"):
        load_model(make_host(), ServeOptions(keys=("exp",), checkpoint="epoch4.hdf5"), "exp")


def test_an_empty_modeldir_serves_identity(modeldir: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO):
        model = load_model(make_host(), ServeOptions(keys=("exp",)), "exp")
    assert model.platform == "identity" and "no checkpoints in" in caplog.text


def test_loader_option_forces_a_loader(modeldir: Path) -> None:
    save(scaler(2.0), modeldir / "m.keras")
    model = load_model(make_host(), ServeOptions(keys=("exp",), loader="identity"), "exp")
    assert model.platform == "identity"


# --- end to end ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def keras_server(tmp_path_factory: pytest.TempPathFactory):
    """One server for the module: experiment `exp` with an older (x2) and a newer (x3) checkpoint."""
    home = tmp_path_factory.mktemp("studioml")
    modeldir = home / "experiments" / "exp" / "modeldir"
    modeldir.mkdir(parents=True)
    save(scaler(2.0), modeldir / "checkpoint.01-0.90.h5", mtime=1_700_000_000)
    save(scaler(3.0), modeldir / "checkpoint.02-0.40.keras", mtime=1_700_000_100)
    with ServerProcess("exp", env={"STUDIOML_HOME": str(home), "STUDIO_STORE": ""}) as server:
        yield server


@pytest.mark.timeout(120)
def test_served_keras_model_answers_like_the_model(keras_server: ServerProcess) -> None:
    batch = np.random.default_rng(1).normal(size=(5, 3)).astype(np.float32)
    expected = scaler(3.0)(batch).detach().numpy()
    result = predict(keras_server.url, {"x": batch})
    np.testing.assert_allclose(result["x"], expected, rtol=1e-5)
    result = predict(keras_server.url, {"first": batch, "second": batch[:2]})
    np.testing.assert_allclose(result["first"], 3 * batch, rtol=1e-5)
    np.testing.assert_allclose(result["second"], 3 * batch[:2], rtol=1e-5)
    assert any("checkpoint.02-0.40.keras with loader keras" in line for line in keras_server.stderr_lines)


@pytest.mark.timeout(120)
def test_served_keras_model_refuses_a_wrong_shape_with_400(keras_server: ServerProcess) -> None:
    with pytest.raises(PredictionError) as error:
        predict(keras_server.url, {"x": np.ones((2, 4), np.float32)})
    assert error.value.status == 400 and "takes (N, 3)" in error.value.server_message
    np.testing.assert_allclose(predict(keras_server.url, {"x": X})["x"], 3 * X, rtol=1e-6)


def run_cli(*args: str, home: Path, code: str = "") -> subprocess.CompletedProcess[str]:
    """`studio-plug ARGS` in a subprocess; ``code`` runs first (e.g. to hide a framework)."""
    program = f"{code}\nfrom studio_plugins.cli import main\nmain({list(args)!r})"
    env = {**os.environ, "STUDIOML_HOME": str(home)}
    env.pop("STUDIO_STORE", None)
    return subprocess.run([sys.executable, "-c", program], capture_output=True, text=True,
                          env=env, timeout=120)


@pytest.mark.timeout(150)
def test_serving_a_corrupt_checkpoint_fails_before_binding(studio_home: Path, modeldir: Path) -> None:
    (modeldir / "checkpoint.05-0.10.h5").write_bytes(b"not hdf5 at all")
    done = run_cli("serve", "exp", "--port", "0", home=studio_home)
    assert done.returncode == 1
    assert "Serving" not in done.stdout
    errors = [line for line in done.stderr.splitlines() if line.startswith(("error:", "hint:"))]
    assert errors[0].startswith("error: checkpoint.05-0.10.h5 is not a Keras model"), done.stderr
    assert "Traceback" not in done.stderr


@pytest.mark.timeout(150)
def test_missing_keras_on_the_command_line_is_one_line(studio_home: Path, modeldir: Path) -> None:
    save(scaler(2.0), modeldir / "m.keras")
    done = run_cli("serve", "exp", "--port", "0", home=studio_home,
                   code="import sys; sys.modules['keras'] = None")
    assert done.returncode == 1
    assert "error: keras is not installed" in done.stderr
    assert "hint: pip install 'studio-plugins[keras]'" in done.stderr
    assert "Traceback" not in done.stderr


@pytest.mark.timeout(150)
def test_a_loaded_model_runs_in_a_forked_child_with_several_threads(tmp_path: Path) -> None:
    from tests.plugins.forking import forked_child

    path = save(scaler(2.0), tmp_path / "m.keras")
    assert forked_child("keras", path, (64, 3)) == "child finished"
    # the check can fail: a parent that ran a multi-threaded op first hangs its child
    assert forked_child("keras", path, (64, 3), dirty=True, patience=5) == "child hung"

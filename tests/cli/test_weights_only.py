"""A modeldir of weights without a model (Keras ``save_weights``, a torch ``state_dict``): `serve`
exits 1 with one line naming what it found and asking for a ``--wrapper``, instead of serving the
identity model; with the wrapper, the same modeldir serves (real checkpoints, real servers)."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import numpy as np
import pytest

from studio_plugins.client import predict
from studio_plugins.testing import ServerProcess
from tests.cli.test_serve import free_port, run_cli

os.environ.setdefault("KERAS_BACKEND", "torch")
torch = pytest.importorskip("torch")
keras = pytest.importorskip("keras")

WRAPPER = '''
import torch

def create_model(modeldir):
    model = torch.nn.Linear(3, 2)
    state = torch.load(f"{modeldir}/weights.pt", weights_only=True)
    model.load_state_dict(state)
    model.eval()

    def predict(data):
        with torch.no_grad():
            return {"y": model(torch.from_numpy(data["x"])).numpy()}

    return predict
'''


@pytest.fixture
def weights(modeldir: Path) -> torch.nn.Linear:
    """``epoch3.weights.h5`` (Keras ``save_weights``) and ``weights.pt`` (a torch state_dict)."""
    inputs = keras.Input((3,))
    keras.Model(inputs, keras.layers.Dense(2)(inputs)).save_weights(modeldir / "epoch3.weights.h5")
    torch.manual_seed(0)
    linear = torch.nn.Linear(3, 2)
    torch.save(linear.state_dict(), modeldir / "weights.pt")
    return linear


@pytest.mark.timeout(120)
def test_serve_refuses_weights_without_a_model_in_one_line(weights: torch.nn.Linear) -> None:
    port = free_port()
    result = run_cli("serve", "exp", "--port", str(port), "--host", "127.0.0.1")
    assert result.returncode == 1, result.stderr
    assert result.stdout == "" and "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.stderr
    assert "weights.pt (a torch state_dict: weights without the model's class)" in errors[0]
    assert "epoch3.weights.h5 (Keras weights saved by save_weights, no model)" in errors[0]
    assert errors[0].endswith("serve it with --wrapper FILE whose create_model(modeldir) builds "
                              "the model")
    assert "identity" not in errors[0]
    with socket.socket() as sock:  # refused before the port was bound
        sock.bind(("127.0.0.1", port))


@pytest.mark.timeout(120)
def test_with_a_wrapper_the_same_modeldir_serves(
    weights: torch.nn.Linear, tmp_path: Path
) -> None:
    wrapper = tmp_path / "build_linear.py"
    wrapper.write_text(WRAPPER)
    x = np.array([[1.0, 2.0, 3.0], [0.5, -1.0, 2.0]], np.float32)
    with ServerProcess("exp", "--wrapper", str(wrapper)) as server:
        reply = predict(server.url, {"x": x})
    with torch.no_grad():
        expected = weights(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(reply["y"], expected, rtol=1e-6)

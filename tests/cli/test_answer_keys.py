"""The seed's contract end to end: each key is answered under that key, the model's own input name
included, for Keras, TorchScript (scripted and traced) and torch.export models; named inputs and
outputs only for models with several; V2 keeps named tensors, refuses an input the model does not
have, and describes every model with valid metadata.

One real server for the module, with batching on (``--max-batch-size``), so that concurrent
requests are stacked into one model call and cut apart again: its answers must be the same.
"""

from __future__ import annotations

import os
import re
import warnings
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from studio_plugins.client import PredictionError, predict
from studio_plugins.testing import ServerProcess
from tests.cli.test_serve import get

os.environ.setdefault("KERAS_BACKEND", "torch")
keras = pytest.importorskip("keras")
torch = pytest.importorskip("torch")
httpclient = pytest.importorskip("tritonclient.http")
from tritonclient.utils import InferenceServerException  # noqa: E402

pytestmark = pytest.mark.timeout(180)

# every datatype the Open Inference Protocol names (Triton's BF16 too)
V2_DATATYPES = {"BOOL", "UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32", "INT64",
                "FP16", "FP32", "FP64", "BF16", "BYTES"}


class Affine(torch.nn.Module):
    def __init__(self, seed: int) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.linear = torch.nn.Linear(3, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x) * 2


def keras_scaling(path: Path) -> None:
    """x (N, 3) -> "double" = 2x: one input and one output, named differently."""
    inputs = keras.Input((3,), name="x")
    double = keras.layers.Dense(3, use_bias=False, name="double")
    model = keras.Model(inputs, double(inputs))
    double.set_weights([2 * np.eye(3, dtype="float32")])
    model.save(path)


def keras_two_inputs(path: Path) -> None:
    """a (N, 2), b (N, 3) -> "total" (N, 1) and "spread" (N, 2): both the sum of every element."""
    a, b = keras.Input((2,), name="a"), keras.Input((3,), name="b")
    joined = keras.layers.Concatenate()([a, b])
    total = keras.layers.Dense(1, use_bias=False, kernel_initializer="ones", name="total")(joined)
    spread = keras.layers.Dense(2, use_bias=False, kernel_initializer="ones", name="spread")(joined)
    keras.Model([a, b], [total, spread]).save(path)


def keras_two_outputs(path: Path) -> None:
    """x (N, 3) -> "p" = 2x and "q" = 3x: one input, several outputs."""
    inputs = keras.Input((3,), name="x")
    p, q = keras.layers.Dense(3, use_bias=False, name="p"), keras.layers.Dense(3, use_bias=False, name="q")
    model = keras.Model(inputs, [p(inputs), q(inputs)])
    p.set_weights([2 * np.eye(3, dtype="float32")])
    q.set_weights([3 * np.eye(3, dtype="float32")])
    model.save(path)


class Served:
    def __init__(self, server: ServerProcess, modules: dict[str, torch.nn.Module]) -> None:
        self.server = server
        self.url = server.url
        self.modules = modules

    def client(self) -> Any:
        return httpclient.InferenceServerClient(self.url.removeprefix("http://").rstrip("/"),
                                                network_timeout=60)

    def expected(self, model: str, x: np.ndarray) -> np.ndarray:
        if model == "kone":
            return 2 * x
        with torch.no_grad():
            return self.modules[model](torch.from_numpy(x)).numpy()


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    home = tmp_path_factory.mktemp("keys") / "studioml"
    dirs = {}
    for key in ("kone", "ktwo", "kfork", "tscript", "ttrace", "texport"):
        dirs[key] = home / "experiments" / key / "modeldir"
        dirs[key].mkdir(parents=True)
    keras_scaling(dirs["kone"] / "m.keras")
    keras_two_inputs(dirs["ktwo"] / "m.keras")
    keras_two_outputs(dirs["kfork"] / "m.keras")
    modules = {key: Affine(seed).eval() for seed, key in enumerate(("tscript", "ttrace", "texport"))}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.jit.save(torch.jit.script(modules["tscript"]), str(dirs["tscript"] / "m.pt"))
        torch.jit.save(torch.jit.trace(modules["ttrace"], torch.ones(1, 3)), str(dirs["ttrace"] / "m.pt"))
    program = torch.export.export(modules["texport"], (torch.ones(2, 3),),
                                  dynamic_shapes={"x": {0: torch.export.Dim("batch")}})
    torch.export.save(program, str(dirs["texport"] / "m.pt2"))
    models = [arg for key in dirs if key != "kone" for arg in ("--model", f"{key}={key}")]
    env = {"STUDIOML_HOME": str(home), "STUDIO_TOKEN": "", "STUDIO_STORE": ""}
    with ServerProcess("kone", *models, "--max-batch-size", "8", "--max-batch-delay", "100",
                       env=env, startup_timeout=150) as server:
        yield Served(server, modules)


X = np.random.default_rng(0).normal(size=(4, 3)).astype(np.float32)
ONE_INPUT = ["kone", "tscript", "ttrace", "texport"]


# --- POST /models/{name}: the seed's contract ---------------------------------------------------


@pytest.mark.parametrize("model", ONE_INPUT)
def test_a_key_named_like_the_models_input_is_answered_under_itself(served: Served, model: str) -> None:
    reply = predict(served.url + f"models/{model}", {"x": X})
    assert set(reply) == {"x"}  # not the output's name ("double", "output_0")
    np.testing.assert_allclose(reply["x"], served.expected(model, X), rtol=1e-5)
    reply = predict(served.url + f"models/{model}", {"x": X[:1], "batch": X})
    assert set(reply) == {"x", "batch"}
    np.testing.assert_allclose(reply["x"], served.expected(model, X[:1]), rtol=1e-5)
    np.testing.assert_allclose(reply["batch"], served.expected(model, X), rtol=1e-5)


def test_post_slash_is_the_first_model_with_the_same_contract(served: Served) -> None:
    np.testing.assert_allclose(predict(served.url, {"x": X})["x"], 2 * X, rtol=1e-6)


def test_several_inputs_are_sent_under_their_names_and_answer_with_named_outputs(served: Served) -> None:
    a, b = np.ones((3, 2), np.float32), np.full((3, 3), 2.0, np.float32)
    reply = predict(served.url + "models/ktwo", {"a": a, "b": b})
    assert set(reply) == {"total", "spread"}
    np.testing.assert_allclose(reply["total"], np.full((3, 1), 8.0))
    np.testing.assert_allclose(reply["spread"], np.full((3, 2), 8.0))
    with pytest.raises(PredictionError) as refused:
        predict(served.url + "models/ktwo", {"a": a})
    assert refused.value.status == 400 and "takes the inputs a, b" in refused.value.server_message


def test_several_outputs_are_a_dict_under_the_key_or_named_under_the_input_name(served: Served) -> None:
    reply = predict(served.url + "models/kfork", {"k": X})
    assert set(reply) == {"k"} and set(reply["k"]) == {"p", "q"}
    np.testing.assert_allclose(reply["k"]["q"], 3 * X, rtol=1e-6)
    reply = predict(served.url + "models/kfork", {"x": X})
    assert set(reply) == {"p", "q"}
    np.testing.assert_allclose(reply["p"], 2 * X, rtol=1e-6)


def batch_stats(url: str, model: str) -> tuple[float, float]:
    """(rows, calls) of the model so far, from the batch-size histogram."""
    text = get(url + "metrics")[1].decode()
    found = {}
    for part in ("sum", "count"):
        match = re.search(rf'^studio_batch_size_{part}\{{model="{model}"\}} (\S+)$', text, re.M)
        found[part] = float(match.group(1)) if match else 0.0
    return found["sum"], found["count"]


@pytest.mark.parametrize("model", ["tscript", "kfork"])
def test_concurrent_requests_batched_together_keep_their_keys(served: Served, model: str) -> None:
    rows = [X[index % 4 : index % 4 + 1] * (index + 1) for index in range(16)]
    before = batch_stats(served.url, model)

    keys = ["x", "k"]  # the input's name and another: batched apart, each with its own kind

    def ask(index: int) -> dict[str, Any]:
        return predict(served.url + f"models/{model}", {keys[index % 2]: rows[index]})

    with ThreadPoolExecutor(8) as pool:
        replies = list(pool.map(ask, range(16)))
    after = batch_stats(served.url, model)
    rows_run, calls = after[0] - before[0], after[1] - before[1]
    assert rows_run == 16 and calls < 16, "no two requests shared a model call"
    for index, (row, reply) in enumerate(zip(rows, replies, strict=True)):
        key = keys[index % 2]
        if model == "kfork" and key == "x":  # several outputs, asked by the input's name: named
            assert set(reply) == {"p", "q"}
            np.testing.assert_allclose(reply["q"], 3 * row, rtol=1e-5)
        elif model == "kfork":  # any other key: a dict of the outputs, cut per request
            assert set(reply) == {"k"} and set(reply["k"]) == {"p", "q"}
            np.testing.assert_allclose(reply["k"]["p"], 2 * row, rtol=1e-5)
        else:
            assert set(reply) == {key}
            np.testing.assert_allclose(reply[key], served.expected(model, row), rtol=1e-5)


def test_v2_and_post_slash_at_once_each_keep_their_own_contract(served: Served) -> None:
    # both send "x"; batched together they would be answered under one convention
    def seed(index: int) -> dict[str, Any]:
        return predict(served.url + "models/kone", {"x": X[:1] * index})

    def v2(index: int) -> np.ndarray:
        tensor = httpclient.InferInput("x", [1, 3], "FP32")
        tensor.set_data_from_numpy(X[:1] * index)
        return served.client().infer("kone", [tensor]).as_numpy("double")

    with ThreadPoolExecutor(8) as pool:
        seeds = [pool.submit(seed, index) for index in range(8)]
        named = [pool.submit(v2, index) for index in range(8)]
        for index, (a, b) in enumerate(zip(seeds, named, strict=True)):
            assert set(a.result()) == {"x"}
            np.testing.assert_allclose(a.result()["x"], 2 * X[:1] * index, rtol=1e-6)
            np.testing.assert_allclose(b.result(), 2 * X[:1] * index, rtol=1e-6)


# --- V2: named inputs and outputs ---------------------------------------------------------------


@pytest.mark.parametrize(("model", "output"), [("kone", "double"), ("tscript", "output_0"),
                                               ("ttrace", "output_0"), ("texport", "output_0")])
def test_v2_answers_with_the_models_output_names(served: Served, model: str, output: str) -> None:
    tensor = httpclient.InferInput("x", [4, 3], "FP32")
    tensor.set_data_from_numpy(X)
    result = served.client().infer(model, [tensor])
    assert [o["name"] for o in result.get_response()["outputs"]] == [output]
    np.testing.assert_allclose(result.as_numpy(output), served.expected(model, X), rtol=1e-5)


@pytest.mark.parametrize(("model", "sent", "fragment"), [
    ("kone", ["y"], "model 'kone' has no input 'y'; its inputs: 'x' (FP32 [-1, 3])"),
    ("tscript", ["y"], "model 'tscript' has no input 'y'; its inputs: 'x'"),  # names only: scripted
    ("texport", ["x", "extra"], "model 'texport' has no input 'extra'; its inputs: 'x' (FP32 [-1, 3])"),
    ("ktwo", ["a"], "model 'ktwo' needs input 'b' too; its inputs: 'a' (FP32 [-1, 2]), 'b' (FP32 [-1, 3])"),
])
def test_v2_an_input_the_model_does_not_have_is_a_400_naming_its_inputs(
        served: Served, model: str, sent: list[str], fragment: str) -> None:
    tensors = []
    for name in sent:
        tensor = httpclient.InferInput(name, [1, 2 if name == "a" else 3], "FP32")
        tensor.set_data_from_numpy(np.ones((1, 2 if name == "a" else 3), np.float32))
        tensors.append(tensor)
    with pytest.raises(InferenceServerException) as refused:
        served.client().infer(model, tensors)
    assert refused.value.status() == "400" and fragment in refused.value.message()
    assert served.client().is_model_ready(model)  # a bad request, not a broken model


@pytest.mark.parametrize("model", ["kone", "ktwo", "kfork", "tscript", "ttrace", "texport"])
def test_v2_metadata_is_valid_for_every_model(served: Served, model: str) -> None:
    metadata = served.client().get_model_metadata(model)
    for tensor in metadata["inputs"] + metadata["outputs"]:
        assert set(tensor) == {"name", "datatype", "shape"}, tensor
        assert tensor["datatype"] in V2_DATATYPES, tensor
        assert all(isinstance(size, int) and size >= -1 for size in tensor["shape"]), tensor


def test_v2_metadata_of_torchscript_what_it_knows_and_what_it_does_not(served: Served) -> None:
    client = served.client()
    traced = client.get_model_metadata("ttrace")  # traced with a (1, 3) float32 example
    assert traced["inputs"] == [{"name": "x", "datatype": "FP32", "shape": [-1, 3]}]
    assert traced["outputs"] == [{"name": "output_0", "datatype": "FP32", "shape": [-1, 2]}]
    assert "inputs_known" not in traced["parameters"] and "outputs_known" not in traced["parameters"]
    scripted = client.get_model_metadata("tscript")  # TorchScript records names only
    assert scripted["inputs"] == [] and scripted["outputs"] == []
    assert scripted["parameters"]["inputs_known"] is False
    assert scripted["parameters"]["outputs_known"] is False

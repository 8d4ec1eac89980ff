"""The Open Inference Protocol (V2) end to end: a real server with several experiments (identity,
Keras, torch.export, and one to switch around), spoken to with Triton's V2 client library
(``tritonclient[http]``: JSON and binary) and with raw HTTP for what a client library never sends."""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from studio_plugins.testing import ServerProcess
from tests.cli.test_models import save_scaler
from tests.cli.test_serve import get, post

os.environ.setdefault("KERAS_BACKEND", "torch")
keras = pytest.importorskip("keras")
torch = pytest.importorskip("torch")
httpclient = pytest.importorskip("tritonclient.http")
from tritonclient.utils import InferenceServerException  # noqa: E402

pytestmark = pytest.mark.timeout(120)

MAX_BODY = 1 << 20


def write_keras(modeldir: Path) -> Any:
    """A Keras model with a named input and output: x (N, 4) -> softmax(x W + b) (N, 3)."""
    keras.utils.set_random_seed(1)
    inputs = keras.Input((4,), name="x")
    model = keras.Model(inputs, keras.layers.Dense(3, activation="softmax", name="probs")(inputs))
    model.save(modeldir / "model.keras")
    return model


class Affine(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.linear = torch.nn.Linear(3, 2)

    def forward(self, x: Any) -> Any:
        return self.linear(x) * 2


def write_exported(modeldir: Path) -> Any:
    module = Affine().eval()
    program = torch.export.export(module, (torch.ones(2, 3),),
                                  dynamic_shapes={"x": {0: torch.export.Dim("batch")}})
    torch.export.save(program, str(modeldir / "affine.pt2"))
    return module


def client_for(server: ServerProcess) -> Any:
    address = server.url.removeprefix("http://").rstrip("/")
    return httpclient.InferenceServerClient(address, network_timeout=60)


class Served:
    def __init__(self, server: ServerProcess, keras_model: Any) -> None:
        self.server = server
        self.url = server.url
        self.keras_model = keras_model

    def client(self) -> Any:
        return client_for(self.server)


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    """One server for the module: identity, a Keras model, and ``swap`` for the repository test."""
    home = tmp_path_factory.mktemp("v2") / "studioml"
    dirs = {}
    for key in ("ident", "kexp", "double", "triple"):
        dirs[key] = home / "experiments" / key / "modeldir"
        dirs[key].mkdir(parents=True)
    keras_model = write_keras(dirs["kexp"])
    save_scaler(dirs["double"] / "ckpt-1.keras", 2.0)
    save_scaler(dirs["triple"] / "ckpt-1.keras", 3.0)
    env = {"STUDIOML_HOME": str(home), "STUDIO_TOKEN": "", "STUDIO_STORE": ""}
    with ServerProcess("ident", "--model", "keras=kexp", "--model", "swap=double",
                       "--max-body", str(MAX_BODY), env=env) as server:
        yield Served(server, keras_model)


def infer_raw(url: str, model: str, message: Any, binary: bytes = b"",
              header_length: int | None = None) -> tuple[int, dict[str, str], Any]:
    body = (json.dumps(message).encode() if not isinstance(message, bytes) else message)
    headers = {}
    if binary or header_length is not None:
        length = len(body) if header_length is None else header_length
        headers["Inference-Header-Content-Length"] = str(length)
    status, reply_headers, reply = post(url + f"v2/models/{model}/infer", body + binary,
                                        "application/json", headers=headers)
    is_json = "json" in reply_headers.get("content-type", "")
    return status, reply_headers, json.loads(reply) if is_json else reply


# --- every datatype through the identity model -------------------------------------------------

VALUES: dict[str, np.ndarray] = {
    "BOOL": np.array([[True, False, True]]),
    "UINT8": np.array([[0, 128, 255]], np.uint8),
    "UINT16": np.array([[0, 1, 65535]], np.uint16),
    "UINT32": np.array([[0, 1, 2**32 - 1]], np.uint32),
    "UINT64": np.array([[0, 2**63, 2**64 - 1]], np.uint64),
    "INT8": np.array([[-128, 0, 127]], np.int8),
    "INT16": np.array([[-(2**15), 0, 2**15 - 1]], np.int16),
    "INT32": np.array([[-(2**31), 0, 2**31 - 1]], np.int32),
    "INT64": np.array([[-(2**63), 0, 2**63 - 1]], np.int64),
    "FP16": np.array([[0.1, -65504, 6e-8]], np.float16),
    "FP32": np.array([[0.1, -3.4028235e38, 1e-45]], np.float32),
    "FP64": np.array([[0.1, -1.7976931348623157e308, 5e-324]], np.float64),
    "BYTES": np.array([[b"plain", "é ü".encode(), b""]], dtype=object),
}
BINARY_ONLY_BYTES = np.array([[b"\x00\xff\xfe", b"trailing\x00", b"\x00"]], dtype=object)


@pytest.mark.parametrize("binary", [False, True], ids=["json", "binary"])
def test_every_datatype_round_trips_exactly_through_identity(served: Served, binary: bool) -> None:
    client = served.client()
    inputs, outputs = [], []
    tensors = dict(VALUES)
    if binary:
        tensors["RAW"] = BINARY_ONLY_BYTES  # not UTF-8: only the binary extension carries it
    for name, value in tensors.items():
        datatype = "BYTES" if name == "RAW" else name
        tensor = httpclient.InferInput(name, list(value.shape), datatype)
        tensor.set_data_from_numpy(value, binary_data=binary)
        inputs.append(tensor)
        outputs.append(httpclient.InferRequestedOutput(name, binary_data=binary))
    result = client.infer("ident", inputs, outputs=outputs)
    response = result.get_response()
    assert {o["name"]: o["datatype"] for o in response["outputs"]} == {
        name: "BYTES" if name == "RAW" else name for name in tensors}
    for name, value in tensors.items():
        got = result.as_numpy(name)
        assert got.shape == value.shape, name
        if value.dtype == object:
            sent = value if binary else np.array([[v.decode() for v in value.ravel()]], dtype=object)
            assert got.tolist() == sent.tolist(), name  # JSON BYTES come back as str
        else:
            assert got.dtype == value.dtype, name
            np.testing.assert_array_equal(got, value, err_msg=name)
        assert ("parameters" in response["outputs"][list(tensors).index(name)]) is binary


def test_binary_and_json_mixed_with_outputs_selection_and_id(served: Served) -> None:
    a = np.arange(12, dtype=np.float32).reshape(3, 4)
    b = np.array([[1, 2]], np.int64)
    ia = httpclient.InferInput("a", [3, 4], "FP32")
    ia.set_data_from_numpy(a, binary_data=True)
    ib = httpclient.InferInput("b", [1, 2], "INT64")
    ib.set_data_from_numpy(b, binary_data=False)
    result = served.client().infer(
        "ident", [ia, ib], request_id="req-42",
        outputs=[httpclient.InferRequestedOutput("b", binary_data=True)],
    )
    response = result.get_response()
    assert response["id"] == "req-42" and response["model_name"] == "ident"
    assert [o["name"] for o in response["outputs"]] == ["b"]  # only what was asked for
    np.testing.assert_array_equal(result.as_numpy("b"), b)
    # without outputs, tritonclient asks for everything in binary (binary_data_output)
    result = served.client().infer("ident", [ia])
    assert result.get_response()["outputs"][0]["parameters"] == {"binary_data_size": 48}
    np.testing.assert_array_equal(result.as_numpy("a"), a)


def test_versions_and_unknown_models(served: Served) -> None:
    message = {"inputs": [{"name": "a", "shape": [1], "datatype": "INT32", "data": [3]}]}
    status, _, _ = post(served.url + "v2/models/ident/versions/1/infer", json.dumps(message).encode())
    assert status == 200
    status, _, body = post(served.url + "v2/models/ident/versions/2/infer", json.dumps(message).encode())
    assert status == 404 and "version" in json.loads(body)["error"]
    status, _, reply = infer_raw(served.url, "nope", message)
    assert status == 404 and "nope" in reply["error"]
    assert get(served.url + "v2/models/nope")[0] == 404
    client = served.client()
    with pytest.raises(InferenceServerException):
        client.get_model_metadata("nope")


# --- bad requests -------------------------------------------------------------------------------


def tensor(datatype: str, shape: list[int], data: Any, name: str = "a") -> dict[str, Any]:
    return {"inputs": [{"name": name, "shape": shape, "datatype": datatype, "data": data}]}


@pytest.mark.parametrize(
    ("message", "fragment"),
    [
        (tensor("FP32", [2, 2], [1, 2, 3]), "holds 4 elements but data has 3"),
        (tensor("FP128", [1], [1]), "unknown datatype"),
        (tensor("UINT8", [1], [300]), "out of range for UINT8"),
        (tensor("INT32", [1], [1.5]), "1.5 is not a INT32"),
        (tensor("FP32", [1], ["one"]), "is not a FP32"),
        (tensor("BOOL", [1], [2]), "BOOL data must be true or false"),
        ({"inputs": [{"name": "a", "shape": [1], "datatype": "FP32"}]}, "missing field 'data'"),
        ({"inputs": [{"name": "a", "datatype": "FP32", "data": [1]}]}, "missing field 'shape'"),
        ({"id": "x"}, "missing field 'inputs'"),
        (b'{"inputs": [', "invalid JSON"),
        ({"inputs": [{"name": "a", "shape": [1], "datatype": "FP32", "data": [1]}],
          "outputs": [{"name": "zzz"}]}, "no output 'zzz'"),
    ],
)
def test_bad_inputs_are_400_with_an_error(served: Served, message: Any, fragment: str) -> None:
    status, _, reply = infer_raw(served.url, "ident", message)
    assert status == 400 and fragment in reply["error"], reply


def test_binary_sizes_that_disagree_with_the_body_are_400(served: Served) -> None:
    header = {"inputs": [{"name": "a", "shape": [2], "datatype": "FP32",
                          "parameters": {"binary_data_size": 8}}]}
    data = np.array([1, 2], "<f4").tobytes()
    assert infer_raw(served.url, "ident", header, data)[0] == 200
    for binary, length, fragment in [
        (data[:6], None, "declare 8 bytes"),                  # body too short
        (data + b"\x00", None, "declare 8 bytes"),            # too long
        (data, 10_000, "Inference-Header-Content-Length is 10000"),  # header past the end
    ]:
        status, _, reply = infer_raw(served.url, "ident", header, binary, header_length=length)
        assert status == 400 and fragment in reply["error"], reply
    bytes_header = {"inputs": [{"name": "s", "shape": [1], "datatype": "BYTES",
                                "parameters": {"binary_data_size": 7}}]}
    status, _, reply = infer_raw(served.url, "ident", bytes_header, struct.pack("<I", 50) + b"abc")
    assert status == 400 and "runs past its data" in reply["error"]


def test_the_body_limit_applies(served: Served) -> None:
    big = np.zeros(MAX_BODY // 4 + 16, np.float32)
    tensor_in = httpclient.InferInput("a", list(big.shape), "FP32")
    tensor_in.set_data_from_numpy(big)
    with pytest.raises(InferenceServerException) as caught:
        served.client().infer("ident", [tensor_in])
    assert caught.value.status() == "413"


# --- framework models: numbers and metadata ------------------------------------------------------


@pytest.mark.parametrize("binary", [False, True], ids=["json", "binary"])
def test_keras_model_answers_like_the_model_itself(served: Served, binary: bool) -> None:
    x = np.random.default_rng(0).normal(size=(5, 4)).astype(np.float32)
    expected = served.keras_model.predict(x, verbose=0)
    tensor_in = httpclient.InferInput("x", [5, 4], "FP32")
    tensor_in.set_data_from_numpy(x, binary_data=binary)
    result = served.client().infer(
        "keras", [tensor_in], outputs=[httpclient.InferRequestedOutput("probs", binary_data=binary)]
    )
    got = result.as_numpy("probs")
    assert got.dtype == np.float32 and got.shape == (5, 3)
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-7)


def test_keras_metadata(served: Served) -> None:
    metadata = served.client().get_model_metadata("keras")
    assert metadata["name"] == "keras" and metadata["platform"] == "keras" and metadata["versions"] == ["1"]
    assert metadata["inputs"] == [{"name": "x", "datatype": "FP32", "shape": [-1, 4]}]
    assert metadata["outputs"] == [{"name": "probs", "datatype": "FP32", "shape": [-1, 3]}]
    assert metadata["parameters"] == {"experiment": "kexp", "checkpoint": "model.keras", "state": "ready"}
    status, versioned = get(served.url + "v2/models/keras/versions/1")
    assert status == 200 and json.loads(versioned) == metadata


def test_torch_export_metadata_and_answer(studio_home: Path) -> None:
    # its own server: loading a Keras and a torch model in parallel threads races in torch's import
    modeldir = studio_home / "experiments" / "texp" / "modeldir"
    modeldir.mkdir(parents=True)
    module = write_exported(modeldir)
    with ServerProcess("--model", "tx=texp") as server:
        check_torch_export(client_for(server), module)


def check_torch_export(client: Any, module: Any) -> None:
    metadata = client.get_model_metadata("tx")
    assert metadata["platform"] == "torch"
    assert metadata["inputs"] == [{"name": "x", "datatype": "FP32", "shape": [-1, 3]}]
    assert metadata["outputs"] == [{"name": "output_0", "datatype": "FP32", "shape": [-1, 2]}]
    assert metadata["parameters"]["checkpoint"] == "affine.pt2"
    x = np.random.default_rng(1).normal(size=(4, 3)).astype(np.float32)
    tensor_in = httpclient.InferInput("x", [4, 3], "FP32")
    tensor_in.set_data_from_numpy(x)
    with torch.no_grad():
        expected = module(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(client.infer("tx", [tensor_in]).as_numpy("output_0"), expected, rtol=1e-6)


def test_identity_metadata_says_it_knows_nothing(served: Served) -> None:
    metadata = served.client().get_model_metadata("ident")
    assert metadata["platform"] == "identity" and metadata["inputs"] == [] and metadata["outputs"] == []
    assert "checkpoint" not in metadata["parameters"]


def test_server_metadata_and_readiness(served: Served) -> None:
    client = served.client()
    assert client.is_server_live() and client.is_server_ready()
    assert client.get_server_metadata() == {
        "name": "studio-plug", "version": client.get_server_metadata()["version"],
        "extensions": ["binary_tensor_data", "model_repository"],
    }
    assert all(client.is_model_ready(name) for name in ("ident", "keras", "swap"))
    assert client.is_model_ready("ident", "1") and not client.is_model_ready("ident", "7")


def test_two_experiments_answer_by_name_through_v2(served: Served) -> None:
    x = np.ones((1, 4), np.float32)
    k = httpclient.InferInput("x", [1, 4], "FP32")
    k.set_data_from_numpy(x)
    client = served.client()
    keras_answer = client.infer("keras", [k]).as_numpy("probs")
    identity_answer = client.infer("ident", [k]).as_numpy("x")
    np.testing.assert_array_equal(identity_answer, x)
    assert keras_answer.shape == (1, 3) and keras_answer.sum() == pytest.approx(1.0, rel=1e-5)


def test_requests_are_counted_under_the_model(served: Served) -> None:
    infer_raw(served.url, "ident", tensor("INT8", [1], [1]))
    infer_raw(served.url, "made-up-name", tensor("INT8", [1], [1]))
    metrics = get(served.url + "metrics")[1].decode()
    assert 'route="/v2/models/{name}/infer"' in metrics and 'model="ident"' in metrics
    assert "made-up-name" not in metrics  # unknown names do not become labels


# --- the repository extension -------------------------------------------------------------------


def scale_of(client: Any) -> float:
    x = np.array([[1.0, 2.0, 3.0]], np.float32)
    name = client.get_model_metadata("swap")["inputs"][0]["name"]
    tensor_in = httpclient.InferInput(name, [1, 3], "FP32")
    tensor_in.set_data_from_numpy(x)
    result = client.infer("swap", [tensor_in])
    output = result.get_response()["outputs"][0]["name"]
    return float(result.as_numpy(output)[0, 0])


def test_repository_index_load_another_experiment_unload_and_load(served: Served) -> None:
    client = served.client()
    index = {entry["name"]: entry for entry in client.get_model_repository_index()}
    assert set(index) == {"ident", "keras", "swap"}
    assert all(entry["state"] == "READY" and entry["version"] == "1" for entry in index.values())
    assert scale_of(client) == 2.0

    status, _, body = post(served.url + "v2/repository/models/swap/load",
                           json.dumps({"parameters": {"key": "triple"}}).encode(), "application/json")
    assert status == 200 and json.loads(body)["experiment"] == "triple", body
    assert scale_of(client) == 3.0
    assert any(line.endswith("loading model swap from experiment triple")
               for line in served.server.stderr_lines), served.server.output()
    assert client.get_model_metadata("swap")["parameters"]["experiment"] == "triple"

    client.unload_model("swap")
    assert not client.is_model_ready("swap")
    status, body = get(served.url + "v2/models/swap/ready")
    assert status == 400 and json.loads(body) == {"name": "swap", "ready": False}
    status, _, reply = infer_raw(served.url, "swap", tensor("FP32", [1, 3], [1, 2, 3]))
    assert status == 503 and "not ready" in reply["error"]
    index = {entry["name"]: entry for entry in client.get_model_repository_index()}
    assert index["swap"]["state"] == "UNAVAILABLE" and index["swap"]["reason"] == "unloaded"
    assert [entry["name"] for entry in served.client().get_model_repository_index()] == list(index)
    status, _, body = post(served.url + "v2/repository/index", b'{"ready": true}', "application/json")
    assert "swap" not in [entry["name"] for entry in json.loads(body)]

    client.load_model("swap")  # reload what it served last: the triple experiment
    assert client.is_model_ready("swap") and scale_of(client) == 3.0

    # loading something that does not exist fails and leaves the served model alone
    status, _, body = post(served.url + "v2/repository/models/swap/load",
                           json.dumps({"parameters": {"key": "missing"}}).encode(), "application/json")
    assert status == 404, body
    with pytest.raises(InferenceServerException):
        client.load_model("swap", config="{}")  # an override config is not something we do
    with pytest.raises(InferenceServerException):
        client.load_model("nope")
    assert scale_of(client) == 3.0


# --- auth ---------------------------------------------------------------------------------------


def test_v2_routes_need_the_token(studio_home: Path) -> None:
    (studio_home / "experiments" / "exp" / "modeldir").mkdir(parents=True)
    with ServerProcess("exp", "--token", "s3cret") as server:
        status, _, _ = infer_raw(server.url, "exp", tensor("INT8", [1], [1]))
        assert status == 401
        assert get(server.url + "v2/models/exp")[0] == 401
        client = httpclient.InferenceServerClient(server.url.removeprefix("http://").rstrip("/"))
        tensor_in = httpclient.InferInput("a", [1], "INT8")
        tensor_in.set_data_from_numpy(np.array([7], np.int8))
        result = client.infer("exp", [tensor_in], headers={"Authorization": "Bearer s3cret"})
        assert result.as_numpy("a").tolist() == [7]

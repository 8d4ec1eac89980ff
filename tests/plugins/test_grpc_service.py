"""V2 over gRPC (plugins/protocols/grpc/) through ``tritonclient.grpc``, a client we did not
write: health, metadata, every datatype raw and typed through the identity model, a Keras model's
numbers, the repository extension, the token and the metrics. One in-process server for the
module (tests/plugins/grpc_harness.py)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.plugins.grpc_harness import GrpcServer, grpc_server

tritongrpc = pytest.importorskip("tritonclient.grpc")
keras = pytest.importorskip("keras")
from tritonclient.grpc import service_pb2, service_pb2_grpc  # noqa: E402
from tritonclient.utils import InferenceServerException  # noqa: E402

pytestmark = pytest.mark.timeout(120)

TOY = ("m.toy", json.dumps({"x": ["FP32", [-1, 3]], "y": ["FP32", [-1, 3]]}))


def write_keras(modeldir: Path) -> Any:
    """An MLP with a named input and output: x (N, 4) -> softmax(relu(x W1) W2) (N, 3)."""
    modeldir.mkdir(parents=True)
    keras.utils.set_random_seed(1)
    inputs = keras.Input((4,), name="x")
    hidden = keras.layers.Dense(8, activation="relu")(inputs)
    model = keras.Model(inputs, keras.layers.Dense(3, activation="softmax", name="probs")(hidden))
    model.save(modeldir / "model.keras")
    return model


class Served:
    def __init__(self, server: GrpcServer, keras_model: Any) -> None:
        self.server = server
        self.keras_model = keras_model

    def client(self) -> Any:
        return tritongrpc.InferenceServerClient(self.server.address)

    def stub(self) -> Any:
        """Triton's own generated stub, for messages tritonclient does not build (typed
        contents, repository parameters)."""
        import grpc

        channel = grpc.insecure_channel(self.server.address)
        return service_pb2_grpc.GRPCInferenceServiceStub(channel)


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    home = tmp_path_factory.mktemp("grpc") / "studioml"
    keras_model = write_keras(home / "experiments" / "kexp" / "modeldir")
    server = grpc_server(home, {"ident": None, "kexp": None, "toy": TOY, "swap": ("a.toy", "{}"),
                                "other": ("b.toy", json.dumps({"x": ["FP32", [-1]]}))})
    try:
        yield Served(server, keras_model)
    finally:
        server.close()


# --- health and metadata ------------------------------------------------------------------------


def test_health_and_server_metadata(served: Served) -> None:
    client = served.client()
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready("ident") and client.is_model_ready("ident", "1")
    metadata = client.get_server_metadata(as_json=True)
    assert metadata["name"] == "studio-plug" and metadata["extensions"] == ["model_repository"]


def test_model_metadata_says_what_the_model_declares(served: Served) -> None:
    client = served.client()
    toy = client.get_model_metadata("toy", as_json=True)
    assert toy["name"] == "toy" and toy["versions"] == ["1"] and toy["platform"] == "toy"
    assert toy["inputs"] == [{"name": "x", "datatype": "FP32", "shape": ["-1", "3"]},
                             {"name": "y", "datatype": "FP32", "shape": ["-1", "3"]}]
    kexp = client.get_model_metadata("kexp", as_json=True)
    assert kexp["inputs"] == [{"name": "x", "datatype": "FP32", "shape": ["-1", "4"]}]
    assert [o["name"] for o in kexp["outputs"]] == ["probs"]
    ident = client.get_model_metadata("ident", as_json=True)
    assert "inputs" not in ident and ident["platform"] == "identity"  # it knows nothing: none listed


def test_model_config_as_triton_tools_read_it(served: Served) -> None:
    config = served.client().get_model_config("kexp", as_json=True)["config"]
    assert config["name"] == "kexp" and config.get("max_batch_size", 0) == 0
    assert config["input"] == [{"name": "x", "data_type": "TYPE_FP32", "dims": ["-1", "4"]}]
    assert [(o["name"], o["data_type"]) for o in config["output"]] == [("probs", "TYPE_FP32")]
    assert "input" not in served.client().get_model_config("ident", as_json=True)["config"]


@pytest.mark.parametrize("call", ["is_model_ready", "get_model_metadata", "get_model_config"])
def test_unknown_models_and_versions_are_not_found(served: Served, call: str) -> None:
    client = served.client()
    for args in (("nope",), ("ident", "2")):
        with pytest.raises(InferenceServerException) as raised:
            getattr(client, call)(*args)
        assert raised.value.status() == "StatusCode.NOT_FOUND", raised.value


# --- every datatype through the identity model --------------------------------------------------

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
    "BYTES": np.array([[b"plain", "é ü".encode(), b"\x00\xff"]], dtype=object),
}


def check_round_trip(result: Any, tensors: dict[str, np.ndarray]) -> None:
    for name, value in tensors.items():
        got = result.as_numpy(name)
        assert got is not None, name
        assert got.shape == value.shape, name
        if value.dtype == object:
            assert got.tolist() == value.tolist(), name
        else:
            assert got.dtype == value.dtype, name
            np.testing.assert_array_equal(got, value, err_msg=name)


def test_every_datatype_round_trips_exactly_raw(served: Served) -> None:
    inputs = []
    for name, value in VALUES.items():
        tensor = tritongrpc.InferInput(name, list(value.shape), name)
        tensor.set_data_from_numpy(value)  # tritonclient.grpc sends raw_input_contents
        inputs.append(tensor)
    outputs = [tritongrpc.InferRequestedOutput(name) for name in VALUES]
    result = served.client().infer("ident", inputs, outputs=outputs, request_id="r-1")
    response = result.get_response()
    assert response.id == "r-1" and response.model_name == "ident" and response.model_version == "1"
    assert [o.datatype for o in response.outputs] == list(VALUES)
    assert len(response.raw_output_contents) == len(VALUES)  # raw asked, raw answered
    check_round_trip(result, VALUES)


FIELDS = {"BOOL": "bool_contents", "INT8": "int_contents", "INT16": "int_contents",
          "INT32": "int_contents", "INT64": "int64_contents", "UINT8": "uint_contents",
          "UINT16": "uint_contents", "UINT32": "uint_contents", "UINT64": "uint64_contents",
          "FP32": "fp32_contents", "FP64": "fp64_contents", "BYTES": "bytes_contents"}
"""The protocol's typed fields, as Triton's grpc_service.proto gives them."""


def typed_request(model: str, tensors: dict[str, np.ndarray], datatypes: dict[str, str] | None = None
                  ) -> Any:
    """A ModelInferRequest with every tensor in typed ``contents`` (what tritonclient cannot
    send), built with Triton's own messages."""
    request = service_pb2.ModelInferRequest(model_name=model)
    for name, value in tensors.items():
        datatype = (datatypes or {}).get(name, name)
        tensor = request.inputs.add(name=name, datatype=datatype, shape=list(value.shape))
        getattr(tensor.contents, FIELDS[datatype]).extend(value.ravel().tolist())
    return request


def test_every_typed_datatype_round_trips_exactly_and_is_answered_typed(served: Served) -> None:
    typed = {name: value for name, value in VALUES.items() if name != "FP16"}  # FP16: raw only
    response = served.stub().ModelInfer(typed_request("ident", typed))
    assert not response.raw_output_contents  # typed asked, typed answered
    assert [o.datatype for o in response.outputs] == list(typed)
    for output in response.outputs:  # tritonclient's as_numpy reads raw or BYTES only: by hand
        value = typed[output.name]
        field = getattr(output.contents, FIELDS[output.datatype])
        assert list(output.shape) == list(value.shape), output.name
        if output.datatype == "BYTES":
            assert list(field) == value.ravel().tolist(), output.name
        else:
            np.testing.assert_array_equal(np.array(field, value.dtype).reshape(value.shape), value,
                                          err_msg=output.name)
            assert np.array(field, value.dtype).tolist() == list(field), output.name  # no rounding


def test_large_typed_and_bytes_tensors_round_trip(served: Served) -> None:
    """Past 16 KiB of typed or BYTES data, decoding and encoding run off the event loop: the
    same values come back."""
    numbers = np.arange(-25_000, 25_000, dtype=np.int32).reshape(100, 500)
    strings = np.array([f"item {i}".encode() for i in range(5_000)], dtype=object).reshape(50, 100)
    response = served.stub().ModelInfer(typed_request("ident", {"INT32": numbers, "BYTES": strings}))
    assert np.array(response.outputs[0].contents.int_contents, np.int32).reshape(100, 500).tolist() \
        == numbers.tolist()
    assert list(response.outputs[1].contents.bytes_contents) == strings.ravel().tolist()
    tensor = tritongrpc.InferInput("s", [50, 100], "BYTES")
    tensor.set_data_from_numpy(strings)
    assert served.client().infer("ident", [tensor]).as_numpy("s").tolist() == strings.tolist()


def test_fp16_comes_raw_only(served: Served) -> None:
    """FP16 has no typed field: typed FP16 data is refused, whichever field it is put in."""
    request = typed_request("ident", {"INT8": VALUES["INT8"]})
    request.inputs.add(name="half", datatype="FP16", shape=[1, 3]).contents.fp32_contents.extend([1, 2, 3])
    with pytest.raises(Exception) as raised:
        served.stub().ModelInfer(request)
    assert raised.value.code().name == "INVALID_ARGUMENT" and "raw_input_contents" in raised.value.details()


def test_an_fp16_output_makes_a_typed_reply_raw() -> None:
    """raw_output_contents is all or none: one FP16 output (a model's own) puts them all there."""
    from plugins.protocols.grpc import grpc_service_pb2 as pb
    from plugins.protocols.grpc.tensors import Inputs, encode_outputs

    response = pb.ModelInferResponse()
    result = {"half": np.array([0.5, 2], np.float16), "n": np.array([3], np.int32)}
    encode_outputs(response, pb.ModelInferRequest(), Inputs({}, raw=False, datatypes={}), result)
    assert [o.datatype for o in response.outputs] == ["FP16", "INT32"]
    assert list(response.raw_output_contents) == [result["half"].tobytes(), result["n"].tobytes()]
    typed = pb.ModelInferResponse()
    encode_outputs(typed, pb.ModelInferRequest(), Inputs({}, raw=False, datatypes={}), {"n": result["n"]})
    assert not typed.raw_output_contents and list(typed.outputs[0].contents.int_contents) == [3]


def test_empty_and_scalar_shapes(served: Served) -> None:
    tensors = {"e": np.zeros((0, 3), np.float32), "s": np.array(7, np.int64),
               "eb": np.empty((2, 0), dtype=object)}
    inputs = []
    for name, value in tensors.items():
        datatype = "BYTES" if value.dtype == object else ("FP32" if name == "e" else "INT64")
        tensor = tritongrpc.InferInput(name, list(value.shape), datatype)
        tensor.set_data_from_numpy(value)
        inputs.append(tensor)
    result = served.client().infer("ident", inputs)
    assert result.as_numpy("e").shape == (0, 3) and result.as_numpy("s").tolist() == 7
    assert result.as_numpy("eb").shape == (2, 0)


def test_outputs_selected_by_name(served: Served) -> None:
    a, b = tritongrpc.InferInput("a", [2], "INT32"), tritongrpc.InferInput("b", [1], "FP64")
    a.set_data_from_numpy(np.array([1, 2], np.int32))
    b.set_data_from_numpy(np.array([0.5]))
    result = served.client().infer("ident", [a, b], outputs=[tritongrpc.InferRequestedOutput("b")])
    assert [o.name for o in result.get_response().outputs] == ["b"]
    assert result.as_numpy("b").tolist() == [0.5]


# --- a Keras model ----------------------------------------------------------------------------


def test_keras_model_answers_like_the_model_itself(served: Served) -> None:
    x = np.random.default_rng(3).normal(size=(5, 4)).astype(np.float32)
    tensor = tritongrpc.InferInput("x", [5, 4], "FP32")
    tensor.set_data_from_numpy(x)
    got = served.client().infer("kexp", [tensor]).as_numpy("probs")
    expected = np.asarray(served.keras_model.predict(x, verbose=0))
    assert got.shape == (5, 3) and got.dtype == np.float32
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-7)
    # typed FP32 gives the same numbers
    response = served.stub().ModelInfer(typed_request("kexp", {"x": x}, {"x": "FP32"}))
    typed = np.array(response.outputs[0].contents.fp32_contents, np.float32).reshape(5, 3)
    np.testing.assert_allclose(typed, expected, rtol=1e-6, atol=1e-7)


# --- the repository extension -------------------------------------------------------------------


def test_repository_index_load_another_experiment_unload_and_load(served: Served) -> None:
    client = served.client()
    index = {m.name: m for m in client.get_model_repository_index().models}
    assert set(index) == {"ident", "kexp", "toy", "swap", "other"}
    assert all(m.state == "READY" and m.version == "1" for m in index.values())
    assert client.get_model_metadata("swap", as_json=True).get("inputs") is None  # {}: no inputs

    stub = served.stub()
    request = service_pb2.RepositoryModelLoadRequest(model_name="swap")
    request.parameters["key"].string_param = "other"
    stub.RepositoryModelLoad(request)
    swapped = client.get_model_metadata("swap", as_json=True)
    assert swapped["inputs"] == [{"name": "x", "datatype": "FP32", "shape": ["-1"]}]

    client.unload_model("swap")
    assert not client.is_model_ready("swap")
    index = {m.name: m for m in client.get_model_repository_index().models}
    assert index["swap"].state == "UNAVAILABLE" and index["swap"].reason == "unloaded"
    ready_only = stub.RepositoryIndex(service_pb2.RepositoryIndexRequest(ready=True))
    assert "swap" not in [m.name for m in ready_only.models]
    tensor = tritongrpc.InferInput("x", [1], "FP32")
    tensor.set_data_from_numpy(np.ones(1, np.float32))
    with pytest.raises(InferenceServerException) as raised:
        client.infer("swap", [tensor])
    assert raised.value.status() == "StatusCode.UNAVAILABLE" and "not ready" in raised.value.message()

    client.load_model("swap")  # what it served last: the other experiment
    assert client.is_model_ready("swap")
    assert client.infer("swap", [tensor]).as_numpy("x").tolist() == [1.0]

    for bad, code in ((service_pb2.RepositoryModelLoadRequest(model_name="nope"), "NOT_FOUND"),):
        with pytest.raises(Exception) as failed:
            stub.RepositoryModelLoad(bad)
        assert failed.value.code().name == code
    missing = service_pb2.RepositoryModelLoadRequest(model_name="swap")
    missing.parameters["key"].string_param = "missing"
    with pytest.raises(Exception) as failed:
        stub.RepositoryModelLoad(missing)
    assert failed.value.code().name == "NOT_FOUND"
    wrong_type = service_pb2.RepositoryModelLoadRequest(model_name="swap")
    wrong_type.parameters["key"].int64_param = 3
    with pytest.raises(Exception) as failed:
        stub.RepositoryModelLoad(wrong_type)
    assert failed.value.code().name == "INVALID_ARGUMENT" and "string" in failed.value.details()
    with pytest.raises(InferenceServerException) as raised:
        client.load_model("swap", config="{}")  # an override config is not something we do
    assert raised.value.status() == "StatusCode.INVALID_ARGUMENT"
    assert client.is_model_ready("swap")


# --- metrics ------------------------------------------------------------------------------------


def test_calls_are_counted_under_the_grpc_route(served: Served) -> None:
    tensor = tritongrpc.InferInput("a", [1], "INT8")
    tensor.set_data_from_numpy(np.array([1], np.int8))
    client = served.client()
    before = served.server.http("GET", "/metrics").text
    route = "/inference.GRPCInferenceService/ModelInfer"
    line = f'studio_requests_total{{model="ident",route="{route}",status="200"}}'
    count = next((float(t.split()[-1]) for t in before.splitlines() if t.startswith(line)), 0.0)
    client.infer("ident", [tensor])
    client.infer("ident", [tensor])
    with pytest.raises(InferenceServerException):
        client.infer("nope", [tensor])
    client.is_server_live()  # health: not counted, as over HTTP
    text = served.server.http("GET", "/metrics").text
    assert f"{line} {count + 2}" in text, text
    assert f'studio_requests_total{{model="",route="{route}",status="404"}}' in text
    assert "ServerLive" not in text

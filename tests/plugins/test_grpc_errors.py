"""V2 over gRPC refuses what V2 over HTTP refuses, with the status code that fits, and keeps
serving: hostile messages (shapes claiming 10**12 elements, raw data shorter than its shape,
BYTES lengths past their buffer, messages over --max-body, bytes that are no message at all),
model failures, the token, deadlines, --max-queue and cancelled calls. One in-process server for
the module (tests/plugins/grpc_harness.py), one more for the token."""

from __future__ import annotations

import json
import logging
import struct
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from core.dataplane.plane import DataPlaneOptions
from tests.grpc_raw import RawCall
from tests.plugins.grpc_harness import GrpcServer, grpc_server

tritongrpc = pytest.importorskip("tritonclient.grpc")
import grpc  # noqa: E402
from tritonclient.grpc import service_pb2, service_pb2_grpc  # noqa: E402
from tritonclient.utils import InferenceServerException  # noqa: E402

pytestmark = pytest.mark.timeout(120)

MAX_BODY = 1 << 20
TOY = ("m.toy", json.dumps({"x": ["FP32", [-1, 3]]}))
SLOW = ("m.slow", json.dumps({"seconds": 0.5}))


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GrpcServer]:
    home = tmp_path_factory.mktemp("grpc-errors") / "studioml"
    served = grpc_server(home, {"ident": None, "toy": TOY, "slow": SLOW}, max_body=MAX_BODY,
                         dataplane=DataPlaneOptions(max_queue=2))
    try:
        yield served
    finally:
        served.close()


def stub_for(server: GrpcServer) -> Any:
    return service_pb2_grpc.GRPCInferenceServiceStub(grpc.insecure_channel(server.address))


def infer_error(server: GrpcServer, request: Any, timeout: float | None = None) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as raised:
        stub_for(server).ModelInfer(request, timeout=timeout)
    return raised.value


def request_with(*tensors: tuple[str, str, list[int], bytes | None], model: str = "ident") -> Any:
    """A ModelInferRequest of raw tensors (name, datatype, shape, data), as a hostile client
    may write it."""
    request = service_pb2.ModelInferRequest(model_name=model)
    for name, datatype, shape, data in tensors:
        request.inputs.add(name=name, datatype=datatype, shape=shape)
        if data is not None:
            request.raw_input_contents.append(data)
    return request


def still_serving(server: GrpcServer) -> None:
    tensor = tritongrpc.InferInput("a", [2], "INT16")
    tensor.set_data_from_numpy(np.array([1, -1], np.int16))
    result = tritongrpc.InferenceServerClient(server.address).infer("ident", [tensor])
    assert result.as_numpy("a").tolist() == [1, -1]


# --- hostile messages ---------------------------------------------------------------------------

BYTES_PAST_BUFFER = struct.pack("<I", 1000) + b"short"

HOSTILE = {
    "10**12 elements, no data": (request_with(("a", "FP32", [10**6, 10**6], b"")),
                                 "RESOURCE_EXHAUSTED", "would decode to 4000000000000 bytes"),
    "10**12 elements, typed, no data": (
        service_pb2.ModelInferRequest(model_name="ident", inputs=[
            service_pb2.ModelInferRequest.InferInputTensor(name="a", datatype="FP32", shape=[10**6, 10**6])]),
        "INVALID_ARGUMENT", "holds 1000000000000 elements but contents.fp32_contents has 0"),
    "2**70 elements": (request_with(("a", "UINT8", [2**40, 2**30], b"")), "INVALID_ARGUMENT", "2**59"),
    "raw shorter than its shape": (request_with(("a", "INT64", [4], b"\0" * 31)),
                                   "INVALID_ARGUMENT", "binary_data_size is 31 bytes"),
    "BYTES length past the buffer": (request_with(("a", "BYTES", [1], BYTES_PAST_BUFFER)),
                                     "INVALID_ARGUMENT", "runs past its data"),
    "BYTES count past the buffer": (request_with(("a", "BYTES", [10**9], b"\0" * 8)),
                                    "INVALID_ARGUMENT", "cannot hold"),
    "empty BYTES of 10**12 lists": (request_with(("a", "BYTES", [10**12, 0], b"")),
                                    "INVALID_ARGUMENT", "nested empty lists"),
    "a negative dim": (request_with(("a", "FP32", [-1, 2], b"\0" * 8)), "INVALID_ARGUMENT",
                       "non-negative"),
    "40 dims": (request_with(("a", "FP32", [1] * 40, b"\0" * 4)), "INVALID_ARGUMENT", "at most 32"),
    "unknown datatype": (request_with(("a", "FP8", [1], b"\0")), "INVALID_ARGUMENT", "unknown datatype"),
    "BOOL byte 2": (request_with(("a", "BOOL", [2], b"\x01\x02")), "INVALID_ARGUMENT", "0 or 1"),
    "raw for one of two inputs": (request_with(("a", "INT8", [1], b"\x01"), ("b", "INT8", [1], None)),
                                  "INVALID_ARGUMENT", "1 entries for 2 inputs"),
    "an input twice": (request_with(("a", "INT8", [1], b"\x01"), ("a", "INT8", [1], b"\x02")),
                       "INVALID_ARGUMENT", "given twice"),
    "no inputs": (service_pb2.ModelInferRequest(model_name="ident"), "INVALID_ARGUMENT", "inputs"),
    "an input the model lacks": (request_with(("z", "FP32", [1, 3], b"\0" * 12), model="toy"),
                                 "INVALID_ARGUMENT", "has no input 'z'"),
    "an unknown model": (request_with(("a", "INT8", [1], b"\x01"), model="nope"), "NOT_FOUND",
                         "no model named 'nope'"),
    "a model name of 100,000 characters": (request_with(("a", "INT8", [1], b"\x01"), model="m" * 100_000),
                                           "NOT_FOUND", "no model named 'mmm"),
    "an unknown version": (service_pb2.ModelInferRequest(model_name="ident", model_version="7"),
                           "NOT_FOUND", "no version '7'"),
}


@pytest.mark.parametrize("case", list(HOSTILE))
def test_hostile_messages_get_the_right_code_and_the_server_serves_on(server: GrpcServer, case: str) -> None:
    request, code, fragment = HOSTILE[case]
    error = infer_error(server, request)
    assert error.code().name == code, error
    assert fragment in error.details(), error.details()
    assert "Traceback" not in error.details()
    still_serving(server)


def typed_request(field: str, datatype: str, values: list[Any]) -> Any:
    request = service_pb2.ModelInferRequest(model_name="ident")
    tensor = request.inputs.add(name="a", datatype=datatype, shape=[len(values)])
    getattr(tensor.contents, field).extend(values)
    return request


@pytest.mark.parametrize(("field", "datatype", "values", "fragment"), [
    ("int_contents", "INT8", [1, 300], "300 is out of range for INT8"),
    ("uint_contents", "UINT16", [70000], "70000 is out of range for UINT16"),
    ("int_contents", "FP32", [1], "FP32 data goes in contents.fp32_contents, not int_contents"),
])
def test_typed_values_that_do_not_fit_are_invalid(server: GrpcServer, field: str, datatype: str,
                                                  values: list[Any], fragment: str) -> None:
    error = infer_error(server, typed_request(field, datatype, values))
    assert error.code().name == "INVALID_ARGUMENT" and fragment in error.details(), error.details()


def test_many_outputs_asked_for_are_refused_quickly(server: GrpcServer) -> None:
    """100,000 output names (each looked for among the others would be 10**10 steps): once each."""
    request = request_with(("a", "INT8", [1], b"\x01"))
    request.outputs.extend(service_pb2.ModelInferRequest.InferRequestedOutputTensor(name=str(i))
                           for i in range(100_000))
    started = time.monotonic()
    error = infer_error(server, request)
    assert error.code().name == "INVALID_ARGUMENT" and "has no output '0'" in error.details()
    request.outputs.add(name="99999")
    assert "asked for twice" in infer_error(server, request).details()
    assert time.monotonic() - started < 5


def test_a_message_over_max_body_is_resource_exhausted(server: GrpcServer) -> None:
    """grpc's own limit (the listener sets --max-body), and ours on what a message decodes to:
    INT32 zeros are one byte each in a message and four once decoded."""
    error = infer_error(server, request_with(("a", "UINT8", [MAX_BODY + 1], b"\0" * (MAX_BODY + 1))))
    assert error.code().name == "RESOURCE_EXHAUSTED", error
    zeros = (MAX_BODY // 4) + 1
    error = infer_error(server, typed_request("int_contents", "INT32", [0] * zeros))
    assert error.code().name == "RESOURCE_EXHAUSTED", error
    assert "--max-body" in error.details(), error.details()
    still_serving(server)


def test_bytes_that_are_no_message_are_invalid(server: GrpcServer) -> None:
    channel = grpc.insecure_channel(server.address)
    call = channel.unary_unary("/inference.GRPCInferenceService/ModelInfer")  # bytes as they are
    with pytest.raises(grpc.RpcError) as raised:
        call(b"\x0a\xff\xff\xff\xff\x0f")  # field 1, a length past the end
    assert raised.value.code().name == "INVALID_ARGUMENT", raised.value
    assert "not a ModelInfer request" in raised.value.details()
    still_serving(server)


def _length_delimited(field: int, data: bytes) -> bytes:
    """A protobuf length-delimited field, written by hand (a message protobuf would not build)."""
    header, length = bytearray([field << 3 | 2]), len(data)
    while True:
        header.append(length & 0x7F | (0x80 if length > 0x7F else 0))
        length >>= 7
        if not length:
            return bytes(header) + data


def test_a_message_without_the_token_is_not_parsed(tmp_path: Path) -> None:
    """20 million empty BYTES elements (40 MB, under this server's --max-body): protobuf holds the
    GIL, and with it the event loop, for most of a second over them. Without the token the call
    is refused before the message is parsed (grpc's deserializer would parse it first)."""
    elements = 20_000_000
    tensor = service_pb2.ModelInferRequest.InferInputTensor(name="a", datatype="BYTES", shape=[1])
    message = _length_delimited(1, b"ident") + _length_delimited(
        5, tensor.SerializeToString() + _length_delimited(5, b"\x42\x00" * elements))
    served = grpc_server(tmp_path / "studioml", {"ident": None}, max_body=64 << 20, token="s3cret")
    try:
        call = grpc.insecure_channel(served.address).unary_unary("/inference.GRPCInferenceService/ModelInfer")
        took = {}
        for token in ("wrong", "s3cret"):
            started = time.monotonic()
            with pytest.raises(grpc.RpcError) as raised:
                call(message, metadata=[("authorization", f"Bearer {token}")], timeout=60)
            took[token] = time.monotonic() - started
            assert raised.value.code().name == ("UNAUTHENTICATED" if token == "wrong" else "INVALID_ARGUMENT")
        # the same transfer; with the token, parsed (and refused: 20000000 elements for shape [1])
        assert took["wrong"] < took["s3cret"] / 3, took
    finally:
        served.close()


def test_unimplemented_rpcs_say_so(server: GrpcServer) -> None:
    with pytest.raises(grpc.RpcError) as raised:
        stub_for(server).ModelStatistics(service_pb2.ModelStatisticsRequest())
    assert raised.value.code().name == "UNIMPLEMENTED"


# --- model failures, deadlines, the queue, cancellation ----------------------------------------


def test_a_model_failure_is_internal_without_a_traceback(server: GrpcServer) -> None:
    error = infer_error(server, request_with(("boom", "INT8", [1], b"\x01"), model="slow"))
    assert error.code().name == "INTERNAL"
    assert "the model broke" in error.details() and "Traceback" not in error.details()
    still_serving(server)


def test_outputs_a_model_failed_on_are_left_out_and_named(server: GrpcServer) -> None:
    request = request_with(("fail", "INT8", [1], b"\x01"), ("ok", "INT8", [1], b"\x02"),
                           ("sleep", "FP32", [1], np.zeros(1, np.float32).tobytes()), model="slow")
    response, call = stub_for(server).ModelInfer.with_call(request)
    assert [o.name for o in response.outputs] == ["ok", "sleep"]
    assert len(response.raw_output_contents) == 2 and response.raw_output_contents[0] == b"\x02"
    trailing = dict(call.trailing_metadata())
    assert trailing["x-studio-failed-count"] == "1" and trailing["x-studio-failed-keys"] == "fail"


def test_a_deadline_shorter_than_the_model_is_deadline_exceeded(server: GrpcServer) -> None:
    tensor = tritongrpc.InferInput("a", [1], "INT8")
    tensor.set_data_from_numpy(np.array([1], np.int8))
    client = tritongrpc.InferenceServerClient(server.address)
    started = time.monotonic()
    with pytest.raises(InferenceServerException) as raised:
        client.infer("slow", [tensor], client_timeout=0.1)
    assert raised.value.status() == "StatusCode.DEADLINE_EXCEEDED"
    # the call stopped counting at its deadline, while the model (0.5 s) still runs
    while metric(server.http("GET", "/metrics").text, "studio_queue_depth") > 0:
        assert time.monotonic() - started < 0.4, "the call outlived its deadline on the server"
        time.sleep(0.01)
    assert client.infer("slow", [tensor], client_timeout=5).as_numpy("a").tolist() == [1]


def metric(text: str, name: str, **labels: str) -> float:
    for line in text.splitlines():
        if line.startswith(name) and all(f'{k}="{v}"' in line for k, v in labels.items()):
            return float(line.split()[-1])
    return 0.0


def test_cancelled_calls_stop_counting_against_the_queue(server: GrpcServer) -> None:
    """--max-queue 2: two slow calls fill it (a third is UNAVAILABLE); cancelling them frees it
    at once, long before the model's 0.5 s are up, and they are counted 499."""
    route = "/inference.GRPCInferenceService/ModelInfer"
    before = metric(server.http("GET", "/metrics").text, "studio_requests_total", route=route, status="499",
                    model="slow")
    stub = stub_for(server)
    request = request_with(("sleep", "FP32", [1], np.array([2.0], np.float32).tobytes()), model="slow")
    calls = [stub.ModelInfer.future(request) for _ in range(2)]
    deadline = time.monotonic() + 5
    while metric(server.http("GET", "/metrics").text, "studio_queue_depth") < 2:
        assert time.monotonic() < deadline, "the calls never reached the queue"
        time.sleep(0.01)
    assert server.context.activity.in_flight == 2  # in flight for --killafter and draining too
    error = infer_error(server, request)
    assert error.code().name == "UNAVAILABLE" and "--max-queue 2" in error.details(), error
    for call in calls:
        call.cancel()
    while metric(server.http("GET", "/metrics").text, "studio_queue_depth") > 0:
        assert time.monotonic() < deadline, "cancelled calls still count"
        time.sleep(0.01)
    text = server.http("GET", "/metrics").text
    assert metric(text, "studio_requests_total", route=route, status="499", model="slow") == before + 2, text
    assert server.context.activity.in_flight == 0
    still_serving(server)


def test_timeout_smaller_than_the_deadline_wins(tmp_path: Path) -> None:
    served = grpc_server(tmp_path / "studioml", {"slow": SLOW}, dataplane=DataPlaneOptions(timeout=0.1))
    try:
        error = infer_error(served, request_with(("a", "INT8", [1], b"\x01"), model="slow"), timeout=10)
        assert error.code().name == "DEADLINE_EXCEEDED" and "--timeout" in error.details(), error
    finally:
        served.close()


# --- the token ------------------------------------------------------------------------------------


def test_the_calls_that_need_no_token_do_not_parse_their_message(server: GrpcServer) -> None:
    """ServerLive's and ServerReady's messages have no fields, so no bytes can change their
    answer: they are not parsed. Anyone could send 64 MiB of unknown fields to be parsed on the
    event loop; bytes that are no message at all show that nothing is parsed."""
    channel = grpc.insecure_channel(server.address, options=[("grpc.max_send_message_length", -1)])
    for method, reply_type in (("ServerLive", service_pb2.ServerLiveResponse),
                               ("ServerReady", service_pb2.ServerReadyResponse)):
        call = channel.unary_unary(f"/inference.GRPCInferenceService/{method}")
        for body in (b"\xff\xff\xff", b"\x0a\x00" * 100_000):  # garbage; 100k empty unknown fields
            reply = reply_type.FromString(call(body, timeout=10))
            assert (reply.live if method == "ServerLive" else reply.ready) is True
        # not even read: a message that claims 1 MB and stalls is answered at once, so gRPC's
        # core never takes in what anyone, without the token, claims to send
        raw = raw_call(server, method)
        raw.conn.send_data(raw.stream, b"\0" + (1 << 20).to_bytes(4, "big") + bytes(10_000))
        raw.flush()
        assert raw.status() == "0"
        raw.sock.close()
    channel.close()


def test_the_token_is_the_authorization_metadata(tmp_path: Path) -> None:
    served = grpc_server(tmp_path / "studioml", {"exp": None}, token="s3cret")
    try:
        client = tritongrpc.InferenceServerClient(served.address)
        assert client.is_server_live() and client.is_server_ready()  # health: no token, as over HTTP
        tensor = tritongrpc.InferInput("a", [1], "INT8")
        tensor.set_data_from_numpy(np.array([7], np.int8))
        for headers in (None, {"authorization": "Bearer wrong"}, {"authorization": "s3cret"}):
            with pytest.raises(InferenceServerException) as raised:
                client.infer("exp", [tensor], headers=headers)
            assert raised.value.status() == "StatusCode.UNAUTHENTICATED", headers
            with pytest.raises(InferenceServerException):
                client.get_model_metadata("exp", headers=headers)
        for scheme in ("Bearer", "bearer"):
            result = client.infer("exp", [tensor], headers={"authorization": f"{scheme} s3cret"})
            assert result.as_numpy("a").tolist() == [7]
    finally:
        served.close()


def test_concurrent_calls_share_the_data_plane(server: GrpcServer) -> None:
    """Calls from several threads at once all answer (the servicer holds no per-call state)."""
    answers: list[int] = []

    def one(value: int) -> None:
        tensor = tritongrpc.InferInput("a", [1], "INT32")
        tensor.set_data_from_numpy(np.array([value], np.int32))
        answers.append(int(tritongrpc.InferenceServerClient(server.address).infer("ident", [tensor])
                           .as_numpy("a")[0]))

    threads = [threading.Thread(target=one, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert sorted(answers) == list(range(8))


def test_server_ready_follows_the_app_draining_and_models(tmp_path: Path) -> None:
    """ServerReady answers as /v2/health/ready does: false while the server drains, or with no
    model ready."""
    served = grpc_server(tmp_path / "studioml", {"exp": None})
    try:
        client = tritongrpc.InferenceServerClient(served.address)
        assert client.is_server_ready() and served.http("GET", "/v2/health/ready").status == 200
        served.context.activity.draining = True  # what SIGTERM sets (core/process/serving.py)
        assert not client.is_server_ready() and served.http("GET", "/v2/health/ready").status == 503
        assert client.is_server_live()
        served.context.activity.draining = False
        served.run(served.context.unload("exp"))
        assert not client.is_server_ready() and not client.is_model_ready("exp")
    finally:
        served.close()


def raw_call(server: GrpcServer, method: str = "ModelInfer") -> RawCall:
    """A call on a raw HTTP/2 connection of its own to the in-process server."""
    import socket

    host, port = server.address.rsplit(":", 1)
    return RawCall(socket.create_connection((host, int(port)), timeout=10), host, method)


def test_a_call_that_ends_without_its_message_is_a_bad_request_at_once(server: GrpcServer) -> None:
    route = "/inference.GRPCInferenceService/ModelInfer"
    before = metric(server.http("GET", "/metrics").text, "studio_requests_total", route=route, status="400",
                    model="")
    call = raw_call(server)
    call.conn.end_stream(call.stream)  # END_STREAM, no message
    call.flush()
    started = time.monotonic()
    assert call.status() == "3"  # INVALID_ARGUMENT
    assert time.monotonic() - started < 2
    call.sock.close()
    wait_for_count(server, route, "400", before + 1)


def wait_for_count(server: GrpcServer, route: str, status: str, count: float) -> None:
    """A call that named no model is counted once its handler is done, which may be just after
    its client heard."""
    deadline = time.monotonic() + 5
    while metric(server.http("GET", "/metrics").text, "studio_requests_total", route=route,
                 status=status, model="") < count:
        assert time.monotonic() < deadline, server.http("GET", "/metrics").text
        time.sleep(0.02)


@pytest.mark.parametrize("how", ["reset by its client", "refused by gRPC's core"])
def test_a_call_that_ends_before_its_message_is_counted_499_and_logs_nothing(
        server: GrpcServer, how: str, caplog: pytest.LogCaptureFixture) -> None:
    """Found by attacking the handler's read: a read gives EOF for these too, so they were
    counted 400 and answered a second time, which grpc logged as an ERROR with a traceback."""
    import h2.errors

    route = "/inference.GRPCInferenceService/ModelInfer"
    before = metric(server.http("GET", "/metrics").text, "studio_requests_total", route=route, status="499",
                    model="")
    call = raw_call(server)
    if how == "reset by its client":
        call.conn.send_data(call.stream, b"\0" + (1000).to_bytes(4, "big") + bytes(10))
        call.flush()
        time.sleep(0.2)  # the handler waits in its read
        call.conn.reset_stream(call.stream, h2.errors.ErrorCodes.CANCEL)
        call.flush()
    else:  # the compressed flag without a grpc-encoding: gRPC's core answers INTERNAL itself
        call.conn.send_data(call.stream, b"\1" + (4).to_bytes(4, "big") + bytes(4), end_stream=True)
        call.flush()
        assert call.status() == "13"
    wait_for_count(server, route, "499", before + 1)
    call.sock.close()
    assert server.context.activity.in_flight == 0
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text
    still_serving(server)

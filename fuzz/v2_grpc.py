"""V2 over gRPC: a ``ModelInferRequest`` as protobuf bytes, decoded as the servicer does
(plugins/protocols/grpc/tensors.py) and answered by an echo.

Bytes that are no message are refused before decoding (the servicer answers INVALID_ARGUMENT).
The echo's reply (raw or typed, as the request was) is then read back as a request (a reply's
outputs have the inputs' layout) and must give the same values."""

from __future__ import annotations

from google.protobuf.message import DecodeError

from fuzz import CLIENT_ERRORS, LIMIT
from fuzz.compare import check_same
from fuzz.instrument import parsers

with parsers():
    from plugins.protocols.grpc import grpc_service_pb2 as pb
    from plugins.protocols.grpc.tensors import decode_inputs, encode_outputs


def one_input(data: bytes) -> None:
    try:
        request = pb.ModelInferRequest.FromString(data)
    except DecodeError:
        return
    try:
        inputs = decode_inputs(request, LIMIT)
        response = pb.ModelInferResponse()
        encode_outputs(response, request, inputs, dict(inputs.values))
    except CLIENT_ERRORS:
        return
    again = pb.ModelInferRequest()
    for output in response.outputs:
        tensor = again.inputs.add(name=output.name, datatype=output.datatype, shape=output.shape)
        if not response.raw_output_contents:
            tensor.contents.CopyFrom(output.contents)
    again.raw_input_contents.extend(response.raw_output_contents)
    echoed = decode_inputs(again, LIMIT).values
    check_same("the echo of a gRPC request", {name: inputs.values[name] for name in echoed}, dict(echoed))

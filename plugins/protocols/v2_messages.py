"""V2 inference request and response bodies: JSON (orjson), with the binary tensor extension.

A binary request is a JSON header of ``Inference-Header-Content-Length`` bytes followed by the
data of every input that declares ``parameters.binary_data_size``, in input order. The sizes
must add up to exactly the rest of the body: a body too short or too long is a 400, and no
input is read past its own bytes. A binary response is laid out the same way.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import orjson

from studio_plugins import BadRequest, Payload, Reply

from .v2_limits import Budget, short
from .v2_tensors import Tensor, decode_binary, decode_json, encode

JSON_OPTIONS = orjson.OPT_SERIALIZE_NUMPY


@dataclass(frozen=True)
class RequestedOutput:
    name: str
    binary: bool


@dataclass(frozen=True)
class InferRequest:
    inputs: Payload
    """Input name -> value (numpy array; nested lists of bytes for BYTES), in request order."""
    id: str | None = None
    outputs: tuple[RequestedOutput, ...] | None = None
    """The outputs asked for (None: all of them)."""
    binary_output: bool = False
    """``parameters.binary_data_output``: every output in binary unless it says otherwise."""
    datatypes: Mapping[str, str] = field(default_factory=dict)
    """Input name -> its datatype, a hint for outputs whose values do not say (empty lists)."""


def header_length(value: bytes | None) -> int | None:
    """The ``Inference-Header-Content-Length`` header, None when absent."""
    if value is None:
        return None
    try:
        length = int(value)
    except ValueError:
        raise BadRequest(f"Inference-Header-Content-Length is not a number: {value[:40]!r}") from None
    if length < 0:
        raise BadRequest("Inference-Header-Content-Length is negative")
    return length


def _field(owner: str, message: Mapping[str, Any], key: str) -> Any:
    if key not in message:
        raise BadRequest(f"{owner}: missing field {key!r}")
    return message[key]


def _parameters(owner: str, message: Mapping[str, Any]) -> Mapping[str, Any]:
    parameters = message.get("parameters")
    if parameters is None:
        return {}
    if not isinstance(parameters, dict):
        raise BadRequest(f"{owner}: parameters must be an object")
    return parameters


def _binary_size(name: str, parameters: Mapping[str, Any]) -> int | None:
    size = parameters.get("binary_data_size")
    if size is None:
        return None
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise BadRequest(
            f"input {name!r}: binary_data_size must be a non-negative integer, got {short(size)}"
        )
    return size


def _flag(owner: str, parameters: Mapping[str, Any], key: str) -> bool | None:
    value = parameters.get(key)
    if value is not None and not isinstance(value, bool):
        raise BadRequest(f"{owner}: parameter {key!r} must be true or false")
    return value


def parse_request(body: bytes, json_length: int | None = None, *, limit: int) -> InferRequest:
    """Decode an inference request; ``json_length`` is the binary extension's header length.

    ``limit`` (``--max-body``) bounds the bytes the decoded inputs hold, all together: JSON
    numbers become up to 8 bytes each, so a JSON body can ask for about 4x its size (a 413)."""
    view = memoryview(body)
    if json_length is None:
        json_length = len(body)
    elif json_length > len(body):
        raise BadRequest(
            f"Inference-Header-Content-Length is {json_length} but the body has {len(body)} bytes"
        )
    try:
        message = orjson.loads(view[:json_length])
    except orjson.JSONDecodeError as exc:
        raise BadRequest(f"invalid JSON: {exc}") from None
    if not isinstance(message, dict):
        raise BadRequest("the inference request must be a JSON object")
    raw_inputs = _field("request", message, "inputs")
    if not isinstance(raw_inputs, list) or not raw_inputs:
        raise BadRequest("request: inputs must be a non-empty list")

    # Where each binary input's bytes are: check the sizes against the body before decoding any.
    binary_total = len(body) - json_length
    offset = json_length
    declared: list[tuple[dict[str, Any], str, int | None]] = []
    for index, item in enumerate(raw_inputs):
        if not isinstance(item, dict):
            raise BadRequest(f"input {index}: must be an object with name, shape, datatype and data")
        name = item["name"] if "name" in item else _field(f"input {index}", item, "name")
        if not isinstance(name, str):
            raise BadRequest(f"input {index}: name must be a string")
        size = _binary_size(name, _parameters(f"input {name!r}", item)) if "parameters" in item else None
        declared.append((item, name, size))
    wanted = sum(size for _, _, size in declared if size is not None)
    if wanted != binary_total:
        raise BadRequest(
            f"binary data: the inputs declare {wanted} bytes (binary_data_size) but the body has "
            f"{binary_total} after the {json_length}-byte JSON header"
        )

    budget = Budget(limit)
    inputs: Payload = {}
    datatypes: dict[str, str] = {}
    for item, name, size in declared:
        if name in inputs:
            raise BadRequest(f"input {name!r} is given twice")
        if "shape" not in item or "datatype" not in item or (size is None and "data" not in item):
            for key in ("shape", "datatype", "data"):  # the message names the first one missing
                _field(f"input {name!r}", item, key)
        shape = item["shape"]
        datatype = item["datatype"]
        if size is not None:
            inputs[name] = decode_binary(name, datatype, shape, view[offset:offset + size], budget)
            offset += size
        else:
            inputs[name] = decode_json(name, datatype, shape, item["data"], budget)
        datatypes[name] = datatype

    parameters = _parameters("request", message)
    binary_output = bool(_flag("request", parameters, "binary_data_output"))
    outputs = None
    raw_outputs = message.get("outputs")
    if raw_outputs is not None:
        if not isinstance(raw_outputs, list):
            raise BadRequest("request: outputs must be a list")
        selected = []
        names: set[str] = set()
        for index, item in enumerate(raw_outputs):
            if not isinstance(item, dict) or not isinstance(item.get("name"), str):
                raise BadRequest(f"output {index}: must be an object with a name")
            if item["name"] in names:  # each copy would be encoded again: a reply N times the result
                raise BadRequest(f"output {item['name']!r} is asked for twice")
            names.add(item["name"])
            binary = _flag(f"output {item['name']!r}", _parameters("output", item), "binary_data")
            selected.append(RequestedOutput(item["name"], binary_output if binary is None else binary))
        outputs = tuple(selected)
    request_id = message.get("id")
    if request_id is not None and not isinstance(request_id, str):
        raise BadRequest("request: id must be a string")
    return InferRequest(inputs, request_id, outputs, binary_output, datatypes)


def failed_outputs(result: Payload) -> frozenset[str]:
    """The outputs ``result`` names as failed (they are ``None``)."""
    if not isinstance(result, Reply) or not result.failed:
        return frozenset()
    return frozenset(key for key in result.failed if key in result and result[key] is None)


def encode_response(
    model_name: str, model_version: str, request: InferRequest, result: Payload
) -> tuple[bytes, int | None]:
    """The response body, and the JSON header's length when some output is binary.

    An output the model failed on (a ``Reply``'s ``None``: a ``ModelPipe`` item) is left out,
    asked for or not: a tensor cannot be ``None``. The reply's headers name it (v2.py)."""
    failed = failed_outputs(result)
    chosen: list[tuple[str, bool]]
    if request.outputs is None:
        chosen = [(name, request.binary_output) for name in result if name not in failed]
    else:
        chosen = [(output.name, output.binary) for output in request.outputs if output.name not in failed]
        missing = [name for name, _ in chosen if name not in result]
        if missing:
            raise BadRequest(
                f"the model has no output {missing[0]!r}; it answered {', '.join(map(repr, result))}"
            )
    outputs: list[dict[str, Any]] = []
    chunks: list[bytes | memoryview] = []
    for wanted, binary in chosen:
        tensor: Tensor = encode(wanted, result[wanted], request.datatypes.get(wanted))
        entry: dict[str, Any] = {"name": tensor.name, "datatype": tensor.datatype, "shape": tensor.shape}
        if binary:
            data = tensor.binary_data()
            entry["parameters"] = {"binary_data_size": len(data)}
            chunks.append(data)
        else:
            entry["data"] = tensor.json_data()
        outputs.append(entry)
    response: dict[str, Any] = {"model_name": model_name, "model_version": model_version}
    if request.id is not None:
        response["id"] = request.id
    response["outputs"] = outputs
    header = orjson.dumps(response, option=JSON_OPTIONS)
    if not chunks:
        return header, None
    return b"".join([header, *chunks]), len(header)

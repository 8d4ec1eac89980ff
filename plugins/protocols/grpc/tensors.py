"""``ModelInferRequest`` tensors -> the values a model sees, and its outputs -> the response.

The same values as V2 over HTTP (plugins/protocols/v2_tensors.py), by the same checks:
``raw_input_contents`` is the binary extension's layout (little-endian numbers, BYTES as 4-byte
lengths and data), read by ``decode_binary``; typed ``contents`` hold one repeated field per
datatype family, refused when a value does not fit the datatype (300 for UINT8). Either way the
shape passes ``v2_limits`` (dims, elements, empty BYTES lists) and the decoded bytes the
request's ``--max-body`` budget before anything is built from it.

The reply is raw (``raw_output_contents``, what ``tritonclient.grpc``'s ``as_numpy`` reads) when
the request was, or when an output is FP16 (which has no typed field); typed otherwise.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from studio_plugins import BadRequest, Payload

from ..v2_limits import MAX_NDIM, Budget, check_empty_lists, check_shape, element_count, short
from ..v2_messages import failed_outputs
from ..v2_tensors import BYTES, DATATYPES, DTYPES, Tensor, decode_binary, encode, nest

# datatype -> the InferTensorContents field that carries it (FP16 and BF16 have none: raw only)
TYPED_FIELDS = {
    "BOOL": "bool_contents",
    "INT8": "int_contents", "INT16": "int_contents", "INT32": "int_contents",
    "INT64": "int64_contents",
    "UINT8": "uint_contents", "UINT16": "uint_contents", "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "FP32": "fp32_contents", "FP64": "fp64_contents",
    BYTES: "bytes_contents",
}
_FIELD_DTYPES = {
    "bool_contents": np.dtype(bool), "int_contents": np.dtype(np.int32),
    "int64_contents": np.dtype(np.int64), "uint_contents": np.dtype(np.uint32),
    "uint64_contents": np.dtype(np.uint64), "fp32_contents": np.dtype(np.float32),
    "fp64_contents": np.dtype(np.float64),
}
_FIELDS = tuple(dict.fromkeys(TYPED_FIELDS.values()))
INLINE_WORK = 16 * 1024
"""Bytes of typed or BYTES data decoded on the event loop; past it, on a thread
(plugins/protocols/v2.py's bodies: ``decode_off_loop``). Raw numbers cost nothing: a view."""


@dataclass(frozen=True)
class Inputs:
    values: Payload
    """Input name -> value, as V2 over HTTP gives them to the model."""
    raw: bool
    """The request sent ``raw_input_contents``: the reply does too."""
    datatypes: Mapping[str, str]
    """Input name -> datatype: a hint for outputs whose values do not say (empty lists)."""


PER_INPUT_WORK = 256
"""What one input costs to decode however small it is, in ``INLINE_WORK``'s bytes (a message of
thousands of empty inputs is slow too)."""


def decode_work(request: Any) -> int:
    """About how many bytes decoding ``request`` walks in Python (see ``INLINE_WORK``)."""
    work = PER_INPUT_WORK * len(request.inputs)
    if request.raw_input_contents:
        return work + sum(len(raw) for tensor, raw in
                          zip(request.inputs, request.raw_input_contents, strict=False)
                          if tensor.datatype == BYTES)
    for tensor in request.inputs:
        contents = tensor.contents
        work += sum(len(getattr(contents, field)) for field in _FIELDS) * 8
    return work


def decode_inputs(request: Any, limit: int) -> Inputs:
    """The inputs of a ``ModelInferRequest``; ``limit`` (``--max-body``) bounds the bytes their
    values hold, all together (a 413)."""
    tensors = request.inputs
    if not tensors:
        raise BadRequest("request: inputs must not be empty")
    raw = request.raw_input_contents
    if raw and len(raw) != len(tensors):
        raise BadRequest(
            f"raw_input_contents has {len(raw)} entries for {len(tensors)} inputs: give every "
            "input's data there, in input order, or none and use contents"
        )
    budget = Budget(limit)
    values: Payload = {}
    datatypes: dict[str, str] = {}
    for index, tensor in enumerate(tensors):
        name = tensor.name
        if name in values:
            raise BadRequest(f"input {short(name)} is given twice")
        if len(tensor.shape) > MAX_NDIM:  # before copying a million dims out of the message
            raise BadRequest(f"input {name!r}: shape has {len(tensor.shape)} dims; at most {MAX_NDIM} "
                             "are supported")
        shape = list(tensor.shape)
        if raw:
            if tensor.HasField("contents"):
                raise BadRequest(f"input {name!r}: has contents as well as raw_input_contents; "
                                 "send its data in one of them")
            values[name] = decode_binary(name, tensor.datatype, shape, memoryview(raw[index]), budget)
        else:
            values[name] = decode_typed(name, tensor.datatype, shape, tensor.contents, budget)
        datatypes[name] = tensor.datatype
    return Inputs(values, bool(raw), datatypes)


def decode_typed(name: str, datatype: str, shape: list[int], contents: Any, budget: Budget | None) -> Any:
    """The value of a tensor sent in typed ``contents`` (an ``InferTensorContents``)."""
    if datatype not in DATATYPES:
        raise BadRequest(f"input {name!r}: unknown datatype {short(datatype)}; one of {', '.join(DATATYPES)}")
    field = TYPED_FIELDS.get(datatype)
    if field is None:
        raise BadRequest(f"input {name!r}: {datatype} has no typed contents field; send its data in "
                         "raw_input_contents (little-endian)")
    dims = check_shape(name, shape)
    count = element_count(name, dims)
    for other in _FIELDS:
        if other != field and len(getattr(contents, other)):
            raise BadRequest(f"input {name!r}: {datatype} data goes in contents.{field}, not {other}")
    values = getattr(contents, field)
    if len(values) != count:
        raise BadRequest(
            f"input {name!r}: shape {short(list(dims))} holds {count} elements but "
            f"contents.{field} has {len(values)}"
        )
    if datatype == BYTES:
        if count == 0:
            check_empty_lists(name, dims)
        items = list(values)
        if budget is not None:
            budget.spend(name, sum(map(len, items)))
        return nest(items, dims)
    dtype = DTYPES[datatype].newbyteorder("=")
    if budget is not None:
        budget.spend(name, count * dtype.itemsize)
    source: np.ndarray = np.fromiter(values, _FIELD_DTYPES[field], count)
    if dtype != source.dtype:  # a narrower integer carried in a 32-bit field: does each fit?
        info = np.iinfo(dtype)
        outside = (source < info.min) | (source > info.max)
        if outside.any():
            raise BadRequest(f"input {name!r}: {source[outside][0].item()!r} is out of range for "
                             f"{datatype} [{info.min}, {info.max}]")
        source = source.astype(dtype)
    try:
        return source.reshape(dims)
    except ValueError as exc:  # an empty tensor whose other dims multiply past what numpy holds
        raise BadRequest(f"input {name!r}: shape {short(list(dims))} is too big for numpy") from exc


def encode_outputs(response: Any, request: Any, inputs: Inputs, result: Payload) -> None:
    """Fill ``response`` (a ``ModelInferResponse``) with the model's outputs: those ``request``
    asks for, or all. An output the model failed on (a ``Reply``'s ``None``) is left out; the
    caller names it in the trailing metadata."""
    failed = failed_outputs(result)
    if request.outputs:
        names: list[str] = []
        seen: set[str] = set()
        for wanted in request.outputs:
            if wanted.name in seen:  # each copy would be encoded again: a reply N times the result
                raise BadRequest(f"output {short(wanted.name)} is asked for twice")
            seen.add(wanted.name)
            names.append(wanted.name)
        names = [name for name in names if name not in failed]
        missing = [name for name in names if name not in result]
        if missing:
            raise BadRequest(
                f"the model has no output {short(missing[0])}; it answered {', '.join(map(repr, result))}"
            )
    else:
        names = [name for name in result if name not in failed]
    tensors: list[Tensor] = [encode(name, result[name], inputs.datatypes.get(name)) for name in names]
    raw = inputs.raw or any(tensor.datatype not in TYPED_FIELDS for tensor in tensors)
    for tensor in tensors:
        output = response.outputs.add(name=tensor.name, datatype=tensor.datatype, shape=tensor.shape)
        if raw:
            response.raw_output_contents.append(bytes(tensor.binary_data()))
        elif tensor.array is not None:
            getattr(output.contents, TYPED_FIELDS[tensor.datatype]).extend(tensor.array.tolist())
        else:
            assert tensor.items is not None
            output.contents.bytes_contents.extend(tensor.items)

"""V2 requests built from the fuzzer's bytes with the protocol's structure (``fuzz/draw.py``):
datatypes, shapes of interesting sizes (0, 1, 2**31, 2**63-1, 2**63, negative ...), data flat or
nested, of the right or wrong kinds, inputs in JSON or binary. Byte-level mutation of JSON
(``v2_json``) rarely gets this far; this target reaches the shape, nesting and size checks. The
request is parsed as the infer route does and its echo encoded."""

from __future__ import annotations

from typing import Any

import orjson

from fuzz import CLIENT_ERRORS, LIMIT
from fuzz.draw import Draw
from fuzz.instrument import parsers

with parsers():
    from plugins.protocols.v2_messages import encode_response, parse_request

DATATYPES = ("BOOL", "UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32", "INT64",
             "FP16", "FP32", "FP64", "BYTES", "FP8", "", "bytes")
SIZES = (0, 1, 2, 3, 4, 7, 255, 256, 65536, 2**31, 2**32, 2**40, 2**53 + 1, 2**62, 2**63 - 1, 2**63, -1)
VALUES: tuple[Any, ...] = (0, 1, -1, 255, 256, -129, 2**31, 2**63 - 1, 2**63, 2**64 - 1, -(2**63), 0.5,
                           1.5, -0.0, 1e39, 70000.0, 1e308, True, False, None, "", "a", "é", [], {})


def shape(draw: Draw) -> list[Any]:
    ndim = draw.pick((0, 1, 1, 2, 2, 3, 4, 32, 33, 100))
    return [draw.pick(SIZES) if draw.below(4) else draw.below(5) for _ in range(ndim)]


def data(draw: Draw, dims: list[Any], depth: int = 0) -> Any:
    """Values shaped like ``dims`` (mostly), sometimes ragged, too deep or of the wrong kind."""
    if depth > 40 or draw.below(16) == 0:
        return draw.pick(VALUES)
    if depth < len(dims) and isinstance(dims[depth], int) and 0 <= dims[depth] <= 8 and draw.below(8):
        return [data(draw, dims, depth + 1) for _ in range(dims[depth] + (draw.below(8) == 0))]
    return draw.pick(VALUES) if draw.below(4) else [data(draw, dims, depth + 1) for _ in range(draw.below(4))]


def tensor(draw: Draw, index: int, chunks: list[bytes]) -> dict[str, Any]:
    item: dict[str, Any] = {"name": draw.pick(("x", "y", "x", str(index))), "datatype": draw.pick(DATATYPES),
                            "shape": shape(draw)}
    if draw.below(3) == 0:  # binary: raw bytes of some size
        chunk = draw.raw(64)
        chunks.append(chunk)
        item["parameters"] = {"binary_data_size": len(chunk) if draw.below(8) else draw.pick(SIZES)}
    else:
        item["data"] = data(draw, item["shape"])
    return item


def one_input(raw: bytes) -> None:
    draw = Draw(raw)
    chunks: list[bytes] = []
    message: dict[str, Any] = {"inputs": [tensor(draw, i, chunks) for i in range(1 + draw.below(3))]}
    if draw.below(4) == 0:
        message["parameters"] = {"binary_data_output": bool(draw.below(2))}
    try:
        head = orjson.dumps(message)
    except (TypeError, orjson.JSONEncodeError):  # an int past 64 bits: not JSON orjson writes
        return
    try:
        request = parse_request(head + b"".join(chunks), len(head) if chunks else None, limit=LIMIT)
        encode_response("m", "1", request, dict(request.inputs))
    except CLIENT_ERRORS:
        return

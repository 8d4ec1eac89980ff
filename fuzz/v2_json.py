"""V2 JSON inference requests, parsed as the infer route does and answered by an echo.

The echo (the identity model) is encoded as the route would reply; a JSON reply is then read
back as a request (a reply's outputs have the inputs' layout) and must give the same values."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import orjson

from fuzz import CLIENT_ERRORS, LIMIT
from fuzz.compare import check_same
from fuzz.instrument import parsers

with parsers():
    from plugins.protocols.v2_messages import InferRequest, encode_response, parse_request


def echo(request: InferRequest) -> tuple[bytes, int | None]:
    return encode_response("m", "1", request, dict(request.inputs))


def finite(value: Any) -> bool:
    """JSON carries no NaN or infinity (orjson writes null): such a value cannot come back."""
    if isinstance(value, np.ndarray):
        return value.dtype.kind not in "fc" or bool(np.isfinite(value).all())
    return not isinstance(value, float) or math.isfinite(value)


def one_input(data: bytes) -> None:
    try:
        request = parse_request(data, limit=LIMIT)
        reply, json_length = echo(request)
    except CLIENT_ERRORS:
        return
    if json_length is not None or request.outputs is not None:
        return
    if not all(finite(value) for value in request.inputs.values()):
        return
    outputs = orjson.loads(reply)["outputs"]
    again = parse_request(orjson.dumps({"inputs": outputs}), limit=LIMIT)
    check_same("the echo of a V2 JSON request", dict(request.inputs), dict(again.inputs))

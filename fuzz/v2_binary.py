"""V2 requests with the binary tensor extension: a JSON header, then the inputs' raw bytes.

The input's first two bytes (little-endian) are the Inference-Header-Content-Length; the rest
is the body. The request is parsed as the infer route does and an echo of it encoded."""

from __future__ import annotations

from fuzz import CLIENT_ERRORS, LIMIT
from fuzz.instrument import parsers

with parsers():
    from plugins.protocols.v2_messages import encode_response, header_length, parse_request


def one_input(data: bytes) -> None:
    if len(data) < 2:
        return
    length = str(int.from_bytes(data[:2], "little")).encode()
    try:
        request = parse_request(data[2:], header_length(length), limit=LIMIT)
        encode_response("m", "1", request, dict(request.inputs))
    except CLIENT_ERRORS:
        return

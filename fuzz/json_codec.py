"""JSON request bodies (``POST /``) through the JSON codec; whatever decodes must encode and
decode back to the same values (the echo a client gets)."""

from __future__ import annotations

from fuzz import CLIENT_ERRORS, LIMIT
from fuzz.compare import check_same
from fuzz.instrument import parsers

with parsers():
    from plugins.codecs.json import JsonCodec

CODEC = JsonCodec()


def one_input(data: bytes) -> None:
    try:
        payload = CODEC.decode(data, LIMIT)
    except CLIENT_ERRORS:
        return
    check_same("a JSON echo", payload, CODEC.decode(CODEC.encode(payload), 2 * LIMIT))

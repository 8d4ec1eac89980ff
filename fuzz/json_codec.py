"""JSON request bodies (``POST /``) through the JSON codec; whatever decodes must encode to strict
JSON (no ``NaN``: a strict parser reads every reply) and decode back to the same values (the echo
a client gets), NaN and infinities (``NaN``, ``1e999``) coming back as ``null``."""

from __future__ import annotations

import json
from typing import Any

from fuzz import CLIENT_ERRORS, LIMIT
from fuzz.compare import check_same
from fuzz.instrument import parsers

with parsers():
    from plugins.codecs.json import JsonCodec, _default

CODEC = JsonCodec()


def _refuse(constant: str) -> Any:
    raise AssertionError(f"a JSON reply holds {constant}: strict parsers refuse it")


def one_input(data: bytes) -> None:
    try:
        payload = CODEC.decode(data, LIMIT)
    except CLIENT_ERRORS:
        return
    reply = CODEC.encode(payload)
    json.loads(reply, parse_constant=_refuse)
    echo = CODEC.decode(reply, 2 * LIMIT)
    loose = json.dumps(payload, default=_default, allow_nan=True).encode()  # Python's NaN and all
    if loose == reply:  # nothing to write as null: the echo is what was sent
        check_same("a JSON echo", payload, echo)
        return
    nulls = json.dumps(json.loads(loose, parse_constant=lambda constant: None)).encode()
    check_same("a JSON echo with null for NaN and infinities", CODEC.decode(nulls, 2 * LIMIT), echo)

"""``.npz`` request bodies through the npz codec; whatever decodes must encode and decode back
to the same arrays (the echo a client gets)."""

from __future__ import annotations

from fuzz import CLIENT_ERRORS, LIMIT
from fuzz.compare import check_same
from fuzz.instrument import parsers

with parsers():
    from plugins.codecs.npz import NpzCodec

CODEC = NpzCodec()


def one_input(data: bytes) -> None:
    try:
        payload = CODEC.decode(data, LIMIT)
    except CLIENT_ERRORS:
        return
    # the echo: what numpy.savez writes of the arrays must decode to them again
    check_same("an npz echo", payload, CODEC.decode(CODEC.encode(payload), 2 * LIMIT))

"""The seed's wire format: a pickled dict of numpy arrays, read as data (never unpickled)."""

from __future__ import annotations

from collections.abc import Callable

from studio_plugins import Codec, Payload, hookimpl, pickle_dumps, restricted_loads


class PickleCodec(Codec):
    name = "pickle"
    media_types = ("application/python-pickle", "application/x-python-pickle")

    def sniff(self, head: bytes) -> bool:
        # protocol 2+ starts with PROTO (0x80) and the protocol number
        return len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5

    def decode(self, body: bytes, limit: int) -> Payload:
        return restricted_loads(body, limit)

    def encode(self, payload: Payload) -> bytes:
        return pickle_dumps(payload)


@hookimpl
def studio_register_codecs(register: Callable[[Codec], None]) -> None:
    register(PickleCodec())

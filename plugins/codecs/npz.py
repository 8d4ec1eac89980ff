"""``.npz`` bodies (``numpy.savez``): one array per name. Loaded with ``allow_pickle=False``."""

from __future__ import annotations

import io
import zipfile
from collections.abc import Callable
from typing import Any

import numpy as np

from studio_plugins import BadRequest, Codec, Payload, hookimpl


class NpzCodec(Codec):
    name = "npz"
    media_types = ("application/x-npz",)

    def sniff(self, head: bytes) -> bool:
        return head.startswith(b"PK\x03\x04") or head.startswith(b"PK\x05\x06")

    def decode(self, body: bytes, limit: int) -> Payload:
        try:
            with np.load(io.BytesIO(body), allow_pickle=False) as archive:
                return {name: archive[name] for name in archive.files}
        except (ValueError, OSError, zipfile.BadZipFile, EOFError, KeyError) as exc:
            raise BadRequest(f"invalid npz body: {exc}") from None

    def encode(self, payload: Payload) -> bytes:
        arrays: dict[str, Any] = {}
        for name, value in payload.items():
            array = np.asarray(value)
            if array.dtype.hasobject:
                raise TypeError(f"output {name!r} is not an array of numbers or strings")
            arrays[name] = array
        buffer = io.BytesIO()
        np.savez(buffer, **arrays)
        return buffer.getvalue()


@hookimpl
def studio_register_codecs(register: Callable[[Codec], None]) -> None:
    register(NpzCodec())

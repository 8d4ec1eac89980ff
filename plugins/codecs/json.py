"""JSON bodies: ``{"a": [1, 2]}``. Numeric lists become numpy arrays; other values stay as sent."""

from __future__ import annotations

import base64
import json
from collections.abc import Callable
from typing import Any

import numpy as np

from studio_plugins import BadRequest, Codec, Payload, hookimpl


def _to_array(value: Any) -> Any:
    """A rectangular list of numbers or booleans becomes an ndarray; anything else is kept."""
    if isinstance(value, list) and value:
        try:
            array = np.asarray(value)
        except ValueError:  # ragged
            return value
        if array.dtype.kind in "biuf":
            return array
    return value


def _default(value: Any) -> Any:
    if isinstance(value, np.ndarray | np.generic):
        return value.tolist()
    if isinstance(value, bytes | bytearray):
        try:
            return bytes(value).decode("utf-8")
        except UnicodeDecodeError:
            return {"b64": base64.b64encode(value).decode("ascii")}
    if isinstance(value, set | frozenset):
        return sorted(value, key=repr)
    if hasattr(value, "__array__"):
        return np.asarray(value).tolist()
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


class JsonCodec(Codec):
    name = "json"
    media_types = ("application/json",)

    def sniff(self, head: bytes) -> bool:
        return head.lstrip()[:1] == b"{"

    def decode(self, body: bytes, limit: int) -> Payload:
        try:
            value = json.loads(body)
        except (ValueError, RecursionError) as exc:
            raise BadRequest(f"invalid JSON: {exc}") from None
        if not isinstance(value, dict):
            raise BadRequest("the JSON body must be an object of named inputs")
        return {key: _to_array(item) for key, item in value.items()}

    def encode(self, payload: Payload) -> bytes:
        return json.dumps(payload, default=_default, allow_nan=True).encode()


@hookimpl
def studio_register_codecs(register: Callable[[Codec], None]) -> None:
    register(JsonCodec())

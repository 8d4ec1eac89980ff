"""JSON bodies: ``{"a": [1, 2]}``. Numeric lists become numpy arrays; other values stay as sent.

Bounded: values nest at most ``MAX_DEPTH`` deep, and the arrays built hold at most ``limit``
bytes in all (``--max-body``; a JSON number becomes 8 bytes, so a body of numbers can ask for
about 4x its size: past the limit it is a 413, refused before numpy allocates).

A body is an object of named inputs (the seed's dict); an array or any other value is a 400
that says so. Replies are strict JSON (RFC 8259), which has no NaN or infinity: those are
written as ``null``, as MLServer, JavaScript's ``JSON.stringify`` and our V2 replies (orjson)
write them, so ``JSON.parse``, Go and jq read every reply. (Python's ``json`` writes ``NaN``,
which they refuse.) numpy reads ``null`` back as NaN: ``np.array(values, float)``."""

from __future__ import annotations

import base64
import contextlib
import json
import math
from collections.abc import Callable
from itertools import chain
from typing import Any

import numpy as np

from studio_plugins import BadRequest, Codec, Payload, PayloadTooLarge, hookimpl

MAX_DEPTH = 64
"""Lists and objects nest at most this deep in an input: numpy 2's most dims, far below the
JSON encoder's recursion limit for a reply that echoes the value."""
_NUMBERS = {bool, int, float}
_CONTAINERS = frozenset({list, dict})


def _leaves(value: list[Any]) -> tuple[tuple[int, ...], list[Any]] | None:
    """The shape and row-major leaves of a rectangular nest of lists, or None (ragged, or lists
    beside values). Level by level at C speed; at most ``MAX_DEPTH`` levels are looked at."""
    dims: list[int] = []
    level = value
    for _ in range(MAX_DEPTH):
        kinds = set(map(type, level))
        if list not in kinds:
            return tuple(dims), level
        if len(kinds) > 1 or len(set(map(len, level))) > 1:  # lists beside values, or ragged
            return None
        dims.append(len(level[0]))
        level = list(chain.from_iterable(level))
    return None


def _to_array(name: str, value: Any, budget: list[int]) -> tuple[Any, bool]:
    """A rectangular list of numbers or booleans becomes an ndarray; anything else is kept.
    With it, whether its depth is known to be within bounds (an array's, or a rectangular list
    of values).

    Every leaf's type is known before numpy sees the list (a long string among numbers would
    make numpy allocate its width for every element), and the array's size is charged to
    ``budget`` (the bytes left) before it is allocated: 1 per boolean, 8 per number."""
    if not isinstance(value, list) or not value:
        return value, not isinstance(value, list | dict)
    found = _leaves(value)
    if found is None:
        return value, False
    dims, leaves = found
    shape = (len(value), *dims)
    kinds = set(map(type, leaves))
    if not kinds:  # nested empty lists: numpy's empty float64 array, as before
        return np.empty(shape), True
    if not kinds <= _NUMBERS:
        return value, _CONTAINERS.isdisjoint(kinds)
    nbytes = len(leaves) * (1 if kinds == {bool} else 8)
    if nbytes > budget[0]:
        raise PayloadTooLarge(
            f"input {name!r}: {len(leaves)} JSON values would decode to {nbytes} bytes of arrays; the "
            f"decoded inputs may hold {budget[0]} more (--max-body)"
        )
    array = np.asarray(leaves)
    if array.dtype.kind == "f" and float not in kinds:
        # integers past int64 beside small ones: numpy makes float64 of them (rounded), but uint64
        # of the same beside a boolean, so the echo of one changed type (found by the fuzzer:
        # tests/corpus/json_codec/uint64-beside-a-small-int); uint64 whenever they all fit it
        with contextlib.suppress(OverflowError):
            array = np.asarray(leaves, dtype=np.uint64)
    if array.dtype.kind not in "biuf":  # integers past 64 bits: object
        return value, True
    try:
        shaped = array.reshape(shape)
    except ValueError:  # more dims than this numpy allows (32 before numpy 2): kept as sent
        return value, True
    budget[0] -= array.nbytes
    return shaped, True


def _check_depth(name: str, value: Any) -> None:
    """``value`` nests lists and objects at most ``MAX_DEPTH`` deep (a reply that echoes it must
    not overflow the encoder's recursion either). Level by level; a level's types at C speed."""
    level = [value]
    for _ in range(MAX_DEPTH):
        if _CONTAINERS.isdisjoint(map(type, level)):
            return
        level = list(chain.from_iterable(
            item.values() if type(item) is dict else item for item in level if type(item) in _CONTAINERS
        ))
    if not _CONTAINERS.isdisjoint(map(type, level)):
        raise BadRequest(f"input {name!r} nests lists or objects more than {MAX_DEPTH} deep")


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


def _finite(value: Any) -> Any:
    """``value`` with every NaN and infinity in it as ``None`` (JSON's ``null``): in floats,
    numpy floats and arrays, dicts, lists and tuples; anything else is left to ``_default``.
    Only a reply that holds one pays for this walk."""
    kind = type(value)
    if kind is float:
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: _finite(item) for key, item in value.items()}
    if kind is list or kind is tuple:
        return [_finite(item) for item in value]
    if isinstance(value, np.ndarray | np.generic):
        if value.dtype.kind == "f":
            finite = np.isfinite(value)
            if finite.all():
                return value.tolist()
            if isinstance(value, np.generic):
                return None
            values = value.astype(object)  # Python floats, written as the finite path writes them
            values[~finite] = None
            return values.tolist()
        items = value.tolist()
        return _finite(items) if value.dtype.kind == "O" else items  # no floats in the others
    return value


def _finite_default(value: Any) -> Any:
    if hasattr(value, "__array__"):  # a torch tensor: through numpy, not element by element
        return _finite(np.asarray(value))
    return _finite(_default(value))


_NOT_AN_OBJECT = {list: "an array", str: "a string", int: "a number", float: "a number",
                  bool: "true or false", type(None): "null"}


class JsonCodec(Codec):
    name = "json"
    media_types = ("application/json",)

    def sniff(self, head: bytes) -> bool:
        """An object or an array, after any whitespace or byte-order mark: other JSON values
        (``3``, ``"a"``, ``null``) look like plain text, which is no format of ours."""
        return head.removeprefix(b"\xef\xbb\xbf").lstrip()[:1] in (b"{", b"[")

    def decode(self, body: bytes, limit: int) -> Payload:
        try:
            value = json.loads(body)
        except (ValueError, RecursionError) as exc:  # json.loads recurses: ~1000 levels at most
            raise BadRequest(f"invalid JSON: {str(exc)[:200]}") from None
        if not isinstance(value, dict):
            # An array could be taken as one unnamed input, but a model's inputs have names
            # (a Keras model's, a pipe's keys) and its reply would be an object all the same.
            raise BadRequest(
                f"the JSON body is {_NOT_AN_OBJECT.get(type(value), 'a value')}; it must be an "
                "object of named inputs",
                hint='name each input: {"x": [[1, 2, 3]]}; GET /v2/models/NAME lists a model\'s '
                "input names",
            )
        budget = [limit]
        payload: Payload = {}
        for key, item in value.items():
            converted, shallow = _to_array(key, item, budget)
            if not shallow:
                _check_depth(key, item)
            payload[key] = converted
        return payload

    def encode(self, payload: Payload) -> bytes:
        try:
            return json.dumps(payload, default=_default, allow_nan=False).encode()
        except ValueError as exc:
            if not str(exc).startswith("Out of range float"):
                raise
        # a NaN or an infinity somewhere: the rare reply, encoded again with them as null
        return json.dumps(_finite(payload), default=_finite_default, allow_nan=False).encode()


@hookimpl
def studio_register_codecs(register: Callable[[Codec], None]) -> None:
    register(JsonCodec())

"""What a V2 request may ask the server to build, checked before anything is built.

- ``MAX_NDIM`` dims, each below 2**63 (the protocol's int64 shapes). 32 is numpy 1.x's
  ``NPY_MAXDIMS``, the most an array can have on every numpy we support; bounding the dims first
  also keeps multiplying them cheap (thousands of 63-bit dims made ``math.prod`` quadratic).
- Elements are counted from the nonzero dims, which numpy needs to fit in its index type even
  when another dim is zero: ``[2**40, 2**40, 0]`` is a 400, ``[10**12, 0]`` an empty array.
- A zero-size BYTES tensor is nested empty lists, as ``ndarray.tolist()`` would give: at most
  ``MAX_EMPTY_LISTS`` of them (``[65536, 0]`` is fine, ``[10**12, 0]`` would be 10**12 lists from
  an 83-byte body: a 400). A non-empty one needs no more lists per dim than it has elements,
  which its body paid for.
- JSON ``data`` nests at most ``MAX_NDIM`` deep, flat or as the shape.
- ``Budget``: the bytes the decoded values hold, across a request's inputs, stay within
  ``--max-body`` (a 413): numeric data at its itemsize, BYTES at its elements' lengths.
"""

from __future__ import annotations

from itertools import chain
from typing import Any

from studio_plugins import BadRequest, PayloadTooLarge

MAX_NDIM = 32
MAX_DIM = 2**63 - 1
MAX_ELEMENTS = 2**59
"""numpy refuses shapes whose nonzero dims times the itemsize pass 2**63 - 1: with 8-byte elements,
exactly 2**60 already does (found by the fuzzer: tests/corpus/v2_struct/2-to-the-60-empty-fp64), so
2**59, whatever the datatype."""
MAX_EMPTY_LISTS = 2**16


def check_shape(name: str, shape: Any) -> tuple[int, ...]:
    """The declared shape as a tuple of non-negative ints, or a ``BadRequest``."""
    if not isinstance(shape, list):
        raise BadRequest(f"input {name!r}: shape must be a list of non-negative integers, got {short(shape)}")
    if len(shape) > MAX_NDIM:  # before looking at the dims: a shape may have a million
        raise BadRequest(f"input {name!r}: shape has {len(shape)} dims; at most {MAX_NDIM} are supported")
    if not all(
        isinstance(size, int) and not isinstance(size, bool) and 0 <= size <= MAX_DIM for size in shape
    ):
        raise BadRequest(
            f"input {name!r}: shape must be a list of non-negative integers below 2**63, got {short(shape)}"
        )
    return tuple(shape)


def element_count(name: str, dims: tuple[int, ...]) -> int:
    """The tensor's element count (0 when a dim is), refusing shapes numpy cannot hold."""
    elements = 1
    for size in dims:
        if size:
            elements *= size
            if elements > MAX_ELEMENTS:
                raise BadRequest(
                    f"input {name!r}: shape {short(list(dims))} has more than 2**59 elements"
                )
    return 0 if 0 in dims else elements


def check_empty_lists(name: str, dims: tuple[int, ...]) -> None:
    """A zero-size BYTES tensor's nested empty lists stay few (see the module's docstring)."""
    lists, row = 1, 1
    for size in dims[:-1]:
        if size == 0:
            break
        row *= size
        lists += row
        if lists > MAX_EMPTY_LISTS:
            raise BadRequest(
                f"input {name!r}: an empty BYTES tensor of shape {short(list(dims))} would be more "
                f"than {MAX_EMPTY_LISTS} nested empty lists; send fewer rows"
            )


def empty_lists(dims: tuple[int, ...]) -> Any:
    """Nested empty lists of a zero-size shape (checked by ``check_empty_lists``)."""
    if dims[0] == 0:
        return []
    return [empty_lists(dims[1:]) for _ in range(dims[0])]


def rows(name: str, data: Any) -> list[Any]:
    """The leaf level of JSON ``data`` (flat or nested, row-major), its types not yet checked.

    Level by level at C speed (``map``, ``chain``) rather than by recursion: no deep Python
    stack. A level whose first item is a list must be lists of one length; the leaf level may
    still hold a stray list beside values (``[1, [2]]``), which ``leaves`` (or a numeric fast
    path that takes numbers only) refuses."""
    level: list[Any] = data if isinstance(data, list) else [data]
    for _ in range(MAX_NDIM):
        if not level or type(level[0]) is not list:
            return level
        if set(map(type, level)) != {list} or len(set(map(len, level))) > 1:
            raise BadRequest(f"input {name!r}: data is not a rectangular array (lists of different "
                             "lengths, or lists beside values)")
        level = list(chain.from_iterable(level))
    if level and type(level[0]) is list:
        raise BadRequest(f"input {name!r}: data is nested more than {MAX_NDIM} deep")
    return level


def leaves(name: str, data: Any, types: tuple[type, ...], what: str) -> list[Any]:
    """The leaves of JSON ``data`` (``rows``), each one of ``types``: known before numpy sees
    any (a single long string among numbers would make ``np.asarray`` allocate that string's
    width for every element)."""
    level = rows(name, data)
    bad = set(map(type, level)).difference(types)
    if list in bad:
        raise BadRequest(f"input {name!r}: data is not a rectangular array (lists of different "
                         "lengths, or lists beside values)")
    if bad:
        example = next(item for item in level if type(item) in bad)
        raise BadRequest(f"input {name!r}: {short(example)} is not {what}")
    return level


class Budget:
    """The bytes a request's decoded values may still hold: ``--max-body`` in all."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.left = limit

    def spend(self, name: str, nbytes: int) -> None:
        if nbytes > self.left:
            raise PayloadTooLarge(
                f"input {name!r} would decode to {nbytes} bytes; the request's decoded inputs may "
                f"hold {self.limit} (--max-body) and {self.left} are left"
            )
        self.left -= nbytes


def short(value: Any) -> str:
    """A client's value for an error message: small, and never a deep ``repr``."""
    if isinstance(value, list) and len(value) <= 8 and not any(isinstance(v, list | dict) for v in value):
        text = repr(value)
    elif isinstance(value, list | dict):
        return f"{'a list' if isinstance(value, list) else 'an object'} of {len(value)} items"
    else:
        text = repr(value[:80] if isinstance(value, str | bytes) else value)
    return text if len(text) <= 80 else text[:77] + "..."

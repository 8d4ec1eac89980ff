"""The final pass over a decoded pickle: nodes made values, and the whole graph within the limits.

The opcode loop (core/wire/pickle_decoder.py) leaves arrays and dtypes as nodes (their state may
come later, and the memo may share them); this pass puts each in place, and refuses a graph
that nests too deep, contains itself, or holds more than ``Limits.max_bytes`` once every shared
reference is counted again, visiting each node once.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from core.wire.pickle_dtypes import DtypeNode, check_built
from core.wire.pickle_limits import Limits, PickleRefused, PickleTooLarge
from core.wire.pickle_values import ArrayNode, Global

_SCALAR_TYPES = frozenset({str, bytes, int, float, bool, complex, type(None)})
_SMALL = frozenset({int, float, bool, type(None)})  # counted as 8 bytes each (ints are bounded)


def _describe(value: Any) -> str:
    return f"global {value.name}" if type(value) is Global else type(value).__name__


class Finisher:
    """The decoded graph made final: arrays and dtypes put in place of their nodes, and refused
    when it nests too deep, refers to itself, or holds more than the limit once every shared
    reference is counted again (each node is visited once: linear in the graph)."""

    def __init__(self, limits: Limits) -> None:
        self.limits = limits
        self.done: dict[int, tuple[Any, int, int]] = {}  # id -> (final value, weight, height)
        self.active: set[int] = set()

    def finish(self, root: Any) -> Any:
        return self.visit(root, 0)[0]

    def visit(self, value: Any, depth: int) -> tuple[Any, int, int]:
        kind = type(value)
        if kind is str or kind is bytes or kind is bytearray:
            return value, len(value), 0
        if kind in _SCALAR_TYPES:
            return value, 8, 0
        if kind is np.ndarray:
            return value, value.nbytes, 0
        if isinstance(value, np.generic):
            return value, value.itemsize, 0
        if kind is DtypeNode:
            return check_built(value), 8, 0
        if kind is ArrayNode:
            if value.array is None:
                raise PickleRefused("an array without its state")
            return value.array, value.array.nbytes, 0
        if kind is not dict and kind is not list and kind is not tuple and kind is not set \
                and kind is not frozenset:
            raise PickleRefused(f"a {_describe(value)} is not data")  # a bare global, say
        if depth >= self.limits.max_depth:
            raise PickleRefused(f"nested deeper than {self.limits.max_depth} levels")
        key = id(value)
        known = self.done.get(key)
        if known is not None:
            if depth + known[2] > self.limits.max_depth:
                raise PickleRefused(f"nested deeper than {self.limits.max_depth} levels")
            return known
        if key in self.active:
            raise PickleRefused("a value that contains itself")
        if kind is set or kind is frozenset:  # members are plain keys, checked when added
            result = (value, 8 * len(value) + sum(self.visit(item, depth + 1)[1] for item in value), 1)
        else:
            self.active.add(key)
            result = self.container(value, kind, depth)
            self.active.discard(key)
        if result[1] > self.limits.max_bytes:
            raise PickleTooLarge(
                f"the decoded values would hold more than {self.limits.max_bytes} bytes "
                "(shared references count each time they are used)")
        self.done[key] = result
        return result

    def container(self, value: Any, kind: type, depth: int) -> tuple[Any, int, int]:
        weight = 8 * len(value)
        height = 0
        if kind is dict:
            for item_key, item in value.items():
                weight += len(item_key) if type(item_key) is str or type(item_key) is bytes else 8
                item_kind = type(item)
                if item_kind is np.ndarray:  # the common items, inline
                    weight += item.nbytes
                elif item_kind in _SMALL:
                    weight += 8
                else:
                    done, item_weight, item_height = self.visit(item, depth + 1)
                    if done is not item:
                        value[item_key] = done
                    weight += item_weight
                    height = max(height, item_height)
        else:  # list or tuple
            final: list[Any] | None = None  # made when the first item changes
            for index, item in enumerate(value):
                item_kind = type(item)
                if item_kind is np.ndarray:
                    weight += item.nbytes
                    done = item
                elif item_kind in _SMALL:
                    weight += 8
                    done = item
                else:
                    done, item_weight, item_height = self.visit(item, depth + 1)
                    weight += item_weight
                    height = max(height, item_height)
                if final is not None:
                    final.append(done)
                elif done is not item:
                    final = [*value[:index], done]
            if final is not None:
                if kind is list:
                    value[:] = final
                else:
                    value = tuple(final)
        return value, weight, height + 1

"""Choices drawn from a fuzzer's bytes, for targets that build structured input themselves
(libFuzzer mutates the bytes; the same bytes always make the same choices). Once the bytes run
out every draw is 0, so any input is a complete one."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TypeVar

T = TypeVar("T")


class Draw:
    def __init__(self, data: bytes) -> None:
        self.data = data
        self.position = 0

    def byte(self) -> int:
        if self.position >= len(self.data):
            return 0
        self.position += 1
        return self.data[self.position - 1]

    def below(self, n: int) -> int:
        """An int in [0, n), from as many bytes as n needs."""
        value = 0
        for _ in range(max(1, (n - 1).bit_length() + 7) // 8):
            value = value << 8 | self.byte()
        return value % n if n else 0

    def pick(self, options: Sequence[T]) -> T:
        return options[self.below(len(options))]

    def raw(self, most: int) -> bytes:
        size = self.below(most + 1)
        chunk = self.data[self.position:self.position + size]
        self.position += len(chunk)
        return chunk

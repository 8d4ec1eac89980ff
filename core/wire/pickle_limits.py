"""What the data-only pickle decoder refuses, and the limits it decodes within.

``PickleRefused`` (a 400) and ``PickleTooLarge`` (a 413) are what a client's bad pickle becomes;
``Limits`` bounds the work and memory one body may cost (core/wire/pickle_decoder.py says why
each bound exists). Every part of the decoder raises these, so they sit below all of them.
"""

from __future__ import annotations

from dataclasses import dataclass

MAX_NDIM = 64  # numpy's own maximum


class PickleRefused(ValueError):
    """The body is not a pickle of plain data we read; the message says why (a 400)."""


class PickleTooLarge(PickleRefused):
    """Decoding would hold more than the limit allows (a 413)."""


@dataclass(frozen=True)
class Limits:
    max_bytes: int
    """What the result may hold, every shared reference counted again (``--max-body``)."""
    max_depth: int = 64
    max_ops: int = 500_000
    """About 0.15 s of decoding (0.3 us an opcode on a 2-core VM); a legitimate body needs one or
    two per value, and a list of more Python numbers than this belongs in an array."""
    max_seconds: float = 5.0

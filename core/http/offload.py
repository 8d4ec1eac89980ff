"""Decoding a client's body off the event loop once it is large enough to take a while.

A decoder's work grows with the body: the pickle decoder's opcode budget is about 0.15 s, an npz
body inflates, a JSON body of many numbers builds many objects. On the event loop that time
stalls every connection, health checks included (issue 13: a hostile pickle kept a server from
answering for seconds). A small body is decoded in place: at 16 KiB even the worst opcode stream
costs a few milliseconds, less than the thread hop (~50 us) is worth for the common request of a
few hundred bytes. Larger ones go to a small pool of threads, one per process (created on first
use, so forked workers make their own).
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

INLINE_BYTES = 16 * 1024
DECODE_THREADS = 2  # decoders hold the GIL: more threads would only queue on it
T = TypeVar("T")

_pool: ThreadPoolExecutor | None = None
_pool_pid = 0


def _decode_pool() -> ThreadPoolExecutor:
    global _pool, _pool_pid
    if _pool is None or _pool_pid != os.getpid():  # a forked worker inherits no live threads
        _pool = ThreadPoolExecutor(DECODE_THREADS, thread_name_prefix="studio-decode")
        _pool_pid = os.getpid()
    return _pool


async def decode_off_loop(decode: Callable[[bytes, int], T], body: bytes, limit: int) -> T:
    """``decode(body, limit)``, in place for a small body, else on a decoding thread."""
    if len(body) <= INLINE_BYTES:
        return decode(body, limit)
    return await asyncio.get_running_loop().run_in_executor(_decode_pool(), decode, body, limit)

"""The periodic sweeps of the body guard's read timeout (core/http/body_guard.py) and of the
disconnect watch (core/http/disconnects.py): one task per watcher instead of a timer per request.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable

LINGER = 1.0
"""Seconds a sweeper keeps sweeping with nothing to watch before it ends. A request that needs
no waiting (the identity model; a small body that came whole in its first message) leaves the
dict in the step it entered it, so a sweeper that ended as soon as it found the dict empty was
started again by nearly every request: a task created, scheduled, run and collected per request,
two with both sweepers, which the in-process bench never saw (nothing there lets the loop run
the sweeper before the next request)."""


async def sweeps(interval: float, busy: Callable[[], bool]) -> AsyncIterator[None]:
    """Every ``interval`` seconds at which ``busy()`` holds; ends once it has not held for
    ``LINGER`` seconds."""
    idle = 0.0
    while idle < LINGER:
        await asyncio.sleep(interval)
        if busy():
            idle = 0.0
            yield
        else:
            idle += interval

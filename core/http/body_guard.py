"""Server-wide guards on request bodies: a read timeout with a minimum rate, and a byte budget.

Read timeout (``--read-timeout T``, ``--min-rate R``), Apache mod_reqtimeout's ``body=T,MinRate=R``:
a body must start within ``T`` seconds of its read starting, and each ``R`` bytes received
extend that deadline by one second (``deadline = start + T + received / R``, no upper bound),
so a client must keep up an average of ``R`` bytes/s once the grace is used up. A body that
misses it is answered 408 and its connection closed, as Apache does.

It is enforced without a timer per request: a body being read is noted in a dict (with the
bytes received so far), and a sweep every ``interval`` seconds dates the bodies it sees for the
first time and cancels the reads past their deadline; so a body is cut between ``T`` and
``T + 2 * interval`` seconds. The hot path (a small body that comes in one message) pays for a
dict entry (see core/http/disconnects.py for what per-request tasks and timers cost).

Budget (``--body-budget``): the bytes of request bodies held by the process at once. Every
request is charged ``FLOOR`` by the app's edge middleware as it starts; a body read grows the
charge to its ``Content-Length`` before reading, and a chunked one to its running total as it
comes. A request that does not fit gets 503 with Retry-After (before its body is read when its
size is declared). The charge is given back when the request ends, on every path (error,
disconnect, success), since the body and what is decoded from it live that long.

Measured costs behind the shape (callgrind, CPython 3.11): ``asyncio.current_task()`` ~1,400
instructions and ``int(b"214")`` ~1,800, so the small-request path neither parses the length
twice nor keys the budget by task: the middleware keeps its constant charge in its own frame,
and only a body larger than ``FLOOR`` is noted in ``grown`` by task.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from core.errors import Overloaded
from core.http.sweeping import sweeps

log = logging.getLogger("studio_plugins.body")

READ_TIMEOUT = 20.0
"""Seconds a body may take to start (mod_reqtimeout's default ``body=20``)."""
MIN_RATE = 500
"""Bytes/s a body must keep up after that (mod_reqtimeout's default ``MinRate=500``)."""
BUDGET_MIN = 1 << 30
BUDGET_BODIES = 4
FLOOR = 64 * 1024
"""What every counted request is charged at least: one socket read in Hypercorn (64 KiB) may be
held per connection whatever the body's size, so the budget also bounds how many requests are
in flight at once (1 GiB / 64 KiB = 16384)."""

Task = asyncio.Task[Any]


def default_budget(max_body: int) -> int:
    """1 GiB, or 4 bodies of ``--max-body`` when that is more (a budget below one body would
    refuse it forever)."""
    return max(BUDGET_MIN, BUDGET_BODIES * max_body)


class BodyGuard:
    def __init__(self, budget: int = 0, read_timeout: float = 0.0, min_rate: int = 0) -> None:
        """``budget`` bytes (0: unbounded); ``read_timeout`` seconds (0: none); ``min_rate``
        bytes/s (0: the whole body within ``read_timeout``)."""
        self.budget = budget
        self.free = budget
        self.grown: dict[Task, int] = {}
        """Requests whose body is larger than ``FLOOR`` -> the bytes charged beyond it."""
        self.read_timeout = read_timeout
        self.min_rate = min_rate
        self.interval = max(0.05, min(1.0, read_timeout / 4))
        self.reading: dict[Task, int] = {}
        """Bodies being read -> bytes received so far."""
        self.started: dict[Task, float] = {}
        """Bodies being read that a sweep saw -> when it first saw them (removed with them)."""
        self.expired: set[Task] = set()
        self.sweeper: asyncio.Task[None] | None = None

    # --- budget -----------------------------------------------------------------------------

    def grow(self, extra: int) -> None:
        """``extra`` more bytes for the current request's body, which outgrew its charge, or
        ``Overloaded``; given back by ``release_grown`` when the request ends."""
        if extra > self.free:
            raise self.overloaded(extra)
        task: Any = asyncio.current_task()
        self.free -= extra
        self.grown[task] = self.grown.get(task, 0) + extra

    def release_grown(self, task: Task | None) -> None:
        self.free += self.grown.pop(task, 0)  # type: ignore[arg-type]

    def overloaded(self, amount: int) -> Overloaded:
        return Overloaded(
            f"the server holds {self.budget - self.free} bytes of request bodies; {amount} more "
            f"would pass its budget of {self.budget} bytes (--body-budget)",
            hint="retry later",
        )

    # --- read timeout -----------------------------------------------------------------------

    # A body being read is noted in ``reading`` (inlined in BodyReader.read) and the sweep is
    # started if it is not running.

    def start_sweep(self) -> None:
        self.sweeper = asyncio.ensure_future(self._sweep())

    def timed_out(self, task: Task) -> bool:
        """After a CancelledError in a read: True (and the cancellation undone) if the sweep
        caused it and nobody else cancelled the task too."""
        if task in self.expired:
            self.expired.discard(task)
            return task.uncancel() == 0
        return False

    def timeout_message(self) -> str:
        rate = f" and then {self.min_rate} bytes/s" if self.min_rate else ""
        return (f"the request body did not arrive in time: it must start within "
                f"{self.read_timeout:g} s{rate} (--read-timeout, --min-rate)")

    def allowed(self, received: int) -> float:
        """Seconds a body that has sent ``received`` bytes may have taken."""
        return self.read_timeout + (received / self.min_rate if self.min_rate else 0.0)

    async def _sweep(self) -> None:
        started = self.started
        try:
            async for _ in sweeps(self.interval, lambda: bool(self.reading)):
                now = time.monotonic()
                for task, received in self.reading.items():
                    took = now - started.setdefault(task, now)
                    if took > self.allowed(received) and task not in self.expired:
                        log.info("closing a connection whose body is too slow: %d bytes in %.1f s",
                                 received, took)
                        self.expired.add(task)
                        task.cancel()
        finally:
            self.sweeper = None

    def close(self) -> None:
        if self.sweeper is not None:
            self.sweeper.cancel()

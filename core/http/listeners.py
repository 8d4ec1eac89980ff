"""The plugins' listeners (``studio_register_listeners``: gRPC) in one serving process.

They live and die with the app: started in its lifespan before the server announces itself (a
client that read the start-up line finds every protocol up), on the app's own ``ServingContext``
(one data plane: queue, deadlines, batching), and stopped when the server stops accepting —
the process layer calls ``stop`` as Hypercorn begins its drain, so both protocols drain side by
side, and the lifespan's end waits for it before the data plane closes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Sequence

from core.types import OpenListener, ServingContext

log = logging.getLogger("studio_plugins.serving")

GRACE = 30.0
"""Seconds calls in flight may take to finish once a listener stops (Hypercorn's own)."""


class ListenerGroup:
    """Starts the reserved listeners together, stops them once (a second ``stop`` waits for the
    first)."""

    def __init__(self, opened: Sequence[OpenListener], grace: float = GRACE) -> None:
        self.opened = list(opened)
        self.grace = grace
        self.started: list[OpenListener] = []
        self._stopping: asyncio.Task[None] | None = None

    def __bool__(self) -> bool:
        return bool(self.opened)

    async def start(self, context: ServingContext) -> None:
        """Start every listener; one that fails stops those already started, and the error
        goes up (the server does not start half its protocols)."""
        try:
            for listener in self.opened:
                await listener.start(context)
                self.started.append(listener)
        except BaseException:
            await self.stop()
            raise

    async def stop(self, grace: float | None = None) -> None:
        """Stop accepting on every listener at once; calls in flight get ``grace`` seconds."""
        if self._stopping is None:
            self._stopping = asyncio.ensure_future(self._stop_all(self.grace if grace is None else grace))
        await asyncio.shield(self._stopping)

    async def _stop_all(self, grace: float) -> None:
        listeners, self.started = self.started, []
        results = await asyncio.gather(*(listener.stop(grace) for listener in listeners),
                                       return_exceptions=True)
        for listener, result in zip(listeners, results, strict=True):
            if isinstance(result, BaseException):
                log.error("listener %s did not stop cleanly: %s", listener.description, result)

    def wait_started(self, timeout: float = 10.0) -> None:
        """In the launching process under ``--workers``: until each listener is served by some
        worker (``OpenListener.wait_started``), at most ``timeout`` seconds in all."""
        deadline = time.monotonic() + timeout
        for listener in self.opened:
            listener.wait_started(max(0.0, deadline - time.monotonic()))

    def release(self) -> None:
        """In the launching process at exit: give back the reserved ports."""
        for listener in self.opened:
            with contextlib.suppress(Exception):
                listener.release()

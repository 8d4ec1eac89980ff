"""Noticing that a client left while its request waits for the model, and cancelling it.

A request whose client disconnected should stop counting against ``--max-queue`` and the model;
the ASGI server tells us through ``receive()`` (``http.disconnect``), but only if someone listens.
"""

from __future__ import annotations

import asyncio
from typing import Any

from starlette.types import Receive

from core.http.sweeping import sweeps


class DisconnectWatch:
    """Cancels a request's task if its client disconnects, so a request whose client left stops
    counting against the queue and the model.

    Listening for a disconnect costs a task per request, and a timer per request is not free
    either; so a request is only noted in a dict, and a sweep every ``after`` seconds starts a
    listener for each request it already saw on its previous sweep (so after ``after`` to
    ``2 * after`` seconds): fast requests (most of them) pay for a dict entry."""

    def __init__(self, after: float = 0.05) -> None:
        self.after = after
        self.pending: dict[asyncio.Task[Any], Receive] = {}
        self.listeners: dict[asyncio.Task[Any], asyncio.Task[None]] = {}
        self.gone: set[asyncio.Task[Any]] = set()
        self.sweeper: asyncio.Task[None] | None = None

    def enter(self, receive: Receive, task: asyncio.Task[Any] | None = None) -> asyncio.Task[Any] | None:
        """Note the current task (``task``, when the caller has it already) as waiting."""
        if task is None:
            task = asyncio.current_task()
        if task is not None:
            self.pending[task] = receive
            if self.sweeper is None:
                self.sweeper = asyncio.ensure_future(self._sweep())
        return task

    def leave(self, task: asyncio.Task[Any] | None) -> None:
        if task is not None:
            del self.pending[task]
            if self.listeners:
                listener = self.listeners.pop(task, None)
                if listener is not None:
                    listener.cancel()
                    self.gone.discard(task)

    async def _sweep(self) -> None:
        seen: set[asyncio.Task[Any]] = set()
        try:
            async for _ in sweeps(self.after, lambda: bool(self.pending)):
                for task, receive in list(self.pending.items()):
                    if task in seen and task not in self.listeners:
                        self.listeners[task] = asyncio.ensure_future(self._listen(task, receive))
                seen = set(self.pending)
        finally:
            self.sweeper = None

    async def _listen(self, task: asyncio.Task[Any], receive: Receive) -> None:
        while (await receive())["type"] != "http.disconnect":
            pass
        self.gone.add(task)
        task.cancel()

    def absorb(self, task: asyncio.Task[Any] | None) -> bool:
        """After a CancelledError: True (and the cancellation undone) if we caused it."""
        if task is not None and task in self.gone:
            self.gone.discard(task)
            task.uncancel()
            return True
        return False

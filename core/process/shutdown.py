"""Shutdown asked for by a plugin (``studio_watch_shutdown``), e.g. on a cloud's notice that the
machine is about to be taken away.

A plugin's watcher runs in its own thread and may ask before the server's event loop exists (a
notice during the model load), after it, or twice; ``ShutdownRequests`` keeps the first request
and hands it to the server once the server attaches. The server then turns readiness false at
once, keeps accepting for ``drain`` seconds (a load balancer needs a few failed health checks to
stop sending here), then stops accepting, finishes what is in flight and exits 0: the same way
out as SIGTERM (core/process/serving.py), only announced to the balancer first.
"""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import Callable

log = logging.getLogger("studio_plugins.serving")

Handler = Callable[[str, float], None]
MAX_DRAIN = 600.0
"""The longest a plugin may keep a doomed server accepting (seconds)."""


class ShutdownRequests:
    """Thread-safe: ``request`` from any thread; the server ``attach``-es its handler once."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._handler: Handler | None = None
        self._pending: tuple[str, float] | None = None
        self._asked = False

    def request(self, reason: str, drain: float = 0.0) -> None:
        """Ask the server to go: readiness false now, stop accepting after ``drain`` seconds
        (clamped to 0..MAX_DRAIN), then finish in-flight requests and exit 0. Later requests
        are ignored: the first one already decided."""
        try:
            drain = float(drain)
        except (TypeError, ValueError):
            drain = 0.0
        drain = min(max(drain, 0.0), MAX_DRAIN) if math.isfinite(drain) else 0.0
        with self._lock:
            if self._asked:
                return
            self._asked = True
            handler = self._handler
            if handler is None:
                self._pending = (str(reason), drain)
                return
        handler(str(reason), drain)

    def attach(self, handler: Handler) -> None:
        """The server's handler (called from whichever thread asks; it must be thread-safe);
        a request made before this is handed over now."""
        with self._lock:
            self._handler = handler
            pending, self._pending = self._pending, None
        if pending is not None:
            handler(*pending)

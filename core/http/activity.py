"""Counts requests in flight and when the last one was seen: for --killafter and draining."""

from __future__ import annotations

import time


class Activity:
    def __init__(self) -> None:
        self.in_flight = 0
        self.last_seen = time.monotonic()
        self.draining = False
        """Set once shutdown began (or a plugin asked for it, core/process/shutdown.py):
        readiness turns false while in-flight requests finish."""

    def started(self) -> None:
        self.in_flight += 1  # idle_for() is 0 from here on: last_seen is set when it finishes

    def finished(self) -> None:
        self.in_flight -= 1
        self.last_seen = time.monotonic()

    def idle_for(self) -> float:
        """Seconds with nothing in flight and nothing received (0 while a request runs)."""
        if self.in_flight:
            return 0.0
        return time.monotonic() - self.last_seen

"""Waiting on AWS: the growing pause between polls, and a delete retried while something
still uses the resource.

AWS takes seconds to minutes to start, register or remove things. Polling quickly at first
and ever more slowly (at most every 15 s) answers soon when it is quick without spending the
API rate limit when it is slow; every wait stops before its ``timeout`` would be passed.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from plugins.aws import error_code

Sleep = Callable[[float], None]
LONGEST = 15.0
"""The longest pause between two polls, in seconds."""


class Backoff:
    """The pauses of one poll loop: ``first`` seconds, then ``factor`` times longer each time
    (at most ``LONGEST``), for ``timeout`` seconds from now."""

    def __init__(self, timeout: float, *, first: float = 2.0, factor: float = 1.5,
                 sleep: Sleep = time.sleep) -> None:
        self.deadline = time.monotonic() + timeout
        self.delay = first
        self.factor = factor
        self.sleep = sleep

    @property
    def spent(self) -> bool:
        """Whether the next pause would end past the deadline (the caller then gives up)."""
        return time.monotonic() + self.delay > self.deadline

    def pause(self) -> None:
        self.sleep(self.delay)
        self.delay = min(self.delay * self.factor, LONGEST)


def wait_until(done: Callable[[], bool], backoff: Backoff) -> bool:
    """Poll ``done()`` until it is true (True) or ``backoff`` is spent (False)."""
    while True:
        if done():
            return True
        if backoff.spent:
            return False
        backoff.pause()


def delete_when_free(delete: Callable[[], Any], *, gone: str, in_use: str, backoff: Backoff) -> bool:
    """``delete()``, again while AWS answers ``in_use`` (what used it, an instance or listener,
    is still being removed). True once it is deleted or AWS answers ``gone`` (it already was);
    False when ``backoff`` is spent first. Any other error is raised."""
    while True:
        try:
            delete()
            return True
        except Exception as exc:
            code = error_code(exc)
            if code == gone:
                return True
            if code != in_use:
                raise
            if backoff.spent:
                return False
        backoff.pause()

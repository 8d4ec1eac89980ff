"""A small progress bar on stderr for transfers larger than a few MB (boto3 ``Callback`` shape).

boto3 calls a transfer callback from several threads with the bytes done since the last call, so
the counter is locked; the line is redrawn at most a few times a second.
"""

from __future__ import annotations

import sys
import threading
import time
from typing import TextIO

PROGRESS_MIN_BYTES = 4 * 1024 * 1024
"""Transfers smaller than this show no bar."""


def _mb(count: float) -> str:
    return f"{count / 1e6:.1f} MB"


class Progress:
    """``Progress(label, total)(bytes_done)``; ``close()`` ends the line. Silent for small files."""

    def __init__(
        self, label: str, total: int, stream: TextIO | None = None, interval: float = 0.2
    ) -> None:
        self.label = label
        self.total = max(total, 0)
        self.done = 0
        self.enabled = self.total >= PROGRESS_MIN_BYTES
        self.stream = stream or sys.stderr
        self.interval = interval
        self._lock = threading.Lock()
        self._last_draw = 0.0
        self._drawn = -1

    def __call__(self, count: int) -> None:
        if not self.enabled:
            return
        with self._lock:
            self.done += count
            now = time.monotonic()
            if now - self._last_draw >= self.interval or self.done >= self.total:
                self._last_draw = now
                self._draw()

    def _draw(self) -> None:
        if self._drawn == self.done:
            return
        self._drawn = self.done
        fraction = min(self.done / self.total, 1.0) if self.total else 1.0
        filled = int(fraction * 30)
        bar = "#" * filled + "." * (30 - filled)
        self.stream.write(
            f"\r{self.label} [{bar}] {fraction:4.0%} {_mb(self.done)} / {_mb(self.total)}"
        )
        self.stream.flush()

    def close(self) -> None:
        if self.enabled:
            with self._lock:
                self._draw()
                self.stream.write("\n")
                self.stream.flush()

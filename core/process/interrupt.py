"""Ctrl-C (or SIGTERM) while the models load: exit 0 at once.

Loads run in threads (core/models/repository.py) that nothing can interrupt: torch's import, a
wrapper's ``create_model``, a download. Left to Python, Ctrl-C would wait for them (the load
pool is joined on the way out, and again at interpreter exit), then click would print
"Aborted!" and exit 1; SIGTERM would kill the process with no word. Before the port is bound and
before any worker is forked there is nothing to drain or hand back, so the process says one
line and leaves with ``os._exit``, not waiting for threads it cannot stop.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from types import FrameType

log = logging.getLogger("studio_plugins.launch")


@contextlib.contextmanager
def exit_on_interrupt(
    doing: str, cleanup: Callable[[], None] | None = None
) -> Iterator[None]:
    """While the block runs, SIGINT and SIGTERM end the process with status 0 at once, after
    ``cleanup`` (which must not block). Elsewhere than on the main thread, signals cannot be
    caught: the block just runs."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def leave(signum: int, frame: FrameType | None) -> None:
        log.info("%s received while %s; exiting", signal.Signals(signum).name, doing)
        if cleanup is not None:
            with contextlib.suppress(Exception):
                cleanup()
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
        os._exit(0)

    previous = {signum: signal.signal(signum, leave) for signum in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)

"""Keeping the loaded model out of the garbage collector's full collections.

Once Keras or torch is loaded, a process holds some 300,000 Python objects that live as long as
it does. CPython's full (generation 2) collection scans every one of them: about 150 ms on a
2-core VM, every few tens of seconds under load, with the event loop stopped. Every request in
flight waits, and that is the p99. ``gc.freeze()`` after loading moves everything that exists
then into a permanent generation that collections skip.

A model swapped out later (``--watch``, V2 repository load/unload) was frozen too and would never
be collected, so a swap unfreezes the heap, and ``HeapKeeper.keep`` freezes it again once the
old model is gone (no request holds it any more), after one full collection that frees it.
Worker processes (``--workers``) inherit the parent's frozen heap (core/process/workers.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import threading
import time
import weakref
from typing import Any

log = logging.getLogger("studio_plugins.heap")


class HeapKeeper:
    """Freezes the heap after loading and again after each model swap, once the old model is gone."""

    GIVE_UP = 6

    def __init__(self) -> None:
        self._retired: list[weakref.ref[Any]] = []
        self._checks = 0
        self._lock = threading.Lock()  # swaps report from a loading thread
        self.frozen = False

    def freeze(self, collect: bool = True) -> None:
        started = time.perf_counter()
        if collect:
            gc.collect()
        gc.freeze()
        self.frozen = True
        self._checks = 0
        log.debug("heap frozen: %d objects, %.0f ms", gc.get_freeze_count(),
                  (time.perf_counter() - started) * 1000)

    def retire(self, old_model: Any) -> None:
        """``old_model`` was swapped out: let the collector see it again."""
        with self._lock:
            self._retire(old_model)

    def _retire(self, old_model: Any) -> None:
        if self.frozen:
            gc.unfreeze()
            self.frozen = False
        self._checks = 0
        with contextlib.suppress(TypeError):  # not weak-referenceable: refreeze at the next check
            self._retired.append(weakref.ref(old_model))

    def refreeze_if_due(self) -> bool:
        """Freeze again if a swap unfroze the heap and every retired model is gone (or after
        ``GIVE_UP`` checks: a model someone keeps for good would otherwise cost a full
        collection at every check)."""
        with self._lock:
            return self._refreeze_if_due()

    def _refreeze_if_due(self) -> bool:
        if self.frozen:
            return False
        gc.collect()  # frees a retired model held only by reference cycles
        self._retired = [ref for ref in self._retired if ref() is not None]
        self._checks += 1
        if self._retired and self._checks < self.GIVE_UP:
            return False  # still answering requests: try again later
        if self._retired:
            log.info("a swapped-out model is still referenced; freezing the heap with it")
        self._retired.clear()
        self.freeze(collect=False)
        return True

    async def keep(self, interval: float = 10.0) -> None:
        """Until cancelled: every ``interval`` seconds, refreeze if a swap made it due."""
        while True:
            await asyncio.sleep(interval)
            self.refreeze_if_due()

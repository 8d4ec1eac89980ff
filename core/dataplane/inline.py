"""Quick calls of a compiled model run on the event loop thread, not in the thread pool.

Why: a synchronous model runs in a worker thread, which must take the GIL back to hand over its
result. Under load the event loop thread holds the GIL and lets go of it for good only when the
interpreter forces a switch (``sys.getswitchinterval()``, 5 ms): it drops it around each socket
call, but takes it back before the waiting thread has woken. Measured with py-spy on the Keras
MLP compiled (a traced graph: 70-90 µs for 8 rows when called alone), 16 connections on 2 cores:
each batched call held its worker thread about 700 µs, nearly all of it waiting for the GIL, and
the server answered 0.66 of the identity model's requests per second on the same server. Run on
the event loop, the same calls gave 0.86 (median of four interleaved rounds each;
``python -m bench.bench_batching``).

Which calls: those of a model whose call time depends on its inputs' shapes alone, timed by its
loader (``ServedModel.call_times``: a traced, frozen graph on its warm-up batches), whose inputs
hold no more elements than the largest timed call that took at most ``BUDGET``, in no more arrays
than the model has inputs. Nothing is extrapolated: a larger call, or one that is not all
arrays, runs in the thread pool. Calls on
the loop that take more than twice the budget of the loop thread's own CPU time (preemption is
not counted) lower the bound below their size for good, from the ``STRIKES``-th on.

``BUDGET`` is a fifth of the switch interval: a threaded model that runs Python holds the loop
up to that long each time it takes the GIL.
"""

from __future__ import annotations

import logging
import time

import numpy as np

from core.types import ModelFn, Payload

log = logging.getLogger("studio_plugins.dataplane")

BUDGET = 0.001
"""Seconds a call may hold the event loop."""

STRIKES = 3
"""Calls over twice the budget that lower the limit: one alone may be a collection by Python's
garbage collector or a page fault storm, not the model."""


def elements(payload: Payload) -> int | None:
    """Elements in the request's arrays; None when a value is not an array (the model's own
    conversion could then take any time)."""
    total = 0
    for value in payload.values():
        if type(value) is not np.ndarray:
            return None
        total += value.size
    return total


class InlineGate:
    """Which calls of one model run on the event loop: those of at most ``limit`` elements."""

    def __init__(self, name: str, call_times: tuple[tuple[int, float], ...], arrays: int = 1,
                 budget: float = BUDGET) -> None:
        self.name = name
        self.arrays = arrays
        """Arrays in a timed call (the model's inputs). A request with more is several calls
        (the seed's contract runs a one-input model once per key): 32 keys of one row each held
        the loop 2.8 ms where one call of 32 rows took under 1."""
        self.budget = budget
        self.limit = max((size for size, seconds in call_times if seconds <= budget), default=0)
        self._strikes: list[int] = []

    def admits(self, payload: Payload) -> bool:
        if not self.limit or len(payload) > self.arrays:
            return False
        size = elements(payload)
        return size is not None and size <= self.limit

    def call(self, predict: ModelFn, payload: Payload) -> object:
        """``predict(payload)`` here, timed: calls far over the budget lower the limit."""
        began = time.thread_time()
        try:
            return predict(payload)
        finally:
            spent = time.thread_time() - began
            if spent > 2 * self.budget:
                self.struck(elements(payload) or 0, spent)

    def struck(self, size: int, spent: float) -> None:
        """A call of ``size`` elements took ``spent`` seconds: the ``STRIKES``-th such call lowers
        the limit below the largest of them."""
        self._strikes.append(size)
        if len(self._strikes) < STRIKES:
            return
        self.limit = min(self.limit, max(self._strikes) - 1)
        self._strikes.clear()
        log.warning("model %s: calls took up to %.1f ms on the event loop; calls of %d elements "
                    "or more now run in the thread pool", self.name, spent * 1e3, self.limit + 1)


def inline_gate(name: str, call_times: tuple[tuple[int, float], ...], arrays: int = 1
                ) -> InlineGate | None:
    """The gate for a model timed as ``call_times`` on ``arrays`` inputs; None when none of its
    calls qualify."""
    gate = InlineGate(name, call_times, arrays)
    if not gate.limit:
        return None
    log.debug("model %s: calls of up to %d elements run on the event loop", name, gate.limit)
    return gate


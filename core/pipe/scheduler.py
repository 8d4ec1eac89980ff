"""The scheduler of one call of a pipe: items through the stages, deadlines, answers in order.

The calling thread is the scheduler: it hands items to stages, collects results from a per-call
event queue that workers post to, and sleeps on that queue until the next event or the nearest
deadline (no busy waiting). An item moves on to the next stage as soon as it is done (stages
overlap); a batched stage sends a batch when it is full, or a partial one when nothing upstream
can add to it. Deadlines count from the moment a worker *starts* the call, so items waiting for
a free worker are not penalised.
"""

from __future__ import annotations

import functools
import heapq
import itertools
import logging
import queue
import time
from collections import deque
from collections.abc import Callable, Hashable, Iterator
from typing import Any

from core.pipe.pools import Failure, Item, Task
from core.pipe.stages import Stage

log = logging.getLogger("studio_plugins.pipe")


class Run:
    """The scheduler of one call (see the module docstring)."""

    def __init__(
        self, stages: tuple[Stage, ...], items: Iterator[tuple[Hashable, Any]], window: int | None
    ) -> None:
        self.stages = stages
        self.items = items
        self.window = window
        self.exhausted = False
        self.events: queue.SimpleQueue[tuple[str, Task]] = queue.SimpleQueue()
        self.in_flight: deque[Item] = deque()  # pulled, not yet yielded, in input order
        self.at_stage = [0] * len(stages)  # items queued, running or waiting for a batch there
        self.pending: list[list[Item]] = [[] for _ in stages]
        self.tasks: set[Task] = set()
        self.deadlines: list[tuple[float, int, Task]] = []
        self.counter = itertools.count()
        self.position = itertools.count()

    def results(self) -> Iterator[Item]:
        while True:
            self._pull()
            self._flush()
            yielded = False
            while self.in_flight and self.in_flight[0].done:
                yield self.in_flight.popleft()
                yielded = True
            if self.exhausted and not self.in_flight:
                return
            if not yielded:  # else there is room in the window: pull before sleeping
                self._wait()

    def close(self) -> None:
        for task in self.tasks:
            pool = self.stages[task.stage].pool
            assert pool is not None
            pool.cancel([task])
        self.tasks.clear()

    def _pull(self) -> None:
        while not self.exhausted and (self.window is None or len(self.in_flight) < self.window):
            try:
                key, value = next(self.items)
            except StopIteration:
                self.exhausted = True
                return
            item = Item(next(self.position), key, value)
            self.in_flight.append(item)
            self._advance(item, 0)

    def _advance(self, item: Item, index: int) -> None:
        """Send ``item`` (its value is the output of stage ``index - 1``) on from stage ``index``."""
        while index < len(self.stages):
            stage = self.stages[index]
            if stage.inline:
                item.value = self._settle(stage, item, stage.run_one(item)[0], set())
                index += 1
                continue
            passes = stage.passes(item.value, item.key)
            if passes is not True:
                self._settle(stage, item, passes, set())
                item.value = None  # rejected: this stage yields nothing for it
                index += 1
                continue
            self.at_stage[index] += 1
            if stage.batched:
                self.pending[index].append(item)
            else:
                self._submit(stage, [item], functools.partial(stage.run_one, item))
            return
        item.done = True

    def _submit(self, stage: Stage, items: list[Item], run: Callable[[], list[Any]]) -> None:
        assert stage.pool is not None
        task = Task(run, self.events, stage.index, items, report_start=stage.options.timeout is not None)
        self.tasks.add(task)
        stage.pool.submit(task)

    def _flush(self) -> None:
        """Send full batches; send a partial one when nothing upstream can still join it."""
        more_input = not self.exhausted and (self.window is None or len(self.in_flight) < self.window)
        for index, stage in enumerate(self.stages):
            pending = self.pending[index]
            size = stage.options.batch_size
            while len(pending) >= size or (pending and not more_input and not any(self.at_stage[:index])):
                batch, pending[:] = pending[:size], pending[size:]
                self._submit(stage, batch, functools.partial(stage.run_batch, batch))

    def _wait(self) -> None:
        if not self.tasks:  # nothing can post an event: waiting would hang
            raise RuntimeError("pipe scheduler stalled with items in flight; please report this")
        timeout = None
        if self.deadlines:
            timeout = max(0.0, self.deadlines[0][0] - time.monotonic())
        try:
            kind, task = self.events.get(timeout=timeout)
        except queue.Empty:
            pass
        else:
            self._handle(kind, task)
            # Take whatever else arrived meanwhile before flushing and yielding.
            while True:
                try:
                    kind, task = self.events.get_nowait()
                except queue.Empty:
                    break
                self._handle(kind, task)
        self._expire()

    def _handle(self, kind: str, task: Task) -> None:
        stage = self.stages[task.stage]
        timeout = stage.options.timeout
        if kind == "started":
            if task in self.tasks and timeout is not None:
                heapq.heappush(self.deadlines, (task.started + timeout, next(self.counter), task))
            return
        if task not in self.tasks:
            return
        if timeout is not None and task.finished - task.started > timeout:
            # It finished, but late (we were busy yielding): the deadline still applies.
            self._time_out(stage, task)
            return
        self._finish(task, task.results)

    @staticmethod
    def _settle(stage: Stage, item: Item, value: Any, logged: set[int]) -> Any:
        """``value``, or None (logged once) for a failure, which marks ``item`` failed."""
        if isinstance(value, Failure):
            item.failed = True
            if id(value) not in logged:  # a failed batch is one failure shared by its items
                logged.add(id(value))
                value.log(stage)
            return None
        return value

    def _finish(self, task: Task, results: list[Any]) -> None:
        self.tasks.discard(task)
        self.at_stage[task.stage] -= len(task.items)
        stage, logged = self.stages[task.stage], set[int]()
        for item, value in zip(task.items, results, strict=True):
            item.value = self._settle(stage, item, value, logged)
            self._advance(item, task.stage + 1)

    def _time_out(self, stage: Stage, task: Task) -> None:
        keys = [item.key for item in task.items]
        log.warning("pipe stage %s: key%s %s took longer than %gs; result%s None", stage.label,
                    "s" if len(keys) > 1 else "", ", ".join(map(repr, keys)), stage.options.timeout,
                    "s are" if len(keys) > 1 else " is")
        for item in task.items:
            item.failed = True
        self._finish(task, [None] * len(task.items))

    def _expire(self) -> None:
        now = time.monotonic()
        while self.deadlines and self.deadlines[0][0] <= now:
            _, _, task = heapq.heappop(self.deadlines)
            if task not in self.tasks:
                continue
            stage = self.stages[task.stage]
            assert stage.pool is not None
            if stage.pool.abandon(task):
                self._time_out(stage, task)
            # else: it finished just now; its "done" event is on the queue and says how long it took

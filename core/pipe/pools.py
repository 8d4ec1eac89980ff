"""Worker pools of the pipe's stages, and the units of work they run.

Each stage owns a small pool, shared by every concurrent call of the pipe, so ``num_workers``
bounds that stage's concurrency overall (one worker for a model means one ``predict`` at a time,
whatever the request load). Pool threads exist only while there is work: a worker exits as soon
as the queue is empty, so no thread outlives a call except a straggler past its deadline, which
finishes in the background while its result is discarded. Its slot is handed to a fresh worker
at once, so stragglers never starve other items.

A task is one item, or a batch of items, of one call; what a worker returns for an item that
failed is a ``Failure``, which the scheduler (core/pipe/scheduler.py) logs and makes ``None``.
"""

from __future__ import annotations

import itertools
import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Hashable, Iterable
from dataclasses import dataclass, field
from enum import Enum
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from core.pipe.stages import Stage

log = logging.getLogger("studio_plugins.pipe")


@dataclass(eq=False)
class Item:
    position: int
    key: Hashable
    value: Any
    done: bool = False
    failed: bool = False
    """A stage failed on it (raised, or passed its deadline): its ``None`` is a failure."""


@dataclass(eq=False)
class Failure:
    """What a worker returns for an item that failed. The scheduler logs it and makes it None,
    so a straggler that fails after its deadline (its result discarded) logs nothing."""

    what: str
    error: BaseException

    def log(self, stage: Stage) -> None:
        error = self.error
        log.warning("pipe stage %s %s: %s: %s; %s", stage.label, self.what, type(error).__name__,
                    error, "results are None" if "batch" in self.what else "result is None")
        log.debug("traceback of the failure above", exc_info=(type(error), error, error.__traceback__))


class TaskState(Enum):
    QUEUED = 1
    RUNNING = 2
    DONE = 3
    ABANDONED = 4  # past its deadline: the caller moved on, the result is discarded
    CANCELLED = 5  # its call ended before it started


@dataclass(eq=False)
class Task:
    """One unit of work for a pool: a single item, or a batch of items, of one call."""

    run: Callable[[], list[Any]]
    events: queue.SimpleQueue[tuple[str, Task]]
    stage: int
    items: list[Item]
    report_start: bool
    state: TaskState = TaskState.QUEUED
    started: float = 0.0
    finished: float = 0.0
    results: list[Any] = field(default_factory=list)


class Pool:
    """At most ``size`` threads, started on demand and gone when the queue is empty."""

    def __init__(self, size: int, name: str) -> None:
        self.size = size
        self.name = name
        self._lock = threading.Lock()
        self._queue: deque[Task] = deque()
        self._active = 0
        self._numbers = itertools.count(1)

    def _spawn_locked(self) -> bool:
        if self._queue and self._active < self.size:
            self._active += 1
            return True
        return False

    def _start_worker(self) -> None:
        name = f"studio-pipe-{self.name}-{next(self._numbers)}"
        threading.Thread(target=self._work, name=name, daemon=True).start()

    def submit(self, task: Task) -> None:
        with self._lock:
            self._queue.append(task)
            spawn = self._spawn_locked()
        if spawn:
            self._start_worker()

    def abandon(self, task: Task) -> bool:
        """Give up on a running task: its worker's slot goes to a fresh worker. False if it
        already finished (its result is on the way) or never started."""
        with self._lock:
            if task.state is not TaskState.RUNNING:
                return False
            task.state = TaskState.ABANDONED
            self._active -= 1
            spawn = self._spawn_locked()
        if spawn:
            self._start_worker()
        return True

    def cancel(self, tasks: Iterable[Task]) -> None:
        """Drop queued tasks of a call that ended; running ones are abandoned."""
        for task in tasks:
            with self._lock:
                if task.state is TaskState.QUEUED:
                    task.state = TaskState.CANCELLED
                    continue
            self.abandon(task)

    def _work(self) -> None:
        while True:
            with self._lock:
                task = None
                while self._queue:
                    candidate = self._queue.popleft()
                    if candidate.state is TaskState.QUEUED:
                        task = candidate
                        break
                if task is None:
                    self._active -= 1
                    return
                task.state = TaskState.RUNNING
                task.started = time.monotonic()
            if task.report_start:
                task.events.put(("started", task))
            try:
                results = task.run()
            except BaseException as exc:  # stage errors are caught per item; this is the rest
                results = [Failure(f"worker {self.name} raised", exc)] * len(task.items)
            with self._lock:
                if task.state is TaskState.ABANDONED:
                    return  # our slot was handed on when the caller gave up on us
                task.state = TaskState.DONE
                task.finished = time.monotonic()
                task.results = results
            task.events.put(("done", task))

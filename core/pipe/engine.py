"""The stage engine behind ``ModelPipe``: workers, per-item deadlines and batching, in order.

A pipe is a list of stages. A stage is a chain of functions applied to one item (or, batched, a
head function applied to a batch and the rest applied per item) with its own options. A call
runs every item of its input through the stages and answers in input order: one result per
item, ``None`` where a stage failed, rejected the item or passed its deadline. A dict's answer
is a ``Reply`` whose ``failed`` names the keys that are ``None`` because a stage failed on them
(raised or passed its deadline), not because a stage answered or filtered them to ``None``.

How a call runs. The calling thread is the scheduler: it hands items to stages, collects
results from a per-call event queue that workers post to, and sleeps on that queue until the
next event or the nearest deadline (no busy waiting). An item moves on to the next stage as soon
as it is done (stages overlap); a batched stage sends a batch when it is full, or a partial one
when nothing upstream can add to it. Deadlines count from the moment a worker *starts* the
call, so items waiting for a free worker are not penalised.

Workers. Each stage owns a small pool, shared by every concurrent call of the pipe, so
``num_workers`` bounds that stage's concurrency overall (one worker for a model means one
``predict`` at a time, whatever the request load). Pool threads exist only while there is work:
a worker exits as soon as the queue is empty, so no thread outlives a call except a straggler
past its deadline, which finishes in the background while its result is discarded. Its slot is
handed to a fresh worker at once, so stragglers never starve other items.
"""

from __future__ import annotations

import functools
import heapq
import itertools
import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Hashable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Self

from core.errors import ConfigurationError
from core.types import Reply

log = logging.getLogger("studio_plugins.pipe")

Func = Callable[[Any], Any]


def is_not_none(value: Any) -> bool:
    """The default ``filterf``: failed items (``None``) do not reach later functions."""
    return value is not None


def _describe(func: Callable[..., Any]) -> str:
    inner = getattr(func, "func", None)  # functools.partial
    target = inner if callable(inner) else func
    return str(getattr(target, "__name__", None) or type(target).__name__)


@dataclass(frozen=True)
class StageOptions:
    """``add`` options. All defaults: compose into the current stage instead of a new one."""

    num_workers: int = 0
    timeout: float | None = None
    batch_size: int = 1
    batcher: Callable[[list[Any]], Any] | None = None
    unbatcher: Callable[[Any], Iterable[Any]] | None = None
    filterf: Callable[[Any], bool] | None = None

    def is_default(self) -> bool:
        return self == StageOptions()

    def validate(self) -> None:
        if not isinstance(self.num_workers, int) or self.num_workers < 0:
            raise ConfigurationError(f"num_workers must be an int >= 0, not {self.num_workers!r}")
        if self.timeout is not None and not self.timeout > 0:
            raise ConfigurationError(f"timeout must be a number of seconds > 0, not {self.timeout!r}")
        if not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise ConfigurationError(f"batch_size must be an int >= 1, not {self.batch_size!r}")
        for name in ("batcher", "unbatcher", "filterf"):
            value = getattr(self, name)
            if value is not None and not callable(value):
                raise ConfigurationError(f"{name} must be callable, not {type(value).__name__}")


# --- worker pools -------------------------------------------------------------------------


class _State(Enum):
    QUEUED = 1
    RUNNING = 2
    DONE = 3
    ABANDONED = 4  # past its deadline: the caller moved on, the result is discarded
    CANCELLED = 5  # its call ended before it started


@dataclass(eq=False)
class _Task:
    """One unit of work for a pool: a single item, or a batch of items, of one call."""

    run: Callable[[], list[Any]]
    events: queue.SimpleQueue[tuple[str, _Task]]
    stage: int
    items: list[_Item]
    report_start: bool
    state: _State = _State.QUEUED
    started: float = 0.0
    finished: float = 0.0
    results: list[Any] = field(default_factory=list)


class _Pool:
    """At most ``size`` threads, started on demand and gone when the queue is empty."""

    def __init__(self, size: int, name: str) -> None:
        self.size = size
        self.name = name
        self._lock = threading.Lock()
        self._queue: deque[_Task] = deque()
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

    def submit(self, task: _Task) -> None:
        with self._lock:
            self._queue.append(task)
            spawn = self._spawn_locked()
        if spawn:
            self._start_worker()

    def abandon(self, task: _Task) -> bool:
        """Give up on a running task: its worker's slot goes to a fresh worker. False if it
        already finished (its result is on the way) or never started."""
        with self._lock:
            if task.state is not _State.RUNNING:
                return False
            task.state = _State.ABANDONED
            self._active -= 1
            spawn = self._spawn_locked()
        if spawn:
            self._start_worker()
        return True

    def cancel(self, tasks: Iterable[_Task]) -> None:
        """Drop queued tasks of a call that ended; running ones are abandoned."""
        for task in tasks:
            with self._lock:
                if task.state is _State.QUEUED:
                    task.state = _State.CANCELLED
                    continue
            self.abandon(task)

    def _work(self) -> None:
        while True:
            with self._lock:
                task = None
                while self._queue:
                    candidate = self._queue.popleft()
                    if candidate.state is _State.QUEUED:
                        task = candidate
                        break
                if task is None:
                    self._active -= 1
                    return
                task.state = _State.RUNNING
                task.started = time.monotonic()
            if task.report_start:
                task.events.put(("started", task))
            try:
                results = task.run()
            except BaseException as exc:  # stage errors are caught per item; this is the rest
                results = [_Failure(f"worker {self.name} raised", exc)] * len(task.items)
            with self._lock:
                if task.state is _State.ABANDONED:
                    return  # our slot was handed on when the caller gave up on us
                task.state = _State.DONE
                task.finished = time.monotonic()
                task.results = results
            task.events.put(("done", task))


# --- stages -------------------------------------------------------------------------------


@dataclass(eq=False)
class _Item:
    position: int
    key: Hashable
    value: Any
    done: bool = False
    failed: bool = False
    """A stage failed on it (raised, or passed its deadline): its ``None`` is a failure."""


@dataclass(eq=False)
class _Failure:
    """What a worker returns for an item that failed. The scheduler logs it and makes it None,
    so a straggler that fails after its deadline (its result discarded) logs nothing."""

    what: str
    error: BaseException

    def log(self, stage: _Stage) -> None:
        error = self.error
        log.warning("pipe stage %s %s: %s: %s; %s", stage.label, self.what, type(error).__name__,
                    error, "results are None" if "batch" in self.what else "result is None")
        log.debug("traceback of the failure above", exc_info=(type(error), error, error.__traceback__))


class _Stage:
    def __init__(self, index: int, func: Func, options: StageOptions, inline: bool) -> None:
        self.index = index
        self.funcs: list[Func] = [func]
        self.options = options
        self.filterf = options.filterf or is_not_none
        self.inline = inline
        self.batched = options.batch_size > 1 or options.batcher is not None
        self.pool = None if inline else _Pool(max(1, options.num_workers), str(index))

    @property
    def label(self) -> str:
        return f"{self.index} ({'+'.join(_describe(func) for func in self.funcs)})"

    def passes(self, value: Any, key: Hashable) -> bool | _Failure:
        try:
            return bool(self.filterf(value))
        except Exception as exc:
            return _Failure(f"filterf raised for key {key!r}", exc)

    def _chain(self, funcs: list[Func], value: Any, key: Hashable) -> Any:
        for func in funcs:
            passes = self.passes(value, key)
            if passes is not True:
                return passes or None
            try:
                value = func(value)
            except Exception as exc:
                return _Failure(f"failed for key {key!r}", exc)
        return value

    def run_one(self, item: _Item) -> list[Any]:
        return [self._chain(self.funcs, item.value, item.key)]

    def run_batch(self, items: list[_Item]) -> list[Any]:
        keys = [item.key for item in items]
        head, tail = self.funcs[0], self.funcs[1:]
        values = [item.value for item in items]
        try:
            batch = self.options.batcher(values) if self.options.batcher else values
            output = head(batch)
            unbatcher = self.options.unbatcher or list
            results = list(unbatcher(output))
            if len(results) != len(items):
                raise ValueError(f"the batch of {len(items)} items gave {len(results)} results")
        except Exception as exc:
            return [_Failure(f"failed for the batch of keys {keys!r}", exc)] * len(items)
        return [self._chain(tail, value, key) for value, key in zip(results, keys, strict=True)]


# --- the pipe -----------------------------------------------------------------------------


class Pipe:
    """A ``dict -> dict`` (and ``list -> list``, ``generator -> generator``) pipeline."""

    # A pipe maps each key on its own; stacking several requests' arrays would mix them up.
    batchable = False

    def __init__(self) -> None:
        self._stages: tuple[_Stage, ...] = ()
        self._lock = threading.Lock()

    def add(
        self,
        func: Func,
        num_workers: int = 0,
        timeout: float | None = None,
        batch_size: int = 1,
        batcher: Callable[[list[Any]], Any] | None = None,
        unbatcher: Callable[[Any], Iterable[Any]] | None = None,
        filterf: Callable[[Any], bool] | None = None,
    ) -> Self:
        """Add ``func``. With no options it runs right after the current stage's functions, in
        the same worker; any option starts a new stage with its own workers (at least one).
        Nothing is inherited from an earlier stage."""
        if not callable(func):
            raise ConfigurationError(f"pipe.add needs a callable, not {type(func).__name__}")
        options = StageOptions(num_workers, timeout, batch_size, batcher, unbatcher, filterf)
        options.validate()
        with self._lock:
            if options.is_default() and self._stages:
                self._stages[-1].funcs.append(func)
            else:
                # Only a first stage without options runs in the calling thread.
                inline = options.is_default()
                self._stages = (*self._stages, _Stage(len(self._stages), func, options, inline))
        return self

    def __call__(self, data: Any) -> Any:
        if isinstance(data, Mapping):
            reply, failed = Reply(), []
            for item in self._run(iter(data.items()), None):
                reply[item.key] = item.value
                if item.failed and item.value is None:  # a later stage may have recovered it
                    failed.append(item.key)
            reply.failed, reply.failed_count = tuple(failed), len(failed)
            return reply
        if isinstance(data, list | tuple):
            return [item.value for item in self._run(enumerate(data), None)]
        if isinstance(data, Iterator):
            return self._stream(data)
        raise TypeError(
            f"a pipe takes a dict, a list, a tuple or a generator, not {type(data).__name__}"
        )

    def _stream(self, data: Iterator[Any]) -> Iterator[Any]:
        stages = self._stages
        widest = max((stage.options.num_workers for stage in stages), default=1)
        largest = max((stage.options.batch_size for stage in stages), default=1)
        window = max(64, 4 * widest, 2 * largest)  # items in flight: bounded memory, full batches
        for item in self._run(enumerate(data), window):
            yield item.value

    def _run(self, items: Iterator[tuple[Hashable, Any]], window: int | None) -> Iterator[_Item]:
        run = _Run(self._stages, items, window)
        try:
            yield from run.results()
        finally:
            run.close()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} stages={[stage.label for stage in self._stages]}>"


class _Run:
    """The scheduler of one call (see the module docstring)."""

    def __init__(
        self, stages: tuple[_Stage, ...], items: Iterator[tuple[Hashable, Any]], window: int | None
    ) -> None:
        self.stages = stages
        self.items = items
        self.window = window
        self.exhausted = False
        self.events: queue.SimpleQueue[tuple[str, _Task]] = queue.SimpleQueue()
        self.in_flight: deque[_Item] = deque()  # pulled, not yet yielded, in input order
        self.at_stage = [0] * len(stages)  # items queued, running or waiting for a batch there
        self.pending: list[list[_Item]] = [[] for _ in stages]
        self.tasks: set[_Task] = set()
        self.deadlines: list[tuple[float, int, _Task]] = []
        self.counter = itertools.count()
        self.position = itertools.count()

    def results(self) -> Iterator[_Item]:
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
            item = _Item(next(self.position), key, value)
            self.in_flight.append(item)
            self._advance(item, 0)

    def _advance(self, item: _Item, index: int) -> None:
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

    def _submit(self, stage: _Stage, items: list[_Item], run: Callable[[], list[Any]]) -> None:
        assert stage.pool is not None
        task = _Task(run, self.events, stage.index, items, report_start=stage.options.timeout is not None)
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

    def _handle(self, kind: str, task: _Task) -> None:
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
    def _settle(stage: _Stage, item: _Item, value: Any, logged: set[int]) -> Any:
        """``value``, or None (logged once) for a failure, which marks ``item`` failed."""
        if isinstance(value, _Failure):
            item.failed = True
            if id(value) not in logged:  # a failed batch is one failure shared by its items
                logged.add(id(value))
                value.log(stage)
            return None
        return value

    def _finish(self, task: _Task, results: list[Any]) -> None:
        self.tasks.discard(task)
        self.at_stage[task.stage] -= len(task.items)
        stage, logged = self.stages[task.stage], set[int]()
        for item, value in zip(task.items, results, strict=True):
            item.value = self._settle(stage, item, value, logged)
            self._advance(item, task.stage + 1)

    def _time_out(self, stage: _Stage, task: _Task) -> None:
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

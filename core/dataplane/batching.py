"""Dynamic batching across requests (``--max-batch-size N``, ``--max-batch-delay MS``).

Requests whose arrays agree per key in trailing shape and dtype are stacked along axis 0, the
model runs once, and each request gets its own rows back. Triton's rule: a request that finds the
model idle runs at once, and requests that arrive while it is busy wait for its next call, where
they are stacked together (up to the maximum batch size): with no delay, the model's own call time
forms the batches, so a lone request never waits and a loaded model sees full batches. A delay
(``--max-batch-delay``) holds a partial batch up to that long past its first request's arrival for
others to join; a full batch never waits. A request that cannot be stacked (non-array values, 0-d
arrays, keys whose row counts differ) or that is a full batch by itself runs on its own.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Awaitable, Callable, Hashable
from dataclasses import dataclass, field

import numpy as np

from core.errors import ModelError
from core.types import ModelReply, Payload

Signature = tuple[Hashable, ...]
RunBatch = Callable[[Payload], Awaitable[Payload]]

MAX_BATCH_BYTES = 64 * 1024 * 1024
"""Bytes of input one batch stacks at most (the default ``--max-body``). Stacking copies the
requests' arrays, so without a cap clients sending bodies just under the row limit could make
each call copy 32 times what one request may hold; large requests gain little from sharing a
call anyway."""


ALONE = ModelReply({}, 0)
"""What a gathering request is told when nobody joined it: run your own call (``_gathered``)."""


def more_this_turn(loop: asyncio.AbstractEventLoop) -> bool:
    """Whether the loop has other callbacks to run before it next waits for sockets (other
    requests' tasks read in the same turn among them). asyncio's own loop keeps them in
    ``_ready``; for any other loop, assume there are."""
    ready = getattr(loop, "_ready", None)
    return ready is None or bool(ready)


def signature(payload: Payload) -> tuple[Signature, int] | None:
    """``(signature, rows)`` if ``payload`` can join a batch, else ``None``.

    The signature is the sorted keys with each array's trailing shape and dtype; rows is the
    common length of axis 0 (every array of one request must have the same)."""
    if not all(type(key) is str for key in payload):
        return None  # a client's pickle may hold other keys, which need not even sort together
    parts: list[Hashable] = []
    rows: int | None = None
    for key in sorted(payload):
        value = payload[key]
        if not isinstance(value, np.ndarray) or value.ndim == 0 or value.dtype.hasobject:
            return None
        if rows is None:
            rows = value.shape[0]
        elif value.shape[0] != rows:
            return None
        parts.append((key, value.shape[1:], value.dtype.str))
    if rows is None or rows == 0:
        return None
    return tuple(parts), rows


@dataclass
class Pending:
    payload: Payload
    rows: int
    nbytes: int
    arrival: float
    future: asyncio.Future[ModelReply] = field(repr=False)


@dataclass
class Group:
    """Requests of one signature waiting for a call, oldest first."""

    items: deque[Pending] = field(default_factory=deque)
    rows: int = 0
    nbytes: int = 0
    timer: asyncio.TimerHandle | None = None


def split_rows(result: Payload, sizes: list[int]) -> list[Payload]:
    """Cut a batched reply back into one reply per request (axis 0, in order).

    A key answered with a dict (a model with several outputs, under the seed's contract) is cut
    the same way, output by output, so a batched reply has the shape of an unbatched one."""
    total = sum(sizes)
    bounds = np.cumsum([0, *sizes])
    parts: list[Payload] = [{} for _ in sizes]
    for key, value in result.items():
        if isinstance(value, dict):
            for part, nested in zip(parts, split_rows(value, sizes), strict=True):
                part[key] = nested
            continue
        array = np.asarray(value)
        if array.ndim == 0 or array.shape[0] != total:
            raise ModelError(
                f"batched output {key!r} has shape {array.shape}, expected {total} rows "
                "(a model that mixes rows must opt out of batching)"
            )
        for index, part in enumerate(parts):
            part[key] = array[bounds[index] : bounds[index + 1]]
    return parts


class Batcher:
    """Collects compatible requests for one model and runs them as one call.

    At most ``max_calls`` batched calls run at once: the model is "busy" when they all run, and
    what arrives meanwhile waits for the next free call. One call at a time forms the largest
    batches, which is what a model whose cost is mostly per call (a small Keras model: ~0.5 ms
    of Python whatever its batch) needs."""

    def __init__(
        self,
        run: RunBatch,
        max_batch_size: int,
        max_delay: float,
        on_batch: Callable[[int], None] | None = None,
        max_calls: int = 1,
        max_bytes: int = MAX_BATCH_BYTES,
        gather: bool = False,
    ) -> None:
        self.run = run
        self.max_batch_size = max_batch_size
        self.max_bytes = max_bytes
        self.max_delay = max_delay
        self.on_batch = on_batch
        self.max_calls = max(1, max_calls)
        self.gather = gather
        """The model's calls hold the event loop (core/dataplane/inline.py), so it is idle
        whenever a request arrives: the first request of a turn of the loop waits for the turn's
        end, and the requests read meanwhile join its call."""
        self._gathering = False
        self.running = 0
        """Batched calls in flight (each counts from its start until the model returned, or its
        only caller gave up)."""
        self._groups: dict[Signature, Group] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    async def submit(self, payload: Payload) -> ModelReply | None:
        """The request's own reply with the rows of the call that made it, or ``None`` when it
        cannot be batched (the caller runs it alone)."""
        found = signature(payload)
        if found is None:
            return None
        key, rows = found
        nbytes = sum(value.nbytes for value in payload.values())
        if rows >= self.max_batch_size or nbytes >= self.max_bytes:
            return None  # already a full batch on its own
        loop = asyncio.get_running_loop()
        if (not self.max_delay and self.running < self.max_calls and not self._groups
                and not (self.gather and more_this_turn(loop))):
            return await self._run_alone(payload, rows)
        pending = Pending(payload, rows, nbytes, time.monotonic(), loop.create_future())
        group = self._groups.get(key)
        if group is None:
            group = self._groups[key] = Group()
        group.items.append(pending)
        group.rows += rows
        group.nbytes += nbytes
        if not self.gather:
            self._pump()
        elif not self._gathering:
            self._gathering = True
            loop.call_soon(self._gathered)
        try:
            reply = await pending.future
        except asyncio.CancelledError:
            if pending.future.done() and not pending.future.cancelled() and pending.future.result() is ALONE:
                self.running -= 1  # the call reserved for it (``_gathered``) is not made
                if self._groups:
                    self._pump()
            raise
        if reply is ALONE:
            return await self._run_alone(payload, rows, reserved=True)
        return reply

    async def _run_alone(self, payload: Payload, rows: int, reserved: bool = False) -> ModelReply:
        """The idle model's fast path: no queue, no task, the caller runs its own call. A caller
        that gives up frees the call at once (as the thread pool's limit does for any model).
        ``reserved``: ``_gathered`` counted the call already."""
        if not reserved:
            self.running += 1
        try:
            if self.on_batch is not None:
                self.on_batch(rows)
            result = await self.run(payload)
        finally:
            self.running -= 1
            if self._groups:
                self._pump()
        return ModelReply(result, rows)

    def _ready(self, group: Group, now: float) -> bool:
        return (not self.max_delay or group.rows >= self.max_batch_size
                or group.nbytes >= self.max_bytes or now >= group.items[0].arrival + self.max_delay)

    def _pump(self) -> None:
        """Start calls for ready groups (oldest first) while calls are free; arm the delay's
        timer for the groups that are not ready yet."""
        now = time.monotonic()
        while self.running < self.max_calls:
            ready = [(group.items[0].arrival, key) for key, group in self._groups.items()
                     if self._ready(group, now)]
            if not ready:
                break
            self._start(min(ready, key=lambda item: item[0])[1])
        if self.max_delay:
            loop = asyncio.get_running_loop()
            for group in self._groups.values():
                if group.timer is None and not self._ready(group, now):
                    group.timer = loop.call_later(
                        group.items[0].arrival + self.max_delay - now, self._wake, group)

    def _gathered(self) -> None:
        """The end of the turn in which a gathering request arrived. If nobody joined it and the
        model is free, its caller runs it alone (a task and a turn of the loop fewer at low load,
        where that was 5-10 % of the latency); else the batches start."""
        self._gathering = False
        if self.running < self.max_calls and not self.max_delay and len(self._groups) == 1:
            key, group = next(iter(self._groups.items()))
            if len(group.items) == 1:
                del self._groups[key]
                pending = group.items.popleft()
                if not pending.future.done():  # else its caller gave up meanwhile
                    self.running += 1
                    pending.future.set_result(ALONE)
                return
        self._pump()

    def _wake(self, group: Group) -> None:
        group.timer = None
        self._pump()

    def _start(self, key: Signature) -> None:
        group = self._groups[key]
        batch: list[Pending] = []
        rows = nbytes = 0
        # Keep within max_batch_size rows and max_bytes; the rest stay queued for the next call.
        while group.items and (not batch or (rows + group.items[0].rows <= self.max_batch_size
                                             and nbytes + group.items[0].nbytes <= self.max_bytes)):
            item = group.items.popleft()
            group.rows -= item.rows
            group.nbytes -= item.nbytes
            if item.future.done():  # its caller gave up while it waited
                continue
            batch.append(item)
            rows += item.rows
            nbytes += item.nbytes
        if not group.items:
            if group.timer is not None:
                group.timer.cancel()
            del self._groups[key]
        if not batch:
            return
        self.running += 1
        task = asyncio.get_running_loop().create_task(self._run(batch))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _run(self, batch: list[Pending]) -> None:
        try:
            await self._call(batch)
        finally:
            self.running -= 1
            self._pump()

    async def _call(self, batch: list[Pending]) -> None:
        live = [p for p in batch if not p.future.done()]  # a caller may have given up
        if not live:
            return
        total = sum(p.rows for p in live)
        if self.on_batch is not None:
            self.on_batch(total)
        try:
            if len(live) == 1:
                results = [await self.run(live[0].payload)]
            else:
                stacked: Payload = {
                    key: np.concatenate([p.payload[key] for p in live]) for key in live[0].payload
                }
                results = split_rows(await self.run(stacked), [p.rows for p in live])
        except BaseException as exc:  # the model's error fails exactly this batch
            for pending in live:
                if not pending.future.done():
                    pending.future.set_exception(exc)
            if not isinstance(exc, Exception):
                raise
            return
        for pending, result in zip(live, results, strict=True):
            if not pending.future.done():
                pending.future.set_result(ModelReply(result, total))

    def pending(self) -> int:
        return sum(len(group.items) for group in self._groups.values())

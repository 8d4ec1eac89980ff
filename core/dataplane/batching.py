"""Dynamic batching across requests (``--max-batch-size N --max-batch-delay MS``).

Requests whose arrays agree per key in trailing shape and dtype are stacked along axis 0, the
model runs once, and each request gets its own rows back. Triton's rule: never wait once a full
batch is there, and never hold a request longer than the delay past its arrival. A request that
cannot be stacked (non-array values, 0-d arrays, keys whose row counts differ) runs on its own.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Hashable
from dataclasses import dataclass, field

import numpy as np

from core.errors import ModelError
from core.types import ModelReply, Payload

Signature = tuple[Hashable, ...]
RunBatch = Callable[[Payload], Awaitable[Payload]]


def signature(payload: Payload) -> tuple[Signature, int] | None:
    """``(signature, rows)`` if ``payload`` can join a batch, else ``None``.

    The signature is the sorted keys with each array's trailing shape and dtype; rows is the
    common length of axis 0 (every array of one request must have the same)."""
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
    arrival: float
    future: asyncio.Future[ModelReply] = field(repr=False)


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
    """Collects compatible requests for one model and runs them as one call."""

    def __init__(
        self,
        run: RunBatch,
        max_batch_size: int,
        max_delay: float,
        on_batch: Callable[[int], None] | None = None,
    ) -> None:
        self.run = run
        self.max_batch_size = max_batch_size
        self.max_delay = max_delay
        self.on_batch = on_batch
        self._groups: dict[Signature, list[Pending]] = {}
        self._timers: dict[Signature, asyncio.TimerHandle] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    async def submit(self, payload: Payload) -> ModelReply | None:
        """The request's own reply with the rows of the call that made it, or ``None`` when it
        cannot be batched (the caller runs it alone)."""
        found = signature(payload)
        if found is None:
            return None
        key, rows = found
        if rows >= self.max_batch_size:
            return None  # already a full batch on its own
        loop = asyncio.get_running_loop()
        pending = Pending(payload, rows, time.monotonic(), loop.create_future())
        group = self._groups.setdefault(key, [])
        group.append(pending)
        if sum(p.rows for p in group) >= self.max_batch_size:
            self._flush(key)  # full: never wait
        elif len(group) == 1:
            self._timers[key] = loop.call_later(self.max_delay, self._flush, key)
        return await pending.future

    def _flush(self, key: Signature) -> None:
        timer = self._timers.pop(key, None)
        if timer is not None:
            timer.cancel()
        group = self._groups.pop(key, [])
        if not group:
            return
        # Keep within max_batch_size rows; the rest start a new group (and timer) at once.
        batch: list[Pending] = []
        rows = 0
        while group and (not batch or rows + group[0].rows <= self.max_batch_size):
            item = group.pop(0)
            batch.append(item)
            rows += item.rows
        if group:
            self._groups[key] = group
            remaining = max(0.0, group[0].arrival + self.max_delay - time.monotonic())
            self._timers[key] = asyncio.get_running_loop().call_later(remaining, self._flush, key)
        task = asyncio.get_running_loop().create_task(self._run(batch))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _run(self, batch: list[Pending]) -> None:
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
        return sum(len(group) for group in self._groups.values())

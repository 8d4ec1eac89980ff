"""The hot path between decoded request and encoded reply: invoke the model safely.

Admission is bounded (``--max-queue``: beyond it, 503 at once); each request has a deadline
(``--timeout``: 504, the late result is discarded); sync models run in a bounded thread pool
(``--threads``) so the event loop never blocks, except a compiled model's calls timed far under
a millisecond, which run on the event loop (core/dataplane/inline.py: the thread's hand-back of
the GIL costs more than they do); compatible concurrent requests are batched
(``--max-batch-size``; on by default for the models that declare themselves batchable: the
framework loaders', wrappers with ``batchable = True``). A model that raises or returns
something other than a dict becomes a ``ModelError`` (500) for exactly the requests it was asked
about, and the server keeps serving. A ``Reply`` (a ``ModelPipe``'s) keeps the keys it failed on,
counted in the metrics.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
from collections.abc import Awaitable, Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from typing import Any

from core.dataplane.batching import Batcher
from core.dataplane.inline import InlineGate, inline_gate
from core.dataplane.metrics import Metrics
from core.errors import DeadlineExceeded, ModelError, Overloaded, StudioError
from core.types import ModelFn, ModelReply, Payload, Reply, ServedModel

log = logging.getLogger("studio_plugins.dataplane")


@dataclass(frozen=True)
class DataPlaneOptions:
    threads: int = 4
    max_queue: int = 256
    """Requests admitted (waiting or running) at once; 0: unbounded."""
    timeout: float | None = None
    """Seconds until a request is answered 504; None: no deadline."""
    max_batch_size: int = 32
    """Rows per model call when batching across requests; 1: off. (The default is
    ``ServeOptions.max_batch_size``'s: README "Under load" says how it was chosen.)"""
    max_batch_delay: float = 0.0
    """Seconds a partial batch may wait for others to join it; 0: none (a request that finds the
    model idle runs at once, and the model's own call time forms the batches)."""


def _is_async(predict: Any) -> bool:
    return inspect.iscoroutinefunction(predict) or inspect.iscoroutinefunction(
        getattr(predict, "__call__", None)  # noqa: B004 - an object whose __call__ is async
    )


class DataPlane:
    """Runs models for requests. One per server, shared by every model it serves."""

    def __init__(self, options: DataPlaneOptions | None = None, metrics: Metrics | None = None) -> None:
        self.options = options or DataPlaneOptions()
        self.metrics = metrics
        self.admitted = 0
        self._executor: ThreadPoolExecutor | None = None
        # by model identity, and whether it is called with named tensors (predict_named)
        self._batchers: dict[tuple[int, bool], Batcher] = {}
        self._invokers: dict[tuple[int, bool], Callable[[Payload], Awaitable[Any]]] = {}
        self._limits: dict[int, asyncio.Semaphore] = {}  # model.concurrency, whichever way it is called
        self._gates: dict[int, InlineGate | None] = {}  # which calls run on the event loop

    @property
    def executor(self) -> ThreadPoolExecutor:
        if self._executor is None:
            self._executor = ThreadPoolExecutor(
                max(1, self.options.threads), thread_name_prefix="studio-model"
            )
        return self._executor

    async def infer(self, model: ServedModel, payload: Payload, name: str = "", *, named: bool = False
                    ) -> ModelReply:
        """The model's reply and the number of rows of the call that produced it.

        ``named``: through ``model.predict_named`` (where it has one), in batches of its own."""
        named = named and model.predict_named is not None
        limit = self.options.max_queue
        if limit and self.admitted >= limit:
            raise Overloaded(f"{self.admitted} requests queued (--max-queue {limit}); retry shortly")
        self.admitted += 1
        counted = self.metrics is not None and self.metrics.multiprocess
        if counted:
            self.metrics.queue_depth.inc()  # type: ignore[union-attr]
        try:
            if self.options.timeout is None:
                return await self._dispatch(model, payload, name, named)
            try:
                return await asyncio.wait_for(self._dispatch(model, payload, name, named),
                                              self.options.timeout)
            except TimeoutError:
                raise DeadlineExceeded(
                    f"no answer within {self.options.timeout:g}s (--timeout)"
                ) from None
        finally:
            self.admitted -= 1
            if counted:
                self.metrics.queue_depth.dec()  # type: ignore[union-attr]

    async def _dispatch(self, model: ServedModel, payload: Payload, name: str, named: bool
                        ) -> ModelReply:
        if self.options.max_batch_size > 1 and model.batchable:
            batched = await self._batcher(model, name, named).submit(payload)
            if batched is not None:
                return batched
        result = await self.call(model, payload, named, name)
        rows = payload_rows(payload)
        if self.metrics is not None:
            self.metrics.observe_batch(name, rows)
            if type(result) is Reply and result.failed:
                self.metrics.observe_failed(name, len(result.failed))
        return ModelReply(result, rows)

    def _batcher(self, model: ServedModel, name: str, named: bool) -> Batcher:
        batcher = self._batchers.get((id(model), named))
        if batcher is None:

            async def run(payload: Payload) -> Payload:
                return await self.call(model, payload, named, name)

            def observe(rows: int) -> None:
                if self.metrics is not None:
                    self.metrics.observe_batch(name, rows)

            # One batched call at a time (Batcher's default): measured on the Keras MLP at 16
            # connections, 2,043 req/s against 1,517 with two calls at once and 677 with four.
            # A model called on the event loop is never busy when a request arrives: its batches
            # form from the requests read in one turn of the loop (``gather``).
            batcher = Batcher(run, self.options.max_batch_size, self.options.max_batch_delay, observe,
                              gather=self._gate(model, name) is not None)
            # Keyed by identity: a model swapped in later gets batches of its own.
            self._batchers[(id(model), named)] = batcher
        return batcher

    async def call(self, model: ServedModel, payload: Payload, named: bool = False, name: str = ""
                   ) -> Payload:
        """One model call, sync models in the thread pool (or on the event loop where the
        model's gate admits it); errors become ``ModelError``."""
        invoke = self._invokers.get((id(model), named))
        if invoke is None:
            invoke = self._invokers[(id(model), named)] = self._invoker(model, named, name)
        try:
            result: Any = await invoke(payload)
        except StudioError:
            raise
        except Exception as exc:
            log.exception("model raised")
            raise ModelError(f"model failed: {type(exc).__name__}: {exc}") from exc
        if type(result) is dict or type(result) is Reply:
            return result
        if not isinstance(result, Mapping):
            raise ModelError(f"model returned {type(result).__name__}, expected a dict")
        if isinstance(result, Reply):  # a subclass: keep what failed, drop the rest
            return Reply(result, result.failed)
        return dict(result)

    def _gate(self, model: ServedModel, name: str) -> InlineGate | None:
        if id(model) not in self._gates:
            self._gates[id(model)] = inline_gate(name, model.call_times, max(1, len(model.inputs)))
        return self._gates[id(model)]

    def _invoker(self, model: ServedModel, named: bool, name: str
                 ) -> Callable[[Payload], Awaitable[Any]]:
        """How to call ``model``, decided once per model: inspecting it per request is slow."""
        predict = model.predict_named if named and model.predict_named is not None else model.predict
        if _is_async(predict):
            return predict  # type: ignore[return-value]
        gate = self._gate(model, name)
        run: Callable[[Payload], Awaitable[Any]] = partial(self._in_thread, predict)
        if gate is not None:
            in_thread = run

            async def inline_or_thread(payload: Payload) -> Any:
                if gate.admits(payload):
                    return gate.call(predict, payload)
                return await in_thread(payload)

            run = inline_or_thread
        if not model.concurrency:
            return run
        limit = self._limits.get(id(model))
        if limit is None:
            limit = self._limits[id(model)] = asyncio.Semaphore(model.concurrency)

        async def limited(payload: Payload) -> Any:
            async with limit:  # wherever the call runs: a model that must not overlap never does
                return await run(payload)

        return limited

    async def _in_thread(self, predict: ModelFn, payload: Payload) -> Any:
        result = await asyncio.get_running_loop().run_in_executor(self.executor, predict, payload)
        if inspect.isawaitable(result):
            result = await result
        return result

    def forget(self, model: ServedModel) -> None:
        """Drop the batcher of a model that was swapped out (batches in flight finish)."""
        for named in (False, True):
            self._batchers.pop((id(model), named), None)
            self._invokers.pop((id(model), named), None)
        self._limits.pop(id(model), None)
        self._gates.pop(id(model), None)

    def close(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
            self._executor = None


def payload_rows(payload: Payload) -> int:
    """Rows in a request (axis 0 of its first array), 1 when it has no array."""
    for value in payload.values():
        shape = getattr(value, "shape", None)
        if shape:
            return int(shape[0])
    return 1

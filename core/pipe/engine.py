"""The stage engine behind ``ModelPipe``: workers, per-item deadlines and batching, in order.

A pipe is a list of stages. A stage is a chain of functions applied to one item (or, batched, a
head function applied to a batch and the rest applied per item) with its own options. A call
runs every item of its input through the stages and answers in input order: one result per
item, ``None`` where a stage failed, rejected the item or passed its deadline. A dict's answer
is a ``Reply`` whose ``failed`` names the keys that are ``None`` because a stage failed on them
(raised or passed its deadline), not because a stage answered or filtered them to ``None``.

How a call runs is core/pipe/scheduler.py; the stages and their options are core/pipe/stages.py;
the workers, one pool per stage, are core/pipe/pools.py. This module is the pipe itself and the
entry ``studio_plugins.model_util`` imports.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Hashable, Iterable, Iterator, Mapping
from typing import Any, Self

from core.errors import ConfigurationError
from core.pipe.pools import Item
from core.pipe.scheduler import Run
from core.pipe.stages import Func, Stage, StageOptions, is_not_none
from core.types import Reply

__all__ = ["Pipe", "StageOptions", "is_not_none"]


class Pipe:
    """A ``dict -> dict`` (and ``list -> list``, ``generator -> generator``) pipeline."""

    # A pipe maps each key on its own; stacking several requests' arrays would mix them up.
    batchable = False

    def __init__(self) -> None:
        self._stages: tuple[Stage, ...] = ()
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
                self._stages = (*self._stages, Stage(len(self._stages), func, options, inline))
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

    def _run(self, items: Iterator[tuple[Hashable, Any]], window: int | None) -> Iterator[Item]:
        run = Run(self._stages, items, window)
        try:
            yield from run.results()
        finally:
            run.close()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} stages={[stage.label for stage in self._stages]}>"

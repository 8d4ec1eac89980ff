"""The stages of a pipe: their options, and how one runs its functions on an item or a batch.

A stage is a chain of functions applied to one item (or, batched, a head function applied to a
batch and the rest applied per item) with its own options and its own worker pool
(core/pipe/pools.py). A function's failure becomes a ``Failure`` for the items it concerned,
never an exception out of the worker.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterable
from dataclasses import dataclass
from typing import Any

from core.errors import ConfigurationError
from core.pipe.pools import Failure, Item, Pool

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


class Stage:
    def __init__(self, index: int, func: Func, options: StageOptions, inline: bool) -> None:
        self.index = index
        self.funcs: list[Func] = [func]
        self.options = options
        self.filterf = options.filterf or is_not_none
        self.inline = inline
        self.batched = options.batch_size > 1 or options.batcher is not None
        self.pool = None if inline else Pool(max(1, options.num_workers), str(index))

    @property
    def label(self) -> str:
        return f"{self.index} ({'+'.join(_describe(func) for func in self.funcs)})"

    def passes(self, value: Any, key: Hashable) -> bool | Failure:
        try:
            return bool(self.filterf(value))
        except Exception as exc:
            return Failure(f"filterf raised for key {key!r}", exc)

    def _chain(self, funcs: list[Func], value: Any, key: Hashable) -> Any:
        for func in funcs:
            passes = self.passes(value, key)
            if passes is not True:
                return passes or None
            try:
                value = func(value)
            except Exception as exc:
                return Failure(f"failed for key {key!r}", exc)
        return value

    def run_one(self, item: Item) -> list[Any]:
        return [self._chain(self.funcs, item.value, item.key)]

    def run_batch(self, items: list[Item]) -> list[Any]:
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
            return [Failure(f"failed for the batch of keys {keys!r}", exc)] * len(items)
        return [self._chain(tail, value, key) for value, key in zip(results, keys, strict=True)]

"""The hot path between decoded request and encoded reply: invoke the model safely.

Sync models run in a bounded thread pool so the event loop never blocks; async models are
awaited. A model that raises or returns something other than a dict becomes a ``ModelError``
(HTTP 500) and the server keeps serving.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from core.errors import ModelError, StudioError
from core.types import Payload, ServedModel

log = logging.getLogger("studio_plugins.dataplane")


def _is_async(model: ServedModel) -> bool:
    predict = model.predict
    return inspect.iscoroutinefunction(predict) or inspect.iscoroutinefunction(
        getattr(predict, "__call__", None)  # noqa: B004 - an object whose __call__ is async
    )


class DataPlane:
    """Runs models for requests. One per server; shared by every model it serves."""

    def __init__(self, threads: int = 4) -> None:
        self.threads = max(1, threads)
        self._executor: ThreadPoolExecutor | None = None

    @property
    def executor(self) -> ThreadPoolExecutor:
        if self._executor is None:
            self._executor = ThreadPoolExecutor(self.threads, thread_name_prefix="studio-model")
        return self._executor

    async def infer(self, model: ServedModel, payload: Payload) -> Payload:
        try:
            if _is_async(model):
                result: Any = await model.predict(payload)  # type: ignore[misc]
            else:
                loop = asyncio.get_running_loop()
                result = await loop.run_in_executor(self.executor, model.predict, payload)
                if inspect.isawaitable(result):
                    result = await result
        except StudioError:
            raise
        except Exception as exc:
            log.exception("model raised")
            raise ModelError(f"model failed: {type(exc).__name__}: {exc}") from exc
        if not isinstance(result, Mapping):
            raise ModelError(f"model returned {type(result).__name__}, expected a dict")
        return dict(result)

    def close(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
            self._executor = None

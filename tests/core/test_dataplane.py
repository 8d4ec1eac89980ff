"""The data plane in process: thread pool, per-model concurrency, errors, deadlines, queue."""

from __future__ import annotations

import asyncio
import threading
import time

import numpy as np
import pytest

from core.dataplane.plane import DataPlane, DataPlaneOptions
from core.errors import DeadlineExceeded, ModelError, Overloaded
from core.types import Payload, ServedModel


class Overlap:
    """A sync model that records how many of its calls ran at once."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.running = 0
        self.most = 0

    def __call__(self, payload: Payload) -> Payload:
        with self.lock:
            self.running += 1
            self.most = max(self.most, self.running)
        time.sleep(0.05)
        with self.lock:
            self.running -= 1
        return payload


async def run_many(plane: DataPlane, model: ServedModel, count: int) -> list[object]:
    return await asyncio.gather(*(plane.infer(model, {"i": i}) for i in range(count)),
                                return_exceptions=True)


@pytest.mark.parametrize(("concurrency", "expected"), [(None, 4), (1, 1), (2, 2)])
def test_a_model_runs_at_most_its_concurrency(concurrency: int | None, expected: int) -> None:
    recorder = Overlap()
    model = ServedModel(predict=recorder, platform="test", concurrency=concurrency)
    plane = DataPlane(DataPlaneOptions(threads=4))
    try:
        results = asyncio.run(run_many(plane, model, 12))
    finally:
        plane.close()
    assert [r[0]["i"] for r in results] == list(range(12))  # type: ignore[index]
    assert recorder.most == expected


def test_errors_deadlines_and_the_queue() -> None:
    def failing(payload: Payload) -> Payload:
        raise ValueError("bad input for this model")

    def slow(payload: Payload) -> Payload:
        time.sleep(0.5)
        return payload

    async def main() -> None:
        plane = DataPlane(DataPlaneOptions(threads=2, timeout=0.1, max_queue=1))
        try:
            with pytest.raises(ModelError, match="bad input for this model"):
                await plane.infer(ServedModel(predict=failing, platform="t"), {})
            with pytest.raises(ModelError, match="expected a dict"):
                await plane.infer(ServedModel(predict=lambda p: [1], platform="t"), {})
            slow_model = ServedModel(predict=slow, platform="t")
            first = asyncio.ensure_future(plane.infer(slow_model, {}))
            await asyncio.sleep(0.01)
            with pytest.raises(Overloaded):
                await plane.infer(slow_model, {})
            with pytest.raises(DeadlineExceeded):
                await first
            assert plane.admitted == 0
        finally:
            plane.close()

    asyncio.run(main())


def test_the_defaults_batch_a_busy_batchable_model_and_no_other() -> None:
    sizes: list[int] = []

    def double(payload: Payload) -> Payload:
        sizes.append(len(payload["x"]))
        time.sleep(0.05)
        return {"x": payload["x"] * 2}

    async def main(model: ServedModel) -> list[object]:
        return await asyncio.gather(*(plane.infer(model, {"x": np.full((1, 2), i)})
                                      for i in range(12)))

    plane = DataPlane(DataPlaneOptions())
    try:
        results = asyncio.run(main(ServedModel(predict=double, platform="test")))
        assert sizes == [1, 11]  # the first found it idle; the rest came while it was busy
        assert [(r[0]["x"].tolist(), r[1]) for r in results] == [  # type: ignore[index]
            ([[2 * i, 2 * i]], 1 if i == 0 else 11) for i in range(12)]
        sizes.clear()
        asyncio.run(main(ServedModel(predict=double, platform="test", batchable=False)))
        assert sizes == [1] * 12
    finally:
        plane.close()

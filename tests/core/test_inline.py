"""Quick calls of a timed model run on the event loop (core/dataplane/inline.py): which calls,
how they batch, and how calls that turn out slow are sent back to the thread pool."""

from __future__ import annotations

import asyncio
import logging
import threading
import time

import numpy as np
import pytest

from core.dataplane.inline import BUDGET, STRIKES, InlineGate, elements, inline_gate
from core.dataplane.plane import DataPlane, DataPlaneOptions
from core.types import Payload, ServedModel

ROW = 4  # elements per row of the test model's one input
TIMES = tuple((rows * ROW, 1e-4 * rows) for rows in range(1, 33))
"""As a loader would time a model: 0.1 ms a row, so up to 10 rows fit the 1 ms budget."""


def rows(count: int) -> Payload:
    return {"x": np.arange(count * ROW, dtype=np.float32).reshape(count, ROW)}


class Recorder:
    """A sync model that answers its input doubled and records each call's thread and rows."""

    def __init__(self) -> None:
        self.calls: list[tuple[int, int]] = []

    def __call__(self, payload: Payload) -> Payload:
        self.calls.append((threading.get_ident(), len(payload["x"])))
        return {"x": payload["x"] * 2}


def test_the_limit_is_the_largest_timed_call_within_the_budget() -> None:
    gate = InlineGate("m", TIMES)
    assert gate.limit == 10 * ROW
    assert gate.admits(rows(10)) and not gate.admits(rows(11))
    assert not gate.admits({"x": [[1.0] * ROW]})  # not an array: its conversion is the model's
    assert not gate.admits({"x": rows(1)["x"], "y": 3})
    assert not gate.admits({"x": rows(1)["x"], "y": rows(1)["x"]})  # two calls of a one-input model
    assert InlineGate("m", TIMES, arrays=2).admits({"x": rows(1)["x"], "y": rows(1)["x"]})
    assert elements({"x": rows(2)["x"], "y": rows(3)["x"]}) == 5 * ROW
    assert inline_gate("m", ((ROW, 2 * BUDGET),)) is None  # nothing quick enough: never inline
    assert inline_gate("m", ()) is None


def spin(seconds: float) -> None:
    began = time.thread_time()
    while time.thread_time() - began < seconds:
        pass


def test_slow_calls_lower_the_limit_from_the_third_on(caplog: pytest.LogCaptureFixture) -> None:
    gate = InlineGate("m", TIMES, budget=0.0005)
    assert gate.limit == 5 * ROW

    def slow(payload: Payload) -> Payload:
        spin(0.002)
        return payload

    caplog.set_level(logging.WARNING, "studio_plugins.dataplane")
    for count in (5, 3)[: STRIKES - 1]:
        gate.call(slow, rows(count))
    assert gate.limit == 5 * ROW and not caplog.records  # one slow call may be the collector
    gate.call(lambda payload: payload, rows(4))  # quick calls are no strike
    assert gate.limit == 5 * ROW
    gate.call(slow, rows(2))
    assert gate.limit == 5 * ROW - 1  # below the largest of the slow calls
    assert "now run in the thread pool" in caplog.text
    assert not gate.admits(rows(5)) and gate.admits(rows(4))


def timed_model(recorder: Recorder, batchable: bool = True) -> ServedModel:
    return ServedModel(predict=recorder, platform="test", call_times=TIMES, batchable=batchable)


def test_admitted_calls_run_on_the_event_loop_and_larger_ones_in_the_pool() -> None:
    recorder, untimed = Recorder(), Recorder()
    plane = DataPlane(DataPlaneOptions(max_batch_size=1))
    model = timed_model(recorder)

    async def main() -> int:
        for count in (1, 10, 11, 32):
            reply = await plane.infer(model, rows(count))
            np.testing.assert_array_equal(reply.payload["x"], rows(count)["x"] * 2)
        await plane.infer(ServedModel(predict=untimed, platform="test"), rows(1))
        return threading.get_ident()

    try:
        loop_thread = asyncio.run(main())
    finally:
        plane.close()
    on_loop = [thread == loop_thread for thread, _ in recorder.calls]
    assert on_loop == [True, True, False, False]
    assert untimed.calls[0][0] != loop_thread  # a model no loader timed: always the pool


def test_requests_read_in_one_turn_of_the_loop_share_a_call() -> None:
    recorder = Recorder()
    plane = DataPlane(DataPlaneOptions())
    model = timed_model(recorder)

    async def main() -> list[Payload]:
        alone = await plane.infer(model, rows(1), "m")  # a lone request: one call of its own
        assert alone.rows == 1
        many = await asyncio.gather(*(plane.infer(model, rows(count), "m") for count in (1, 2, 3)))
        assert {reply.rows for reply in many} == {6}
        return [reply.payload for reply in many]

    try:
        results = asyncio.run(main())
    finally:
        plane.close()
    assert [calls for _, calls in recorder.calls] == [1, 6]
    for count, result in zip((1, 2, 3), results, strict=True):
        np.testing.assert_array_equal(result["x"], rows(count)["x"] * 2)  # each its own rows


def test_a_model_that_must_not_batch_still_runs_on_the_loop_one_request_a_call() -> None:
    recorder = Recorder()
    plane = DataPlane(DataPlaneOptions())
    model = timed_model(recorder, batchable=False)

    async def main() -> int:
        await asyncio.gather(*(plane.infer(model, rows(2)) for _ in range(3)))
        return threading.get_ident()

    try:
        loop_thread = asyncio.run(main())
    finally:
        plane.close()
    assert recorder.calls == [(loop_thread, 2)] * 3


def test_a_lone_gathering_request_runs_its_own_call_and_gives_it_back_if_it_gives_up() -> None:
    from core.dataplane.batching import Batcher

    calls: list[int] = []

    async def run(payload: Payload) -> Payload:
        calls.append(len(payload["x"]))
        return {"x": payload["x"] * 2}

    async def main() -> None:
        batcher = Batcher(run, 32, 0.0, gather=True)
        reply = await batcher.submit(rows(2))
        assert reply is not None and reply.rows == 2 and batcher.running == 0
        # cancelled after the end of its turn handed it its call, before it woke to make it
        task = asyncio.ensure_future(batcher.submit(rows(1)))
        await asyncio.sleep(0)  # it waits now, and the end of its turn is scheduled
        asyncio.get_running_loop().call_soon(task.cancel)  # runs right after that end
        with pytest.raises(asyncio.CancelledError):
            await task
        assert batcher.running == 0  # the call reserved for it is free again
        assert (await batcher.submit(rows(3))) is not None

    asyncio.run(main())
    assert calls == [2, 3]


def test_a_model_that_must_not_overlap_does_not_wherever_its_calls_run() -> None:
    """``concurrency=1``: a small call (for the event loop) waits for a large one (in a thread)."""
    lock = threading.Lock()
    running = [0, 0]  # now, most

    def predict(payload: Payload) -> Payload:
        with lock:
            running[0] += 1
            running[1] = max(running[1], running[0])
        if len(payload["x"]) > 10:
            time.sleep(0.2)  # in the thread pool (too large for the loop)
        with lock:
            running[0] -= 1
        return payload

    model = ServedModel(predict=predict, platform="test", call_times=TIMES, concurrency=1)
    plane = DataPlane(DataPlaneOptions(max_batch_size=1))

    async def main() -> None:
        large = asyncio.ensure_future(plane.infer(model, rows(20)))
        await asyncio.sleep(0.05)  # the large call runs in its thread now
        await plane.infer(model, rows(1))
        await large

    try:
        asyncio.run(main())
    finally:
        plane.close()
    assert running[1] == 1

"""Batching across requests, in process: who joins a batch, when it runs, what each gets back."""

from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest

from core.dataplane.batching import Batcher, signature, split_rows
from core.errors import ModelError
from core.types import Payload


def test_signature_needs_arrays_with_one_row_count() -> None:
    assert signature({"x": np.zeros((2, 3), np.float32)}) == (((("x", (3,), "<f4")),), 2)
    assert signature({"x": np.zeros((2, 3)), "y": np.zeros((3, 1))}) is None
    assert signature({"x": np.zeros(())}) is None
    assert signature({"s": "text"}) is None
    assert signature({"x": np.zeros((0, 3))}) is None
    assert signature({}) is None
    assert signature({1: np.zeros((2, 3)), "a": np.zeros((2, 3))}) is None  # a pickle's keys


def test_split_rows_checks_the_row_count() -> None:
    parts = split_rows({"y": np.arange(5)}, [2, 3])
    assert [p["y"].tolist() for p in parts] == [[0, 1], [2, 3, 4]]
    with pytest.raises(ModelError, match="expected 5 rows"):
        split_rows({"y": np.arange(4)}, [2, 3])


def test_split_rows_cuts_a_key_answered_with_several_outputs() -> None:
    # the seed's contract for a model with two outputs: {key: {output: rows}}
    parts = split_rows({"k": {"p": np.arange(5), "q": np.arange(5) * 10}}, [2, 3])
    assert [{name: v.tolist() for name, v in p["k"].items()} for p in parts] == [
        {"p": [0, 1], "q": [0, 10]}, {"p": [2, 3, 4], "q": [20, 30, 40]}]
    with pytest.raises(ModelError, match="'q' has shape"):
        split_rows({"k": {"p": np.arange(5), "q": np.arange(4)}}, [2, 3])


class Recorder:
    def __init__(self, fail: bool = False) -> None:
        self.calls: list[int] = []
        self.fail = fail

    async def __call__(self, payload: Payload) -> Payload:
        self.calls.append(len(payload["x"]))
        if self.fail:
            raise ModelError("model failed")
        return {"y": payload["x"] * 10}


def run(coro):  # type: ignore[no-untyped-def]
    return asyncio.run(coro)


def test_full_batch_runs_at_once_and_each_gets_its_rows() -> None:
    async def main() -> None:
        model = Recorder()
        batcher = Batcher(model, max_batch_size=4, max_delay=10.0)
        started = time.monotonic()
        results = await asyncio.gather(
            *(batcher.submit({"x": np.array([[i]])}) for i in range(4))
        )
        assert time.monotonic() - started < 1.0  # a full batch never waits for the delay
        assert model.calls == [4]
        for i, (reply, rows) in enumerate(results):
            assert reply["y"].tolist() == [[i * 10]] and rows == 4

    run(main())


def test_partial_batch_waits_at_most_the_delay() -> None:
    async def main() -> None:
        model = Recorder()
        batcher = Batcher(model, max_batch_size=8, max_delay=0.05)
        started = time.monotonic()
        results = await asyncio.gather(*(batcher.submit({"x": np.array([[i]])}) for i in range(3)))
        waited = time.monotonic() - started
        assert 0.04 <= waited < 0.5
        assert model.calls == [3] and [r[0]["y"][0, 0] for r in results] == [0, 10, 20]

    run(main())


def test_overflow_starts_the_next_batch() -> None:
    async def main() -> None:
        model = Recorder()
        batcher = Batcher(model, max_batch_size=4, max_delay=0.02)
        results = await asyncio.gather(*(batcher.submit({"x": np.array([[i]])}) for i in range(10)))
        assert sorted(model.calls) == [2, 4, 4]
        assert [r[0]["y"][0, 0] for r in results] == [i * 10 for i in range(10)]

    run(main())


def test_incompatible_requests_do_not_share_a_batch() -> None:
    async def main() -> None:
        model = Recorder()
        batcher = Batcher(model, max_batch_size=8, max_delay=0.02)
        a, b, c = await asyncio.gather(
            batcher.submit({"x": np.ones((1, 3))}),
            batcher.submit({"x": np.ones((1, 5))}),
            batcher.submit({"x": np.ones((1, 3), np.float32)}),
        )
        assert sorted(model.calls) == [1, 1, 1]
        assert a[0]["y"].shape == (1, 3) and b[0]["y"].shape == (1, 5)
        assert c[0]["y"].dtype == np.float32
        assert await batcher.submit({"s": "not an array"}) is None

    run(main())


def test_a_model_error_fails_only_its_batch() -> None:
    async def main() -> None:
        failing = Recorder(fail=True)
        batcher = Batcher(failing, max_batch_size=2, max_delay=1.0)
        results = await asyncio.gather(
            *(batcher.submit({"x": np.array([[i]])}) for i in range(2)), return_exceptions=True
        )
        assert all(isinstance(r, ModelError) for r in results)
        assert failing.calls == [2]

    run(main())


def test_a_cancelled_caller_is_left_out() -> None:
    async def main() -> None:
        model = Recorder()
        batcher = Batcher(model, max_batch_size=8, max_delay=0.05)
        gone = asyncio.ensure_future(batcher.submit({"x": np.array([[1]])}))
        stays = asyncio.ensure_future(batcher.submit({"x": np.array([[2]])}))
        await asyncio.sleep(0.01)
        gone.cancel()
        reply, rows = await stays
        assert model.calls == [1] and rows == 1 and reply["y"].tolist() == [[20]]

    run(main())


class Gate:
    """An async model that holds each call until released, recording the rows of each call."""

    def __init__(self) -> None:
        self.calls: list[int] = []
        self.open = asyncio.Event()

    async def __call__(self, payload: Payload) -> Payload:
        self.calls.append(len(payload["x"]))
        await self.open.wait()
        return {"y": payload["x"] * 10}


def test_with_no_delay_a_request_that_finds_the_model_idle_runs_at_once() -> None:
    async def main() -> None:
        model = Gate()
        batcher = Batcher(model, max_batch_size=8, max_delay=0.0)
        first = asyncio.ensure_future(batcher.submit({"x": np.array([[1]])}))
        await asyncio.sleep(0)  # one turn of the loop: no timer, no queue in between
        assert model.calls == [1]
        model.open.set()
        reply, rows = await first
        assert reply["y"].tolist() == [[10]] and rows == 1

    run(main())


def test_with_no_delay_what_arrives_while_the_model_is_busy_forms_its_next_batches() -> None:
    async def main() -> None:
        model = Gate()
        batcher = Batcher(model, max_batch_size=4, max_delay=0.0)
        busy = asyncio.ensure_future(batcher.submit({"x": np.array([[0]])}))
        await asyncio.sleep(0)
        waiting = [asyncio.ensure_future(batcher.submit({"x": np.array([[i]] * (1 + i % 2))}))
                   for i in range(1, 6)]  # 2 + 1 + 2 + 1 + 2 rows
        other = asyncio.ensure_future(batcher.submit({"x": np.ones((1, 2))}))  # its own shape
        await asyncio.sleep(0.01)
        assert model.calls == [1] and batcher.pending() == 6  # all wait for the busy model
        model.open.set()
        results = await asyncio.gather(busy, *waiting, other)
        # oldest first, one call at a time, each within 4 rows; the other shape on its own
        assert model.calls == [1, 3, 3, 2, 1]
        for i, (reply, _rows) in enumerate(results[:6]):
            assert reply["y"].tolist() == [[i * 10]] * (1 + i % 2 if i else 1)
        assert [rows for _reply, rows in results] == [1, 3, 3, 3, 3, 2, 1]
        assert results[6][0]["y"].tolist() == [[10.0, 10.0]]

    run(main())


def test_a_caller_that_gives_up_on_an_idle_model_frees_it() -> None:
    async def main() -> None:
        model = Gate()
        batcher = Batcher(model, max_batch_size=8, max_delay=0.0)
        gone = asyncio.ensure_future(batcher.submit({"x": np.array([[1]])}))
        await asyncio.sleep(0)
        gone.cancel()
        await asyncio.sleep(0)
        assert batcher.running == 0
        model.open.set()
        reply, rows = await batcher.submit({"x": np.array([[2]])})
        assert model.calls == [1, 1] and rows == 1 and reply["y"].tolist() == [[20]]

    run(main())


def test_a_batch_stacks_at_most_max_bytes_of_input() -> None:
    async def main() -> None:
        model = Gate()
        batcher = Batcher(model, max_batch_size=32, max_delay=0.0, max_bytes=3 * 8)
        busy = asyncio.ensure_future(batcher.submit({"x": np.zeros((1, 1))}))
        await asyncio.sleep(0)
        waiting = [asyncio.ensure_future(batcher.submit({"x": np.full((1, 1), i)}))
                   for i in range(1, 6)]  # 8 bytes each: three fit in a call
        model.open.set()
        results = await asyncio.gather(busy, *waiting)
        assert model.calls == [1, 3, 2]
        assert [reply["y"].tolist() for reply, _rows in results] == [[[i * 10]] for i in range(6)]
        # a request of max_bytes or more runs on its own: the caller is told to run it alone
        assert await batcher.submit({"x": np.zeros((3, 1))}) is None

    run(main())

"""The stage engine: order, per-item deadlines, failures in place, batching, threads."""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest

from core.errors import ConfigurationError
from core.pipe.engine import Pipe
from core.types import Reply


def pipe_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("studio-pipe-")]


def wait_for_no_pipe_threads(timeout: float = 2.0) -> list[threading.Thread]:
    """Pipe workers exit as soon as their queue is empty; give them a moment to finish."""
    deadline = time.monotonic() + timeout
    for thread in pipe_threads():
        thread.join(max(0.0, deadline - time.monotonic()))
    return pipe_threads()


@pytest.fixture(autouse=True)
def no_threads_left_behind() -> Iterator[None]:
    yield
    assert wait_for_no_pipe_threads(5.0) == []


# --- shapes of input and output ---------------------------------------------------------------


def test_add_returns_the_pipe_so_calls_chain() -> None:
    pipe = Pipe()
    assert pipe.add(lambda x: x + 1) is pipe
    assert pipe.add(lambda x: x * 2).add(lambda x: x - 1, num_workers=2) is pipe


def test_a_dict_gives_a_dict_with_the_same_keys_in_order() -> None:
    pipe = Pipe().add(lambda x: x * 10, num_workers=4)
    data = {"z": 1, "a": 2, "m": 3}
    result = pipe(data)
    assert result == {"z": 10, "a": 20, "m": 30}
    assert list(result) == ["z", "a", "m"]


def test_a_list_or_tuple_gives_a_list_in_input_order() -> None:
    def jitter(x: int) -> int:
        time.sleep(0.001 * ((x * 7) % 5))  # finish out of order
        return x

    pipe = Pipe().add(jitter, num_workers=8)
    assert pipe(list(range(50))) == list(range(50))
    assert pipe(tuple(range(5))) == [0, 1, 2, 3, 4]
    assert pipe([]) == [] and pipe({}) == {}


def test_a_generator_gives_a_lazy_generator_in_order() -> None:
    pulled: list[int] = []

    def source() -> Iterator[int]:
        for i in itertools.count():
            pulled.append(i)
            yield i

    pipe = Pipe().add(lambda x: x * 2, num_workers=4).add(
        lambda batch: [x + 1 for x in batch], batch_size=8
    )
    output = pipe(source())
    assert not isinstance(output, list | dict) and pulled == []  # nothing runs before it is read
    first = list(itertools.islice(output, 300))
    assert first == [2 * i + 1 for i in range(300)]
    assert len(pulled) < 300 + 200  # an infinite input is read a bounded window ahead
    output.close()  # type: ignore[attr-defined]


def test_an_empty_pipe_answers_its_input() -> None:
    assert Pipe()({"a": 1}) == {"a": 1}


def test_other_inputs_are_refused() -> None:
    with pytest.raises(TypeError, match="dict, a list, a tuple or a generator"):
        Pipe().add(lambda x: x)(np.arange(3))


# --- stages and composition -----------------------------------------------------------------


def test_no_options_composes_into_the_current_stage_in_the_same_worker() -> None:
    seen: list[tuple[str, str]] = []

    def head(x: int) -> int:
        seen.append(("head", threading.current_thread().name))
        return x

    def tail(x: int) -> int:
        seen.append(("tail", threading.current_thread().name))
        return x

    pipe = Pipe().add(head, num_workers=1).add(tail)
    assert pipe([1]) == [1]
    assert seen[0][1] == seen[1][1] and seen[0][1].startswith("studio-pipe-")
    assert "stages=['0 (head+tail)']" in repr(pipe)


def test_a_first_stage_without_options_runs_in_the_calling_thread() -> None:
    names: list[str] = []
    pipe = Pipe().add(lambda x: names.append(threading.current_thread().name) or x)
    pipe([1, 2])
    assert names == [threading.current_thread().name] * 2


def test_any_option_makes_a_new_stage() -> None:
    for option in ({"num_workers": 1}, {"timeout": 5}, {"batch_size": 2}, {"filterf": bool},
                   {"batcher": list}, {"unbatcher": list}):
        pipe = Pipe().add(lambda x: x, num_workers=1).add(lambda x: x, **option)
        assert repr(pipe).count("(<lambda>)") == 2, option


def test_nothing_is_inherited_from_an_earlier_stage() -> None:
    def slow(x: int) -> int:
        time.sleep(0.3)
        return x

    # The first stage's timeout does not apply to the second; its filterf neither.
    pipe = Pipe().add(lambda x: x, num_workers=2, timeout=0.1, filterf=lambda x: True)
    pipe.add(slow, num_workers=2)
    assert pipe([1, None]) == [1, None]


def test_options_are_checked() -> None:
    with pytest.raises(ConfigurationError, match="num_workers"):
        Pipe().add(lambda x: x, num_workers=-1)
    with pytest.raises(ConfigurationError, match="timeout"):
        Pipe().add(lambda x: x, timeout=0)
    with pytest.raises(ConfigurationError, match="batch_size"):
        Pipe().add(lambda x: x, batch_size=0)
    with pytest.raises(ConfigurationError, match="callable"):
        Pipe().add("not a function")  # type: ignore[arg-type]


# --- failures and filters -------------------------------------------------------------------


def test_an_exception_makes_that_item_none_in_place_and_later_stages_skip_it(
    caplog: pytest.LogCaptureFixture,
) -> None:
    received: list[Any] = []

    def picky(x: int) -> int:
        if x == 3:
            raise ValueError("three is right out")
        return x

    def later(x: int) -> int:
        received.append(x)
        return x * 10

    pipe = Pipe().add(picky, num_workers=4).add(later, num_workers=1)
    with caplog.at_level(logging.WARNING, logger="studio_plugins.pipe"):
        assert pipe({"a": 1, "b": 3, "c": 5}) == {"a": 10, "b": None, "c": 50}
    assert sorted(received) == [1, 5]
    [record] = [r for r in caplog.records if "failed" in r.getMessage()]
    assert "picky" in record.getMessage() and "'b'" in record.getMessage()
    assert "three is right out" in record.getMessage()


def test_an_exception_in_a_composed_function_stops_that_item_only() -> None:
    pipe = Pipe().add(lambda x: x).add(lambda x: 1 / x).add(lambda x: x * 2)
    assert pipe([1, 0, 2]) == [2.0, None, 1.0]


def test_filterf_decides_what_a_stage_takes() -> None:
    calls: list[int] = []
    pipe = Pipe().add(lambda x: calls.append(x) or x, num_workers=2, filterf=lambda x: x % 2 == 0)
    assert pipe([1, 2, 3, 4]) == [None, 2, None, 4]
    assert sorted(calls) == [2, 4]


def test_a_custom_filterf_can_let_none_through() -> None:
    pipe = Pipe().add(lambda x: "default" if x is None else x, num_workers=1, filterf=lambda x: True)
    assert pipe([None, "given"]) == ["default", "given"]


def test_a_filterf_that_raises_rejects_the_item(caplog: pytest.LogCaptureFixture) -> None:
    pipe = Pipe().add(lambda x: x, num_workers=1, filterf=lambda x: 10 / x > 1)
    with caplog.at_level(logging.WARNING, logger="studio_plugins.pipe"):
        assert pipe([1, 0]) == [1, None]
    assert any("filterf raised" in r.getMessage() for r in caplog.records)


# --- which Nones are failures -----------------------------------------------------------------


@pytest.mark.timeout(30)
def test_a_dict_reply_names_the_keys_that_failed_not_those_answered_none() -> None:
    release = threading.Event()

    def stage(value: str) -> str | None:
        if value == "raise":
            raise ValueError("asked to")
        if value == "hang":
            release.wait(10)
        return None if value == "none" else value.upper()

    pipe = Pipe().add(stage, num_workers=4, timeout=0.3).add(lambda x: x + "!")
    data = {"ok": "a", "boom": "raise", "quiet": "none", "late": "hang", "ok2": "b"}
    try:
        result = pipe(data)
    finally:
        release.set()
    assert isinstance(result, Reply)
    assert result == {"ok": "A!", "boom": None, "quiet": None, "late": None, "ok2": "B!"}
    assert result.failed == ("boom", "late") and result.failed_count == 2  # in input order
    assert Pipe().add(lambda x: x)({"a": 1}).failed == ()


def test_failures_in_batches_filters_and_workers_are_named_and_rejections_are_not() -> None:
    def model(batch: list[int]) -> list[int]:
        if 13 in batch:
            raise RuntimeError("unlucky batch")
        return [x * 2 for x in batch]

    def stage(x: int) -> int:
        if x == 7:
            raise SystemExit("not an Exception: caught by the worker itself")
        return x

    pipe = Pipe().add(stage, num_workers=2, filterf=lambda x: 1 / x > 0)  # 0: filterf raises
    pipe.add(model, num_workers=1, batch_size=2)
    result = pipe({"zero": 0, "neg": -1, "seven": 7, "a": 12, "b": 13, "c": 1})
    assert result == {"zero": None, "neg": None, "seven": None, "a": None, "b": None, "c": 2}
    # -1 was rejected by the filter (not a failure); 12 shared its batch with 13
    assert result.failed == ("zero", "seven", "a", "b")


def test_an_item_a_later_stage_recovers_is_not_named() -> None:
    def fetch(url: str) -> str:
        raise ConnectionError(url)

    fallback = Pipe().add(fetch, num_workers=1).add(
        lambda x: "placeholder" if x is None else x, num_workers=1, filterf=lambda x: True)
    result = fallback({"a": "http://down/"})
    assert result == {"a": "placeholder"} and result.failed == ()
    # the default filterf skips it instead: it stays a failure through every later stage
    skipped = Pipe().add(fetch, num_workers=1).add(lambda x: x, num_workers=1).add(lambda x: x)
    assert skipped({"a": "http://down/"}).failed == ("a",)


# --- deadlines --------------------------------------------------------------------------------


@pytest.mark.timeout(30)
def test_a_late_item_is_none_and_the_call_does_not_wait_for_it(caplog: pytest.LogCaptureFixture) -> None:
    release = threading.Event()

    def fetch(x: str) -> str:
        if x == "slow":
            release.wait(10)
            raise ConnectionError("gave up at last")
        return x.upper()

    pipe = Pipe().add(fetch, num_workers=4, timeout=0.3)
    started = time.monotonic()
    caplog.set_level(logging.WARNING, logger="studio_plugins.pipe")
    result = pipe({"a": "x", "b": "slow", "c": "y"})
    elapsed = time.monotonic() - started
    assert result == {"a": "X", "b": None, "c": "Y"}
    assert 0.3 <= elapsed < 1.5
    [record] = [r for r in caplog.records if "took longer" in r.getMessage()]
    assert "fetch" in record.getMessage() and "'b'" in record.getMessage()
    # The straggler is still running in the background; it finishes and its thread goes.
    assert len(pipe_threads()) == 1
    release.set()
    assert wait_for_no_pipe_threads() == []
    assert len(caplog.records) == 1  # its late failure is discarded with its result, unlogged


@pytest.mark.timeout(30)
def test_a_straggler_does_not_hold_up_the_items_behind_it() -> None:
    release = threading.Event()

    def work(x: int) -> int:
        if x == 0:
            release.wait(10)
        return x

    pipe = Pipe().add(work, num_workers=1, timeout=0.2)  # one worker: the straggler's slot is handed on
    started = time.monotonic()
    assert pipe(list(range(5))) == [None, 1, 2, 3, 4]
    assert time.monotonic() - started < 1.5
    release.set()


def test_the_deadline_counts_from_the_start_of_the_call_not_the_queue() -> None:
    def work(x: int) -> int:
        time.sleep(0.1)
        return x

    # Eight items through one worker take 0.8 s in all, but each call takes 0.1 s < 0.3 s.
    assert Pipe().add(work, num_workers=1, timeout=0.3)(list(range(8))) == list(range(8))


@pytest.mark.timeout(30)
def test_no_busy_waiting_while_items_are_in_flight() -> None:
    pipe = Pipe().add(lambda x: time.sleep(1.0) or x, num_workers=2, timeout=5)
    cpu, wall = time.process_time(), time.monotonic()
    assert pipe([1, 2]) == [1, 2]
    assert time.monotonic() - wall >= 1.0
    assert time.process_time() - cpu < 0.3  # a polling loop would burn about a second


# --- batching ---------------------------------------------------------------------------------


def test_batches_with_a_batcher_and_a_partial_last_batch() -> None:
    sizes: list[int] = []

    def model(batch: np.ndarray) -> np.ndarray:
        sizes.append(len(batch))
        return batch.sum(axis=1)

    pipe = Pipe().add(lambda x: np.full((1, 3), x), num_workers=4)
    pipe.add(model, num_workers=1, batch_size=32, batcher=np.vstack)
    result = pipe(list(range(100)))
    assert sizes == [32, 32, 32, 4]
    assert [float(r) for r in result] == [3.0 * i for i in range(100)]


def test_without_a_batcher_the_stage_gets_a_list_and_an_unbatcher_splits() -> None:
    seen: list[Any] = []

    def join(batch: list[str]) -> str:
        seen.append(batch)
        return "|".join(s.upper() for s in batch)

    pipe = Pipe().add(join, batch_size=3, unbatcher=lambda out: out.split("|"))
    assert pipe(["a", "b", "c", "d"]) == ["A", "B", "C", "D"]
    assert seen == [["a", "b", "c"], ["d"]]


def test_a_failing_batch_makes_each_of_its_items_none(caplog: pytest.LogCaptureFixture) -> None:
    def model(batch: list[int]) -> list[int]:
        if 5 in batch:
            raise RuntimeError("bad batch")
        return [x * 2 for x in batch]

    with caplog.at_level(logging.WARNING, logger="studio_plugins.pipe"):
        result = Pipe().add(model, num_workers=1, batch_size=4)(list(range(10)))
    assert result == [0, 2, 4, 6, None, None, None, None, 16, 18]
    [record] = [r for r in caplog.records if "bad batch" in r.getMessage()]  # once per batch
    assert "[4, 5, 6, 7]" in record.getMessage()


def test_a_batch_that_answers_the_wrong_number_of_results_is_none() -> None:
    pipe = Pipe().add(lambda batch: batch[:1], batch_size=2)
    assert pipe([1, 2, 3]) == [None, None, 3]


def test_items_that_failed_earlier_do_not_enter_a_batch() -> None:
    sizes: list[int] = []
    pipe = Pipe().add(lambda x: 1 / x, num_workers=2)
    pipe.add(lambda batch: sizes.append(len(batch)) or batch, batch_size=8)
    assert pipe([1, 0, 2, 0]) == [1.0, None, 0.5, None]
    assert sizes == [2]


def test_functions_composed_after_a_batched_stage_run_per_item() -> None:
    pipe = Pipe().add(lambda batch: [x * 2 for x in batch], batch_size=4).add(lambda x: x + 1)
    assert pipe([1, 2, 3]) == [3, 5, 7]


def test_a_late_batch_makes_each_of_its_items_none() -> None:
    pipe = Pipe().add(lambda batch: time.sleep(0.5 if 0 in batch else 0) or batch,
                      batch_size=2, timeout=0.2)
    assert pipe([0, 1, 2, 3]) == [None, None, 2, 3]


# --- scale and concurrency ----------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_ten_thousand_items_through_32_workers_keep_their_order() -> None:
    pipe = Pipe().add(lambda x: x * 3, num_workers=32)
    items = list(range(10_000))
    assert pipe(items) == [x * 3 for x in items]


@pytest.mark.timeout(60)
def test_one_pipe_serves_concurrent_calls_and_bounds_each_stage() -> None:
    lock = threading.Lock()
    running = {"now": 0, "most": 0}

    def model(batch: list[int]) -> list[int]:
        with lock:
            running["now"] += 1
            running["most"] = max(running["most"], running["now"])
        time.sleep(0.005)
        with lock:
            running["now"] -= 1
        return [x + 1 for x in batch]

    pipe = Pipe().add(lambda x: x * 2, num_workers=4).add(model, num_workers=2, batch_size=4)
    results: dict[int, Any] = {}

    def client(n: int) -> None:
        data = {f"k{i}": n * 1000 + i for i in range(37)}
        results[n] = pipe(data)

    threads = [threading.Thread(target=client, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    for n in range(8):
        assert results[n] == {f"k{i}": (n * 1000 + i) * 2 + 1 for i in range(37)}
    assert running["most"] <= 2  # num_workers bounds the stage across all calls


def test_a_closed_generator_cancels_its_queued_work() -> None:
    calls: list[int] = []

    def work(x: int) -> int:
        calls.append(x)
        time.sleep(0.01)
        return x

    output = Pipe().add(work, num_workers=1)(iter(range(1000)))
    assert next(output) == 0
    output.close()
    time.sleep(0.1)
    assert len(calls) < 20

"""HeapKeeper: the loaded heap is frozen, a swapped-out model is unfrozen and collected, then the
heap is frozen again."""

from __future__ import annotations

import gc
import weakref
from collections.abc import Iterator

import pytest

from core.process.heap import HeapKeeper
from core.types import ServedModel


@pytest.fixture(autouse=True)
def unfrozen() -> Iterator[None]:
    gc.unfreeze()
    yield
    gc.unfreeze()  # the rest of the test session runs with the collector as usual


def cyclic_model() -> ServedModel:
    """A model held together by a reference cycle, as framework models are."""
    state: dict[str, object] = {}

    def predict(payload: dict) -> dict:
        return {"state": state}

    state["self"] = predict
    return ServedModel(predict=predict, platform="test", checkpoint=None)


def frozen_objects() -> int:
    return gc.get_freeze_count()


def test_freeze_moves_the_heap_out_of_collections() -> None:
    keeper = HeapKeeper()
    keeper.freeze()
    assert keeper.frozen and frozen_objects() > 0


def test_a_swapped_out_model_is_collected_and_the_heap_frozen_again() -> None:
    keeper = HeapKeeper()
    old = cyclic_model()
    gone = weakref.ref(old.predict)
    keeper.freeze()
    keeper.retire(old)
    assert not keeper.frozen and frozen_objects() == 0
    del old
    assert keeper.refreeze_if_due()
    assert gone() is None  # the cycle was freed before freezing, not frozen in for good
    assert keeper.frozen and frozen_objects() > 0


def test_a_model_still_in_use_waits_then_is_frozen_in_after_give_up() -> None:
    keeper = HeapKeeper()
    in_use = cyclic_model()
    keeper.freeze()
    keeper.retire(in_use)
    for _ in range(HeapKeeper.GIVE_UP - 1):
        assert not keeper.refreeze_if_due()
        assert frozen_objects() == 0
    assert keeper.refreeze_if_due()  # held for good: stop paying a full collection per check
    assert frozen_objects() > 0


def test_nothing_to_do_while_frozen() -> None:
    keeper = HeapKeeper()
    keeper.freeze()
    count = frozen_objects()
    assert not keeper.refreeze_if_due()
    # A frozen object that dies leaves the count (another thread may drop one meanwhile); a
    # refreeze would add the whole heap, so the count must not grow.
    assert frozen_objects() <= count

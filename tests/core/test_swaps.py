"""What the app does when the repository swaps a model out: a reload and an unload alike let go
of the old model (its batcher and invoker) and unfreeze the heap so it can be collected."""

from __future__ import annotations

import asyncio
import gc
import weakref
from collections.abc import Iterator

import numpy as np
import pytest

from core.http.app import AppSettings, build_app
from core.http.codecs import CodecSet
from core.models.repository import ModelRepository
from core.process.heap import HeapKeeper
from studio_plugins.testing import make_host


@pytest.fixture(autouse=True)
def unfrozen() -> Iterator[None]:
    gc.unfreeze()
    yield
    gc.unfreeze()


@pytest.fixture
def repository(identity_repository: ModelRepository) -> ModelRepository:
    return identity_repository


@pytest.mark.parametrize("swap", ["reload", "unload"])
def test_a_swapped_out_model_is_let_go_and_the_heap_unfrozen(repository: ModelRepository, swap: str) -> None:
    host = make_host()
    heap = HeapKeeper()
    settings = AppSettings(codecs=CodecSet(host.codecs()), heap=heap)
    app = build_app(repository, settings)
    old = repository.slot("exp").model
    assert old is not None
    # a request makes the data plane hold the model (its invoker)
    dataplane = app.endpoint.dataplane  # type: ignore[attr-defined]
    asyncio.run(dataplane.infer(old, {"x": np.ones((1, 2))}, "exp"))
    assert dataplane._invokers
    held = weakref.ref(old)
    heap.freeze()

    if swap == "reload":
        repository.load("exp")
    else:
        repository.unload("exp")
    del old

    assert not heap.frozen
    gc.collect()
    assert held() is None  # nothing in the app keeps the swapped-out model alive

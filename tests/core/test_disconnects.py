"""The disconnect watch's sweeper (core/http/disconnects.py), in process: one task for requests
that need no waiting, a listener only for a request still waiting after a sweep."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from core.http import sweeping
from core.http.disconnects import DisconnectWatch


async def forever() -> dict[str, Any]:
    await asyncio.Event().wait()
    raise AssertionError("unreachable")


def test_one_sweeper_outlives_requests_that_need_no_waiting(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sweeping, "LINGER", 0.1)
    watch = DisconnectWatch(after=0.02)

    async def main() -> None:
        watch.leave(watch.enter(forever))  # a request answered in the step it arrived
        sweeper = watch.sweeper
        assert sweeper is not None
        for _ in range(3):
            await asyncio.sleep(0.03)  # the sweeper ran and found nothing to watch
            watch.leave(watch.enter(forever))
            assert watch.sweeper is sweeper and not sweeper.done()
        assert not watch.listeners  # nobody waited through a sweep: no listener task either
        await asyncio.sleep(0.3)
        assert sweeper.done() and watch.sweeper is None

    asyncio.run(main())


def test_a_request_still_waiting_after_a_sweep_gets_a_listener() -> None:
    watch = DisconnectWatch(after=0.02)

    async def main() -> None:
        async def gone() -> dict[str, Any]:
            return {"type": "http.disconnect"}

        async def waiting() -> None:
            task = watch.enter(gone)
            try:
                await asyncio.sleep(5)
            except asyncio.CancelledError:
                assert watch.absorb(task)
                raise
            finally:
                watch.leave(task)

        with pytest.raises(asyncio.CancelledError):
            await asyncio.wait_for(asyncio.ensure_future(waiting()), 1.0)

    asyncio.run(main())

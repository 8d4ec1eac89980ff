"""A plugin's shutdown request (core/process/shutdown.py): kept until the server attaches, the
first one wins, and a drain from a plugin is clamped to something the server can do."""

from __future__ import annotations

import threading

from core.process.shutdown import MAX_DRAIN, ShutdownRequests


def test_a_request_before_the_server_attaches_is_handed_over_then() -> None:
    requests = ShutdownRequests()
    requests.request("notice", 2.5)
    seen: list[tuple[str, float]] = []
    requests.attach(lambda reason, drain: seen.append((reason, drain)))
    assert seen == [("notice", 2.5)]


def test_only_the_first_request_counts_even_from_racing_threads() -> None:
    requests = ShutdownRequests()
    seen: list[tuple[str, float]] = []
    requests.attach(lambda reason, drain: seen.append((reason, drain)))
    threads = [threading.Thread(target=requests.request, args=(f"r{i}", 1.0)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(seen) == 1


def test_a_drain_out_of_range_is_clamped() -> None:
    for given, expected in ((-5, 0.0), (float("nan"), 0.0), (float("inf"), 0.0), (1e9, MAX_DRAIN),
                            ("x", 0.0)):
        requests = ShutdownRequests()
        seen: list[float] = []
        requests.attach(lambda reason, drain, seen=seen: seen.append(drain))
        requests.request("go", given)  # type: ignore[arg-type]
        assert seen == [expected]


def test_the_host_calls_every_watcher_and_one_that_fails_does_not_stop_the_others() -> None:
    from studio_plugins import ServeOptions, hookimpl
    from studio_plugins.testing import make_host

    called: list[str] = []

    class Broken:
        @hookimpl
        def studio_watch_shutdown(self, options, request_shutdown):  # type: ignore[no-untyped-def]
            raise RuntimeError("no metadata service")

    class Asking:
        @hookimpl
        def studio_watch_shutdown(self, options, request_shutdown):  # type: ignore[no-untyped-def]
            called.append(options.keys[0])
            request_shutdown("told to", 0.0)

    requests = ShutdownRequests()
    host = make_host(Asking(), Broken())  # pluggy calls the later one first
    host.watch_shutdown(ServeOptions(keys=("exp",)), requests.request)
    seen: list[str] = []
    requests.attach(lambda reason, drain: seen.append(reason))
    assert called == ["exp"] and seen == ["told to"]

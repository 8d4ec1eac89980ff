"""--workers: how dead workers are replaced (real servers, real forked workers, real signals).

A worker that dies right after its fork is re-forked with a doubling delay (0.5, 1, 2, 4 s), and
after 5 such deaths in a row the server exits 1 with one line; one that ran a while is replaced
at once; one killed while serving never stops the server; a rolling reload is not a crash.
"""

from __future__ import annotations

import gc
import itertools
import os
import signal
import socket
import time
from pathlib import Path

import numpy as np
import pytest

from core.http.activity import Activity
from core.process.workers import Supervisor, WorkerPlan
from studio_plugins.client import PredictionError, predict
from studio_plugins.testing import ServerProcess
from tests.cli.test_workers import pids_answering, worker_pids

DYING = str(Path(__file__).parent / "data" / "dying_wrapper.py")


def forks(log: Path) -> list[tuple[float, int]]:
    """(monotonic time, pid) of each worker forked, as the workers wrote them."""
    if not log.exists():
        return []
    return [(float(t), int(p)) for t, p in (line.split() for line in log.read_text().splitlines())]


def rounds(log: Path) -> list[float]:
    """Fork times grouped into rounds: both slots' workers die together, so fork together."""
    starts: list[float] = []
    for when, _ in sorted(forks(log)):
        if not starts or when - starts[-1] > 0.3:
            starts.append(when)
    return starts


def dying_server(log: Path) -> ServerProcess:
    return ServerProcess("exp", "--wrapper", DYING, "--workers", "2",
                         env={"DYING_AT_FORK": "1", "DYING_LOG": str(log)}).start()


@pytest.mark.timeout(60)
def test_workers_dying_at_start_are_backed_off_then_the_server_exits_1(
    modeldir: Path, tmp_path: Path
) -> None:
    log = tmp_path / "forks.log"
    server = dying_server(log)
    try:
        assert server.wait(timeout=30) == 1
    finally:
        server.kill()
    starts = rounds(log)
    gaps = [later - earlier for earlier, later in itertools.pairwise(starts)]
    assert len(starts) == 5, (starts, server.output())
    for gap, delay in zip(gaps, [0.5, 1.0, 2.0, 4.0], strict=True):
        assert delay - 0.05 <= gap <= delay + 0.8, gaps
    errors = [line for line in server.stderr_lines if line.startswith("error:")]
    assert len(errors) == 1, server.output()
    assert errors[0].startswith("error: the workers die at start: 5 in a row died before taking "
                                "a request, the last (pid ")
    assert "status 3" in errors[0]
    assert any(line.startswith("hint:") and "--workers 1" in line for line in server.stderr_lines)
    assert any("starting a new one in 4.0s" in line for line in server.stderr_lines)


@pytest.mark.timeout(60)
def test_sigterm_while_backing_off_stops_at_once(modeldir: Path, tmp_path: Path) -> None:
    log = tmp_path / "forks.log"
    server = dying_server(log)
    try:
        deadline = time.monotonic() + 15
        while len(rounds(log)) < 3 and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.3)  # the third round has died: its slot now waits 2 s
        assert len(rounds(log)) == 3
        signalled = time.monotonic()
        server.signal(signal.SIGTERM)
        assert server.wait(timeout=10) == 0
        assert time.monotonic() - signalled < 1.0
        assert len(rounds(log)) == 3  # nothing forked after the signal
    finally:
        server.kill()


@pytest.mark.timeout(60)
def test_a_worker_that_ran_a_while_is_replaced_at_once(modeldir: Path, tmp_path: Path) -> None:
    log = tmp_path / "forks.log"
    with ServerProcess("exp", "--wrapper", DYING, "--workers", "2",
                       env={"DYING_LOG": str(log)}) as server:
        before = worker_pids(server)
        time.sleep(5.2)  # past the 5 s in which a death counts as "at start"
        victim = next(iter(before))
        killed = time.monotonic()
        os.kill(victim, signal.SIGKILL)
        deadline = killed + 5
        while len(forks(log)) < 3 and time.monotonic() < deadline:
            time.sleep(0.02)
        replaced_at, replacement = forks(log)[-1]
        assert replaced_at - killed < 0.5
        assert worker_pids(server) == before - {victim} | {replacement}
        assert pids_answering(server.url, 40) <= worker_pids(server)
        assert any(line.endswith(f"worker {victim} exited (killed by SIGKILL); starting a new one")
                   for line in server.stderr_lines), server.output()


@pytest.mark.timeout(90)
def test_workers_killed_while_serving_never_stop_the_server(
    modeldir: Path, tmp_path: Path
) -> None:
    # A request that kills its worker (what the hostile-input fixes prevent) is backed off like
    # any early death, but must not make the server give up: that would be a remote off switch.
    with ServerProcess("exp", "--wrapper", DYING, "--workers", "2") as server:
        for _ in range(7):
            with pytest.raises(PredictionError):
                predict(server.url, {"die": np.ones(1)}, timeout=30)
        assert server.process is not None and server.process.poll() is None
        reply = predict(server.url, {"x": np.ones(1)}, timeout=30)
        assert int(reply["pid"][0]) in worker_pids(server)
        assert not any(line.startswith("error:") for line in server.stderr_lines)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and deaths(server) < 7:  # the last may be reaped later
            time.sleep(0.05)
        assert deaths(server) == 7


def deaths(server: ServerProcess) -> int:
    return sum("exited (status 4)" in line for line in server.stderr_lines)


@pytest.mark.timeout(60)
def test_a_rolling_reload_is_not_counted_as_workers_dying() -> None:
    # In process: Supervisor forks this test process. Every watch tick reloads, so every worker
    # is replaced within a second of its fork; counted as deaths, 2 would end the run.
    sock = socket.create_server(("127.0.0.1", 0))
    plan = WorkerPlan(workers=2, threads_per_worker=1, watch=0.2, graceful_timeout=1,
                      max_early_deaths=2)

    def serve(sock: socket.socket, activity: Activity) -> int:
        time.sleep(60)  # killed by the supervisor's SIGTERM (SIG_DFL in the worker)
        return 0

    reloads: list[float] = []
    supervisor: Supervisor

    def reload() -> bool:
        reloads.append(time.monotonic())
        if len(reloads) == 6:
            supervisor.stopping = True
        return True

    supervisor = Supervisor(sock, plan, serve, worker_init=lambda threads: None, reload=reload)
    try:
        assert supervisor.run() == 0
    finally:
        gc.unfreeze()
        sock.close()
    assert len(reloads) == 6 and not supervisor.pids
    assert not supervisor.early and not supervisor.due

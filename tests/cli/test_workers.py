"""--workers: one load, N forked workers on one socket, supervised (real server subprocesses)."""

from __future__ import annotations

import os
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from studio_plugins.client import PredictionError, predict
from studio_plugins.testing import ServerProcess
from tests.cli.test_dataplane import metric
from tests.cli.test_serve import get

PID_WRAPPER = str(Path(__file__).parent / "data" / "pid_wrapper.py")


def pids_answering(url: str, requests: int = 64) -> set[int]:
    with ThreadPoolExecutor(16) as pool:
        replies = list(pool.map(lambda _: predict(url, {"x": np.ones(1)}, timeout=30),
                                range(requests)))
    return {int(reply["pid"][0]) for reply in replies}


def worker_pids(server: ServerProcess) -> set[int]:
    """The server's worker processes (children of the parent), from /proc."""
    assert server.process is not None
    parent = server.process.pid
    children = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == parent:
                children.add(int(entry.name))
    return children


@pytest.mark.timeout(120)
def test_four_workers_share_the_load(modeldir: Path) -> None:
    with ServerProcess("exp", "--wrapper", PID_WRAPPER, "--workers", "4") as server:
        assert "Serving exp (4 workers) on" in server.output()
        workers = worker_pids(server)
        assert len(workers) == 4
        answered = pids_answering(server.url, 200)
        assert len(answered) > 1 and answered <= workers
        assert server.process is not None and server.process.pid not in answered
        # /metrics from any one worker counts the requests every worker served; a worker counts a
        # request just after sending its reply, so the last few may land a moment later
        deadline = time.monotonic() + 5
        while True:
            text = get(server.url + "metrics")[1].decode()
            if metric(text, "studio_requests_total", status="200") == 200 or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        assert metric(text, "studio_requests_total", status="200") == 200
        assert text.count("studio_requests_in_flight{pid=") == 4


@pytest.mark.timeout(120)
def test_a_killed_worker_is_replaced(modeldir: Path) -> None:
    with ServerProcess("exp", "--wrapper", PID_WRAPPER, "--workers", "2") as server:
        before = worker_pids(server)
        victim = next(iter(before))
        os.kill(victim, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and (len(worker_pids(server)) < 2
                                               or victim in worker_pids(server)):
            time.sleep(0.1)
        after = worker_pids(server)
        assert victim not in after and len(after) == 2 and after - before
        assert pids_answering(server.url, 40) <= after
        assert any("killed by SIGKILL" in line for line in server.stderr_lines)


@pytest.mark.timeout(120)
def test_sigterm_drains_every_worker_and_exits_0(modeldir: Path) -> None:
    server = ServerProcess("exp", "--wrapper", PID_WRAPPER, "--workers", "2").start()
    results: list[Any] = []

    def slow() -> None:
        results.append(predict(server.url, {"sleep": np.array([2.0])}, timeout=30))

    try:
        threads = [threading.Thread(target=slow) for _ in range(4)]
        for thread in threads:
            thread.start()
        time.sleep(0.7)
        server.signal(signal.SIGTERM)
        for thread in threads:
            thread.join(30)
        assert len(results) == 4
        assert server.wait(timeout=30) == 0
    finally:
        server.kill()


@pytest.mark.timeout(120)
def test_killafter_counts_idleness_across_workers(modeldir: Path) -> None:
    server = ServerProcess("exp", "--wrapper", PID_WRAPPER, "--workers", "2",
                           "--killafter", "2").start()
    try:
        # one busy worker keeps the whole server up past --killafter
        reply = predict(server.url, {"sleep": np.array([4.0])}, timeout=30)
        assert reply["pid"].size == 1
        assert server.wait(timeout=20) == 0
    finally:
        server.kill()


def save_keras(path: Path) -> None:
    os.environ.setdefault("KERAS_BACKEND", "torch")
    keras = pytest.importorskip("keras")
    inputs = keras.Input((64,), name="x")
    hidden = keras.layers.Dense(256, activation="relu")(inputs)
    keras.Model(inputs, keras.layers.Dense(8)(hidden)).save(path)


def save_torchscript(path: Path) -> None:
    torch = pytest.importorskip("torch")
    module = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.ReLU(), torch.nn.Linear(256, 8))
    torch.jit.save(torch.jit.script(module), str(path))


@pytest.mark.timeout(180)
@pytest.mark.parametrize("save", [save_keras, save_torchscript], ids=["keras", "torchscript"])
def test_primed_framework_models_answer_from_four_workers(modeldir: Path, save: Any) -> None:
    # a multi-threaded op in the parent before the fork would hang the workers forever
    name = "model.keras" if save is save_keras else "model.pt"
    save(modeldir / name)
    with ServerProcess("exp", "--workers", "4", "--threads-per-worker", "2") as server:
        batch = np.random.default_rng(0).normal(size=(64, 64)).astype(np.float32)
        with ThreadPoolExecutor(8) as pool:
            replies = list(pool.map(lambda _: predict(server.url, {"a": batch}, timeout=60),
                                    range(16)))
        first = next(iter(replies[0].values()))
        assert first.shape == (64, 8)
        for reply in replies:
            np.testing.assert_allclose(next(iter(reply.values())), first, rtol=1e-5, atol=1e-5)


@pytest.mark.timeout(180)
def test_watch_reloads_every_worker(modeldir: Path) -> None:
    keras = pytest.importorskip("keras")

    def scaler(factor: float, path: Path) -> None:
        inputs = keras.Input((3,), name="x")
        dense = keras.layers.Dense(3, use_bias=False)
        model = keras.Model(inputs, dense(inputs))
        dense.set_weights([factor * np.eye(3, dtype="float32")])
        model.save(path)

    scaler(2.0, modeldir / "a.keras")
    x = np.ones((1, 3), np.float32)
    with ServerProcess("exp", "--workers", "2", "--watch", "0.3") as server:
        assert predict(server.url, {"v": x})["v"][0, 0] == 2.0
        temp = modeldir.parent / "b.keras"
        scaler(7.0, temp)
        temp.rename(modeldir / "b.keras")
        deadline = time.monotonic() + 60
        closed = 0
        while time.monotonic() < deadline:
            values = set()
            for _ in range(20):
                try:
                    values.add(float(predict(server.url, {"v": x})["v"][0, 0]))
                except PredictionError as error:
                    # a connection a draining worker accepted in the instant it stopped is closed
                    # by Hypercorn's graceful shutdown unanswered (seen once in CI); not a wrong answer
                    assert error.status == 0, error
                    closed += 1
            if values == {7.0}:
                break
            time.sleep(0.2)
        assert values == {7.0} and closed <= 2
        assert any("workers now serve the new model" in line for line in server.stderr_lines)
    # the replacement reads as planned: one INFO line per worker, and nothing like a death
    lines = server.stderr_lines
    replaced = [line for line in lines if "rolling reload: worker" in line]
    assert len(replaced) == 2 and all(" INFO " in line for line in replaced), server.output()
    assert all(line.endswith("which finishes its requests and stops") for line in replaced)
    assert not [line for line in lines if " WARNING " in line or " ERROR " in line
                or "exited" in line or "died" in line], server.output()
    # the old workers' own lines name the worker, not "server stopped"
    assert not any(line.endswith("server stopped") for line in lines), server.output()


def test_repository_load_is_refused_in_workers(modeldir: Path) -> None:
    # one worker swapping its own copy would leave the others on the old model
    from tests.cli.test_serve import post

    with ServerProcess("exp", "--workers", "2") as server:
        status, _, body = post(server.url + "v2/repository/models/exp/load", b"{}",
                               "application/json")
        assert status == 409 and b"--watch" in body
        status, _, _ = post(server.url + "v2/repository/models/exp/unload", b"{}",
                            "application/json")
        assert status == 409
    # refused, so nothing was loading (or unloaded): the log must not say so
    assert not any("loading" in line or "unloaded" in line for line in server.stderr_lines), \
        server.output()


@pytest.mark.timeout(60)
def test_workers_do_not_outlive_a_killed_parent(modeldir: Path) -> None:
    server = ServerProcess("exp", "--wrapper", PID_WRAPPER, "--workers", "2").start()
    workers = worker_pids(server)
    assert len(workers) == 2
    server.kill()  # SIGKILL: the parent cannot drain anyone
    deadline = time.monotonic() + 15
    alive = set(workers)
    while alive and time.monotonic() < deadline:
        alive = {pid for pid in alive if Path(f"/proc/{pid}").exists()
                 and "(Z)" not in _state(pid)}
        time.sleep(0.1)
    assert not alive, f"orphaned workers still running: {alive}"


def _state(pid: int) -> str:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return "(Z)"
    return "(Z)" if stat.rsplit(")", 1)[1].split()[0] == "Z" else "(R)"

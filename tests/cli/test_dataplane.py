"""The data plane with the real server: batching, deadlines, overload, metrics, request ids."""

from __future__ import annotations

import json
import logging
import re
import socket
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from studio_plugins.client import PredictionError, predict
from studio_plugins.testing import ServerProcess
from tests.cli.test_serve import get, post

DATA = Path(__file__).parent / "data"
BATCH_WRAPPER = str(DATA / "batch_wrapper.py")
BEHAVIOUR_WRAPPER = str(DATA / "behaviour_wrapper.py")


def metric(text: str, name: str, **labels: str) -> float:
    """The value of one sample in Prometheus text output (0 when absent)."""
    total = 0.0
    for line in text.splitlines():
        if not line.startswith(name + "{") and not line.startswith(name + " "):
            continue
        if all(f'{key}="{value}"' in line for key, value in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


@pytest.mark.timeout(120)
def test_32_concurrent_requests_are_batched_and_each_gets_its_own_rows(modeldir: Path) -> None:
    with ServerProcess("exp", "--wrapper", BATCH_WRAPPER, "--max-batch-size", "8",
                       "--max-batch-delay", "20", "--threads", "4") as server:
        inputs = [np.full((1, 4), i, np.float32) for i in range(32)]
        with ThreadPoolExecutor(32) as pool:
            replies = list(pool.map(lambda x: predict(server.url, {"x": x}, timeout=60), inputs))
        for x, reply in zip(inputs, replies, strict=True):
            np.testing.assert_array_equal(reply["y"], x * 2)  # exactly its own result
        call_sizes = [int(reply["rows_in_call"][0]) for reply in replies]
        assert max(call_sizes) > 1 and all(size <= 8 for size in call_sizes)
        # 32 requests in far fewer than 32 calls
        assert sum(1 / size for size in call_sizes) < 16
        text = get(server.url + "metrics")[1].decode()
        assert metric(text, "studio_batch_size_count", model="exp") < 16
        assert metric(text, "studio_batch_size_sum", model="exp") == 32


@pytest.mark.timeout(120)
def test_with_the_defaults_a_busy_model_gets_batches_and_a_lone_request_runs_alone(
        modeldir: Path) -> None:
    # no batching option given: on by default for a wrapper that declares itself batchable
    with ServerProcess("exp", "--wrapper", BATCH_WRAPPER) as server:
        inputs = [np.full((1, 4), i, np.float32) for i in range(32)]
        with ThreadPoolExecutor(32) as pool:
            replies = list(pool.map(lambda x: predict(server.url, {"x": x}, timeout=60), inputs))
        for x, reply in zip(inputs, replies, strict=True):
            np.testing.assert_array_equal(reply["y"], x * 2)  # exactly its own result
        call_sizes = [int(reply["rows_in_call"][0]) for reply in replies]
        assert max(call_sizes) > 1 and all(size <= 32 for size in call_sizes)
        text = get(server.url + "metrics")[1].decode()
        calls = metric(text, "studio_batch_size_count", model="exp")
        assert calls < 16 and metric(text, "studio_batch_size_sum", model="exp") == 32
        # one connection: every request finds the model idle and runs in a call of its own
        for i in range(5):
            reply = predict(server.url, {"x": np.full((2, 4), i, np.float32)})
            assert reply["rows_in_call"].tolist() == [2, 2]
            np.testing.assert_array_equal(reply["y"], np.full((2, 4), 2 * i))
        text = get(server.url + "metrics")[1].decode()
        assert metric(text, "studio_batch_size_count", model="exp") == calls + 5


def save_doubler(path: Path) -> None:
    """A Keras model x (N, 3) -> 2x."""
    keras = pytest.importorskip("keras")
    inputs = keras.Input((3,), name="x")
    dense = keras.layers.Dense(3, use_bias=False)
    model = keras.Model(inputs, dense(inputs))
    dense.set_weights([2 * np.eye(3, dtype="float32")])
    model.save(path)


@pytest.mark.timeout(120)
def test_a_keras_model_is_batched_by_default_and_each_client_gets_its_rows(modeldir: Path) -> None:
    save_doubler(modeldir / "m.keras")
    with ServerProcess("exp") as server:
        def client(index: int) -> None:
            for step in range(10):
                x = np.full((1 + step % 2, 3), index * 100 + step, np.float32)
                np.testing.assert_array_equal(predict(server.url, {"x": x})["x"], 2 * x)

        with ThreadPoolExecutor(16) as pool:
            list(pool.map(client, range(16)))
        text = get(server.url + "metrics")[1].decode()
        calls = metric(text, "studio_batch_size_count", model="exp")
        assert metric(text, "studio_batch_size_sum", model="exp") == 16 * 15  # every row, once
        assert metric(text, "studio_batch_size_bucket", model="exp", le="2.0") < calls  # batches


@pytest.mark.timeout(120)
def test_mixed_shapes_are_answered_correctly(modeldir: Path) -> None:
    with ServerProcess("exp", "--wrapper", BATCH_WRAPPER, "--max-batch-size", "8") as server:
        inputs = [np.full((1 + i % 3, 2 + i % 2), i, np.float32 if i % 4 else np.float64)
                  for i in range(24)]
        with ThreadPoolExecutor(24) as pool:
            replies = list(pool.map(lambda x: predict(server.url, {"x": x}, timeout=60), inputs))
        for x, reply in zip(inputs, replies, strict=True):
            np.testing.assert_array_equal(reply["y"], x * 2)
            assert reply["y"].dtype == x.dtype


@pytest.mark.timeout(60)
def test_deadline_gives_504_and_the_server_keeps_serving(modeldir: Path) -> None:
    with ServerProcess("exp", "--wrapper", BEHAVIOUR_WRAPPER, "--timeout", "1") as server:
        started = time.monotonic()
        with pytest.raises(PredictionError) as caught:
            predict(server.url, {"sleep": np.array([3.0])}, timeout=30)
        assert caught.value.status == 504 and time.monotonic() - started < 2.5
        assert predict(server.url, {"x": np.ones(1)})["done"] is True


@pytest.mark.timeout(60)
def test_a_full_queue_gives_503_with_retry_after(modeldir: Path) -> None:
    with ServerProcess("exp", "--wrapper", BEHAVIOUR_WRAPPER, "--max-queue", "1") as server:
        slow = threading.Thread(target=predict, args=(server.url, {"sleep": np.array([2.0])}))
        slow.start()
        time.sleep(0.5)
        status, headers, body = post(server.url, b'{"x": [1]}', "application/json")
        assert status == 503 and headers["retry-after"] == "1"
        assert json.loads(body)["type"] == "Overloaded"
        slow.join(30)
        assert predict(server.url, {"x": np.ones(1)})["done"] is True
        text = get(server.url + "metrics")[1].decode()
        assert metric(text, "studio_requests_total", status="503") == 1
        assert metric(text, "studio_requests_total", status="200") == 2


def post_and_leave(url: str, path: str, body: bytes) -> None:
    """Send a request on a raw socket and disconnect without reading the reply."""
    host, port = url.removeprefix("http://").strip("/").split(":")
    with socket.create_connection((host, int(port))) as sock:
        sock.sendall(b"POST %s HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n%s" % (path.encode(), len(body), body))
        time.sleep(0.5)


@pytest.mark.timeout(60)
@pytest.mark.parametrize(("path", "body"), [
    ("/", b'{"sleep": [3]}'),
    ("/v2/models/exp/infer",
     b'{"inputs": [{"name": "sleep", "shape": [1], "datatype": "FP64", "data": [3]}]}'),
], ids=["pickle-route", "v2"])
def test_a_client_that_disconnects_stops_counting(modeldir: Path, path: str, body: bytes) -> None:
    with ServerProcess("exp", "--wrapper", BEHAVIOUR_WRAPPER, "--max-queue", "1") as server:
        post_and_leave(server.url, path, body)
        time.sleep(0.3)  # the client is gone: its slot is free although the model still sleeps
        assert predict(server.url, {"x": np.ones(1)})["done"] is True
        text = get(server.url + "metrics")[1].decode()
        assert metric(text, "studio_requests_total", status="499") == 1


@pytest.mark.timeout(60)
def test_metrics_count_what_happened(modeldir: Path) -> None:
    with ServerProcess("exp", "--wrapper", BEHAVIOUR_WRAPPER) as server:
        for _ in range(3):
            predict(server.url, {"x": np.ones(1)})
        post(server.url, b'{"fail": 1}', "application/json")
        post(server.url, b"not json", "application/json")
        get(server.url + "v2/health/ready")
        status, text_bytes = get(server.url + "metrics")
        text = text_bytes.decode()
        assert status == 200
        assert metric(text, "studio_requests_total", route="/", status="200") == 3
        assert metric(text, "studio_requests_total", status="500") == 1
        assert metric(text, "studio_requests_total", status="400") == 1
        assert metric(text, "studio_request_duration_seconds_count", route="/") == 5
        assert metric(text, "studio_requests_in_flight") == 0
        assert 'studio_model_info{checkpoint="",key="exp",loader="wrapper",model="exp"} 1.0' in text
        assert "studio_model_load_seconds" in text
        assert "/v2/health" not in text  # health checks are not inference


def test_no_metrics_turns_the_route_off(modeldir: Path) -> None:
    with ServerProcess("exp", "--no-metrics") as server:
        assert get(server.url + "metrics")[0] == 404


def test_request_ids_and_the_access_log(modeldir: Path) -> None:
    with ServerProcess("exp", "--access-log") as server:
        status, headers, _ = post(server.url, b'{"a": 1}', "application/json",
                                  {"X-Request-Id": "abc-123"})
        assert status == 200 and headers["x-request-id"] == "abc-123"
        status, headers, _ = post(server.url, b"{", "application/json")
        assert status == 400 and re.fullmatch(r"[0-9a-f]{32}", headers["x-request-id"])
        request = urllib.request.Request(server.url + "v2/health/live")
        with urllib.request.urlopen(request) as response:
            assert response.headers["x-request-id"]
        time.sleep(0.3)
        lines = [line for line in server.stderr_lines if "studio_plugins.access" in line]
        assert any("status=200" in line and "request_id=abc-123" in line and "batch=1" in line
                   and "method=POST path=/ " in line for line in lines), lines
        assert any("status=400" in line for line in lines)


def test_access_log_is_off_by_default(modeldir: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    with ServerProcess("exp") as server:
        post(server.url, b'{"a": 1}', "application/json")
        time.sleep(0.2)
        assert not [line for line in server.stderr_lines if "studio_plugins.access" in line]

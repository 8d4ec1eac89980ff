"""`studio-plug serve` end to end: a real server subprocess on 127.0.0.1, spoken to over HTTP."""

from __future__ import annotations

import json
import pickle
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from studio_plugins import restricted_loads
from studio_plugins.client import PredictionError, predict
from studio_plugins.testing import ServerProcess

WRAPPER = str(Path(__file__).parent / "data" / "behaviour_wrapper.py")


def post(url: str, body: bytes, content_type: str | None = None,
         headers: dict[str, str] | None = None, timeout: float = 30) -> tuple[int, dict[str, str], bytes]:
    request = urllib.request.Request(url, data=body, method="POST", headers=headers or {})
    if content_type is not None:
        request.add_header("Content-Type", content_type)
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read()


def get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def server(modeldir: Path):
    with ServerProcess("exp") as running:
        yield running


@pytest.fixture
def wrapped(modeldir: Path):
    with ServerProcess("exp", "--wrapper", WRAPPER) as running:
        yield running


def test_identity_json_answers_what_it_was_sent(server: ServerProcess) -> None:
    # The original's identity test.
    status, headers, body = post(server.url, b'{"a": "b"}', "application/json")
    assert status == 200 and headers["content-type"] == "application/json"
    assert json.loads(body) == {"a": "b"}


def test_identity_pickle_with_the_client(server: ServerProcess) -> None:
    x = np.random.default_rng(0).normal(size=(2, 3)).astype(np.float32)
    result = predict(server.url, {"x": x, "n": np.int64(7), "s": "text"})
    np.testing.assert_array_equal(result["x"], x)
    assert result["x"].dtype == np.float32 and result["n"] == 7 and result["s"] == "text"


def test_raw_pickle_without_content_type_is_sniffed(server: ServerProcess) -> None:
    body = pickle.dumps({"x": np.arange(4)}, protocol=2)
    status, headers, reply = post(server.url, body, "application/octet-stream")
    assert status == 200 and headers["content-type"] == "application/python-pickle"
    np.testing.assert_array_equal(restricted_loads(reply)["x"], np.arange(4))


def test_accept_picks_the_reply_format(server: ServerProcess) -> None:
    body = pickle.dumps({"x": np.arange(3)})
    status, _, reply = post(server.url, body, "application/python-pickle",
                            {"Accept": "application/json"})
    assert status == 200 and json.loads(reply) == {"x": [0, 1, 2]}


def test_health_and_unknown_routes(server: ServerProcess) -> None:
    assert get(server.url + "v2/health/live") == (200, b'{"live":true}')
    assert get(server.url + "v2/health/ready") == (200, b'{"ready":true}')
    status, body = get(server.url + "nope")
    assert status == 404 and json.loads(body)["error"]
    status, _, body = post(server.url + "models/unknown", b"{}", "application/json")
    assert status == 404 and "unknown" in json.loads(body)["error"]


def request(url: str, method: str) -> tuple[int, Any, bytes]:
    """Status, headers (case-insensitive) and body of a body-less request."""
    try:
        with urllib.request.urlopen(urllib.request.Request(url, method=method), timeout=10) as response:
            return response.status, response.headers, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers, exc.read()


@pytest.mark.parametrize(("method", "path", "allowed"), [
    ("GET", "", {"POST"}),  # the hot path
    ("PUT", "models/exp", {"POST"}),
    ("POST", "v2/health/live", {"GET", "HEAD"}),  # a Starlette route
])
def test_a_wrong_method_is_405_with_allow(server: ServerProcess, method: str, path: str,
                                          allowed: set[str]) -> None:
    status, headers, body = request(server.url + path, method)
    assert status == 405 and json.loads(body)["type"] == "MethodNotAllowed"
    assert {value.strip() for value in (headers.get("Allow") or "").split(",")} == allowed


def test_model_errors_are_500_with_message_and_the_server_survives(wrapped: ServerProcess) -> None:
    status, _, body = post(wrapped.url, b'{"fail": 1}', "application/json")
    error = json.loads(body)
    assert status == 500 and "boom" in error["error"] and error["type"] == "ModelError"
    assert "Traceback" not in body.decode() and "File " not in body.decode()
    status, _, body = post(wrapped.url, b'{"notdict": 1}', "application/json")
    assert status == 500 and "expected a dict" in json.loads(body)["error"]
    status, _, body = post(wrapped.url, pickle.dumps({"object": 1}), "application/python-pickle")
    assert status == 500 and "cannot be encoded" in json.loads(body)["error"]
    assert predict(wrapped.url, {"a": np.ones(2)})["done"] is True


def test_client_raises_with_the_servers_message(wrapped: ServerProcess) -> None:
    with pytest.raises(PredictionError) as caught:
        predict(wrapped.url, {"fail": np.ones(1)})
    assert caught.value.status == 500 and "boom" in caught.value.server_message


@pytest.mark.parametrize("with_wrapper", [False, True])
def test_port_is_honoured_with_and_without_wrapper(modeldir: Path, with_wrapper: bool) -> None:
    port = free_port()
    args = ["exp", "--port", str(port)] + (["--wrapper", WRAPPER] if with_wrapper else [])
    with ServerProcess(*args) as running:
        assert running.url == f"http://127.0.0.1:{port}/"
        assert predict(running.url, {"a": np.ones(1)})["a"] == np.ones(1)


def test_host_all_interfaces(modeldir: Path) -> None:
    with ServerProcess("exp", host="0.0.0.0") as running:
        # a URL a person can open, not 0.0.0.0 (an address to listen on, not to connect to)
        assert running.url.startswith("http://localhost:")
        assert predict(running.url, {"a": np.ones(1)})["a"] == np.ones(1)
        port = running.url.rsplit(":", 1)[1].strip("/")
        assert predict(f"http://127.0.0.1:{port}/", {"a": np.ones(1)})["a"] == np.ones(1)
        assert "listening on every interface: from another machine, http://" in running.output()
        assert "0.0.0.0" not in running.output()


def test_token_is_required_except_for_health(modeldir: Path) -> None:
    with ServerProcess("exp", "--token", "s3cret") as running:
        status, headers, body = post(running.url, b'{"a": 1}', "application/json")
        assert status == 401 and json.loads(body)["type"] == "Unauthorized"
        assert headers.get("www-authenticate") == "Bearer"
        status, _, _ = post(running.url, b'{"a": 1}', "application/json",
                            {"Authorization": "Bearer wrong"})
        assert status == 401
        assert get(running.url + "v2/health/ready")[0] == 200
        assert predict(running.url, {"a": np.ones(1)}, token="s3cret")["a"] == np.ones(1)
        with pytest.raises(PredictionError) as caught:
            predict(running.url, {"a": np.ones(1)})
        assert caught.value.status == 401


def test_token_from_the_environment(modeldir: Path) -> None:
    with ServerProcess("exp", env={"STUDIO_TOKEN": "from-env"}) as running:
        assert post(running.url, b"{}", "application/json")[0] == 401
        assert predict(running.url, {"a": np.ones(1)}, token="from-env")["a"] == np.ones(1)


def test_body_limit_is_413(modeldir: Path) -> None:
    with ServerProcess("exp", "--max-body", "1KiB") as running:
        status, _, body = post(running.url, pickle.dumps({"x": np.zeros(1000)}),
                               "application/python-pickle")
        assert status == 413 and json.loads(body)["type"] == "PayloadTooLarge"
        assert predict(running.url, {"x": np.zeros(10)})["x"].shape == (10,)


@pytest.mark.timeout(60)
def test_killafter_exits_0_when_idle(modeldir: Path) -> None:
    running = ServerProcess("exp", "--killafter", "2").start()
    started = time.monotonic()
    assert running.wait(timeout=15) == 0
    assert 1.5 <= time.monotonic() - started <= 8
    assert "--killafter" in running.output()


@pytest.mark.timeout(60)
def test_killafter_never_exits_during_a_request(modeldir: Path) -> None:
    running = ServerProcess("exp", "--wrapper", WRAPPER, "--killafter", "2").start()
    try:
        result = predict(running.url, {"sleep": np.array([5.0]), "x": np.ones(1)}, timeout=30)
        assert result["done"] is True
        # the 5 s request outlived --killafter 2; the server exits only once it is idle again
        assert running.wait(timeout=15) == 0
        assert "no requests for 2s" in running.output()
    finally:
        running.kill()


def test_killafter_zero_disables(modeldir: Path) -> None:
    with ServerProcess("exp", "--killafter", "0") as running:
        time.sleep(2.5)
        assert running.process is not None and running.process.poll() is None


@pytest.mark.timeout(60)
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_signal_lets_the_request_in_flight_finish(modeldir: Path, signum: int) -> None:
    running = ServerProcess("exp", "--wrapper", WRAPPER).start()
    results: list[Any] = []

    def slow_request() -> None:
        results.append(predict(running.url, {"sleep": np.array([3.0]), "x": np.ones(1)}, timeout=30))

    try:
        thread = threading.Thread(target=slow_request)
        thread.start()
        time.sleep(1.0)
        running.signal(signum)
        thread.join(30)
        assert results and results[0]["done"] is True
        assert running.wait(timeout=15) == 0
    finally:
        running.kill()


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    import os

    return subprocess.run(
        [sys.executable, "-m", "studio_plugins", *args],
        capture_output=True, text=True, timeout=60, env={**os.environ, **(env or {})},
    )


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["serve", "exp", "--store", "gopher://x"], "no experiment store"),
        (["serve", "../escape"], "invalid experiment key"),
        (["serve", "missing"], "no experiment 'missing'"),
        (["serve", "exp", "--wrapper", "/no/such/wrapper.py"], "does not exist"),
        (["serve", "exp", "--loader", "nope"], "no loader named"),
    ],
)
def test_assembly_errors_are_one_line_before_the_port_is_bound(
    modeldir: Path, args: list[str], message: str
) -> None:
    port = free_port()
    started = time.monotonic()
    result = run_cli(*args, "--port", str(port), "--host", "127.0.0.1")
    assert result.returncode == 1, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and message in errors[0]
    assert "Traceback" not in result.stderr and result.stdout == ""
    assert time.monotonic() - started < 30
    with socket.socket() as sock:  # the port was never taken
        sock.bind(("127.0.0.1", port))


def test_port_in_use_is_a_clear_error(modeldir: Path) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        port = sock.getsockname()[1]
        result = run_cli("serve", "exp", "--port", str(port), "--host", "127.0.0.1")
    assert result.returncode == 1 and "already in use" in result.stderr
    assert "Traceback" not in result.stderr


def test_debug_shows_the_traceback(modeldir: Path) -> None:
    result = run_cli("serve", "exp", "--store", "gopher://x", "--debug")
    assert result.returncode != 0 and "Traceback" in result.stderr


def test_experiments_push_and_ls(studio_home: Path, tmp_path: Path) -> None:
    source = tmp_path / "ckpts"
    source.mkdir()
    (source / "notes.txt").write_text("not a checkpoint")
    result = run_cli("experiments", "push", "exp-1", str(source))
    assert result.returncode == 0 and "pushed 1 file" in result.stdout
    assert (studio_home / "experiments" / "exp-1" / "modeldir" / "notes.txt").exists()
    listing = run_cli("experiments", "ls")
    assert listing.returncode == 0
    assert any(line.startswith("exp-1") for line in listing.stdout.splitlines())
    bad = run_cli("experiments", "push", "../x", str(source))
    assert bad.returncode == 1 and "invalid experiment key" in bad.stderr


def test_a_busy_port_fails_before_the_model_is_loaded(modeldir: Path, tmp_path: Path) -> None:
    # a large model should not load for a minute only to find the port taken
    marker = tmp_path / "loaded"
    wrapper = tmp_path / "marking_wrapper.py"
    wrapper.write_text(f"def create_model(modeldir):\n    open({str(marker)!r}, 'w').close()\n"
                       "    return lambda data: data\n")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        port = sock.getsockname()[1]
        result = run_cli("serve", "exp", "--wrapper", str(wrapper), "--port", str(port),
                         "--host", "127.0.0.1")
    assert result.returncode == 1 and "already in use" in result.stderr
    assert not marker.exists()


def test_bearer_scheme_is_case_insensitive_and_form_posts_are_sniffed(modeldir: Path) -> None:
    with ServerProcess("exp", "--token", "s3cret") as running:
        status, _, body = post(running.url, b'{"a": "b"}', "application/x-www-form-urlencoded",
                               {"Authorization": "bearer s3cret"})
        assert status == 200 and json.loads(body) == {"a": "b"}


def test_unknown_routes_name_the_path(server: ServerProcess) -> None:
    status, body = get(server.url + "v3/nothing")
    error = json.loads(body)
    assert status == 404 and error["type"] == "NotFound" and "/v3/nothing" in error["error"]

"""``--grpc-port``: V2 over gRPC from real ``studio-plug serve`` processes, spoken to by Triton's
``tritonclient.grpc`` (a client this project did not write): every worker serves it on the one
port, a killed worker's replacement serves it again, SIGTERM drains a call in flight, the
HTTPS certificate and the token apply, ``--max-body`` bounds a message, ``--killafter`` counts
gRPC calls, and the mistakes one can make with the option fail before anything loads."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import ssl
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import h2.config
import h2.connection
import h2.events
import h2.exceptions
import h2.settings
import numpy as np
import pytest

from plugins.protocols.grpc.listener import MAX_STREAMS
from studio_plugins import ConfigurationError, ServeOptions
from studio_plugins.testing import ServerProcess
from tests.cli.test_serve import free_port, run_cli
from tests.cli.test_workers import PID_WRAPPER, worker_pids
from tests.grpc_raw import RawCall, call_headers
from tests.tls_ca import Tls

grpcclient = pytest.importorskip("tritonclient.grpc")
from tritonclient.utils import InferenceServerException  # noqa: E402

pytestmark = pytest.mark.timeout(120)
TOKEN = "s3cret-grpc"
AUTH = {"authorization": f"Bearer {TOKEN}"}


@pytest.fixture(scope="module")
def served(tls: Tls, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """One server for the module: two workers, HTTPS and gRPC with the test CA's certificate,
    a token, ``--max-body 1MiB``, ``--read-timeout 2`` (which bounds the handshake); ``exp``
    answers its worker's pid (and sleeps when asked), ``ident`` is the identity model. The last
    test of the module stops it (SIGTERM)."""
    home = tmp_path_factory.mktemp("grpc") / "studioml"
    for key in ("exp", "ident"):
        (home / "experiments" / key / "modeldir").mkdir(parents=True)
    env = {"STUDIOML_HOME": str(home), "STUDIO_TOKEN": TOKEN, "STUDIO_STORE": ""}
    with ServerProcess("exp", "--model", "ident=ident", "--wrapper", f"exp={PID_WRAPPER}",
                       "--workers", "2", "--grpc-port", "0", "--certfile", tls.cert,
                       "--keyfile", tls.key, "--max-body", "1MiB", "--read-timeout", "2",
                       env=env) as server:
        assert server.grpc_target.startswith("127.0.0.1:"), server.output()
        assert f"  V2 over gRPC on {server.grpc_target} (TLS)" in server.stdout_lines
        yield server


def client(server: ServerProcess, tls: Tls) -> Any:
    """A new client: a channel (a TCP connection) of its own, so the kernel picks a worker."""
    return grpcclient.InferenceServerClient(server.grpc_target, ssl=True, root_certificates=tls.ca)


def infer(c: Any, model: str, **arrays: np.ndarray) -> Any:
    inputs = []
    for name, array in arrays.items():
        tensor = grpcclient.InferInput(name, list(array.shape),
                                       "FP32" if array.dtype == np.float32 else "INT64")
        tensor.set_data_from_numpy(array)
        inputs.append(tensor)
    return c.infer(model, inputs, headers=AUTH)


def pid_of(c: Any, sleep: float = 0.0) -> int:
    arrays = {"sleep": np.array([sleep], np.float32)} if sleep else {"x": np.ones(1, np.float32)}
    return int(infer(c, "exp", **arrays).as_numpy("pid")[0])


def pids_answering(server: ServerProcess, tls: Tls, calls: int = 24) -> set[int]:
    pids = set()
    for _ in range(calls):
        c = client(server, tls)
        try:
            pids.add(pid_of(c))
        finally:
            c.close()
    return pids


def test_both_workers_answer_over_tls_with_the_token(served: ServerProcess, tls: Tls) -> None:
    workers = worker_pids(served)
    assert len(workers) == 2
    assert pids_answering(served, tls) == workers
    c = client(served, tls)
    try:
        assert c.is_server_live() and c.is_server_ready()  # health needs no token
        array = np.arange(12, dtype=np.float32).reshape(3, 4) / 7
        assert np.array_equal(infer(c, "ident", x=array).as_numpy("x"), array)
        with pytest.raises(InferenceServerException) as refused:
            c.infer("ident", [grpcclient.InferInput("x", [1], "FP32")], headers={
                "authorization": "Bearer wrong"})
        assert refused.value.status() == "StatusCode.UNAUTHENTICATED"
    finally:
        c.close()
    # a client that speaks plain text to the TLS port gets no answer, and nothing breaks
    plain = grpcclient.InferenceServerClient(served.grpc_target)
    with pytest.raises(InferenceServerException):
        plain.is_server_live(client_timeout=5)
    plain.close()


def test_a_message_over_max_body_is_refused_and_the_workers_serve_on(served: ServerProcess,
                                                                      tls: Tls) -> None:
    before = worker_pids(served)
    c = client(served, tls)
    try:
        with pytest.raises(InferenceServerException) as refused:
            infer(c, "ident", x=np.ones(300_000, np.float32))  # 1.2 MB > --max-body 1MiB
        assert refused.value.status() == "StatusCode.RESOURCE_EXHAUSTED"
        small = np.ones(1000, np.float32)
        assert np.array_equal(infer(c, "ident", x=small).as_numpy("x"), small)
    finally:
        c.close()
    assert worker_pids(served) == before


def test_silent_and_garbage_connections_are_closed_and_the_workers_serve_on(
        served: ServerProcess, tls: Tls) -> None:
    before = worker_pids(served)
    host, port = served.grpc_target.rsplit(":", 1)
    silent = socket.create_connection((host, int(port)))
    garbage = socket.create_connection((host, int(port)))
    garbage.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n" + bytes(range(256)) * 64)
    started = time.monotonic()
    for sock in (silent, garbage):
        sock.settimeout(15)
        with sock:
            while sock.recv(4096):  # until the server closes it
                pass
    assert time.monotonic() - started < 8  # --read-timeout 2 bounds the handshake, not gRPC's 120 s
    assert pids_answering(served, tls, 4) <= before == worker_pids(served)


@contextlib.contextmanager
def tls_socket(served: ServerProcess, tls: Tls, timeout: float = 10) -> Iterator[ssl.SSLSocket]:
    """A TLS connection to the gRPC port offering HTTP/2, for frames written by hand as a hostile
    client may write them."""
    host, port = served.grpc_target.rsplit(":", 1)
    context = ssl.create_default_context(cafile=tls.ca)
    context.set_alpn_protocols(["h2"])
    with context.wrap_socket(socket.create_connection((host, int(port)), timeout=timeout),
                             server_hostname=host) as sock:
        yield sock


def test_a_connection_may_open_max_streams_and_gzip_does_not_pass_max_body(
        served: ServerProcess, tls: Tls) -> None:
    """Hostile transport: calls that each send part of a large message and stall buffer it until
    the connection closes, so one connection's calls are bounded (SETTINGS_MAX_CONCURRENT_STREAMS,
    none by gRPC's default); a gzip message of a few KB that inflates past --max-body is
    refused (the limit applies after decompression)."""
    with tls_socket(served, tls) as sock:
        conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
        conn.initiate_connection()
        sock.sendall(conn.data_to_send())
        settings: dict[int, int] = {}
        while not settings:
            for event in conn.receive_data(sock.recv(65536)):
                if isinstance(event, h2.events.RemoteSettingsChanged):
                    settings = {key: value.new_value for key, value in event.changed_settings.items()}
        assert settings.get(h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS) == MAX_STREAMS, settings
        headers = call_headers(served.grpc_target.rsplit(":", 1)[0], metadata=AUTH, scheme="https")
        for _ in range(MAX_STREAMS):  # each claims 1 MiB - 1, sends 10 KB, and stalls
            stream = conn.get_next_available_stream_id()
            conn.send_headers(stream, headers)
            conn.send_data(stream, b"\0" + ((1 << 20) - 1).to_bytes(4, "big") + bytes(10_000))
        sock.sendall(conn.data_to_send())
        with pytest.raises(h2.exceptions.TooManyStreamsError):  # the server's limit, kept by h2
            conn.send_headers(conn.get_next_available_stream_id(), headers)
        c = client(served, tls)
        try:
            with pytest.raises(InferenceServerException) as refused:
                tensor = grpcclient.InferInput("x", [2_000_000], "FP32")  # 8 MB of zeros
                tensor.set_data_from_numpy(np.zeros(2_000_000, np.float32))
                c.infer("ident", [tensor], headers=AUTH, compression_algorithm="gzip")
            assert refused.value.status() == "StatusCode.RESOURCE_EXHAUSTED", refused.value
            assert pid_of(c) in worker_pids(served)  # served while the stalled calls are open
        finally:
            c.close()


def _h2_call(served: ServerProcess, tls: Tls, metadata: dict[str, str], data: bytes
             ) -> tuple[dict[str, str], float]:
    """One ModelInfer over a raw HTTP/2 connection that sends ``data`` (part of a message) and
    then nothing: the trailers the server ends the call with, and the seconds that took."""
    with tls_socket(served, tls, timeout=15) as sock:
        call = RawCall(sock, served.grpc_target.rsplit(":", 1)[0], metadata=metadata, scheme="https")
        call.conn.send_data(call.stream, data)
        call.flush()
        started = time.monotonic()
        return call.trailers(), time.monotonic() - started


def test_a_call_that_stalls_mid_message_is_ended_after_read_timeout(served: ServerProcess,
                                                                  tls: Tls) -> None:
    """It was held, with what it had sent, until its connection closed: now --read-timeout (2 s
    here) bounds the whole message, and the call ends with DEADLINE_EXCEEDED (4)."""
    partial = b"\0" + (100_000).to_bytes(4, "big") + bytes(10_000)  # 10 KB of a 100 KB message
    trailers, seconds = _h2_call(served, tls, AUTH, partial)
    assert trailers["grpc-status"] == "4" and "--read-timeout" in trailers["grpc-message"], trailers
    assert 1.5 < seconds < 6
    # without the token, nothing of the message is waited for: refused at once
    trailers, seconds = _h2_call(served, tls, {}, partial)
    assert trailers["grpc-status"] == "16", trailers  # UNAUTHENTICATED
    assert seconds < 1.5


def test_a_killed_workers_replacement_serves_grpc(served: ServerProcess, tls: Tls) -> None:
    before = worker_pids(served)
    victim = next(iter(before))
    os.kill(victim, signal.SIGKILL)
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and (victim in worker_pids(served)
                                           or len(worker_pids(served)) < 2):
        time.sleep(0.1)
    after = worker_pids(served)
    assert victim not in after and len(after) == 2, served.output()
    (replacement,) = after - before
    # the replacement binds the port itself once its app starts: until then the survivor answers
    deadline = time.monotonic() + 15
    seen: set[int] = set()
    while replacement not in seen and time.monotonic() < deadline:
        seen |= pids_answering(served, tls, 8)
    assert seen <= after and replacement in seen


def test_sigterm_drains_a_grpc_call_in_flight(served: ServerProcess, tls: Tls) -> None:
    # last in the module: it stops the shared server
    results: list[int] = []
    c = client(served, tls)

    def slow() -> None:
        results.append(pid_of(c, sleep=2.0))

    thread = threading.Thread(target=slow)
    thread.start()
    time.sleep(0.7)
    served.signal(signal.SIGTERM)
    thread.join(30)
    c.close()
    assert len(results) == 1 and results[0] > 0  # answered, not cut off
    assert served.wait(timeout=30) == 0
    assert any("SIGTERM received; finishing 1 request(s) in flight" in line
               for line in served.stderr_lines), served.output()


def test_one_process_counts_grpc_calls_against_killafter(modeldir: Path) -> None:
    """Without workers the app's own process serves gRPC; a call longer than --killafter keeps
    the server up until it is answered, then idleness stops it (exit 0)."""
    server = ServerProcess("exp", "--wrapper", PID_WRAPPER, "--grpc-port", "0",
                           "--killafter", "1.5").start()
    try:
        c = grpcclient.InferenceServerClient(server.grpc_target)
        assert server.process is not None
        sleep = grpcclient.InferInput("sleep", [1], "FP32")
        sleep.set_data_from_numpy(np.array([3.0], np.float32))
        reply = c.infer("exp", [sleep])
        assert int(reply.as_numpy("pid")[0]) == server.process.pid
        c.close()
        assert server.wait(timeout=20) == 0
    finally:
        server.kill()


def test_a_taken_grpc_port_fails_before_loading(modeldir: Path, tmp_path: Path) -> None:
    marker = tmp_path / "loaded"
    wrapper = tmp_path / "marking_wrapper.py"
    wrapper.write_text(f"def create_model(modeldir):\n    open({str(marker)!r}, 'w').close()\n"
                       "    return lambda data: data\n")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run_cli("serve", "exp", "--wrapper", str(wrapper), "--port", str(free_port()),
                         "--host", "127.0.0.1", "--grpc-port", str(port))
    assert result.returncode == 1, result.stderr
    assert f"--grpc-port {port} on 127.0.0.1 is already in use" in result.stderr.splitlines()[0]
    assert not marker.exists()


def test_without_the_extra_grpc_port_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    from plugins.protocols.grpc import listener

    found = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "grpc" else found(name, *a))
    with pytest.raises(ConfigurationError, match="--grpc-port needs grpcio, which is not installed"
                       ) as caught:
        listener.GrpcListener().reserve(ServeOptions(keys=("exp",), grpc_port=0))
    assert caught.value.hint == "pip install 'studio-plugins[grpc]'"
    assert listener.GrpcListener().reserve(ServeOptions(keys=("exp",))) is None  # not asked


def test_a_protobuf_too_old_for_the_generated_modules_is_one_line_before_anything_loads(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """``pip install tritonclient[grpc]`` (2.73) beside the server downgraded protobuf to 6.33,
    and ``serve --grpc-port`` then loaded its models and died in three tracebacks."""
    import importlib.metadata

    from plugins.protocols.grpc import listener

    found = importlib.metadata.version
    monkeypatch.setattr(importlib.metadata, "version",
                        lambda name: "6.33.6" if name == "protobuf" else found(name))
    with pytest.raises(ConfigurationError, match=r"--grpc-port needs protobuf >= 7\.35\.1, and "
                       r"6\.33\.6 is installed") as caught:
        listener.GrpcListener().reserve(ServeOptions(keys=("exp",), grpc_port=0))
    assert caught.value.hint is not None and "pip install 'protobuf>=7.35.1'" in caught.value.hint


def test_the_versions_checked_are_those_the_modules_were_generated_for() -> None:
    from plugins.protocols.grpc import grpc_service_pb2_grpc, listener

    assert listener.GENERATED_BY["grpcio"] == tuple(
        int(part) for part in grpc_service_pb2_grpc.GRPC_GENERATED_VERSION.split("."))
    source = (Path(listener.__file__).parent / "grpc_service_pb2.py").read_text()
    major, minor, patch = re.search(r"Domain\.PUBLIC,\s*(\d+),\s*(\d+),\s*(\d+),", source).groups()
    assert listener.GENERATED_BY["protobuf"] == (int(major), int(minor), int(patch))
    with pytest.raises(ConfigurationError, match="--grpc-port and --port are both 5000"):
        listener.GrpcListener().reserve(ServeOptions(keys=("exp",), port=5000, grpc_port=5000))

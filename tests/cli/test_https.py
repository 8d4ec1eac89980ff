"""HTTPS end to end (--certfile/--keyfile, --ca-certs): real servers on 127.0.0.1 with
certificates from a test CA (trustme), spoken to by the Python client, urllib, Triton's V2 client
and a raw socket that sends plain HTTP to the HTTPS port."""

from __future__ import annotations

import contextlib
import socket
import ssl
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from studio_plugins.client import PredictionError, predict
from studio_plugins.testing import ServerProcess
from tests.cli.test_serve import free_port, run_cli
from tests.cli.test_workers import PID_WRAPPER, pids_answering
from tests.tls_ca import Tls

trustme = pytest.importorskip("trustme")
pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def served(tls: Tls, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """One HTTPS server for the module, with two workers: ``exp`` answers its worker's pid,
    ``ident`` is the identity model (for the V2 client). ``--read-timeout 2`` also bounds the TLS
    handshake to 2 s."""
    home = tmp_path_factory.mktemp("https") / "studioml"
    for key in ("exp", "ident"):
        (home / "experiments" / key / "modeldir").mkdir(parents=True)
    env = {"STUDIOML_HOME": str(home), "STUDIO_TOKEN": "", "STUDIO_STORE": "", "STUDIO_CA_FILE": ""}
    with ServerProcess("exp", "--model", "ident=ident", "--wrapper", f"exp={PID_WRAPPER}",
                       "--workers", "2", "--certfile", tls.cert, "--keyfile", tls.key,
                       "--read-timeout", "2", env=env) as server:
        yield server


@pytest.fixture
def no_ca(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> pytest.MonkeyPatch:
    """A client environment that trusts only the system's CAs (no CLI CA, no $STUDIO_CA_FILE)."""
    monkeypatch.setenv("STUDIOML_HOME", str(tmp_path / "empty-home"))
    monkeypatch.delenv("STUDIO_CA_FILE", raising=False)
    monkeypatch.delenv("STUDIO_TOKEN", raising=False)
    return monkeypatch


def health(url: str, context: ssl.SSLContext) -> bytes:
    with urllib.request.urlopen(url + "v2/health/ready", timeout=10, context=context) as response:
        return bytes(response.read())


def test_the_url_is_https_and_requests_verify(served: ServerProcess, tls: Tls, no_ca: pytest.MonkeyPatch
                                              ) -> None:
    assert served.url.startswith("https://127.0.0.1:")
    assert f"(2 workers) on {served.url}" in served.output()
    reply = predict(served.url + "models/ident", {"x": np.arange(3)}, cafile=tls.ca)
    np.testing.assert_array_equal(reply["x"], np.arange(3))
    assert health(served.url, ssl.create_default_context(cafile=tls.ca)) == b'{"ready":true}'
    # by the name in the certificate too
    localhost = served.url.replace("127.0.0.1", "localhost")
    assert health(localhost, ssl.create_default_context(cafile=tls.ca)) == b'{"ready":true}'
    no_ca.setenv("STUDIO_CA_FILE", tls.ca)  # the client's environment names the CA
    assert "pid" in predict(served.url, {"x": np.ones(1)})


def test_a_client_that_does_not_trust_the_ca_refuses(served: ServerProcess, tls: Tls,
                                                     no_ca: pytest.MonkeyPatch) -> None:
    with pytest.raises(PredictionError, match="cannot verify the certificate"):
        predict(served.url, {"x": np.ones(1)})
    with pytest.raises(urllib.error.URLError, match="CERTIFICATE_VERIFY_FAILED"):
        health(served.url, ssl.create_default_context())
    # a CA file that is not the server's is no better
    other = Path(tls.ca).with_name("other-ca.pem")
    trustme.CA().cert_pem.write_to_path(str(other))
    with pytest.raises(PredictionError, match="cannot verify the certificate"):
        predict(served.url, {"x": np.ones(1)}, cafile=other)


def pids_answering_over_https(served: ServerProcess, tls: Tls, env: pytest.MonkeyPatch,
                              requests: int) -> set[int]:
    env.setenv("STUDIO_CA_FILE", tls.ca)
    return pids_answering(served.url, requests)


def plain_http_exchange(url: str) -> bytes:
    """What the HTTPS port answers a plain HTTP request: the bytes read until it closes."""
    host, port = url.removeprefix("https://").rstrip("/").rsplit(":", 1)
    received = b""
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(b"GET /v2/health/ready HTTP/1.1\r\nHost: x\r\n\r\n")
        try:
            while chunk := sock.recv(4096):
                received += chunk
        except ConnectionResetError:
            pass
    return received


def test_plain_http_to_the_https_port_fails_cleanly_and_the_server_keeps_serving(
        served: ServerProcess, tls: Tls, no_ca: pytest.MonkeyPatch) -> None:
    started = time.monotonic()
    for _ in range(4):  # on both workers, most likely
        # closed without a byte: nothing is served in the clear
        assert plain_http_exchange(served.url) == b""
    assert time.monotonic() - started < 10  # closed at once, not left to time out
    with pytest.raises(PredictionError, match="cannot reach"):
        predict(served.url.replace("https://", "http://"), {"x": np.ones(1)}, timeout=10)
    assert len(pids_answering_over_https(served, tls, no_ca, 16)) >= 1
    output = served.output()
    assert "Traceback" not in output and " ERROR " not in output, output


def test_a_client_that_never_completes_the_handshake_is_closed(served: ServerProcess) -> None:
    # it would hold its connection for Hypercorn's 60 s otherwise, before any header timeout
    host, port = served.url.removeprefix("https://").rstrip("/").rsplit(":", 1)
    started = time.monotonic()
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(b"\x16\x03\x01")  # the start of a TLS record, and then nothing
        with contextlib.suppress(ConnectionResetError):
            assert sock.recv(4096) == b""
    assert 1.5 < time.monotonic() - started < 8


def test_both_workers_serve_https(served: ServerProcess, tls: Tls, no_ca: pytest.MonkeyPatch) -> None:
    assert len(pids_answering_over_https(served, tls, no_ca, 64)) == 2


def test_the_v2_client_works_over_tls(served: ServerProcess, tls: Tls) -> None:
    httpclient = pytest.importorskip("tritonclient.http")
    address = served.url.removeprefix("https://").rstrip("/")
    client = httpclient.InferenceServerClient(address, ssl=True, ssl_options={"ca_certs": tls.ca},
                                              network_timeout=30)
    try:
        assert client.is_server_ready() and client.is_model_ready("ident")
        x = np.arange(6, dtype=np.float32).reshape(2, 3)
        tensor = httpclient.InferInput("x", list(x.shape), "FP32")
        tensor.set_data_from_numpy(x, binary_data=True)
        result = client.infer("ident", [tensor])
        np.testing.assert_array_equal(result.as_numpy("x"), x)
    finally:
        client.close()
    untrusting = httpclient.InferenceServerClient(address, ssl=True, network_timeout=30)
    try:
        with pytest.raises(Exception, match=r"(?i)certificate verify failed"):
            untrusting.is_server_ready()
    finally:
        untrusting.close()


def test_ca_certs_admits_only_clients_with_a_certificate(tls: Tls, modeldir: Path) -> None:
    with ServerProcess("exp", "--certfile", tls.cert, "--keyfile", tls.key,
                       "--ca-certs", tls.ca) as server:
        with_cert = ssl.create_default_context(cafile=tls.ca)
        with_cert.load_cert_chain(tls.client)
        reply = predict(server.url, {"x": np.arange(2)}, context=with_cert)
        np.testing.assert_array_equal(reply["x"], np.arange(2))
        with pytest.raises(PredictionError, match="cannot reach"):
            predict(server.url, {"x": np.arange(2)}, cafile=tls.ca)
        # a certificate from another CA is refused as well
        stranger = ssl.create_default_context(cafile=tls.ca)
        foreign = Path(tls.client).with_name("foreign-client.pem")
        trustme.CA().issue_cert("intruder@example.com").private_key_and_cert_chain_pem.write_to_path(
            str(foreign))
        stranger.load_cert_chain(str(foreign))
        with pytest.raises(PredictionError, match="cannot reach"):
            predict(server.url, {"x": np.arange(2)}, context=stranger)
        assert predict(server.url, {"x": np.arange(1)}, context=with_cert)["x"].tolist() == [0]
        assert "Traceback" not in server.output()


@pytest.mark.parametrize(("options", "message"), [
    (["--certfile", "{cert}"], "--certfile needs --keyfile too"),
    (["--certfile", "{cert}", "--keyfile", "{client}"], "is not the private key of the certificate"),
    (["--certfile", "{cert}", "--keyfile", "{key}", "--ca-certs", "/no/such/ca.pem"],
     "cannot read --ca-certs /no/such/ca.pem"),
])
def test_bad_tls_options_exit_1_with_one_line_before_loading(
        tls: Tls, modeldir: Path, tmp_path: Path, options: list[str], message: str) -> None:
    marker = tmp_path / "loaded"
    wrapper = tmp_path / "marking_wrapper.py"
    wrapper.write_text(f"def create_model(modeldir):\n    open({str(marker)!r}, 'w').close()\n"
                       "    return lambda data: data\n")
    port = free_port()
    args = [option.format(cert=tls.cert, key=tls.key, client=tls.client) for option in options]
    result = run_cli("serve", "exp", "--wrapper", str(wrapper), "--port", str(port),
                     "--host", "127.0.0.1", *args)
    assert result.returncode == 1, result.stderr
    assert result.stderr.splitlines()[0].startswith("error: ") and message in result.stderr
    assert len(result.stderr.splitlines()) == 1, result.stderr
    assert result.stdout == "" and not marker.exists()
    with socket.socket() as sock:  # the port was never taken
        sock.bind(("127.0.0.1", port))

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from tests.tls_ca import Tls, issue_tls

# Keras 3 runs on the torch backend here; set before anything imports keras.
os.environ.setdefault("KERAS_BACKEND", "torch")


@pytest.fixture
def studio_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh embedded store: $STUDIOML_HOME in a temp dir, no STUDIO_STORE/TOKEN leaking in."""
    home = tmp_path / "studioml"
    home.mkdir()
    monkeypatch.setenv("STUDIOML_HOME", str(home))
    for variable in ("STUDIO_STORE", "STUDIO_TOKEN", "STUDIO_PLUGINS_DISABLE", "STUDIO_PLUGINS_LOAD"):
        monkeypatch.delenv(variable, raising=False)
    return home


@pytest.fixture
def modeldir(studio_home: Path) -> Path:
    """The (empty) modeldir of experiment ``exp`` in the embedded store."""
    path = studio_home / "experiments" / "exp" / "modeldir"
    path.mkdir(parents=True)
    return path


# --- AWS: moto's standalone server, spoken to over real HTTP (issue 5) ----------------------


class MotoServer:
    """A ThreadedMotoServer on 127.0.0.1 that records every request it answers."""

    def __init__(self) -> None:
        import logging

        from moto.server import ThreadedMotoServer

        logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one line per request otherwise
        self._server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        self._server.start()
        host, port = self._server.get_host_and_port()
        self.url = f"http://{host}:{port}"
        self.requests: list[tuple[str, str, str]] = []
        """(method, path, query) of every request, in order."""
        wsgi = self._server._server
        assert wsgi is not None
        inner = wsgi.app

        def recording_app(environ, start_response):  # type: ignore[no-untyped-def]
            self.requests.append(
                (environ["REQUEST_METHOD"], environ.get("PATH_INFO", ""), environ.get("QUERY_STRING", ""))
            )
            return inner(environ, start_response)

        wsgi.app = recording_app

    def reset(self) -> None:
        import urllib.request

        urllib.request.urlopen(urllib.request.Request(f"{self.url}/moto-api/reset", method="POST")).read()
        self.requests.clear()

    def object_gets(self, bucket: str, key_prefix: str = "") -> list[str]:
        """Paths of the GETs that downloaded objects (listings and other calls left out)."""
        path = f"/{bucket}/{key_prefix}"
        return [p for method, p, query in self.requests
                if method == "GET" and p.startswith(path) and "list-type" not in query]

    def stop(self) -> None:
        self._server.stop()


AWS_ENV_CLEARED = ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN", "AWS_REGION",
                   "AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL_EC2", "AWS_CA_BUNDLE")


@pytest.fixture(scope="session")
def moto_server():
    server = MotoServer()
    yield server
    server.stop()


@pytest.fixture
def aws(moto_server: MotoServer, studio_home: Path, monkeypatch: pytest.MonkeyPatch) -> MotoServer:
    """A fresh, empty moto (S3, EC2, ...) with boto3 pointed at it through the environment only,
    so server subprocesses started by the test reach it exactly as the test does."""
    moto_server.reset()
    for variable in AWS_ENV_CLEARED:
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.setenv("AWS_ENDPOINT_URL", moto_server.url)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(studio_home / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(studio_home / "no-aws-credentials"))
    return moto_server


# --- a small HTTP site for pipe stages that fetch URLs (issue 4) ----------------------------


class HttpSite:
    """A threaded HTTP server on 127.0.0.1 serving ``files`` (path -> bytes), plus ``/never``
    (accepts the request and never answers) and ``/redirect?to=URL`` (a 302 to URL)."""

    def __init__(self) -> None:
        import http.server
        import threading
        from urllib.parse import parse_qs, urlparse

        self.files: dict[str, bytes] = {}
        self.released = threading.Event()
        site = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                parsed = urlparse(self.path)
                if parsed.path == "/never":
                    site.released.wait(60)
                    return
                if parsed.path == "/redirect":
                    self.send_response(302)
                    self.send_header("Location", parse_qs(parsed.query)["to"][0])
                    self.end_headers()
                    return
                body = site.files.get(parsed.path)
                if body is None:
                    self.send_error(404)
                    return
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: object) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        self.base = f"http://127.0.0.1:{self.server.server_address[1]}"

    def url(self, path: str) -> str:
        return self.base + path

    def close(self) -> None:
        self.released.set()
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="module")
def http_site():
    site = HttpSite()
    yield site
    site.close()


# --- AWS fleets: an experiment in moto's S3 and the clients a fleet uses (issue 9) -----------


@pytest.fixture
def fleet_cloud(aws: MotoServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):  # type: ignore[no-untyped-def]
    """moto with experiment ``exp`` (``weights.npy``, a 3x1 matrix) in ``s3://models/prod`` and
    the AMI lookup pointed at moto's public Deep Learning AMI. Returns the EC2, ELBv2 and Auto
    Scaling clients and the weights."""
    from types import SimpleNamespace

    import boto3
    import numpy as np
    from click.testing import CliRunner

    from studio_plugins.cli import build_cli
    from studio_plugins.testing import make_host

    monkeypatch.setenv("STUDIO_EC2_AMI_NAME", "Deep Learning AMI Ubuntu Linux*")
    monkeypatch.setenv("STUDIO_EC2_AMI_OWNER", "898082745236")
    boto3.client("s3").create_bucket(Bucket="models")
    weights = np.array([[1.0], [2.0], [3.0]], np.float32)
    source = tmp_path / "fleet-modeldir"
    source.mkdir()
    np.save(source / "weights.npy", weights)
    pushed = CliRunner().invoke(build_cli(make_host()), ["experiments", "push", "exp", str(source),
                                                         "--store", "s3://models/prod"])
    assert pushed.exit_code == 0, pushed.output
    return SimpleNamespace(ec2=boto3.client("ec2"), elb=boto3.client("elbv2"),
                           asg=boto3.client("autoscaling"), weights=weights)


@pytest.fixture
def identity_repository(studio_home: Path) -> Any:
    """A loaded ModelRepository serving experiment ``exp`` (empty: the identity model)."""
    from core.models.repository import ModelRepository
    from core.types import ServeOptions
    from studio_plugins.testing import make_host

    (studio_home / "experiments" / "exp" / "modeldir").mkdir(parents=True)
    repository = ModelRepository(make_host(), ServeOptions(keys=("exp",)))
    repository.load_all()
    return repository


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> Tls:
    """A test CA's server and client certificates (tests/tls_ca.py); one CA per test module."""
    pytest.importorskip("trustme")
    return issue_tls(tmp_path_factory.mktemp("tls"))

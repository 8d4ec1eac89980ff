"""Which CAs the client trusts for https:// (studio_plugins/tls.py): the ``cafile`` given, else
``$STUDIO_CA_FILE``, else the system's plus the CLI's own CA under ``$STUDIOML_HOME``."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from core.errors import ConfigurationError
from studio_plugins.tls import CA_FILE_ENV, client_context, user_ca_file

trustme = pytest.importorskip("trustme")


def subjects(context: object) -> list[str]:
    """The organisation of each CA a context trusts (trustme names each CA uniquely)."""
    names = []
    for ca in context.get_ca_certs():  # type: ignore[attr-defined]
        for rdn in ca["subject"]:
            names += [value for key, value in rdn if key == "organizationName"]
    return names


def organisation(ca: object) -> str:
    from cryptography import x509
    from cryptography.x509.oid import NameOID

    cert = x509.load_pem_x509_certificate(ca.cert_pem.bytes())  # type: ignore[attr-defined]
    return str(cert.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)[0].value)


@pytest.fixture
def cas(tmp_path: Path, studio_home: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, object]:
    monkeypatch.delenv(CA_FILE_ENV, raising=False)
    made = {name: trustme.CA() for name in ("given", "env", "own")}
    for name, ca in made.items():
        ca.cert_pem.write_to_path(str(tmp_path / f"{name}.pem"))
    return made


def test_the_cafile_given_is_the_only_one_trusted(cas: dict[str, object], tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    user_ca_file().parent.mkdir(parents=True)
    cas["own"].cert_pem.write_to_path(str(user_ca_file()))  # type: ignore[attr-defined]
    monkeypatch.setenv(CA_FILE_ENV, str(tmp_path / "env.pem"))
    assert subjects(client_context(tmp_path / "given.pem")) == [organisation(cas["given"])]
    assert subjects(client_context()) == [organisation(cas["env"])]
    monkeypatch.setenv(CA_FILE_ENV, "")  # empty: unset
    assert organisation(cas["own"]) in subjects(client_context())


def test_the_clis_own_ca_is_trusted_beside_the_systems(cas: dict[str, object]) -> None:
    before = subjects(client_context())
    assert organisation(cas["own"]) not in before
    user_ca_file().parent.mkdir(parents=True)
    cas["own"].cert_pem.write_to_path(str(user_ca_file()))  # type: ignore[attr-defined]
    context = client_context()
    assert organisation(cas["own"]) in subjects(context)
    assert context.check_hostname  # names are checked, not only signatures
    # a new CA in its place (another mtime) is picked up, not the cached context
    replaced = trustme.CA()
    replaced.cert_pem.write_to_path(str(user_ca_file()))
    stat = user_ca_file().stat()
    os.utime(user_ca_file(), ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    assert organisation(replaced) in subjects(client_context())


@pytest.mark.parametrize("content", [None, "not a certificate\n"])
def test_a_ca_file_that_cannot_be_used_is_a_clear_error(cas: dict[str, object], tmp_path: Path,
                                                        content: str | None) -> None:
    path = tmp_path / "bad-ca.pem"
    if content is not None:
        path.write_text(content)
    with pytest.raises(ConfigurationError, match=str(path)):
        client_context(path)


@pytest.mark.parametrize("expired", [True, False])
def test_an_expired_certificate_is_named_and_a_stranger_s_asks_for_its_ca(
        tmp_path: Path, expired: bool) -> None:
    """A certificate past its date used to get the hint for an unknown CA ("pass cafile="),
    which cannot help: the server needs a new certificate (an EC2 one lasts 30 days)."""
    import datetime as dt
    import http.server
    import ssl
    import threading

    import numpy as np

    from studio_plugins.client import PredictionError, predict

    ca = trustme.CA()
    now = dt.datetime.now(dt.UTC)
    leaf = (ca.issue_cert("127.0.0.1", not_before=now - dt.timedelta(days=40),
                          not_after=now - dt.timedelta(days=10)) if expired
            else trustme.CA().issue_cert("127.0.0.1"))  # valid, but from a CA not given
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    leaf.configure_cert(context)

    class Handler(http.server.BaseHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.socket = context.wrap_socket(httpd.socket, server_side=True)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    url = f"https://127.0.0.1:{httpd.server_address[1]}/"
    try:
        with pytest.raises(PredictionError) as raised:
            predict(url, {"x": np.zeros(1)}, cafile=tmp_path / "ca.pem", timeout=10)
    finally:
        httpd.shutdown()
    if expired:
        assert "has expired" in str(raised.value) and "cafile" not in str(raised.value)
        assert "launch it again" in str(raised.value)
    else:
        assert "pass cafile=" in str(raised.value)

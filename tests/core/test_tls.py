"""The server's TLS context (core/process/tls.py): built from --certfile/--keyfile/--ca-certs at
start, each wrong file one ConfigurationError that names it; and the https:// URL it prints."""

from __future__ import annotations

import socket
import ssl
from pathlib import Path

import pytest

from core.errors import ConfigurationError
from core.process.serving import socket_url
from core.process.tls import server_context

trustme = pytest.importorskip("trustme")


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """A certificate and key for 127.0.0.1/localhost, a key of another certificate, an encrypted
    key, a file that is not PEM, and a CA for client certificates."""
    from cryptography.hazmat.primitives.serialization import (
        BestAvailableEncryption,
        Encoding,
        PrivateFormat,
        load_pem_private_key,
    )

    root = tmp_path_factory.mktemp("tls")
    ca, other = trustme.CA(), trustme.CA()
    server = ca.issue_cert("127.0.0.1", "localhost")
    server.cert_chain_pems[0].write_to_path(str(root / "cert.pem"))
    server.private_key_pem.write_to_path(str(root / "key.pem"))
    server.private_key_and_cert_chain_pem.write_to_path(str(root / "both.pem"))
    other.issue_cert("127.0.0.1").private_key_pem.write_to_path(str(root / "other-key.pem"))
    key = load_pem_private_key(server.private_key_pem.bytes(), password=None)
    (root / "encrypted-key.pem").write_bytes(key.private_bytes(
        Encoding.PEM, PrivateFormat.PKCS8, BestAvailableEncryption(b"passphrase")))
    (root / "junk.pem").write_text("not a certificate\n")
    ca.cert_pem.write_to_path(str(root / "clients-ca.pem"))
    return {path.stem: str(path) for path in root.iterdir()}


def test_no_files_is_plain_http() -> None:
    assert server_context(None, None) is None


def test_a_certificate_and_its_key_make_a_server_context(files: dict[str, str]) -> None:
    context = server_context(files["cert"], files["key"])
    assert context is not None and context.verify_mode == ssl.CERT_NONE
    assert context.minimum_version >= ssl.TLSVersion.TLSv1_2
    # one file with both, given to both flags
    assert server_context(files["both"], files["both"]) is not None


def test_ca_certs_requires_client_certificates(files: dict[str, str]) -> None:
    context = server_context(files["cert"], files["key"], files["clients-ca"])
    assert context is not None and context.verify_mode == ssl.CERT_REQUIRED
    # only the CA given is trusted for clients, not the system's
    assert len(context.get_ca_certs()) == 1


@pytest.mark.parametrize(("cert", "key", "ca", "message", "fault"), [
    ("cert", None, None, "--certfile needs --keyfile too", None),
    (None, "key", None, "--keyfile needs --certfile too", None),
    (None, None, "clients-ca", "--ca-certs (verify client certificates) needs HTTPS", None),
    ("missing", "key", None, "cannot read --certfile", "missing"),
    ("cert", "missing", None, "cannot read --keyfile", "missing"),
    ("cert", "key", "missing", "cannot read --ca-certs", "missing"),
    ("junk", "key", None, "--certfile", "junk"),
    ("key", "key", None, "holds no PEM certificate", "key"),
    ("cert", "junk", None, "holds no PEM private key", "junk"),
    ("cert", "cert", None, "holds no PEM private key", "cert"),
    ("cert", "other-key", None, "is not the private key of the certificate", "other-key"),
    ("cert", "encrypted-key", None, "is encrypted with a passphrase", "encrypted-key"),
    ("cert", "key", "junk", "--ca-certs", "junk"),
])
def test_each_wrong_file_is_one_clear_error(files: dict[str, str], tmp_path: Path, cert: str | None,
                                            key: str | None, ca: str | None, message: str,
                                            fault: str | None) -> None:
    def path(name: str | None) -> str | None:
        if name is None:
            return None
        return files.get(name, str(tmp_path / f"{name}.pem"))

    with pytest.raises(ConfigurationError) as raised:
        server_context(path(cert), path(key), path(ca))
    text = raised.value.message
    assert message in text and "\n" not in text
    if fault is not None:  # the file at fault is named
        assert str(path(fault)) in text


def test_a_directory_is_not_a_certificate(files: dict[str, str], tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError, match="cannot read --certfile"):
        server_context(str(tmp_path), files["key"])


def test_the_url_says_https_and_names_the_host_given() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        assert socket_url(sock, "localhost", tls=True) == f"https://localhost:{port}/"
        assert socket_url(sock, "127.0.0.1", tls=True) == f"https://127.0.0.1:{port}/"
        # plain HTTP keeps naming the address
        assert socket_url(sock, "localhost") == f"http://127.0.0.1:{port}/"
    with socket.socket() as sock:
        sock.bind(("0.0.0.0", 0))
        port = sock.getsockname()[1]
        assert socket_url(sock, "0.0.0.0", tls=True) == f"https://localhost:{port}/"

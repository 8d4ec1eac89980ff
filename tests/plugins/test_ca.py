"""The user's own CA (plugins/backends/ec2/ca.py): created once under $STUDIOML_HOME with a
private key, it signs short-lived server certificates for addresses and names; a real server
serving one is verified by the client with the CA (found by itself) and refused without it."""

from __future__ import annotations

import datetime as dt
import ipaddress
import ssl
import stat
import threading
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from plugins.backends.ec2.ca import SERVER_DAYS, CertificateAuthority, user_ca_key_file
from studio_plugins import ConfigurationError
from studio_plugins.client import PredictionError, predict
from studio_plugins.testing import ServerProcess
from studio_plugins.tls import user_ca_file

x509 = pytest.importorskip("cryptography.x509")
from cryptography.x509.oid import ExtendedKeyUsageOID  # noqa: E402


def test_the_ca_is_created_once_with_a_private_key(studio_home: Path) -> None:
    ca = CertificateAuthority.load_or_create()
    assert ca.cert_file == user_ca_file() == studio_home / "tls" / "ca.pem"
    key_file = user_ca_key_file()
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    assert stat.S_IMODE(key_file.parent.stat().st_mode) == 0o700
    assert b"PRIVATE KEY" not in ca.cert_file.read_bytes()
    constraints = ca.certificate.extensions.get_extension_for_class(x509.BasicConstraints).value
    assert constraints.ca and constraints.path_length == 0
    # the next command uses the same CA: clients that trust it keep trusting it
    again = CertificateAuthority.load_or_create()
    assert again.certificate == ca.certificate and again.cert_pem == ca.cert_pem


def test_commands_at_once_create_one_ca(studio_home: Path) -> None:
    made: list[CertificateAuthority] = []
    threads = [threading.Thread(target=lambda: made.append(CertificateAuthority.load_or_create()))
               for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert len(made) == 4 and len({ca.certificate.serial_number for ca in made}) == 1


def test_a_ca_key_others_can_read_is_refused(studio_home: Path) -> None:
    CertificateAuthority.load_or_create()
    user_ca_key_file().chmod(0o644)
    with pytest.raises(ConfigurationError, match="readable by other users"):
        CertificateAuthority.load_or_create()


def test_a_server_certificate_names_its_address_and_host_and_is_short_lived(studio_home: Path) -> None:
    ca = CertificateAuthority.load_or_create()
    issued = ca.issue(["54.210.1.2", "2001:db8::1"], ["My-Fleet.example.com."])
    cert = x509.load_pem_x509_certificate(issued.cert_pem)
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert names.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("54.210.1.2"),
                                                         ipaddress.ip_address("2001:db8::1")]
    assert names.get_values_for_type(x509.DNSName) == ["my-fleet.example.com"]
    cert.verify_directly_issued_by(ca.certificate)
    assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    usage = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(usage) == [ExtendedKeyUsageOID.SERVER_AUTH]
    lifetime = cert.not_valid_after_utc - dt.datetime.now(dt.UTC)
    assert dt.timedelta(days=SERVER_DAYS - 1) < lifetime <= dt.timedelta(days=SERVER_DAYS)
    assert issued.not_after == cert.not_valid_after_utc
    assert issued.chain_pem == issued.cert_pem + ca.cert_pem
    # each server its own key, never the CA's
    other = ca.issue(["54.210.1.2"], days=2)
    assert other.key_pem != issued.key_pem and b"PRIVATE KEY" in other.key_pem
    assert x509.load_pem_x509_certificate(other.cert_pem).not_valid_after_utc < cert.not_valid_after_utc


@pytest.mark.parametrize(("ips", "names", "message"), [
    ([], [], "needs an IP address or a DNS name"),
    (["300.1.2.3"], [], "is not an IP address"),
    ([], ["bad name.example.com"], "is not a DNS name"),
    ([], ["*.example.com"], "is not a DNS name"),
    ([], ["10.0.0.1"], "is an IP address"),
])
def test_bad_names_are_refused(studio_home: Path, ips: list[str], names: list[str], message: str) -> None:
    with pytest.raises(ConfigurationError, match=message):
        CertificateAuthority.load_or_create().issue(ips, names)


@pytest.mark.timeout(120)
def test_a_server_with_a_certificate_it_signed_is_verified_with_the_ca(
        studio_home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (studio_home / "experiments" / "exp" / "modeldir").mkdir(parents=True)
    monkeypatch.delenv("STUDIO_CA_FILE", raising=False)
    ca = CertificateAuthority.load_or_create()
    issued = ca.issue(["127.0.0.1"])
    cert, key = tmp_path / "server.pem", tmp_path / "server-key.pem"
    cert.write_bytes(issued.chain_pem)
    key.write_bytes(issued.key_pem)
    with ServerProcess("exp", "--certfile", str(cert), "--keyfile", str(key)) as server:
        assert server.url.startswith("https://127.0.0.1:")
        # the client finds the CA under $STUDIOML_HOME by itself
        reply = predict(server.url, {"x": np.arange(3)})
        np.testing.assert_array_equal(reply["x"], np.arange(3))
        # as curl --cacert does with the file the CLI prints
        context = ssl.create_default_context(cafile=str(ca.cert_file))
        with urllib.request.urlopen(server.url + "v2/health/ready", context=context, timeout=10) as r:
            assert r.read() == b'{"ready":true}'
        # without the CA: refused
        monkeypatch.setenv("STUDIOML_HOME", str(tmp_path / "another-home"))
        with pytest.raises(PredictionError, match="cannot verify the certificate"):
            predict(server.url, {"x": np.arange(3)})
        # and the certificate is for 127.0.0.1 only: another name for it is refused
        with pytest.raises(PredictionError, match="cannot verify the certificate"):
            predict(server.url.replace("127.0.0.1", "localhost"), {"x": np.arange(3)},
                    cafile=ca.cert_file)

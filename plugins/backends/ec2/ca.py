"""The user's own certificate authority: it signs the certificates the servers we launch present.

A public CA cannot certify an instance's bare IP address, and a self-signed certificate per server
would leave clients nothing to check. So the CLI keeps one CA per user, created on first use
under ``$STUDIOML_HOME/tls`` (studio_plugins/tls.py names the place): ``ca.pem``, the certificate
clients trust (``curl --cacert``; the Python client finds it by itself), and ``ca-key.pem``, its
private key, mode 0600 in a 0700 directory and refused when others can read it. Each server gets
a fresh key and a certificate for its address and/or DNS name, valid for days, not years.

Keys are ECDSA P-256: small and fast, and accepted by Python's ssl, curl, Triton's client, ACM
and AWS load balancers. ``cryptography`` comes with the ``aws`` extra; it is imported on first
use, as boto3 is.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import getpass
import ipaddress
import os
import re
import socket
import stat
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from studio_plugins import ConfigurationError, MissingDependencyError
from studio_plugins.tls import user_ca_dir, user_ca_file

CA_DAYS = 3650
"""The CA's own lifetime: it is the user's trust anchor, replaced only by deleting it."""
SERVER_DAYS = 30
"""A server certificate's default lifetime: a leaked key is useless within weeks. A launch signs
a new one; a server meant to run longer asks for more (``days``)."""
CLOCK_SKEW = dt.timedelta(minutes=5)
"""Certificates are valid from a little before now: a client whose clock lags still accepts them."""

_DNS_LABEL = re.compile(r"(?!-)[a-z0-9-]{1,63}(?<!-)")


def user_ca_key_file() -> Path:
    """The CA's private key, beside its certificate (``user_ca_file``)."""
    return user_ca_dir() / "ca-key.pem"


@dataclass(frozen=True)
class IssuedCertificate:
    """A server's key and certificate, in PEM, and the CA certificate that signed it."""

    key_pem: bytes
    """The server's private key (PKCS#8, unencrypted): a secret, for the server alone."""
    cert_pem: bytes
    ca_pem: bytes
    not_after: dt.datetime

    @property
    def chain_pem(self) -> bytes:
        """The certificate followed by its CA's: what ``--certfile`` takes."""
        return self.cert_pem + self.ca_pem


def _crypto() -> Any:
    try:
        from cryptography import x509
    except ImportError:
        raise MissingDependencyError("cryptography", "aws") from None
    return x509


class CertificateAuthority:
    """The CA in ``directory`` (default ``$STUDIOML_HOME/tls``): ``load_or_create`` it, then
    ``issue`` server certificates."""

    def __init__(self, key: Any, certificate: Any, cert_file: Path) -> None:
        self._key = key
        self.certificate = certificate
        self.cert_file = cert_file
        """What a client trusts: print it for ``curl --cacert``."""

    @property
    def cert_pem(self) -> bytes:
        from cryptography.hazmat.primitives.serialization import Encoding

        return bytes(self.certificate.public_bytes(Encoding.PEM))

    @classmethod
    def load_or_create(cls, directory: Path | None = None) -> CertificateAuthority:
        """The user's CA, created on first use. Two commands at once create one CA, not two:
        the first holds a lock while it writes."""
        x509 = _crypto()
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.hazmat.primitives.serialization import (
            Encoding,
            PublicFormat,
            load_pem_private_key,
        )

        directory = directory or user_ca_dir()
        cert_file, key_file = directory / user_ca_file().name, directory / user_ca_key_file().name
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        with _locked(directory / ".lock"):
            if not key_file.exists():
                _create(directory, cert_file, key_file)
            _check_private(key_file)
            try:
                key = load_pem_private_key(key_file.read_bytes(), password=None)
                certificate = x509.load_pem_x509_certificate(cert_file.read_bytes())
            except (OSError, ValueError, TypeError) as exc:
                raise ConfigurationError(
                    f"the CA in {directory} cannot be read ({exc})",
                    hint=f"remove {directory} to start a new CA (clients must then trust the "
                    "new ca.pem)") from None
        def spki(public: Any) -> bytes:
            return bytes(public.public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo))

        if (not isinstance(key, ec.EllipticCurvePrivateKey)
                or spki(certificate.public_key()) != spki(key.public_key())):
            raise ConfigurationError(f"{key_file} is not the key of {cert_file}",
                                     hint=f"remove {directory} to start a new CA")
        return cls(key, certificate, cert_file)

    def issue(self, ip_addresses: Iterable[str] = (), dns_names: Iterable[str] = (), *,
              days: int = SERVER_DAYS) -> IssuedCertificate:
        """A new key and a certificate for a server reached at these addresses and names (at
        least one), valid for ``days``, signed by this CA."""
        x509 = _crypto()
        from cryptography.hazmat.primitives import hashes
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.hazmat.primitives.serialization import (
            Encoding,
            NoEncryption,
            PrivateFormat,
        )
        from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

        ips = [_ip(address) for address in ip_addresses]
        names = [_dns_name(name) for name in dns_names]
        if not ips and not names:
            raise ConfigurationError("a server certificate needs an IP address or a DNS name")
        if days < 1:
            raise ConfigurationError(f"a certificate valid for {days} days is never valid")
        key = ec.generate_private_key(ec.SECP256R1())
        now = dt.datetime.now(dt.UTC).replace(microsecond=0)  # as X.509 keeps it
        not_after = min(now + dt.timedelta(days=days), self.certificate.not_valid_after_utc)
        common_name = (names[0] if names else str(ips[0]))[:64]
        ski = x509.SubjectKeyIdentifier.from_public_key(self._key.public_key())
        certificate = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
            .issuer_name(self.certificate.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - CLOCK_SKEW)
            .not_valid_after(not_after)
            .add_extension(x509.SubjectAlternativeName(
                [x509.IPAddress(ip) for ip in ips] + [x509.DNSName(name) for name in names]),
                critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(_key_usage(x509, signing=False), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski),
                           critical=False)
            .sign(self._key, hashes.SHA256())
        )
        return IssuedCertificate(
            key_pem=key.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption()),
            cert_pem=certificate.public_bytes(Encoding.PEM),
            ca_pem=self.cert_pem,
            not_after=not_after,
        )


def _key_usage(x509: Any, *, signing: bool) -> Any:
    """A CA signs certificates (and nothing else); a server signs its handshakes."""
    return x509.KeyUsage(
        digital_signature=not signing, content_commitment=False, key_encipherment=False,
        data_encipherment=False, key_agreement=False, key_cert_sign=signing, crl_sign=signing,
        encipher_only=False, decipher_only=False)


def _create(directory: Path, cert_file: Path, key_file: Path) -> None:
    x509 = _crypto()
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC).replace(microsecond=0)  # as X.509 keeps it
    name = x509.Name([
        x509.NameAttribute(NameOID.ORGANIZATION_NAME, "studio-plug"),
        x509.NameAttribute(NameOID.COMMON_NAME, f"studio-plug CA of {_owner()}"[:64]),
    ])
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - CLOCK_SKEW)
        .not_valid_after(now + dt.timedelta(days=CA_DAYS))
        # it signs server certificates only, never another CA's
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(x509, signing=True), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    # the key is created 0600 (never readable by others, not even for an instant), and the
    # certificate written after it: a CA with a certificate but no key cannot be left behind
    pem = key.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption())
    partial = key_file.with_name(key_file.name + ".partial")
    with contextlib.suppress(FileNotFoundError):
        partial.unlink()
    descriptor = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "wb") as file:
        file.write(pem)
    cert_partial = cert_file.with_name(cert_file.name + ".partial")
    cert_partial.write_bytes(certificate.public_bytes(Encoding.PEM))
    os.replace(cert_partial, cert_file)
    os.replace(partial, key_file)  # last: its presence means the CA is complete


def _check_private(key_file: Path) -> None:
    mode = key_file.stat().st_mode
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise ConfigurationError(
            f"the CA key {key_file} is readable by other users (mode {stat.S_IMODE(mode):o}): "
            "whoever reads it can impersonate your servers",
            hint=f"chmod 600 {key_file}; if others may have read it, remove {key_file.parent} "
            "to start a new CA")


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    import fcntl

    descriptor = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX)
        yield
    finally:
        os.close(descriptor)  # releases the lock


def _owner() -> str:
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = "user"
    return f"{user}@{socket.gethostname()}"


def _ip(address: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    try:
        return ipaddress.ip_address(address)
    except ValueError:
        raise ConfigurationError(f"{address!r} is not an IP address") from None


def _dns_name(name: str) -> str:
    """A host name as a certificate names it: ASCII (IDNA) labels, lower case, no trailing dot.
    No wildcards: each server's certificate names that server."""
    candidate = name.strip().rstrip(".").lower()
    with contextlib.suppress(ValueError):
        ipaddress.ip_address(candidate)
        raise ConfigurationError(f"{name!r} is an IP address: give it as one, not as a DNS name")
    if len(candidate) > 253 or not all(_DNS_LABEL.fullmatch(label) for label in candidate.split(".")):
        raise ConfigurationError(f"{name!r} is not a DNS name a certificate can name")
    return candidate

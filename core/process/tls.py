"""HTTPS: the server's TLS context, built and checked once, at start.

``--certfile``/``--keyfile`` (and ``--ca-certs``) are read here, in the process that binds the
socket, before any model is loaded: a missing, unreadable or mismatched file is one
``ConfigurationError`` line, never a traceback from inside Hypercorn or a forked worker. The one
context is then handed to Hypercorn in every serving process (core/process/serving.py), so each
connection on the socket we bound is TLS-wrapped, under ``--workers N`` too, and the key is read
from disk once.

The settings are Hypercorn's (TLS 1.2 at least, its cipher list, no compression) over Python's
server defaults, but ALPN offers HTTP/1.1 only: the limits that guard against slow and greedy
clients (``hypercorn_config``) are HTTP/1.1's, and plain HTTP serves HTTP/1.1 too.
"""

from __future__ import annotations

import ssl

from hypercorn.config import Config

from core.errors import ConfigurationError


class _EncryptedKey(Exception):
    """The key file asked for a passphrase (OpenSSL would otherwise prompt on the terminal)."""


def _no_passphrase() -> bytes:
    raise _EncryptedKey


def _readable(flag: str, path: str) -> None:
    try:
        with open(path, "rb") as file:
            file.read(1)
    except OSError as exc:
        raise ConfigurationError(f"cannot read {flag} {path}: {exc.strerror or exc}") from None


def server_context(certfile: str | None, keyfile: str | None,
                   ca_certs: str | None = None) -> ssl.SSLContext | None:
    """The server's TLS context for these options; None for plain HTTP (none of them given).

    ``ca_certs``: clients must present a certificate signed by a CA in that file (only there:
    not the system's CAs)."""
    if certfile is None and keyfile is None:
        if ca_certs is not None:
            raise ConfigurationError(
                "--ca-certs (verify client certificates) needs HTTPS: give --certfile and "
                "--keyfile too")
        return None
    if certfile is None or keyfile is None:
        given, missing = ("--certfile", "--keyfile") if keyfile is None else ("--keyfile", "--certfile")
        raise ConfigurationError(
            f"{given} needs {missing} too: HTTPS takes the certificate and its private key "
            "(both flags may name one file that holds both), or neither for plain HTTP")
    for flag, path in (("--certfile", certfile), ("--keyfile", keyfile), ("--ca-certs", ca_certs)):
        if path is not None:
            _readable(flag, path)
    _check_certificates("--certfile", certfile)
    defaults = Config()
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.set_ciphers(defaults.ciphers)
    context.options |= ssl.OP_NO_COMPRESSION
    context.set_alpn_protocols(["http/1.1"])
    try:
        context.load_cert_chain(certfile, keyfile, password=_no_passphrase)
    except _EncryptedKey:
        raise ConfigurationError(
            f"--keyfile {keyfile} is encrypted with a passphrase, which the server cannot ask "
            "for: decrypt it (openssl pkey -in KEY -out PLAIN_KEY) and keep that file private"
        ) from None
    except ssl.SSLError as exc:
        if exc.reason == "KEY_VALUES_MISMATCH":
            raise ConfigurationError(
                f"--keyfile {keyfile} is not the private key of the certificate in "
                f"--certfile {certfile}") from None
        raise ConfigurationError(f"--keyfile {keyfile} holds no PEM private key ({exc.reason or exc})"
                                 ) from None
    if ca_certs is not None:
        _check_certificates("--ca-certs", ca_certs)
        context.load_verify_locations(cafile=ca_certs)
        context.verify_mode = ssl.CERT_REQUIRED
    return context


def _check_certificates(flag: str, path: str) -> None:
    """That ``path`` holds at least one PEM certificate: said before a key error could hide it."""
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_verify_locations(cafile=path)
    except (ssl.SSLError, ValueError) as exc:
        reason = getattr(exc, "reason", None) or exc
        raise ConfigurationError(f"{flag} {path} holds no PEM certificate ({reason})") from None

"""Which certificate authorities a client trusts for a studio-plug server over HTTPS.

A server the CLI launched in the cloud presents a certificate signed by the user's own CA, which
the CLI keeps under ``$STUDIOML_HOME`` (plugins/backends/ec2/ca.py creates it; its certificate's
path is defined here, where the client and that module can both import it). The client trusts, in
this order: the ``cafile`` it is given; else ``$STUDIO_CA_FILE``; else the system's CAs and, when
it exists, the CLI's CA (so a server with a public certificate verifies too); a file given
explicitly is the only one trusted, as with ``curl --cacert``.
"""

from __future__ import annotations

import functools
import os
import ssl
from pathlib import Path

from core.errors import ConfigurationError
from core.models.experiments import studio_home

CA_FILE_ENV = "STUDIO_CA_FILE"
"""A PEM file of the CAs to trust instead of the system's (as ``--cacert`` is to curl)."""


def user_ca_dir() -> Path:
    """Where the CLI keeps the user's CA: ``$STUDIOML_HOME/tls``."""
    return studio_home() / "tls"


def user_ca_file() -> Path:
    """The certificate (public) of the user's CA: what ``curl --cacert`` and clients trust."""
    return user_ca_dir() / "ca.pem"


def client_context(cafile: str | os.PathLike[str] | None = None) -> ssl.SSLContext:
    """A TLS context that verifies the server's certificate and name, trusting ``cafile``, else
    ``$STUDIO_CA_FILE``, else the system's CAs plus the user's own CA when it exists."""
    explicit = cafile if cafile is not None else os.environ.get(CA_FILE_ENV) or None
    if explicit is not None:
        return _context(str(explicit), _mtime(str(explicit)), only=True)
    own = user_ca_file()
    try:
        mtime = own.stat().st_mtime_ns
    except OSError:
        return _context(None, 0, only=False)
    return _context(str(own), mtime, only=False)


def _mtime(path: str) -> int:
    try:
        return os.stat(path).st_mtime_ns
    except OSError as exc:
        raise ConfigurationError(f"cannot read the CA file {path}: {exc.strerror or exc}",
                                 hint=f"pass cafile= or set ${CA_FILE_ENV} to a PEM file") from None


@functools.lru_cache(maxsize=8)
def _context(path: str | None, mtime: int, *, only: bool) -> ssl.SSLContext:
    """Built once per file and version (``mtime``): loading the system's CAs takes milliseconds,
    more than a small request."""
    try:
        if only:
            return ssl.create_default_context(cafile=path)
        context = ssl.create_default_context()
        if path is not None:
            context.load_verify_locations(cafile=path)
        return context
    except OSError as exc:  # ssl.SSLError is one
        raise ConfigurationError(f"the CA file {path} holds no PEM certificate ({exc})") from None

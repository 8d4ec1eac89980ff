"""A test CA's files for the HTTPS and gRPC-over-TLS servers (``tls`` fixture in conftest.py)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass
class Tls:
    """Files of one test CA: a server certificate for 127.0.0.1 and localhost, its key, the CA's
    certificate (what clients trust), and a client certificate with its key in one file."""

    cert: str
    key: str
    ca: str
    client: str
    authority: object


def issue_tls(root: Path) -> Tls:
    """A fresh trustme CA under ``root`` and the files ``Tls`` names."""
    import trustme

    ca = trustme.CA()
    server = ca.issue_cert("127.0.0.1", "localhost")
    paths = {name: str(root / f"{name}.pem") for name in ("cert", "key", "ca", "client")}
    server.cert_chain_pems[0].write_to_path(paths["cert"])
    server.private_key_pem.write_to_path(paths["key"])
    ca.cert_pem.write_to_path(paths["ca"])
    ca.issue_cert("client@example.com").private_key_and_cert_chain_pem.write_to_path(paths["client"])
    return Tls(**paths, authority=ca)

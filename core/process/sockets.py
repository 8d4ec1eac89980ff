"""The server's listening sockets: bound by us before anything serves, so ``--port 0`` can report
the port it got, a taken port fails before a long model load, and worker processes share the
socket (core/process/serving.py hands it to Hypercorn; a plugin's listener reserves its own)."""

from __future__ import annotations

import errno
import socket

from core.errors import ConfigurationError

LOCAL_NAMES = {"localhost": "127.0.0.1"}
"""``--host localhost`` binds the loopback address, not whatever the resolver lists first."""


def bind_socket(host: str, port: int, backlog: int = 1024, *, flag: str = "--port",
                reserve_only: bool = False) -> socket.socket:
    """A listening TCP socket on ``host:port`` (port 0: any free port).

    ``reserve_only``: bound with ``SO_REUSEPORT`` and not listening, which holds the port (no
    one else takes it, and 0 becomes a real port) while receiving nothing, for a listener that
    each serving process binds again itself (the gRPC one). ``flag`` names the option in errors.
    """
    address = LOCAL_NAMES.get(host, host)
    try:
        infos = socket.getaddrinfo(address, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise ConfigurationError(f"cannot resolve --host {host!r}: {exc}") from None
    family, _, _, _, sockaddr = infos[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        if reserve_only:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            sock.bind(sockaddr)
            return sock
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(sockaddr)
        sock.listen(backlog)
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise ConfigurationError(
                f"{flag} {port} on {host} is already in use", hint=f"choose another {flag} (0: any)"
            ) from None
        if exc.errno == errno.EADDRNOTAVAIL:
            raise ConfigurationError(f"--host {host} is not an address of this machine") from None
        raise ConfigurationError(f"cannot bind {flag} {port} on {host}: {exc.strerror}") from None
    sock.set_inheritable(True)
    return sock

"""``--grpc-port``: the Open Inference Protocol over gRPC, a listener beside HTTP in every serving
process (the protocol itself, ``inference.GRPCInferenceService``, is servicer.py's).

The launching process only reserves the port: a socket bound with ``SO_REUSEPORT`` and never
listened on, so ``--grpc-port 0`` is decided once and a taken port fails before any model loads.
gRPC's core starts threads that do not survive a fork, so nothing of it is imported there: each
serving process (every worker of ``--workers N``, a replacement too) builds its own
``grpc.aio.Server`` on its own event loop and binds the reserved port with ``SO_REUSEPORT`` as
well; the kernel spreads connections over the workers that listen (the parent's socket is in no
accept queue). The server's limits and TLS apply: ``--max-body`` is the largest message taken,
``--certfile``/``--keyfile`` (and ``--ca-certs``) make it TLS (client certificates required with
the last), read once here, at start.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import re
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from studio_plugins import (
    ConfigurationError,
    Listener,
    OpenListener,
    ServeOptions,
    ServingContext,
    bind_socket,
    hookimpl,
)

if TYPE_CHECKING:
    import grpc

HANDSHAKE = 10.0
"""Seconds a new connection has for its (TLS and) HTTP/2 handshake."""
IDLE = 300.0
"""Seconds a connection may carry no call before the server closes it (GOAWAY): gRPC's default
keeps it forever, so idle connections would pile up. A client's channel reconnects by itself."""
MAX_STREAMS = 256
"""Calls one connection may have open at once (HTTP/2 SETTINGS_MAX_CONCURRENT_STREAMS): gRPC's
default is no limit, and each open call buffers what its client sent of a message (gRPC opens the
flow-control window to the length the message claims, up to --max-body) until it is whole, so
one connection of 4000 calls that each sent 60 KB of a 1 MB message and stalled held 240 MB, for
as long as the connection stayed open. This bounds one connection to this many times --max-body,
and since the handlers read the message themselves (service.py), for --read-timeout at most,
only after the token, and never on the calls that need none.
256 is --max-queue's default: one channel can still fill the queue (a burst past the limit is
refused by gRPC's core with ``UNAVAILABLE``, as --max-queue refuses: a status to retry)."""
_PEM = re.compile(rb"-----BEGIN ([A-Z0-9 ]+)-----\r?\n.*?-----END \1-----\r?\n?", re.DOTALL)


GENERATED_BY = {"grpcio": (1, 85, 1), "protobuf": (7, 35, 1)}
"""The versions the checked-in ``*_pb2*`` modules need at least (they were generated for them,
and refuse older ones when imported, after the models have loaded); pyproject's ``grpc`` extra
says the same."""


def _version(distribution: str) -> tuple[int, ...] | None:
    try:
        found = re.match(r"\d+(\.\d+)*", importlib.metadata.version(distribution))
    except importlib.metadata.PackageNotFoundError:
        return None
    return tuple(int(part) for part in found.group(0).split(".")) if found else None


def _require_extra() -> None:
    """Checked without importing grpc: the launching process may fork workers after this."""
    missing = [name for name, module in (("grpcio", "grpc"), ("protobuf", "google.protobuf"))
               if importlib.util.find_spec(module) is None]
    if missing:
        raise ConfigurationError(
            f"--grpc-port needs {' and '.join(missing)}, which is not installed",
            hint="pip install 'studio-plugins[grpc]'")
    for distribution, needed in GENERATED_BY.items():
        # e.g. a client that pins protobuf<7 (tritonclient 2.73), installed beside the server
        found = _version(distribution)
        if found is not None and found < needed:
            wanted = ".".join(map(str, needed))
            raise ConfigurationError(
                f"--grpc-port needs {distribution} >= {wanted}, and {'.'.join(map(str, found))} is "
                "installed (something installed later may have downgraded it)",
                hint=f"pip install '{distribution}>={wanted}'; a client that needs an older one "
                "goes in an environment of its own")


def _pem_blocks(path: str, kinds: tuple[str, ...]) -> bytes:
    """The PEM blocks of ``kinds`` in ``path``: a certificate file may hold its key too (and
    the reverse), which gRPC would not take as a certificate chain or a key. The files were
    checked already (the HTTP server's TLS context is built first)."""
    try:
        with open(path, "rb") as file:
            data = file.read()
    except OSError as exc:
        raise ConfigurationError(f"cannot read {path}: {exc.strerror or exc}") from None
    blocks = [m.group(0) for m in _PEM.finditer(data) if m.group(1).decode().endswith(kinds)]
    if not blocks:
        raise ConfigurationError(f"{path} holds no PEM {kinds[0].lower()} for gRPC's TLS")
    return b"".join(block if block.endswith(b"\n") else block + b"\n" for block in blocks)


@dataclass(frozen=True)
class Credentials:
    """PEM bytes for ``grpc.ssl_server_credentials``, read in the launching process."""

    key: bytes
    chain: bytes
    client_cas: bytes | None = None

    @classmethod
    def from_options(cls, options: ServeOptions) -> Credentials | None:
        if not options.certfile:
            return None
        keyfile = options.keyfile or options.certfile
        return cls(_pem_blocks(keyfile, ("PRIVATE KEY",)),
                   _pem_blocks(options.certfile, ("CERTIFICATE",)),
                   _pem_blocks(options.ca_certs, ("CERTIFICATE",)) if options.ca_certs else None)


def _target(sock: socket.socket) -> str:
    """``host:port`` of the reserved socket, as gRPC binds it (IPv6 in brackets)."""
    host, port = sock.getsockname()[:2]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class GrpcPort(OpenListener):
    """The reserved port; ``start`` serves it in this process (each worker its own server)."""

    def __init__(self, sock: socket.socket, options: ServeOptions, credentials: Credentials | None
                 ) -> None:
        self.sock = sock
        self.target = _target(sock)
        self.max_body = options.max_body
        self.read_timeout = options.read_timeout
        # a client that connects and says nothing is closed as HTTPS does it (core's
        # hypercorn_config): 10 s for the handshake, or --read-timeout when shorter
        self.handshake = min(HANDSHAKE, options.read_timeout) if options.read_timeout > 0 else HANDSHAKE
        self.credentials = credentials
        host, port = sock.getsockname()[:2]
        if host in ("0.0.0.0", "::"):
            shown = f"localhost:{port}"  # an address to listen on, not one to connect to
        elif credentials:  # as --host named it, as the HTTPS URL does: a certificate names hosts
            shown = f"[{options.host}]:{port}" if ":" in options.host else f"{options.host}:{port}"
        else:
            shown = self.target
        self.description = f"V2 over gRPC on {shown}{' (TLS)' if credentials else ''}"
        self.server: grpc.aio.Server | None = None

    async def start(self, context: ServingContext) -> None:
        import grpc  # here, after the fork: see the module's docstring

        from plugins.protocols.grpc.servicer import add_v2_servicer

        server = grpc.aio.server(
            options=[
                ("grpc.so_reuseport", 1),
                ("grpc.max_receive_message_length", self.max_body),
                ("grpc.max_send_message_length", -1),
                ("grpc.server_handshake_timeout_ms", int(self.handshake * 1000)),
                ("grpc.max_connection_idle_ms", int(IDLE * 1000)),
                ("grpc.max_concurrent_streams", MAX_STREAMS),
            ],
        )
        add_v2_servicer(server, context, self.read_timeout)
        try:
            if self.credentials is None:
                bound = server.add_insecure_port(self.target)
            else:
                c = self.credentials
                bound = server.add_secure_port(self.target, grpc.ssl_server_credentials(
                    [(c.key, c.chain)], root_certificates=c.client_cas,
                    require_client_auth=c.client_cas is not None))
        except RuntimeError as exc:  # gRPC says only that it failed
            raise ConfigurationError(f"gRPC cannot listen on {self.target}: {exc}") from None
        if not bound:
            raise ConfigurationError(f"gRPC cannot listen on {self.target}")
        await server.start()
        self.server = server

    async def stop(self, grace: float) -> None:
        server, self.server = self.server, None
        if server is not None:
            await server.stop(grace)

    def wait_started(self, timeout: float) -> None:
        """A TCP connection to the port succeeds once some worker listens on it (the kernel
        hands connections to listening sockets only); none is made before."""
        host, port = self.sock.getsockname()[:2]
        host = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(host, host)
        deadline = time.monotonic() + timeout
        while True:
            try:
                with socket.create_connection((host, port), timeout=1.0):
                    return
            except OSError:
                if time.monotonic() >= deadline:
                    return  # the workers' own log says why; the server goes on
                time.sleep(0.05)

    def release(self) -> None:
        self.sock.close()


class GrpcListener(Listener):
    name = "grpc"

    def reserve(self, options: ServeOptions) -> OpenListener | None:
        if options.grpc_port is None:
            return None
        if options.grpc_port and options.grpc_port == options.port:
            raise ConfigurationError(f"--grpc-port and --port are both {options.port}: gRPC needs "
                                     "a port of its own", hint="e.g. --grpc-port 8001")
        _require_extra()
        credentials = Credentials.from_options(options)
        return GrpcPort(
            bind_socket(options.host, options.grpc_port, flag="--grpc-port", reserve_only=True),
            options, credentials)


@hookimpl
def studio_register_listeners(register: Callable[[Listener], None]) -> None:
    register(GrpcListener())

"""One gRPC call on a raw HTTP/2 connection (the ``h2`` package), its frames written by hand as a
hostile client may write them: what it sends after the headers is up to the test."""

from __future__ import annotations

import socket
from collections.abc import Mapping

import h2.config
import h2.connection
import h2.events


def call_headers(authority: str, method: str = "ModelInfer", metadata: Mapping[str, str] | None = None,
                 scheme: str = "http") -> list[tuple[str, str]]:
    """The request headers of a call to ``inference.GRPCInferenceService/<method>``."""
    return [(":method", "POST"), (":scheme", scheme), (":authority", authority),
            (":path", f"/inference.GRPCInferenceService/{method}"),
            ("content-type", "application/grpc"), ("te", "trailers"), *(metadata or {}).items()]


class RawCall:
    """The call's headers sent on ``sock`` (plain TCP or TLS with ALPN h2); ``conn`` and
    ``stream`` for what the test sends next."""

    def __init__(self, sock: socket.socket, authority: str, method: str = "ModelInfer",
                 metadata: Mapping[str, str] | None = None, scheme: str = "http") -> None:
        self.sock = sock
        self.conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
        self.conn.initiate_connection()
        self.stream = self.conn.get_next_available_stream_id()
        self.conn.send_headers(self.stream, call_headers(authority, method, metadata, scheme))
        self.flush()

    def flush(self) -> None:
        self.sock.sendall(self.conn.data_to_send())

    def trailers(self) -> dict[str, str]:
        """The headers (trailers, or a trailers-only reply) the server ends the call with."""
        while True:
            received = self.sock.recv(65536)
            assert received, "the server closed the connection without ending the call"
            for event in self.conn.receive_data(received):
                if isinstance(event, h2.events.TrailersReceived | h2.events.ResponseReceived):
                    headers = {k.decode(): v.decode() for k, v in event.headers}
                    if "grpc-status" in headers:
                        return headers
            self.flush()

    def status(self) -> str:
        return self.trailers()["grpc-status"]

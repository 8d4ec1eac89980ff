"""The seam between the gRPC listener (listener.py) and the protocol: ``add_v2_servicer``.

Importing this module needs nothing beyond the core install; grpc and protobuf (the ``grpc``
extra) are imported when a servicer is added, so a server without them fails only if it was asked
to serve gRPC, with the line that says what to install.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from studio_plugins import MissingDependencyError, ServingContext

if TYPE_CHECKING:
    import grpc


def add_v2_servicer(server: grpc.aio.Server, context: ServingContext, read_timeout: float = 0.0
                    ) -> None:
    """Serve V2 (``inference.GRPCInferenceService``, plugins/protocols/grpc/service.py) on
    ``server``, a ``grpc.aio.Server`` not yet started, for the server's models in ``context``.
    ``read_timeout`` (``--read-timeout``; 0: none): seconds a call's request message may take
    to arrive whole.

    The message size limit (``--max-body``), the port and TLS are the listener's: the servicer
    bounds what a message decodes to by ``context.max_body`` on its own."""
    try:
        from .service import add_service
    except ImportError as exc:
        missing = exc.name or "grpcio"
        if not missing.startswith(("grpc", "google")):
            raise
        raise MissingDependencyError("grpcio and protobuf", "grpc") from exc
    add_service(server, context, read_timeout)

"""studio-plug: serve a trained model from its experiment's checkpoints in one command.

What users and plugin authors import. A plugin is a module (or object) with ``@hookimpl``
functions named after the hooks in ``core.hookspecs``; see docs/plugins.md.
"""

from __future__ import annotations

from pathlib import Path

from core.errors import (
    BackendError,
    BadRequest,
    ConfigurationError,
    ExperimentError,
    LoadError,
    MissingDependencyError,
    ModelError,
    NotFound,
    Overloaded,
    PayloadTooLarge,
    RequestTimeout,
    StoreError,
    StudioError,
    UnknownExperiment,
)
from core.hookspecs import hookimpl
from core.http.body import ClientGone, read_body
from core.http.failed_keys import failed_headers
from core.http.offload import decode_off_loop
from core.http.replies import ErrorReply, error_reply
from core.models.experiments import studio_home, validate_key
from core.options import serve_argv, serve_environment
from core.process.sockets import bind_socket
from core.types import (
    Backend,
    Codec,
    CreateModel,
    ExperimentInfo,
    ExperimentStore,
    FileInfo,
    LaunchContext,
    Listener,
    Loader,
    LoadOptions,
    ModelFn,
    ModelReply,
    ModelSpec,
    ModelState,
    OpenListener,
    Payload,
    Reply,
    RouteFactory,
    ServedModel,
    ServeOptions,
    ServingContext,
    Stage,
    StoreFactory,
    TensorSpec,
)
from core.version import __version__
from core.wire.safe_pickle import dumps as pickle_dumps
from core.wire.safe_pickle import restricted_loads


def get_model_directory(key: str) -> str:
    """The local modeldir of experiment ``key`` in the embedded store, created if missing.

    Training scripts save their checkpoints here; ``studio-plug serve KEY`` finds them.
    """
    validate_key(key)
    path = Path(studio_home()) / "experiments" / key / "modeldir"
    path.mkdir(parents=True, exist_ok=True)
    return str(path)


__all__ = [
    "Backend",
    "BackendError",
    "BadRequest",
    "ClientGone",
    "Codec",
    "ConfigurationError",
    "CreateModel",
    "ErrorReply",
    "ExperimentError",
    "ExperimentInfo",
    "ExperimentStore",
    "FileInfo",
    "LaunchContext",
    "Listener",
    "LoadError",
    "LoadOptions",
    "Loader",
    "MissingDependencyError",
    "ModelError",
    "ModelFn",
    "ModelReply",
    "ModelSpec",
    "ModelState",
    "NotFound",
    "OpenListener",
    "Overloaded",
    "Payload",
    "PayloadTooLarge",
    "Reply",
    "RequestTimeout",
    "RouteFactory",
    "ServeOptions",
    "ServedModel",
    "ServingContext",
    "Stage",
    "StoreError",
    "StoreFactory",
    "StudioError",
    "TensorSpec",
    "UnknownExperiment",
    "__version__",
    "bind_socket",
    "decode_off_loop",
    "error_reply",
    "failed_headers",
    "get_model_directory",
    "hookimpl",
    "pickle_dumps",
    "read_body",
    "restricted_loads",
    "serve_argv",
    "serve_environment",
    "studio_home",
    "validate_key",
]

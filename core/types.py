"""The types a plugin implements or receives. Re-exported by ``studio_plugins``.

A *model* is any callable ``dict -> dict`` (sync or async). Everything else here describes how
such a model is found (loaders, stores), how it talks (codecs) and where it runs (backends).
The serve options (``ServeOptions``, ``ModelSpec``) sit beside the declarations of their flags,
in core/serve_options.py, and are named here too.
"""

from __future__ import annotations

import fnmatch
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable, Iterable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol

from core.serve_options import ModelSpec as ModelSpec
from core.serve_options import ServeOptions as ServeOptions

if TYPE_CHECKING:
    import click

Payload = dict[str, Any]
"""What a request decodes to and what a model returns: named arrays (or plain values)."""

ModelFn = Callable[[Payload], Payload | Awaitable[Payload]]
"""A servable model: takes the request's dict, returns a dict (sync or async)."""

CreateModel = Callable[[str], ModelFn]
"""A wrapper's ``create_model(modeldir)``."""


class Reply(dict[Any, Any]):
    """A model's reply that names the keys it failed on: their values are ``None``, and
    ``failed`` lists them in input order, so a failure can be told from a model that answered
    ``None``.

    ``ModelPipe`` answers one for a dict; any model may. The server names the failed keys in
    the reply's ``X-Studio-Failed-Keys`` header (core/http/failed_keys.py), and the client's
    ``predict`` returns one with them. ``failed_count`` is ``len(failed)``, or more in a
    client's when the server left keys off that header (more than 4 KiB of them)."""

    __slots__ = ("failed", "failed_count")

    def __init__(self, items: Any = (), failed: Iterable[Any] = (), failed_count: int | None = None) -> None:
        super().__init__(items)
        self.failed: tuple[Any, ...] = tuple(failed)
        self.failed_count: int = len(self.failed) if failed_count is None else failed_count


class ModelReply(NamedTuple):
    """What running a model for a request gives: its reply and the rows of the model call
    that produced it (several requests' rows when they were batched together; the batch size
    the access log and metrics show). A tuple, so ``reply, rows = ...`` still reads it."""

    payload: Payload
    rows: int


# --- models -------------------------------------------------------------------------------


@dataclass(frozen=True)
class TensorSpec:
    """One named input or output, as far as the framework knows it (-1: unknown / batch axis)."""

    name: str
    datatype: str = "UNKNOWN"
    shape: tuple[int, ...] = (-1,)


@dataclass
class ServedModel:
    """A model ready to serve, with what is known about where it came from."""

    predict: ModelFn
    """The seed's contract (``POST /``): each request key answered under the same key."""
    platform: str
    """The loader (or ``wrapper``) that produced it: ``identity``, ``keras``, ``torch``, ..."""
    checkpoint: Path | None = None
    inputs: tuple[TensorSpec, ...] = ()
    outputs: tuple[TensorSpec, ...] = ()
    batchable: bool = True
    """Whether concurrent requests may be stacked into one call (batching is on by default):
    False when the model must see each request on its own. A loader's model is batched unless
    it says otherwise; a wrapper's only when its callable has ``batchable = True``."""
    concurrency: int | None = None
    """Calls at once at most (None: ``--threads``), for a model that must not run concurrently.
    (The Keras and torch loaders leave it unset: measured on the Keras MLP at 16 connections,
    one call at a time gave 1,079 req/s against 1,498 with four.)"""
    predict_named: ModelFn | None = None
    """The same model for protocols whose tensors have names (V2): the request's keys are the
    model's input names, the reply's its output names. None: ``predict`` serves both."""
    compiler: Callable[[], ServedModel] | None = None
    """Builds a faster version of this model (the Keras and torch loaders: a traced, frozen
    graph), already checked to answer as this one does; it raises, saying why, when it cannot.
    Core calls it in the background once this model serves and swaps the result into its slot
    (core/models/compiling.py; ``--no-compile``: never). None: nothing to compile."""
    compiled: str | None = None
    """How this model was compiled (for the log); None: it runs as loaded."""
    call_times: tuple[tuple[int, float], ...] = ()
    """``(input elements, seconds)`` of calls its loader timed, for a model whose call time
    depends on its inputs' shapes alone (a traced, frozen graph): the data plane runs calls no
    larger than a measured one that was quick on the event loop itself (core/dataplane/inline.py).
    (): every call runs in the thread pool."""


@dataclass(frozen=True)
class LoadOptions:
    """What the user said about loading, passed to every loader."""

    trust_checkpoint: bool = False
    """Allow deserialisation that can run code stored in the checkpoint (Keras Lambda, pickles)."""
    gpus: int = 0


class Loader(ABC):
    """Recognises checkpoint files of one framework and loads one into a model.

    Subclasses set ``name`` and ``patterns`` (shell globs matched against file names) and
    implement ``load``. ``extra`` names the pip extra that installs the framework.
    """

    name: str = ""
    patterns: tuple[str, ...] = ()
    extra: str | None = None

    def recognises(self, path: Path) -> bool:
        return any(fnmatch.fnmatch(path.name, pattern) for pattern in self.patterns)

    def describe(self, path: Path) -> str | None:
        """What ``path`` is when it is this framework's file but not a model this loader serves
        (weights saved without the model's code, say), e.g. ``"Keras weights"``: named when a
        modeldir holds nothing to serve, so the error says what was found. None: not such a
        file. Decide from names and headers; never run anything from the file."""
        return None

    @abstractmethod
    def load(self, checkpoint: Path | None, options: LoadOptions) -> ServedModel:
        """Load ``checkpoint`` (None only for loaders with no patterns, like identity)."""


# --- experiment stores --------------------------------------------------------------------


@dataclass(frozen=True)
class FileInfo:
    """A file in a modeldir, as a store sees it (remote stores need not download to list)."""

    name: str
    size: int
    mtime: datetime


@dataclass(frozen=True)
class ExperimentInfo:
    key: str
    files: tuple[FileInfo, ...]


class ExperimentStore(ABC):
    """Where experiments' modeldirs live. One instance per store URL."""

    url: str

    @abstractmethod
    def modeldir(self, key: str) -> Path:
        """A local directory holding the experiment's modeldir, fetched or refreshed if remote.

        Raises ``ExperimentError`` when the experiment does not exist.
        """

    @abstractmethod
    def experiments(self) -> list[ExperimentInfo]:
        """Every experiment in the store with the files of its modeldir."""

    @abstractmethod
    def push(self, key: str, source: Path) -> int:
        """Copy the files of the directory ``source`` (or the one file ``source``) into the
        experiment's modeldir; returns the file count."""

    def fingerprint(self, key: str) -> str:
        """A cheap token that changes when the modeldir changes (mtimes, ETags): for reloads."""
        info = [i for i in self.experiments() if i.key == key]
        files = info[0].files if info else ()
        return ";".join(f"{f.name}:{f.size}:{f.mtime.timestamp()}" for f in files)


StoreFactory = Callable[[str], ExperimentStore]
"""Builds a store from its URL (``file:///path``, ``s3://bucket/prefix``)."""


# --- codecs -------------------------------------------------------------------------------


class Codec(ABC):
    """A wire format for ``POST /``: bytes <-> dict of named values."""

    name: str = ""
    media_types: tuple[str, ...] = ()
    """The first is the one replies are labelled with."""

    def sniff(self, head: bytes) -> bool:
        """Whether a body that starts with ``head`` is in this format (no Content-Type given)."""
        return False

    @abstractmethod
    def decode(self, body: bytes, limit: int) -> Payload:
        """Decode a request body; raise ``BadRequest`` with a clear message when it is not valid.

        ``limit`` bounds the bytes the decoded values may hold (the server's ``--max-body``): a
        body that would decode to more (a compressed or self-referencing one) is
        ``PayloadTooLarge``, refused before the memory is allocated."""

    @abstractmethod
    def encode(self, payload: Payload) -> bytes:
        """Encode a model's reply."""

    @property
    def media_type(self) -> str:
        return self.media_types[0]


# --- serving ------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelState:
    """What a server knows about one of its models, for metadata and repository routes."""

    name: str
    key: str
    state: str
    """``ready``, ``loading``, ``failed`` or ``unloaded``."""
    model: ServedModel | None = None
    error: str | None = None

    @property
    def ready(self) -> bool:
        return self.state == "ready" and self.model is not None


class ServingContext(Protocol):
    """What route plugins (``studio_register_routes``) get: the models and the data plane."""

    server_name: str
    version: str
    default_model: str
    max_body: int
    """The largest request body the server takes (``--max-body``): read no more than this."""

    def model_names(self) -> list[str]: ...

    def read_body(self, receive: Any, declared: bytes | None) -> Awaitable[bytes]:
        """Await the request's whole body, given the ASGI ``receive`` and the ``Content-Length``
        header (None when absent), under the server's limits: 413 past ``--max-body``, 503 when
        the server's body budget is spent (before reading), 408 when the body does not start
        within ``--read-timeout`` or falls below ``--min-rate``. ``ClientGone`` when the client
        disconnects. Use it rather than ``read_body(receive, declared, max_body)``."""
        ...

    def state(self, name: str) -> ModelState:
        """The model's state; raises ``NotFound`` for a name the server does not have."""
        ...

    async def infer(self, name: str, payload: Payload, receive: Any = None, *, named: bool = False
                    ) -> ModelReply:
        """Run model ``name`` on the data plane (queue, deadline, batching, metrics apply):
        its reply and the rows of the call that produced it. Raises ``StudioError``s. Given the
        request's ASGI ``receive``, a client that disconnects meanwhile cancels the request and
        ``ClientGone`` is raised (answer nothing: no one is listening). ``named``: the payload's
        keys are the model's input names and the reply is keyed by its output names
        (``ServedModel.predict_named``), rather than the seed's key-for-key contract."""
        ...

    async def load(self, name: str, key: str | None = None, checkpoint: str | None = None) -> ModelState:
        """(Re)load ``name`` now, optionally from another experiment key or checkpoint; the
        new model is primed, then swapped in atomically (requests in flight finish on the old)."""
        ...

    async def unload(self, name: str) -> ModelState: ...

    def record(self, scope: Any, model: str, rows: int | None = None, *, status: int | None = None) -> None:
        """Tell the access log and metrics which model (and batch size) a request used;
        ``status=499`` for a request answered nothing because its client went away
        (``ClientGone``)."""
        ...

    # For protocols served beside the HTTP app (gRPC): what the app's edge does for its routes.

    def authorized(self, authorization: bytes | str | None) -> bool:
        """Whether a request with this ``Authorization`` value (``Bearer <token>``; None when it
        sent none) passes ``--token``; always True when the server has no token."""
        ...

    def ready(self) -> bool:
        """Whether the server is ready, as ``GET /v2/health/ready`` answers: started, not
        draining, and some model ready."""
        ...

    def counted(self, route: str) -> AbstractContextManager[Any]:
        """Count a request as the HTTP app counts its own (in flight for ``--killafter`` and
        draining; metrics labelled ``route``); yields the ``scope`` that ``record`` takes, whose
        status is 500 until ``record`` gives another."""
        ...


RouteFactory = Callable[[ServingContext], Sequence[Any]]
"""Builds Starlette routes (``starlette.routing.Route``) for a server's ``ServingContext``."""


# --- listeners: protocols on ports of their own ---------------------------------------------

class OpenListener(ABC):
    """A listener whose port is reserved (``Listener.reserve``): started in each serving process.

    Under ``--workers N`` the launching process reserves, then forks: every worker starts its own
    copy on its own event loop (after the fork: a library like gRPC must not run before one)
    and all of them share the one port."""

    description: str = ""
    """Its start-up line: what it serves and where clients connect, e.g. ``V2 over gRPC on
    127.0.0.1:50051``; printed before the ``Serving ... on URL`` line."""

    @abstractmethod
    async def start(self, context: ServingContext) -> None:
        """Start serving on the running event loop, for the server's models in ``context`` (the
        app's own: one data plane for both protocols); return once clients can connect. Wrap
        each call in ``context.counted(...)`` so ``--killafter``, a drain and the metrics see it."""

    @abstractmethod
    async def stop(self, grace: float) -> None:
        """Stop accepting at once and let calls in flight finish for up to ``grace`` seconds
        (then cancel them). Called when the HTTP server stops accepting: on SIGTERM, a
        shutdown request or ``--killafter``."""

    def wait_started(self, timeout: float) -> None:  # noqa: B027 (optional)
        """In the launching process under ``--workers``, after the fork and before the
        ``Serving`` line: return once some worker serves (at most ``timeout`` seconds), so a
        client that read the line can connect. HTTP needs no wait: its socket listens from the
        parent on."""

    def release(self) -> None:  # noqa: B027 (optional: most hold nothing but a socket)
        """In the launching process, when the server exits: let go of what ``reserve`` held."""


class Listener(ABC):
    """A protocol served on a port of its own beside HTTP (``studio_register_listeners``)."""

    name: str = ""

    @abstractmethod
    def reserve(self, options: ServeOptions) -> OpenListener | None:
        """None when the options do not ask for this listener. Else, in the launching process
        and before any model loads (so a mistake costs no load): check what it needs (its
        extra, its port, certificate files), raising ``ConfigurationError``, and hold its port
        (``--grpc-port 0``: pick it here, so every worker binds the same one). Runs before
        workers fork: start no thread, and import nothing that starts one."""


# --- backends -----------------------------------------------------------------------------

class LaunchContext(Protocol):
    """What the host hands a backend: the options, and the means to serve here."""

    options: ServeOptions

    def serve_here(self) -> int:
        """Assemble the model and serve it in this process until shutdown; the exit status."""
        ...

    def serve_argv(self, options: ServeOptions | None = None) -> list[str]:
        """The ``studio-plug serve ...`` command line equivalent to these options, or to
        ``options``: a backend that serves something else elsewhere (another ``--host``, the
        wrapper's path there) passes ``dataclasses.replace(context.options, ...)``."""
        ...


class Backend(ABC):
    """Where a server runs (``--cloud NAME``)."""

    name: str = ""
    help: str = ""

    def cli_options(self) -> Sequence[click.Option]:
        """Extra ``serve`` options this backend understands (values land in backend_options)."""
        return ()

    @abstractmethod
    def launch(self, context: LaunchContext) -> int:
        """Start serving; return the process exit status."""


# --- stages and wrappers ------------------------------------------------------------------

Stage = Callable[..., Any]
"""A named pipeline stage: a callable applied per item (or per batch)."""
